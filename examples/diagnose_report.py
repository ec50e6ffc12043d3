"""From a fresh monitored run to a diagnosis report you can open offline.

    python examples/diagnose_report.py                                # tiny-random model, seconds
    python examples/diagnose_report.py --model smollm2 --out smollm2-report.html
    python examples/diagnose_report.py --model smollm2 --policy "threshold:jsd_instability.instability>=0.3"

Runs each question twice with the same seed (`RunConfig(compare=True)`, the library form of `run --compare`):
once under the policy and once unmonitored, which records the unmonitored run in each trace (`meta["compare"]`,
so the report shows the tokens saved and whether halting changed the answer), writes the traces
(JSON Lines) and renders the HTML report: one trace's diagnosis for one question, a batch report for
several. `overthink diagnose TRACES.jsonl --out report.html` renders the same report from any trace file.
"""

import argparse
from pathlib import Path

from monitor.config import RunConfig
from monitor.models import load_model
from monitor.report import render_report, render_text
from monitor.run import run_problems
from monitor.trace import write_traces

QUESTIONS = [
    {"id": "muffins", "question": "A baker makes 12 muffins per tray and bakes 7 trays. She sells 60 muffins. "
                                  "How many muffins are left?", "answer": "24"},
    {"id": "pens", "question": "A pen costs $3 and a book costs $12. What do 2 pens and a book cost?",
     "answer": "18"},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-random", help="tiny-random (default) | smollm2 | qwen-coder-0.5b | ...")
    ap.add_argument("--policy", default="observe", help="as in `overthink run --policy` (default: --halt-after)")
    ap.add_argument("--halt-after", type=int, default=48, help="fixed budget policy when --policy is observe")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--questions", type=int, default=len(QUESTIONS), help="how many of the built-in questions")
    ap.add_argument("--trace", default="out/diagnose-example.jsonl")
    ap.add_argument("--out", default="out/diagnose-example.html")
    args = ap.parse_args()

    lm = load_model(args.model)
    problems = QUESTIONS[: args.questions]
    base = dict(max_new_tokens=args.max_new_tokens, answer_max_tokens=24, block_tokens=32, seed=0)
    halt_after = args.halt_after if args.policy == "observe" else None
    # compare=True: each question also runs unmonitored on the same seed (meta["compare"], the tokens saved)
    traces = run_problems(lm, problems, RunConfig(policy=args.policy, halt_after=halt_after, compare=True, **base))

    write_traces(args.trace, traces)
    out = render_report(traces, args.out)
    render_text(traces)  # the terminal view of the same traces (`overthink diagnose --format text`)
    print(f"traces: {args.trace}\nreport: {Path(out).resolve()}  (open it in a browser; works offline)")


if __name__ == "__main__":
    main()
