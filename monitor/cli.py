"""The `overthink` command. Commands are thin: parse, call one library function, print.

  overthink run --model M --question Q [--policy P | --halt-after N] [--trace t.jsonl] [--json]
  overthink run --model M --data FILE.jsonl --limit N [--trace t.jsonl]
  overthink run --model M --messages chat.json --answer-kind text --device cuda --dtype bfloat16
  overthink bench overhead --model M [--json]
  overthink signals
  overthink diagnose TRACES.jsonl [--out report.html] [--index I | --id ID] [--format html|text]

Errors are one readable line on stderr and exit code 2 (bad usage or input); `--debug` shows tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from monitor.cli_args import (
    add_model_args,
    add_task_args,
    add_vllm_engine_args,
    check_bounds_from_args,
    fraction_arg,
    layers_arg,
    load_from_args,
    logprobs_arg,
    positive_int,
    seed_arg,
    temperature_arg,
)
from monitor.cli_output import TokenProgress, brief, print_comparison, print_one, print_summary
from monitor.errors import UsageError

console = Console(stderr=False)
err_console = Console(stderr=True)




def _int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return out


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("overthink")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="overthink", description="Monitor a reasoning LLM and stop it when "
                                "more thinking will not change the answer.")
    p.add_argument("--version", action="version", version=f"overthink {_version()}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="monitored generation for one question or a JSONL batch")
    add_model_args(r)
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--question", help="one question to answer")
    src.add_argument("--messages", metavar="FILE",
                     help="one chat to answer: a JSON file with a list of {role, content} messages")
    src.add_argument("--data", help="JSONL file with id, question (or messages), answer, optional answer_kind")
    r.add_argument("--limit", type=positive_int, help="first N problems of --data")
    r.add_argument("--gold", help="gold answer for --question (to grade it)")
    r.add_argument("--policy", default="observe",
                   help="observe | deer[:CONF] | certaindex[:K[:CONF]] | threshold:FAMILY.KEY>=VALUE | a probe bundle; "
                        "deer, certaindex and threshold take @KINDS, the decision points they act at: cue, step_end, "
                        "any, auto (cue words, and step ends while the model has written none; DEER's default), "
                        "e.g. deer:0.9@step_end (default: observe)")
    r.add_argument("--halt-after", type=positive_int, help="halt after N reasoning tokens (fixed budget)")
    r.add_argument("--max-new-tokens", type=positive_int, default=512, help="reasoning token cap (default 512)")
    add_task_args(r)
    r.add_argument("--layers", type=layers_arg, help="decoder layers to hook, e.g. 3,6,9,11 (default ~L/4,L/2,3L/4,last)")
    r.add_argument("--block-tokens", type=positive_int, default=64, help="latent-trajectory block size")
    r.add_argument("--embedder", choices=["hidden", "minilm"], default="hidden", help="redundancy embedder")
    r.add_argument("--batch-size", type=positive_int, default=4)
    r.add_argument("--seed", type=seed_arg, default=0, help="random seed, 0..2**32-1 (default 0)")
    r.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    r.add_argument("--temperature", type=temperature_arg, help="sampling temperature > 0 (with --sample; default 1.0)")
    r.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf: transformers generate (default); vllm: vLLM engine (install the vllm extra)")
    r.add_argument("--logprobs", type=logprobs_arg, default=20,
                   help="vLLM: top-k log-probabilities per token fed to the signals, or 'full' (default 20)")
    r.add_argument("--no-hidden", action="store_true",
                   help="vLLM: no hidden-state taps (logprob signals only; no latent trajectory or probes on hidden)")
    r.add_argument("--force", choices=["auto", "processor", "resubmit"], default="auto",
                   help="vLLM: force the exit cue with the logits processor, or abort + resubmit (default auto)")
    add_vllm_engine_args(r)
    r.add_argument("--no-memory-check", action="store_true",
                   help="skip the check that the batch's KV cache fits in free memory (HF backend)")
    r.add_argument("--compare", action="store_true",
                   help="also run every question unmonitored (same seed, same process) and show, per question, the "
                        "tokens saved, whether the answer changed, and the accuracy of both runs (costs a second run)")
    r.add_argument("--trace", help="write traces to this JSON Lines file (atomically)")
    r.add_argument("--append", action="store_true", help="append to --trace instead of replacing it")
    r.add_argument("--record", choices=["default", "full", "points", "none"], default="default",
                   help="trace recording level: default (the series the report draws, 4 significant digits; a 32k-"
                        "token trace stays under 4 MB), full (every signal key, float32, and the step-by-step "
                        "similarities the report's redundancy panel draws), points (signal values at decision "
                        "points only) or none (no signal values)")
    r.add_argument("--json", action="store_true", help="print machine-readable JSON")

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    o = bsub.add_parser("overhead", help="tokens/s of plain vs monitored generation")
    add_model_args(o)
    o.add_argument("--data", help="JSONL questions (default: built-in questions)")
    o.add_argument("--new-tokens", type=positive_int, default=64)
    o.add_argument("--batch-size", type=positive_int, default=1)
    o.add_argument("--repeats", type=positive_int, default=3)
    o.add_argument("--no-memory-check", action="store_true",
                   help="skip the check that the batch's KV cache fits in free memory")
    o.add_argument("--random-weights", action="store_true",
                   help="--model is a directory with config.json and tokenizer files only: build that architecture "
                        "with random weights (seed 0) on the device; it costs what the real model costs per token "
                        "(e.g. a 7B config on a GPU without downloading 15 GB)")
    o.add_argument("--json", action="store_true")

    v = bsub.add_parser("vllm", help="vLLM throughput: N concurrent requests, plain vs monitored")
    add_model_args(v)
    v.add_argument("--data", help="JSONL questions (default: built-in questions)")
    v.add_argument("--requests", type=positive_int, default=16, help="concurrent requests (default 16)")
    v.add_argument("--new-tokens", type=positive_int, default=128)
    v.add_argument("--repeats", type=positive_int, default=2)
    v.add_argument("--logprobs", type=positive_int, default=20, help="top-k logprobs for the monitor (default 20)")
    v.add_argument("--tensor-parallel-size", type=positive_int, default=1, help="vLLM: GPUs to shard the model over")
    v.add_argument("--gpu-memory-utilization", type=fraction_arg, help="vLLM: fraction of GPU memory for the engine")
    v.add_argument("--json", action="store_true")

    mb = bsub.add_parser("monitor", help="host time per token and memory of the monitor alone (synthetic steps)")
    mb.add_argument("--batch", type=_int_list, default=[1, 16, 64, 256], help="batch sizes (default 1,16,64,256)")
    mb.add_argument("--logprobs", type=logprobs_arg, default=20, help="top-k per token, or 'full' (default 20)")
    mb.add_argument("--vocab", type=positive_int, default=151_936, help="vocabulary size (default Qwen's 151936)")
    mb.add_argument("--tokens", type=positive_int, default=256, help="tokens per row for the timing (default 256)")
    mb.add_argument("--hidden-size", type=positive_int, default=896, help="hidden size of the tapped layers")
    mb.add_argument("--layers", type=positive_int, default=4, help="number of tapped layers (default 4)")
    mb.add_argument("--memory-tokens", type=_int_list, default=[1_000, 8_000, 32_000],
                    help="sequence lengths for the memory peak (default 1000,8000,32000)")
    mb.add_argument("--device", default="cpu", help="where the synthetic distributions and hidden states live, as a "
                    "model's would (cpu, cuda, cuda:N; default cpu); the monitor's ops run there")
    mb.add_argument("--probe", action="store_true",
                    help="the rows run a calibrated probe policy (a logistic probe on the hidden-state and signal "
                         "features of these sizes, fitted on random features; its threshold never halts), so each "
                         "decision point costs a probe call; default: observe")
    mb.add_argument("--json", action="store_true")
    sv = bsub.add_parser("serve", help="concurrent streaming clients against OpenAI-compatible servers you started "
                                       "(plain vllm serve, overthink serve --upstream, overthink serve)")
    sv.add_argument("--target", action="append", required=True, type=_target_arg,
                    help="NAME=URL@MODEL, repeatable, e.g. plain=http://127.0.0.1:8000/v1@Qwen/Qwen3-8B (a target "
                         "named 'plain' gets no overthink fields)")
    sv.add_argument("--clients", type=positive_int, default=8, help="concurrent streaming clients (default 8)")
    sv.add_argument("--requests", type=positive_int, default=32, help="requests per target (default 32)")
    sv.add_argument("--max-tokens", type=positive_int, default=64, help="max_tokens per request (default 64)")
    sv.add_argument("--json", action="store_true")

    d = sub.add_parser("diagnose", help="HTML report (or terminal summary) of one trace or a batch of traces")
    d.add_argument("traces", help="trace file (JSON Lines) written by `overthink run --trace`")
    d.add_argument("--out", help="HTML file to write (default: the trace file's name with .html)")
    pick = d.add_mutually_exclusive_group()
    pick.add_argument("--index", type=int, help="report only the trace at this 0-based position in the file")
    pick.add_argument("--id", help="report only the trace with this id")
    d.add_argument("--format", choices=["html", "text"], default="html",
                   help="html: self-contained report file (default); text: print to the terminal")
    sg = sub.add_parser("signals", help="list the signal families, their keys and what each means")
    sg.add_argument("--json", action="store_true")
    from probes.cli import add_commands
    from serve.cli import add_serve_command, cmd_serve

    add_serve_command(sub)
    handlers = {"run": cmd_run, "bench": cmd_bench, "diagnose": cmd_diagnose, "signals": cmd_signals,
                "serve": cmd_serve, **add_commands(sub, positive_int)}
    for name, handler in handlers.items():  # each command carries its handler (`args.handler`)
        sub.choices[name].set_defaults(handler=handler)
    return p


def cmd_run(args: argparse.Namespace) -> int:
    from monitor.config import RunConfig
    from monitor.tasks import problem_kind

    if args.limit and not args.data:
        raise UsageError("--limit only applies to --data")
    if args.temperature is not None and not args.sample:
        raise UsageError("--temperature applies to sampling: add --sample (greedy decoding has no temperature)")
    if args.gold is not None and not (args.question or args.messages):
        raise UsageError("--gold grades --question or --messages; a --data file carries its own answers")
    cfg = RunConfig(policy=args.policy, halt_after=args.halt_after, max_new_tokens=args.max_new_tokens,
                    answer_max_tokens=args.answer_max_tokens, layers=args.layers, block_tokens=args.block_tokens,
                    embedder=args.embedder, batch_size=args.batch_size, seed=args.seed, do_sample=args.sample,
                    temperature=args.temperature, backend=args.backend, vllm_hidden=not args.no_hidden,
                    vllm_logprobs=args.logprobs, vllm_force=args.force, system=args.system, exit_cue=args.exit_cue,
                    device=args.device, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
                    gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                    enforce_eager=args.enforce_eager, record=args.record, compare=args.compare)
    problems = problems_from_args(args, cfg)
    cfg.validate()
    check_bounds_from_args(args, cfg.max_new_tokens,
                           max(cfg.answer_budget(problem_kind(cfg.answer_kind, p)) for p in problems),
                           min(cfg.batch_size, len(problems)), memory=args.backend != "vllm")
    if not args.trace:
        return _run_and_print(args, load_from_args(args, weights=args.backend != "vllm"), cfg, problems, None)
    from monitor.config import is_bundle_spec
    from monitor.io import LineSink, check_output
    from monitor.trace import check_trace_file

    check_output(args.trace, "--trace", inputs={"--data": args.data, "--messages": args.messages,
                                                "--policy": args.policy if is_bundle_spec(args.policy) else None})
    sink = LineSink(args.trace, append=args.append, flag="--trace", validate=check_trace_file)
    sink.open()  # before the model loads: a locked, unwritable or broken --trace fails in a second, not an hour
    try:
        lm = load_from_args(args, weights=args.backend != "vllm")
        return _run_and_print(args, lm, cfg, problems, sink)
    except KeyboardInterrupt:
        sink.close()
        err_console.print(f"interrupted: {args.trace} holds the {sink.count} trace(s) finished before the interrupt"
                          + (" (appended)" if args.append else ""), soft_wrap=True, markup=False, highlight=False)
        return 130
    finally:
        sink.close()


def problems_from_args(args: argparse.Namespace, cfg: Any) -> list[dict[str, Any]]:
    """The problems of --data, --question or --messages; sets cfg.answer_kind from --answer-kind or the data."""
    from monitor.problems import kind_for_dataset, load_problems

    if args.data:
        problems = load_problems(args.data, limit=args.limit)
        if not problems:
            raise UsageError(f"{args.data} has no problems")
        cfg.answer_kind = args.answer_kind or kind_for_dataset(args.data)
        return problems
    cfg.answer_kind = args.answer_kind or "auto"
    gold = {"answer": args.gold} if args.gold is not None else {}
    if getattr(args, "messages", None):
        return [{"id": "q0", "messages": _read_messages(args.messages), **gold}]
    if not args.question.strip():
        raise UsageError("--question is empty")
    return [{"id": "q0", "question": args.question, **gold}]


def _read_messages(path: str) -> list[dict[str, str]]:
    from monitor.formats import validate_messages

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--messages {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--messages {path} cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"--messages {path} is not JSON ({e.msg} at line {e.lineno}); expected a list of "
                         '{"role": "user", "content": "..."} objects') from None
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    try:
        return validate_messages(data, where=f"--messages {path}")
    except ValueError as e:
        raise UsageError(str(e)) from None


def _run_and_print(args: argparse.Namespace, lm: Any, cfg: Any, problems: list[dict[str, Any]], sink: Any) -> int:
    from monitor.report import batch_summary
    from monitor.run import Progress as RunProgress
    from monitor.run import run_problems
    from monitor.trace import trace_line

    def write(ts: list[Any]) -> None:
        if sink is not None:
            sink.write_lines([trace_line(t) for t in ts])

    with TokenProgress(problems, cfg) as progress:  # on stderr, also under --json (stdout holds the JSON)
        traces = run_problems(lm, problems, cfg, RunProgress(on_traces=lambda ts: (write(ts), progress.done(ts)),
                                                             on_tokens=progress.tokens))
    if sink is not None:
        sink.close()

    summary = batch_summary(traces)
    if args.json:
        out = {"summary": summary, "traces": [brief(t) for t in traces]}
        if args.trace:
            out["trace_file"] = args.trace
        print(json.dumps(out, indent=2))
        return 0
    if len(traces) == 1:
        print_one(traces[0])
    else:
        print_summary(summary)
    if cfg.compare:
        print_comparison(traces, summary)
    if summary.get("policy_never_acted"):
        console.print(f"[yellow]the policy ({traces[0].decision.get('policy')}) never acted in "
                      f"{summary['policy_never_acted']} of {len(traces)} trace(s): it met no decision point of the "
                      "kinds it acts at, or no value to read there (a model that writes no cue words gives a policy "
                      "at cue words nothing: add @step_end or @any, e.g. --policy deer@any)[/yellow]",
                      soft_wrap=True, highlight=False)
    if args.trace:
        console.print(f"trace written to [bold]{args.trace}[/bold]")
    return 0


def _target_arg(text: str) -> tuple[str, str, str]:
    name, eq, rest = text.partition("=")
    url, at, model = rest.rpartition("@")
    if not (name and eq and url and at and model) or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected NAME=URL@MODEL (e.g. plain=http://127.0.0.1:8000/v1@my-model), "
                                         f"got {text!r}")
    return name, url, model


def cmd_bench(args: argparse.Namespace) -> int:
    from monitor.bench import bench_overhead

    if args.bench == "monitor":
        return _bench_monitor(args)
    if args.bench == "serve":
        return _bench_serve(args)

    check_bounds_from_args(args, args.new_tokens, 48, getattr(args, "batch_size", None) or args.requests,
                           memory=args.bench == "overhead")
    lm = load_from_args(args)
    if args.bench == "vllm":
        return _bench_vllm(args, lm)
    with err_console.status("benchmarking plain vs monitored generation ...") as status:
        res = bench_overhead(lm, args.data, new_tokens=args.new_tokens, batch_size=args.batch_size,
                             repeats=args.repeats, on_phase=lambda what: status.update(what + " ..."))
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
    console.print(f"a decoding step of {res.batch_size} rows: {res.plain_ms_per_step:.2f} ms plain, "
                  f"{res.monitored_ms_per_step:.2f} ms monitored; monitoring adds {res.added_ms_per_step:.2f} ms "
                  f"a step ({res.added_us_per_token:.1f} us per token)")
    return 0


def _bench_monitor(args: argparse.Namespace) -> int:
    from monitor.bench_monitor import bench_monitor

    with err_console.status(f"timing the monitor alone: batch {args.batch}, {args.tokens} synthetic token steps, "
                            f"logprobs {args.logprobs}, then its memory at {', '.join(map(str, args.memory_tokens))} tokens ..."):
        res = bench_monitor(args.batch, args.logprobs, args.vocab, args.tokens, args.hidden_size, args.layers,
                            args.memory_tokens, device=args.device, probe=args.probe)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
        return 0
    s = res.setup
    table = Table(title=f"monitor host cost, logprobs {s['logprobs']} (vocab {s['vocab']}), {s['layers']} layers x "
                        f"{s['hidden_size']}, one core, tensors on {s['device']}, policy {s['policy']}")
    for col in ("batch", "host us / token", "tokens/s / core"):
        table.add_column(col, justify="right")
    for r in res.throughput:
        table.add_row(str(r["batch"]), f"{r['host_us_per_token']:.1f}", f"{r['tokens_per_s_per_core']:.0f}")
    console.print(table)
    mem = Table(title="memory of one sequence (tracemalloc)")
    for col in ("tokens", "recording", "held MiB", "+ state tensors MiB", "peak with the trace record MiB"):
        mem.add_column(col, justify="right")
    for r in res.memory:
        mem.add_row(str(r["tokens"]), r["recording"], f"{r['held_bytes'] / 2**20:.1f}",
                    f"{r['tensor_state_bytes'] / 2**20:.2f}", f"{r['peak_bytes'] / 2**20:.1f}")
    console.print(mem)
    return 0


def _bench_vllm(args: argparse.Namespace, lm: Any) -> int:
    from monitor.backends.vllm_engine import require_vllm
    from monitor.bench import bench_vllm

    require_vllm()
    with err_console.status("benchmarking plain vs monitored vLLM ...") as status:
        extra = {"tensor_parallel_size": args.tensor_parallel_size}
        if args.gpu_memory_utilization is not None:
            extra["gpu_memory_utilization"] = args.gpu_memory_utilization
        res = bench_vllm(lm, requests=args.requests, new_tokens=args.new_tokens, repeats=args.repeats,
                         on_phase=lambda what: status.update(what + " ..."),
                         logprobs=args.logprobs, data_path=args.data, dtype=args.dtype, **extra)
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


def _bench_serve(args: argparse.Namespace) -> int:
    from serve.bench import bench_serve

    with err_console.status(f"timing {len(args.target)} server(s) one after the other: {args.clients} clients, "
                            f"{args.requests} requests of {args.max_tokens} tokens each ..."):
        res = bench_serve(args.target, clients=args.clients, requests=args.requests, max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
        return 0
    table = Table(title=f"{args.clients} streaming clients x {args.requests} requests, max_tokens {args.max_tokens}")
    for col in ("target", "requests/s", "tokens/s", "TTFT median s", "TTFT p90 s", "errors"):
        table.add_column(col, justify="left" if col == "target" else "right")
    for r in res.rows:
        table.add_row(f"{r.name} ({r.url})", f"{r.requests_per_s:.3f}", f"{r.tokens_per_s:.1f}",
                      f"{r.ttft_median_s:.3f}", f"{r.ttft_p90_s:.3f}", str(r.errors))
    console.print(table)
    return 0


def cmd_signals(args: argparse.Namespace) -> int:
    from monitor.signals.catalog import family_inputs, format_catalog, signal_catalog

    if args.json:
        inputs = family_inputs()
        print(json.dumps({fam: {"keys": keys, "needs": inputs.get(fam, {})} for fam, keys in signal_catalog().items()},
                         indent=2))
        return 0
    print(format_catalog())
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: results written so far are kept and counted."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


_SIGINT = {"seen": False}  # Ctrl-C arrived during this main() call


def _on_sigint(signum: int, frame: Any) -> None:
    """Python's own Ctrl-C behaviour (KeyboardInterrupt), noting that it happened: an interrupt inside an import
    (numpy's, torch's) can surface as another error from the half-imported module ("module 'numpy' has no
    attribute 'ndarray'"), which must still end as an interrupt, not as a crash."""
    _SIGINT["seen"] = True
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    import signal

    _SIGINT["seen"] = False
    with contextlib.suppress(ValueError):  # not in the main thread (an embedding app): leave SIGINT alone
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        return _main(argv)
    except Exception:
        if not _SIGINT["seen"]:
            raise
        # an interrupted import (numpy's, torch's) failing later as something else: still the interrupt
    except KeyboardInterrupt:  # anywhere, start-up and argument parsing included: no traceback
        pass
    _interrupted()
    # CPython notes "a KeyboardInterrupt went unhandled" when one leaves an exec() of a string (dataclasses builds
    # its methods so, in every import that defines one), even though we caught it; under `python -m` it then kills
    # the process by SIGINT at exit, after our message and clean-up. Any exec() of a string starts by clearing
    # that note, so this one does.
    exec("pass")  # noqa: S102
    return 130


def _interrupted() -> None:
    """Say so once; a further Ctrl-C (or one delivered late) while the process exits must not kill it by SIGINT
    instead of the exit code 130."""
    import signal

    with contextlib.suppress(ValueError):  # not in the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    err_console.print("interrupted")


def _import_torch_whole() -> None:
    """Import torch (every command uses it; the parser does not) with Ctrl-C held back until the import is done;
    the interrupt then goes on as usual (exit 130), a second or two later. Inside torch's import a Ctrl-C can abort
    the process from C++ ("terminate called after throwing an instance of 'pybind11::error_already_set'", seen
    about 1 start in 30 under load) or leave numpy half-built."""
    if "torch" in sys.modules:
        return
    from monitor.io import signals_deferred

    with signals_deferred():
        import torch  # noqa: F401


def _main(argv: list[str] | None) -> int:
    import signal

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")  # GGUF de-quantisation bars; rich shows our own progress
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM logs INFO, and to stdout, which --json owns:
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # its log lines go to stderr instead
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(ValueError):  # not in the main thread (an embedding app): leave SIGTERM alone
        signal.signal(signal.SIGTERM, _on_sigterm)
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a usage line on bad flags
    _import_torch_whole()
    try:
        return args.handler(args)
    except Exception as e:  # one readable line, not a traceback
        if _SIGINT["seen"] or args.debug:  # after a Ctrl-C, main() makes it the interrupt
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
