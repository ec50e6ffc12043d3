"""The `overthink` command. Commands are thin: parse, call one library function, print.

  overthink run --model M --question Q [--policy P | --halt-after N] [--trace t.jsonl] [--json]
  overthink run --model M --data FILE.jsonl --limit N [--trace t.jsonl]
  overthink bench overhead --model M [--json]
  overthink diagnose TRACES.jsonl [--out report.html] [--index I | --id ID] [--format html|text]

Errors are one readable line on stderr and exit code 2 (bad usage or input); `--debug` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=False)
err_console = Console(stderr=True)


PROBE_HANDLERS: dict[str, Any] = {}  # collect / train / calibrate, registered by probes.cli


class UsageError(Exception):
    """Bad usage or input: printed as one line, exit code 2."""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers, got {text!r}") from None


def _logprobs(text: str) -> int | str:
    if text == "full":
        return text
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"--logprobs takes a positive integer or 'full', got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="overthink", description="Monitor a reasoning LLM and stop it when "
                                "more thinking will not change the answer.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="monitored generation for one question or a JSONL batch")
    r.add_argument("--model", required=True, help="smollm2 | qwen-coder-0.5b | tiny-random | path.gguf | dir | HF id")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--question", help="one question to answer")
    src.add_argument("--data", help="JSONL file with id, question, answer (see shared/data/README.md)")
    r.add_argument("--limit", type=_positive_int, help="first N problems of --data")
    r.add_argument("--gold", help="gold answer for --question (to grade it)")
    r.add_argument("--policy", default="observe",
                   help="observe | deer[:CONF] | threshold:FAMILY.KEY>=VALUE (default: observe)")
    r.add_argument("--halt-after", type=_positive_int, help="halt after N reasoning tokens (fixed budget)")
    r.add_argument("--max-new-tokens", type=_positive_int, default=512, help="reasoning token cap (default 512)")
    r.add_argument("--answer-max-tokens", type=_positive_int, default=48,
                   help="answer tokens allowed after the exit cue (default 48)")
    r.add_argument("--layers", type=_layers, help="decoder layers to hook, e.g. 3,6,9,11 (default ~L/4,L/2,3L/4,last)")
    r.add_argument("--block-tokens", type=_positive_int, default=64, help="latent-trajectory block size")
    r.add_argument("--embedder", choices=["hidden", "minilm"], default="hidden", help="redundancy embedder")
    r.add_argument("--batch-size", type=_positive_int, default=4)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    r.add_argument("--temperature", type=float)
    r.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf: transformers generate (default); vllm: vLLM engine (install the vllm extra)")
    r.add_argument("--logprobs", type=_logprobs, default=20,
                   help="vLLM: top-k log-probabilities per token fed to the signals, or 'full' (default 20)")
    r.add_argument("--no-hidden", action="store_true",
                   help="vLLM: no hidden-state taps (logprob signals only; no latent trajectory or probes on hidden)")
    r.add_argument("--force", choices=["auto", "processor", "resubmit"], default="auto",
                   help="vLLM: force the exit cue with the logits processor, or abort + resubmit (default auto)")
    r.add_argument("--trace", help="write traces to this JSON Lines file (atomically)")
    r.add_argument("--append", action="store_true", help="append to --trace instead of replacing it")
    r.add_argument("--json", action="store_true", help="print machine-readable JSON")

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    o = bsub.add_parser("overhead", help="tokens/s of plain vs monitored generation")
    o.add_argument("--model", required=True)
    o.add_argument("--data", help="JSONL questions (default: built-in questions)")
    o.add_argument("--new-tokens", type=_positive_int, default=64)
    o.add_argument("--batch-size", type=_positive_int, default=1)
    o.add_argument("--repeats", type=_positive_int, default=3)
    o.add_argument("--json", action="store_true")

    v = bsub.add_parser("vllm", help="vLLM throughput: N concurrent requests, plain vs monitored")
    v.add_argument("--model", required=True)
    v.add_argument("--data", help="JSONL questions (default: built-in questions)")
    v.add_argument("--requests", type=_positive_int, default=16, help="concurrent requests (default 16)")
    v.add_argument("--new-tokens", type=_positive_int, default=128)
    v.add_argument("--repeats", type=_positive_int, default=2)
    v.add_argument("--logprobs", type=_positive_int, default=20, help="top-k logprobs for the monitor (default 20)")
    v.add_argument("--json", action="store_true")

    d = sub.add_parser("diagnose", help="HTML report (or terminal summary) of one trace or a batch of traces")
    d.add_argument("traces", help="trace file (JSON Lines) written by `overthink run --trace`")
    d.add_argument("--out", help="HTML file to write (default: the trace file's name with .html)")
    pick = d.add_mutually_exclusive_group()
    pick.add_argument("--index", type=int, help="report only the trace at this 0-based position in the file")
    pick.add_argument("--id", help="report only the trace with this id")
    d.add_argument("--format", choices=["html", "text"], default="html",
                   help="html: self-contained report file (default); text: print to the terminal")
    from probes.cli import add_commands

    PROBE_HANDLERS.update(add_commands(sub, _positive_int))
    return p


def _load(spec: str) -> Any:
    from monitor.models import load_model

    with err_console.status(f"loading model {spec} ..."):
        return load_model(spec)


def cmd_run(args: argparse.Namespace) -> int:
    from monitor.answers import kind_for_dataset, load_problems
    from monitor.report import batch_summary
    from monitor.run import Progress as RunProgress
    from monitor.run import RunConfig, run_problems
    from monitor.trace import write_traces

    if args.limit and not args.data:
        raise UsageError("--limit only applies to --data")
    cfg = RunConfig(policy=args.policy, halt_after=args.halt_after, max_new_tokens=args.max_new_tokens,
                    answer_max_tokens=args.answer_max_tokens, layers=args.layers, block_tokens=args.block_tokens,
                    embedder=args.embedder, batch_size=args.batch_size, seed=args.seed, do_sample=args.sample,
                    temperature=args.temperature, backend=args.backend, vllm_hidden=not args.no_hidden,
                    vllm_logprobs=args.logprobs, vllm_force=args.force)
    if args.data:
        problems = load_problems(args.data, limit=args.limit)
        if not problems:
            raise UsageError(f"{args.data} has no problems")
        cfg.answer_kind = kind_for_dataset(args.data)
    else:
        if not args.question.strip():
            raise UsageError("--question is empty")
        problems = [{"id": "q0", "question": args.question, **({"answer": args.gold} if args.gold else {})}]
    cfg.validate()
    if args.trace:
        _check_writable(args.trace)
    lm = _load(args.model)

    if len(problems) > 1 and not args.json:
        with Progress(TextColumn("[bold]generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err_console) as bar:
            task = bar.add_task("run", total=len(problems))
            traces = run_problems(lm, problems, cfg, RunProgress(on_batch=lambda n: bar.advance(task, n)))
    else:
        traces = run_problems(lm, problems, cfg)
    if args.trace:
        write_traces(args.trace, traces, append=args.append)

    summary = batch_summary(traces)
    if args.json:
        out = {"summary": summary, "traces": [_brief(t) for t in traces]}
        if args.trace:
            out["trace_file"] = args.trace
        print(json.dumps(out, indent=2))
        return 0
    if len(traces) == 1:
        _print_one(traces[0])
    else:
        _print_summary(summary)
    if args.trace:
        console.print(f"trace written to [bold]{args.trace}[/bold]")
    return 0


def _check_writable(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise UsageError(f"--trace {path} is a directory; give a file name such as {path.rstrip('/')}/trace.jsonl")
    if os.path.exists(parent) and not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write --trace {path}: directory {parent} is not writable")


def _brief(t: Any) -> dict[str, Any]:
    return {"id": t.id, "answer": t.answer, "gold": t.gold, "correct": t.correct, "decision": t.decision,
            "accounting": t.accounting}


def _print_one(t: Any) -> None:
    console.rule(f"[bold]{t.model}[/bold]  {t.id}")
    reasoning = "".join(x for x, ph in zip(t.tokens["text"], t.tokens["phase"]) if ph == "reasoning")
    console.print("[dim]reasoning:[/dim]")
    console.print(reasoning.strip(), markup=False, highlight=False)
    console.print("[dim]after reasoning:[/dim]")
    console.print(t.answer_text.strip() or "(nothing)", markup=False, highlight=False)
    console.print(f"[bold]answer:[/bold] {t.answer!s}" + (f"   gold: {t.gold}  correct: {t.correct}"
                                                         if t.gold is not None else ""))
    why = ("halted: " if t.decision["halted"] else "not halted: ") + t.decision["reason"]
    console.print(f"[bold]stop:[/bold] {why}  [dim](policy {t.decision['policy']})[/dim]")
    table = Table(title="token accounting")
    for k in ("prompt", "reasoning", "answer", "probe", "forced"):
        table.add_column(k, justify="right")
    table.add_row(*(str(t.accounting[k]) for k in ("prompt", "reasoning", "answer", "probe", "forced")))
    console.print(table)
    if t.errors:
        console.print(f"[yellow]{len(t.errors)} signal error(s) (monitor failed open): "
                      f"{t.errors[0]['signal']}: {t.errors[0]['error']}[/yellow]")


def _print_summary(s: dict[str, Any]) -> None:
    table = Table(title=f"summary of {s['n']} traces")
    table.add_column("metric")
    table.add_column("value", justify="right")
    acc = s["accuracy"]
    table.add_row("accuracy", "n/a" if acc is None else f"{acc:.3f} ({s['graded']} graded)")
    table.add_row("halt rate", f"{s['halt_rate']:.3f}")
    for k, v in s["tokens"].items():
        table.add_row(f"mean {k} tokens", f"{v['mean']:.1f}")
    for k, v in s["stop_reasons"].items():
        table.add_row(f"stop: {k}", str(v))
    table.add_row("signal errors", str(s["signal_errors"]))
    console.print(table)


def cmd_bench(args: argparse.Namespace) -> int:
    from monitor.bench import bench_overhead

    lm = _load(args.model)
    if args.bench == "vllm":
        return _bench_vllm(args, lm)
    with err_console.status("benchmarking plain vs monitored generation ..."):
        res = bench_overhead(lm, args.data, new_tokens=args.new_tokens, batch_size=args.batch_size,
                             repeats=args.repeats)
    if args.json:
        print(json.dumps(asdict(res), indent=2))
        return 0
    table = Table(title=f"overhead on {res.model} (batch {res.batch_size}, {res.new_tokens} new tokens, "
                        f"median of {res.repeats})")
    table.add_column("run")
    table.add_column("tokens/s", justify="right")
    table.add_row("plain model.generate", f"{res.plain_tokens_per_s:.2f}")
    table.add_row(f"monitored (4 signal families, layers {res.layers})", f"{res.monitored_tokens_per_s:.2f}")
    table.add_row("throughput_ratio", f"{res.throughput_ratio:.4f}")
    console.print(table)
    return 0


def _bench_vllm(args: argparse.Namespace, lm: Any) -> int:
    from monitor.bench import bench_vllm
    from monitor.vllm import require_vllm

    require_vllm()
    with err_console.status("benchmarking plain vs monitored vLLM ..."):
        res = bench_vllm(lm, requests=args.requests, new_tokens=args.new_tokens, repeats=args.repeats,
                         logprobs=args.logprobs, data_path=args.data)
    if args.json:
        print(json.dumps(asdict(res), indent=2))
        return 0
    table = Table(title=f"vLLM throughput on {res.model}: {res.requests} concurrent requests x {res.new_tokens} "
                        f"tokens, median of {res.repeats}")
    table.add_column("run")
    table.add_column("tokens/s", justify="right")
    table.add_column("ratio", justify="right")
    table.add_row("plain LLM.generate", f"{res.plain_tokens_per_s:.2f}", "1")
    table.add_row(f"monitored, logprob signals (top-{res.logprobs})", f"{res.logprob_monitored_tokens_per_s:.2f}",
                  f"{res.logprob_ratio:.4f}")
    table.add_row(f"monitored, 4 families + hidden tap (layers {res.layers})",
                  f"{res.hidden_monitored_tokens_per_s:.2f}", f"{res.hidden_ratio:.4f}")
    console.print(table)
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from monitor.report import ReportWriteError, diagnose

    if args.format == "text" and args.out:
        raise UsageError("--out applies to --format html; --format text prints to the terminal")
    try:
        out = diagnose(args.traces, out=args.out, index=args.index, trace_id=args.id, fmt=args.format,
                       console=console)
    except ReportWriteError as e:  # the user's to fix (a path, a full disk): exit 2 like other bad input
        raise UsageError(e.strerror) from None
    if out is not None:
        console.print(f"report written to [bold]{escape(str(out))}[/bold]")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")  # GGUF de-quantisation bars; rich shows our own progress
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM logs INFO, and to stdout, which --json owns:
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # its log lines go to stderr instead
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a usage line on bad flags
    handlers = {"run": cmd_run, "bench": cmd_bench, "diagnose": cmd_diagnose, **PROBE_HANDLERS}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as e:  # one readable line, not a traceback
        if args.debug:
            raise
        from monitor.errors import is_user_error

        msg = str(e) or type(e).__name__
        err_console.print(f"[red]error:[/red] {escape(msg)}", markup=True, highlight=False, soft_wrap=True)
        if is_user_error(e):
            return 2
        err_console.print("[dim](unexpected error; run with --debug for the traceback)[/dim]")
        return 1


if __name__ == "__main__":
    sys.exit(main())
