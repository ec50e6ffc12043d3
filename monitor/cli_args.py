"""Flags and helpers that every `overthink` command shares: model, device and dtype; task; vLLM engine options;
number parsers; the bounds checked before a model loads; loading a model from flags. monitor/cli.py and
probes/cli.py both build on it, and it imports neither."""

from __future__ import annotations

import argparse
import math
from typing import Any

from rich.console import Console

err_console = Console(stderr=True)


def _number_arg(text: str, kind: Any, ok: Any, what: str) -> Any:
    """Parse a flag value with `kind` and check it with `ok`; argparse turns the error into exit code 2."""
    try:
        v = kind(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def positive_int(text: str) -> int:
    return _number_arg(text, int, lambda v: v >= 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    return _number_arg(text, int, lambda v: v >= 0, "a non-negative integer")


def seed_arg(text: str) -> int:
    return _number_arg(text, int, lambda v: 0 <= v < 2**32, f"an integer seed in 0..{2**32 - 1} (32-bit unsigned)")


def temperature_arg(text: str) -> float:
    return _number_arg(text, float, lambda v: 0 < v < float("inf"),
                       "a finite temperature > 0 (for greedy decoding drop --sample and --temperature)")


def fraction_arg(text: str) -> float:
    return _number_arg(text, float, lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1]")


def layers_arg(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("--layers is empty; give decoder layer indices such as 5,11,17,23, "
                                         "or leave the flag out for the default (~L/4, L/2, 3L/4, last)")
    return out


def gates_arg(text: str) -> list[float]:
    """--gates: comma-separated free-probe scores in [0, 1], or "none" (no trial anywhere: the signals-only probe,
    gate +inf)."""
    bad = (f"--gates takes comma-separated scores in [0, 1] (0 = a trial at every decision point) or 'none' (no "
           f"trial: the free probe alone), got {text!r}")
    try:
        out = [math.inf if x.strip().lower() == "none" else float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(bad) from None
    if not out or any(not (0.0 <= g <= 1.0 or g == math.inf) for g in out):
        raise argparse.ArgumentTypeError(bad)
    return out


def logprobs_arg(text: str) -> int | str:
    if text == "full":
        return text
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"--logprobs takes a positive integer or 'full', got {text!r}")
    return v


def cue_text(text: str) -> str:
    """Exit-cue text from a shell: the two-character escapes \\n and \\t mean newline and tab (other
    backslashes, as in \\boxed, stay as they are)."""
    if not text:
        raise argparse.ArgumentTypeError("the exit cue is empty")
    return text.replace("\\n", "\n").replace("\\t", "\t")


DEVICE_HELP = "cpu | cuda | cuda:N | auto (default: the GPUs with accelerate's device_map='auto', else the CPU)"
DTYPE_HELP = "auto | bfloat16 | float16 | float32 (default auto: the config's bf16/fp16 on a GPU, float32 on a CPU)"


def add_model_args(a: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype, --reasoning-format: every command that loads a model has them."""
    from monitor.formats import FORMATS
    from monitor.models import DTYPES

    a.add_argument("--model", required=True,
                   help="smollm2 | qwen-coder-0.5b | tiny-random | path.gguf | model directory | Hugging Face id")
    a.add_argument("--device", default="auto", help=DEVICE_HELP)
    a.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    a.add_argument("--reasoning-format", default="auto", choices=["auto", *FORMATS],
                   help="how the model writes its reasoning (default: recognised from its chat template)")


def add_task_args(a: argparse.ArgumentParser, answer_max_default: int | None = None) -> None:
    """What the model is asked and how its answer is forced and graded: run and collect have them."""
    from monitor.answers import ANSWER_KINDS

    a.add_argument("--system", help="system message added to every prompt")
    a.add_argument("--exit-cue", type=cue_text,
                   help="text forced when the monitor halts (\\n = newline; default: the reasoning format's cue for "
                        "the answer kind, e.g. '\\n</think>\\n\\n**Final Answer**: \\boxed{')")
    a.add_argument("--answer-kind", choices=list(ANSWER_KINDS), default=None,
                   help="number | math | choice | code | text (default: from the data file's name or each row's "
                        "answer_kind, else auto). code and text answers are free: the exit cue only closes the "
                        "reasoning")
    a.add_argument("--answer-max-tokens", type=positive_int, default=answer_max_default,
                   help="answer tokens allowed after the exit cue (default: 48 for boxed answers, 256 for code/text)")


def add_vllm_engine_args(a: argparse.ArgumentParser) -> None:
    """vLLM engine options, passed through to `vllm.LLM` (the names are vLLM's own)."""
    a.add_argument("--tensor-parallel-size", type=positive_int, default=1, help="vLLM: GPUs to shard the model over")
    a.add_argument("--gpu-memory-utilization", type=fraction_arg,
                   help="vLLM: fraction of GPU memory the engine may use (default: vLLM's, 0.9)")
    a.add_argument("--max-model-len", type=positive_int,
                   help="vLLM: context length (default: the model's, capped at 32768 on a GPU, 4096 on a CPU)")
    a.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="vLLM: eager mode without CUDA graphs (default: on with the hidden-state tap, which needs "
                        "it; off with --no-hidden)")


def load_from_args(args: argparse.Namespace, weights: bool = True) -> Any:
    """Load --model on --device in --dtype with --reasoning-format (what every model command shares)."""
    from monitor.models import load_model

    with err_console.status(f"loading model {args.model} ..."):
        return load_model(args.model, device=args.device, dtype=args.dtype, weights=weights,
                          reasoning_format=args.reasoning_format,
                          random_weights=bool(getattr(args, "random_weights", False)))


def check_bounds_from_args(args: argparse.Namespace, new_tokens: int, answer_tokens: int, batch_size: int,
                           memory: bool = True) -> None:
    """Before the model loads: the token budget against the model's context, and the batch's KV cache against
    the free memory (unless --no-memory-check)."""
    from monitor.bounds import (
        EXIT_CUE_ALLOWANCE,
        PROMPT_ALLOWANCE,
        check_budget,
        check_memory,
        dtype_bytes,
        peek_limits,
    )
    from monitor.models import resolve_device

    limits = peek_limits(args.model)
    check_budget(limits, new_tokens, answer_tokens)
    if memory and not getattr(args, "no_memory_check", False):
        dev = resolve_device(args.device)
        check_memory(limits, batch_size, PROMPT_ALLOWANCE + new_tokens + EXIT_CUE_ALLOWANCE + answer_tokens, dev,
                     dtype_bytes(args.dtype, dev))
