"""`overthink serve`: flags, model loading, the trace log, uvicorn."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from monitor.cli_args import (
    add_model_args,
    add_vllm_engine_args,
    err_console,
    load_from_args,
    positive_int,
)
from monitor.errors import UsageError

log = logging.getLogger("overthink.serve")


def add_serve_command(sub: Any) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible server whose completions are monitored and halted")
    add_model_args(s)
    s.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf: transformers, batching the waiting requests (default; small models); vllm: vLLM's "
                        "AsyncLLM in this process, continuous batching (install the vllm extra)")
    s.add_argument("--upstream", help="proxy mode: the URL of an OpenAI-compatible server that returns top "
                                      "logprobs (vllm serve, SGLang, overthink serve); --model then only gives "
                                      "the tokenizer and chat template")
    s.add_argument("--upstream-model", help="proxy mode: the model name the upstream serves (default: its first)")
    s.add_argument("--upstream-logprobs", type=positive_int, default=20,
                   help="proxy mode: top-k logprobs asked of the upstream per token (default 20)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=positive_int, default=8000, help="port (default 8000)")
    s.add_argument("--served-model-name", help="the model name clients send (default: --model)")
    s.add_argument("--policy", default="observe",
                   help="default policy for requests that name none: observe | deer[:CONF] | certaindex[:K[:CONF]] | "
                        "threshold:FAMILY.KEY>=VALUE | a calibrated probe bundle (.joblib; requests name it by its "
                        "file name without the extension) (a request's overthink.policy overrides it)")
    s.add_argument("--halt-after", type=positive_int, help="default policy: halt after N reasoning tokens")
    s.add_argument("--max-new-tokens", type=positive_int, default=512,
                   help="reasoning token cap of a request that sets no max_tokens (default 512)")
    s.add_argument("--answer-max-tokens", type=positive_int,
                   help="answer tokens after a forced exit (default: 256 for free answers, 48 for boxed ones)")
    s.add_argument("--max-batch", type=positive_int, default=8,
                   help="most requests generated together by the HF backend (default 8)")
    s.add_argument("--no-hidden", action="store_true",
                   help="vllm backend: tap no hidden states (logprob signals only; keeps CUDA graphs)")
    s.add_argument("--force", choices=["auto", "processor", "resubmit"], default="auto",
                   help="vllm backend: how a halt forces the exit cue (default auto: the logits processor where "
                        "the engine has it, else abort + resubmit)")
    add_vllm_engine_args(s)
    s.add_argument("--trace-log", help="append every request's trace to this JSON Lines file (whole lines)")
    s.add_argument("--record", choices=["default", "full", "points", "none"], default="default",
                   help="trace recording level (as overthink run)")


def cmd_serve(args: argparse.Namespace) -> int:
    from monitor.config import RunConfig

    if args.upstream and args.backend == "vllm":
        raise UsageError("--upstream proxies a server that already runs the model; --backend vllm runs it in this "
                         "process: give one of them")
    if args.backend == "vllm":
        from monitor.backends.vllm_engine import require_vllm

        try:
            require_vllm()
        except ImportError as e:
            raise UsageError(str(e)) from None
    cfg = RunConfig(policy=args.policy, halt_after=args.halt_after, max_new_tokens=args.max_new_tokens,
                    answer_max_tokens=args.answer_max_tokens, device=args.device, dtype=args.dtype,
                    record=args.record, answer_kind="text", backend="hf" if args.upstream else args.backend,
                    vllm_hidden=not args.no_hidden, vllm_force=args.force,
                    tensor_parallel_size=args.tensor_parallel_size,
                    gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                    enforce_eager=args.enforce_eager)  # validate() checks the tap against --no-enforce-eager
    try:
        if args.upstream:  # first: a proxy's policy may name the logprob families' keys only
            from monitor.decision import parse_policy

            parse_policy(args.policy, args.halt_after, known_keys=proxy_keys())
        cfg.validate()
    except ValueError as e:
        raise UsageError(str(e) + (" (proxy mode has the logprob families only: path_deviation, jsd_instability; "
                                   "hidden-state signals and probes need the in-process mode, without --upstream)"
                                   if args.upstream else "")) from None
    from monitor.config import is_bundle_spec

    if is_bundle_spec(args.policy) and args.upstream:
        raise UsageError("a probe bundle needs the full distributions and hidden states of the in-process mode; "
                         "proxy mode has the upstream's top-k logprobs only: run the bundle without --upstream")
    if is_bundle_spec(args.policy) and args.halt_after:
        raise UsageError("--halt-after is a policy of its own; do not combine it with a probe bundle")
    sink = None
    if args.trace_log:
        from monitor.io import LineSink, check_output
        from monitor.trace import check_trace_file

        check_output(args.trace_log, "--trace-log", inputs={})
        sink = LineSink(args.trace_log, append=True, flag="--trace-log", validate=check_trace_file, live=True)
        sink.open()  # before the model loads: a locked or broken log fails at once
    try:
        return _serve(args, cfg, sink)
    finally:
        if sink is not None:
            sink.close()


def proxy_keys() -> list[str]:
    """The signal keys a proxy has (the logprob families)."""
    from monitor.signals.catalog import signal_catalog
    from serve.proxy import PROXY_FAMILIES

    return [f"{fam}.{k}" for fam, keys in signal_catalog().items() if fam in PROXY_FAMILIES for k in keys]


def _upstream_model(url: str) -> str:
    import httpx

    from serve.proxy import api_base

    base = api_base(url)
    try:
        r = httpx.get(f"{base}/models", timeout=30)
        r.raise_for_status()
        return str(r.json()["data"][0]["id"])
    except Exception as e:
        raise UsageError(f"cannot list the upstream's models at {base}/models ({type(e).__name__}: {e}); check "
                         "--upstream, or name the model with --upstream-model") from None


def _bundles(policy: str, lm: Any, cfg: Any) -> tuple[dict[str, Any], Any]:
    """{name: ProbePolicy} for a bundle given as --policy (its file name without the extension; requests name it
    in overthink.policy), after checking it was made for this model, and the settings aligned with the bundle
    (layers, cue words, exit cue); ({}, cfg) for other policies."""
    from pathlib import Path

    from monitor.config import is_bundle_spec
    from monitor.run import load_probe_policy

    if not is_bundle_spec(policy):
        return {}, cfg
    try:
        probe, cfg = load_probe_policy(policy, lm, cfg)
        return {Path(policy).stem: probe}, cfg
    except (ValueError, OSError) as e:
        raise UsageError(f"--policy {policy}: {e}") from None


def _vllm_engine(lm: Any, cfg: Any, sink: Any) -> Any:
    from monitor.backends.vllm_engine import export_for_vllm, vllm_engine_kwargs
    from monitor.models import resolve_layers
    from serve.vllm_engine import VLLMServeEngine

    with err_console.status("starting the vLLM engine ..."):
        return VLLMServeEngine(lm, cfg, str(export_for_vllm(lm)), resolve_layers(lm, cfg.layers), trace_sink=sink,
                               **vllm_engine_kwargs(lm, cfg))


def _serve(args: argparse.Namespace, cfg: Any, sink: Any) -> int:
    import uvicorn

    from serve.app import create_app
    from serve.engine import HFServeEngine

    known = None
    bundles: dict[str, Any] = {}
    if args.upstream:
        from serve.proxy import ProxyEngine

        upstream_model = args.upstream_model or _upstream_model(args.upstream)
        lm = load_from_args(args, weights=False)  # the tokenizer and the chat template; no weights
        engine: Any = ProxyEngine(lm, cfg, args.upstream, upstream_model, top_k=args.upstream_logprobs,
                                  trace_sink=sink)
        known = proxy_keys()
    elif args.backend == "vllm":
        lm = load_from_args(args, weights=False)  # vLLM loads the weights (a directory); others are exported
        bundles, cfg = _bundles(args.policy, lm, cfg)
        engine = _vllm_engine(lm, cfg, sink)
    else:
        lm = load_from_args(args)
        bundles, cfg = _bundles(args.policy, lm, cfg)  # cfg aligned (layers, cue words, exit cue) with the bundle
        engine = HFServeEngine(lm, cfg, max_batch=args.max_batch, trace_sink=sink)
    name = args.served_model_name or args.model
    default = next(iter(bundles)) if bundles else args.policy
    app = create_app(engine, name, cfg, default_policy=default, default_halt_after=args.halt_after,
                     known_keys=known, bundles=bundles)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=60))
    mode = f" in front of {args.upstream}" if args.upstream else ""
    err_console.print(f"overthink serve: {name}{mode} on http://{args.host}:{args.port}/v1 (policy {cfg.policy}"
                      + (f", halt-after {args.halt_after}" if args.halt_after else "")
                      + (f"; traces appended to {args.trace_log}" if args.trace_log else "") + ")",
                      markup=False, highlight=False, soft_wrap=True)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT/SIGTERM it handled, after its graceful shutdown
        pass
    finally:
        engine.close()
    err_console.print("overthink serve: shut down" + (f"; {args.trace_log} holds whole lines" if args.trace_log
                                                      else ""), markup=False, highlight=False)
    return 0


__all__ = ["add_serve_command", "cmd_serve"]
