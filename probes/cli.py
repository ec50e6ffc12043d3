"""`overthink collect | train | calibrate`: thin commands over `probes.collect` and `probes.pipeline`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def add_commands(sub: Any, positive_int: Callable[[str], int]) -> dict[str, Callable[[argparse.Namespace], int]]:
    from monitor.cli_args import (
        add_model_args,
        add_task_args,
        add_vllm_engine_args,
        gates_arg,
        layers_arg,
        logprobs_arg,
        nonnegative_int,
    )
    from probes.data import TARGETS

    c = sub.add_parser("collect", help="roll out problems and label every decision point by a forced exit")
    add_model_args(c)
    c.add_argument("--data", required=True, help="JSONL problems (id, question, answer)")
    c.add_argument("--limit", type=positive_int)
    c.add_argument("--offset", type=nonnegative_int, default=0, help="skip the first N problems of --data")
    c.add_argument("--out", required=True, help="output directory (resumable)")
    c.add_argument("--max-new-tokens", type=positive_int, default=384)
    add_task_args(c, answer_max_default=32)
    c.add_argument("--batch-size", type=positive_int, default=4)
    c.add_argument("--layers", type=layers_arg, help="decoder layers to hook (default ~L/4, L/2, 3L/4, last)")
    c.add_argument("--no-memory-check", action="store_true",
                   help="skip the check that the batch's KV cache fits in free memory")
    c.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf: transformers (default); vllm: vLLM's AsyncLLM, each forced exit a side request over the "
                        "prefix cache, --batch-size problems in flight (the engine you serve with)")
    c.add_argument("--logprobs", type=logprobs_arg, default="full",
                   help="vllm: top-k log-probabilities the signals see, or 'full' (default full: the HF collector's "
                        "features; a probe sees the same at run time only with the same setting)")
    add_vllm_engine_args(c)
    c.add_argument("--json", action="store_true")

    t = sub.add_parser("train", help="train the probe (grouped CV report, then fit) into a bundle")
    t.add_argument("data_dir", nargs="?", help="collect directory (or give --from-log)")
    t.add_argument("--from-log", metavar="FILE",
                   help="train on an overthink.log/1 file (trial answers logged by any serving stack) instead of a "
                        "collect directory: the probe reads the signals the log carries, no hidden states")
    t.add_argument("--out", required=True, help="bundle file to write, e.g. probe.joblib")
    t.add_argument("--probe", choices=["logreg", "mlp"], default="logreg")
    t.add_argument("--signals-only", action="store_true", help="no hidden-state features")
    t.add_argument("--calib-fraction", type=float, default=0.3,
                   help="fraction of problems held out for calibration (default 0.3)")
    t.add_argument("--folds", type=positive_int, default=5)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--target", choices=TARGETS, default="correct",
                   help="what the probe predicts at a decision point: 'correct' (default, LYNX: the forced answer is "
                        "right) or 'safe' (stopping loses nothing against the full run: the forced answer is right "
                        "or the full answer is wrong, the complement of the premature exit calibrate bounds)")
    t.add_argument("--cascade", action="store_true",
                   help="also train the trial probe (signals + trial answer features) and the gates of the cascade: "
                        "a trial answer is decoded only where the free probe passes the gate (calibrate chooses "
                        "gate and threshold together)")
    t.add_argument("--json", action="store_true")

    k = sub.add_parser("calibrate", help="conformally calibrate a bundle's halting rule")
    k.add_argument("bundle")
    k.add_argument("--data", help="collect directory (problems not used in training are used)")
    k.add_argument("--from-log", metavar="FILE", help="calibrate on an overthink.log/1 file instead of --data")
    k.add_argument("--delta", type=float, required=True, help="risk level, e.g. 0.1")
    k.add_argument("--epsilon", type=float, default=0.1, help="1 - confidence of the per-trace guarantee")
    k.add_argument("--mode", choices=["per-trace", "per-cue"], default="per-trace")
    k.add_argument("--risk", choices=["premature", "halted_wrong"], default="premature")
    k.add_argument("--out", help="write the calibrated bundle here (default: update BUNDLE in place)")
    k.add_argument("--gates", type=gates_arg,
                   help="cascade bundles: exactly these free-probe gates to choose from, comma-separated (default: "
                        "the ones train chose from the training scores plus 'none', no trial: the signals-only "
                        "probe; 0 = a trial at every decision point the free probe does not halt at, the trial "
                        "probe alone)")
    k.add_argument("--json", action="store_true")

    e = sub.add_parser("evaluate", help="replay calibrated bundles on a held-out collection: accuracy, risk, tokens")
    e.add_argument("bundles", nargs="+", help="calibrated bundle files")
    e.add_argument("--data", help="collect directory of held-out problems (e.g. GSM8K test)")
    e.add_argument("--from-log", metavar="FILE", help="replay on an overthink.log/1 file of held-out traces instead")
    e.add_argument("--deer", default="0.95",
                   help="also replay DEER's rule at these trial confidences, comma-separated (default 0.95; a strict "
                        "one such as 0.9999 shows DEER at a calibrated rule's accuracy; 0 to skip)")
    e.add_argument("--certaindex", type=int, default=3, metavar="K",
                   help="also replay certaindex: halt when the last K trial answers agree (default 3; 0 to skip)")
    e.add_argument("--budgets", help="fixed reasoning budgets to replay, comma-separated (default: half and three "
                                     "quarters of the collection's max_new_tokens; 'none' to skip)")
    e.add_argument("--plot", help="also write the Pareto plot (net tokens saved vs accuracy) to this HTML file")
    e.add_argument("--markdown", help="also write the table as Markdown to this file")
    e.add_argument("--check-run", metavar="TRACES",
                   help="compare the first bundle's replay with real `overthink run --policy BUNDLE` traces")
    e.add_argument("--json", action="store_true")
    return {"collect": cmd_collect, "train": cmd_train, "calibrate": cmd_calibrate, "evaluate": cmd_evaluate}


def cmd_collect(args: argparse.Namespace) -> int:
    from monitor.cli_args import check_bounds_from_args, load_from_args
    from monitor.config import RunConfig
    from monitor.io import directory_lock
    from monitor.problems import kind_for_dataset, load_problems
    from probes.collect import check_collect_out, collect

    check_collect_out(args.out, args.data)  # not the --data file, writable, a readable manifest: before the model
    problems = load_problems(args.data)
    problems = problems[args.offset:]
    if args.limit:
        problems = problems[:args.limit]
    if not problems:
        raise ValueError(f"no problems selected from {args.data} (offset {args.offset}, limit {args.limit})")
    kind = args.answer_kind or kind_for_dataset(args.data)
    cfg = RunConfig(max_new_tokens=args.max_new_tokens, answer_max_tokens=args.answer_max_tokens,
                    batch_size=args.batch_size, layers=args.layers, answer_kind=kind, system=args.system,
                    exit_cue=args.exit_cue, device=args.device, dtype=args.dtype, backend=args.backend,
                    vllm_logprobs=args.logprobs, tensor_parallel_size=args.tensor_parallel_size,
                    gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                    enforce_eager=args.enforce_eager)
    cfg.validate()
    check_bounds_from_args(args, cfg.max_new_tokens, cfg.answer_budget(cfg.answer_kind), min(cfg.batch_size,
                                                                                               len(problems)),
                           memory=args.backend == "hf")
    with directory_lock(args.out, "--out"):  # one collect per directory; taken before the model loads
        lm = load_from_args(args, weights=args.backend == "hf")
        done = [0]
        try:
            with Progress(TextColumn("[bold]collecting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=err_console, disable=args.json) as bar:
                task = bar.add_task("collect", total=len(problems))

                def advance(n: int) -> None:
                    done[0] += n
                    bar.advance(task, n)

                res = collect(lm, problems, args.out, cfg, kind=cfg.answer_kind, on_batch=advance)
        except KeyboardInterrupt:
            err_console.print(f"interrupted: {args.out} holds the {done[0]} problem(s) finished in this run (each "
                              "batch is written whole); run the same command again to resume", soft_wrap=True,
                              markup=False, highlight=False)
            return 130
    out = {"out_dir": str(res.out_dir), "problems_done": res.problems_done, "problems_skipped": res.problems_skipped,
           "events": res.events, "positive_rate": res.positive_rate}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        console.print(f"collected {res.events} decision points from {res.problems_done} problems "
                      f"({res.problems_skipped} already done) into [bold]{res.out_dir}[/bold]; "
                      f"forced exits correct: {res.positive_rate if res.positive_rate is None else round(res.positive_rate, 3)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from probes.pipeline import train_bundle
    from probes.train import fmt_metric

    source, from_log = _source(args.data_dir, args.from_log, "DATA_DIR")
    _, rep = train_bundle(source, args.out, kind=args.probe, use_hidden=not args.signals_only,
                          calib_fraction=args.calib_fraction, folds=args.folds, seed=args.seed, cascade=args.cascade,
                          from_log=from_log, target=args.target)
    if args.json:
        print(json.dumps({k: v for k, v in rep.items() if k != "train_ids"}, indent=2))
        return 0
    table = Table(title=f"grouped {rep['folds']}-fold validation on {rep['n_events']} decision points from "
                        f"{rep['n_problems']} problems (target {rep['target']}, positive rate "
                        f"{rep['positive_rate']:.3f})")
    table.add_column("score")
    table.add_column("AUROC", justify="right")
    table.add_column("Brier", justify="right")
    table.add_row(f"probe ({rep['kind']}{', signals only' if not rep['use_hidden'] else ''})",
                  fmt_metric(rep["probe"]["auroc"]), fmt_metric(rep["probe"]["brier"]))
    if "trial_probe" in rep:
        table.add_row(f"trial probe (signals + trial answer; cascade gates {rep['gates']})",
                      fmt_metric(rep["trial_probe"]["auroc"]), fmt_metric(rep["trial_probe"]["brier"]))
    for name, m in rep["baselines"].items():
        table.add_row(name, fmt_metric(m["auroc"]), fmt_metric(m["brier"]))
    console.print(table)
    console.print("single signals are scored as-is: an AUROC well below 0.5 means the signal predicts a correct "
                  "stop in reverse (e.g. low entropy = safe to stop); the probe learns either direction.")
    console.print(f"bundle written to [bold]{args.out}[/bold] (not calibrated yet: run `overthink calibrate`)")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from probes.pipeline import calibrate_bundle

    source, from_log = _source(args.data, args.from_log, "--data")
    b = calibrate_bundle(args.bundle, source, delta=args.delta, epsilon=args.epsilon, mode=args.mode,
                         risk=args.risk, out=args.out, gates=args.gates, from_log=from_log)
    info = b.calibration_info
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    console.print(info["guarantee"], markup=False)
    sel = info.get("gate_selection") or {}
    if sel.get("tried"):
        gave = ", ".join(f"{'none' if t['gate'] is None else format(t['gate'], '.4g')}: "
                         + (f"{t['net_tokens_saved_per_trace']:+.1f}" if t["certified"] else "nothing certified")
                         for t in sel["tried"])
        console.print(f"gates: {sel['how']}; net tokens saved per training trace by gate: {gave}", markup=False)
    if "threshold" in info:
        console.print(f"threshold lambda = {info['threshold']:.4f} on {info['n_traces']} calibration traces")
    console.print(f"calibrated bundle written to [bold]{args.out or args.bundle}[/bold]")
    return 0


def _source(data: str | None, log: str | None, flag: str) -> tuple[str, bool]:
    """The data a command reads: a collect directory (`flag`) or an overthink.log/1 file (--from-log), exactly one."""
    if (data is None) == (log is None):
        raise ValueError(f"give the data as {flag} (a collect directory) or --from-log FILE (an overthink.log/1 "
                         "file), exactly one of them")
    return (log, True) if log is not None else (data, False)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from monitor.io import atomic_write_text, check_output
    from probes.evaluate import evaluate, markdown_table

    deer = _deer(args.deer)
    if args.certaindex < 0:
        raise ValueError(f"--certaindex must be K >= 1 agreeing answers (0 skips the baseline), got {args.certaindex}")
    budgets = _budgets(args.budgets)
    source, from_log = _source(args.data, args.from_log, "--data")
    if from_log and args.check_run:
        raise ValueError("--check-run compares a replay with real runs on a collect directory; give --data")
    if args.plot:
        check_output(args.plot, "--plot", inputs={"BUNDLES": args.bundles, "--data": source,
                                                  "--check-run": args.check_run})
    if args.markdown:  # before any work: not over a bundle, the data (or a shard) or the traces; writable
        check_output(args.markdown, "--markdown", inputs={"BUNDLES": args.bundles, "--data": source,
                                                          "--check-run": args.check_run})
    if args.check_run:
        from probes.evaluate import check_replay

        chk = check_replay(args.bundles[0], args.data, args.check_run)
        if args.json:
            print(json.dumps(chk, indent=2))
        else:
            console.print(f"replay vs run on {chk['n']} problems: halted agree {chk['agree']['halted']}, "
                          f"answer agree {chk['agree']['answer']}, correctness agree {chk['agree']['correct']}, "
                          f"token counts equal {chk['exact_tokens']}")
            for r in chk["rows"]:
                if r["answer"][0] != r["answer"][1] or r["token_diff"] or r["halted"][0] != r["halted"][1]:
                    console.print(f"  {r['id']}: run/replay halted {r['halted']}, answer {r['answer']}, "
                                  f"token diff {r['token_diff']}", markup=False)
        return 0
    res = evaluate(args.bundles, source, deer=deer, certaindex=args.certaindex or None,
                   budgets=budgets, from_log=from_log)
    md = markdown_table(res)
    if args.markdown:
        atomic_write_text(args.markdown, md + "\n")
    if args.plot:
        from probes.evaluate import pareto_html

        atomic_write_text(args.plot, pareto_html(res))
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    table = Table(title=f"replay on {res['n']} held-out problems from {res['data_dir']} ({res['model']})")
    for col in ("policy", "delta", "accuracy", "exit rate", "premature risk (95% up)", "halted wrong",
                "mean tokens", "trial tokens", "net saved"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for r in res["rows"]:
        table.add_row(r["policy"], "-" if r["delta"] is None else f"{r['delta']:g}", f"{r['accuracy']:.3f}",
                      f"{r['exit_rate']:.3f}", f"{r['premature_risk']:.3f} ({r['premature_risk_upper95']:.3f})",
                      f"{r['halted_wrong_rate']:.3f}", f"{r['mean_tokens']:.1f}", f"{r['trial_tokens']:.1f}",
                      f"{100 * r['tokens_saved']:.1f}%")
    console.print(table)
    return 0


def _deer(text: str) -> list[float]:
    """--deer: the DEER confidences to replay ([] for '0')."""
    try:
        out = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or any(not 0.0 <= c <= 1.0 for c in out):
        raise ValueError(f"--deer must be trial confidences in [0, 1], comma-separated (0 skips the baseline), "
                         f"got {text!r}")
    return [c for c in out if c > 0]


def _budgets(text: str | None) -> list[int] | None:
    """--budgets: None (the defaults), [] ('none'), or the positive integers given."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return []
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or any(b < 1 for b in out):
        from monitor.errors import UsageError

        raise UsageError(f"--budgets must be positive token counts, comma-separated (e.g. 128,192), or 'none'; "
                         f"got {text!r}")
    return out
