"""Bounds checked before a model loads: the context length, the prompt lengths and the memory a batch needs.

`peek_limits(spec)` reads what the checks need without loading weights: a directory's (or cached hub
snapshot's) config.json, a GGUF file's header, or the built-in tiny model's config. `check_budget` refuses a
token budget that cannot fit the model's context; `check_memory` refuses a batch whose KV cache alone would not
fit in the memory that is free (GPU memory on a GPU, available RAM on a CPU), with an override for users who
know better; `check_prompts` refuses prompts that leave no room for the reasoning.

The KV-cache estimate is 2 (keys, values) x layers x KV heads x head dim x bytes per value x tokens x rows,
with tokens = the longest prompt allowance + reasoning budget + answer budget. It is a lower bound on what
generation needs (weights and activations come on top), so a refusal is never a false alarm of the estimate.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_CUE_ALLOWANCE = 32  # tokens of the longest built-in exit cue, with room to spare
PROMPT_ALLOWANCE = 512  # prompt tokens assumed by the memory estimate before prompts are tokenized


@dataclass(frozen=True)
class ModelLimits:
    """What the bounds need to know of a model (None where unknown)."""

    context: int | None
    layers: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None

    def kv_bytes_per_token(self, dtype_bytes: int) -> int | None:
        if None in (self.layers, self.kv_heads, self.head_dim):
            return None
        return 2 * int(self.layers) * int(self.kv_heads) * int(self.head_dim) * dtype_bytes  # type: ignore[arg-type]


def limits_from_config(cfg: dict[str, Any]) -> ModelLimits:
    """ModelLimits from a config.json dict (text configs nested under text_config are read too)."""
    c = dict(cfg.get("text_config") or {}) | {k: v for k, v in cfg.items() if k != "text_config"}
    ctx = c.get("max_position_embeddings") or c.get("n_positions") or c.get("max_sequence_length")
    heads = c.get("num_attention_heads") or c.get("n_head")
    hidden = c.get("hidden_size") or c.get("n_embd")
    head_dim = c.get("head_dim") or (hidden // heads if hidden and heads else None)
    return ModelLimits(context=int(ctx) if ctx else None, layers=c.get("num_hidden_layers") or c.get("n_layer"),
                       kv_heads=c.get("num_key_value_heads") or heads, head_dim=head_dim)


def _gguf_limits(path: Path) -> ModelLimits:
    from gguf import GGUFReader

    r = GGUFReader(str(path))

    def field(key: str) -> Any:
        f = r.fields.get(key)
        if f is None or not f.data:
            return None
        v = f.parts[f.data[0]]
        return bytes(v).decode() if f.types and f.types[0].name == "STRING" else v.tolist()[0]

    arch = field("general.architecture")
    heads, hidden = field(f"{arch}.attention.head_count"), field(f"{arch}.embedding_length")
    head_dim = field(f"{arch}.attention.key_length") or (hidden // heads if hidden and heads else None)
    return ModelLimits(context=field(f"{arch}.context_length"), layers=field(f"{arch}.block_count"),
                       kv_heads=field(f"{arch}.attention.head_count_kv") or heads, head_dim=head_dim)


def peek_limits(spec: str) -> ModelLimits | None:
    """The limits of the model `spec` names, read without loading it; None when they cannot be read cheaply
    (a hub id not in the cache yet: the checks then run after loading, from the loaded config)."""
    from monitor.models import files as M

    key = M.ALIASES.get(spec.strip().lower(), spec.strip().lower())
    try:
        if key == "tiny-random":
            return ModelLimits(context=4096, layers=4, kv_heads=2, head_dim=64)
        if key == "smollm2":
            return _gguf_limits(M.smollm2_gguf())
        if key == "qwen-coder-0.5b":
            parts = M.qwen_coder_parts()
            cached = M.cache_dir() / "models" / M.QWEN_CACHE_NAME
            return _gguf_limits(cached if cached.is_file() else parts[0])
        path = Path(spec).expanduser()
        if spec.lower().endswith(".gguf") and path.is_file():
            return _gguf_limits(path)
        if path.is_dir() and (path / "config.json").is_file():
            return limits_from_config(json.loads((path / "config.json").read_text()))
        if path.is_dir():
            ggufs = sorted(path.glob("*.gguf"))
            return _gguf_limits(ggufs[0]) if len(ggufs) == 1 else None
        from huggingface_hub import try_to_load_from_cache

        cfg = try_to_load_from_cache(spec, "config.json")
        if isinstance(cfg, str):
            return limits_from_config(json.loads(Path(cfg).read_text()))
    except Exception:  # the loader reports a broken or missing model with its own, better message
        return None
    return None


def limits_of(model: Any) -> ModelLimits:
    """ModelLimits of a loaded model, from its config."""
    cfg = getattr(model, "config", None)
    return limits_from_config(cfg.to_dict() if cfg is not None else {})


def check_budget(limits: ModelLimits | None, max_new_tokens: int, answer_tokens: int, prompt_tokens: int = 0,
                 exit_tokens: int = EXIT_CUE_ALLOWANCE, flag: str = "--max-new-tokens") -> None:
    """Reasoning budget + exit cue + answer budget (+ prompt) must fit the model's context. `exit_tokens`: the
    exit cue's length when it is known (else the allowance); `flag`: how the caller names the reasoning budget."""
    if limits is None or not limits.context:
        return
    need = max_new_tokens + exit_tokens + answer_tokens + prompt_tokens
    if need > limits.context:
        room = limits.context - exit_tokens - answer_tokens - prompt_tokens
        fix = f"use {flag} {room} or less" if room >= 1 else "shorten the prompt or the answer budget"
        what = f" and a {prompt_tokens}-token prompt" if prompt_tokens else ""
        raise ValueError(f"{flag} {max_new_tokens} with a {answer_tokens}-token answer budget{what} needs "
                         f"{need} positions, more than the model's context of {limits.context} tokens: {fix}")


def free_memory_bytes(device: str) -> tuple[int, str] | None:
    """Free memory where the KV cache will live: (bytes, where), or None when it cannot be read."""
    if device != "cpu":
        try:
            import torch

            if torch.cuda.is_available():
                idx = 0 if device in ("auto", "cuda") else int(device.partition(":")[2] or 0)
                free, _ = torch.cuda.mem_get_info(idx)
                n = torch.cuda.device_count() if device == "auto" else 1
                return int(free) * n, f"free GPU memory ({'all ' + str(n) + ' GPUs' if n > 1 else f'cuda:{idx}'})"
        except Exception:
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available RAM"
    except (ValueError, OSError, AttributeError):
        return None


def kv_cache_bytes(limits: ModelLimits | None, batch_size: int, tokens_per_row: int, dtype_bytes: int) -> int | None:
    """The KV cache of `batch_size` rows of `tokens_per_row` tokens (see the module docstring), or None."""
    per_token = limits.kv_bytes_per_token(dtype_bytes) if limits else None
    return None if per_token is None else per_token * tokens_per_row * batch_size


def check_memory(limits: ModelLimits | None, batch_size: int, tokens_per_row: int, device: str, dtype_bytes: int,
                 flag: str = "--batch-size") -> None:
    """Refuse a batch whose KV cache alone exceeds the free memory (override: --no-memory-check)."""
    need = kv_cache_bytes(limits, batch_size, tokens_per_row, dtype_bytes)
    free = free_memory_bytes(device)
    if need is None or free is None or need <= free[0]:
        return
    per_row = need // batch_size
    fits = max(0, free[0] // max(per_row, 1))
    fix = f"use {flag} {fits} or less, fewer tokens," if fits >= 1 else "even one row does not fit: use fewer tokens"
    raise ValueError(f"{flag} {batch_size} needs about {need / 2**30:.1f} GiB of KV cache ({per_row / 2**20:.1f} MiB "
                     f"per row of {tokens_per_row} tokens) but only {free[0] / 2**30:.1f} GiB of {free[1]} is free: "
                     f"{fix} or --no-memory-check if you know it fits")


def dtype_bytes(dtype: str | Any, device: str) -> int:
    """Bytes per value of the dtype a model will run in ("auto": 2 on a GPU, 4 on a CPU)."""
    from monitor.models import dtype_name

    d = dtype_name(dtype)
    if d == "auto":
        return 4 if device == "cpu" else 2
    return 4 if d == "float32" else 2


__all__ = ["ModelLimits", "peek_limits", "limits_of", "limits_from_config", "check_budget", "check_memory",
           "kv_cache_bytes", "free_memory_bytes", "dtype_bytes", "EXIT_CUE_ALLOWANCE", "PROMPT_ALLOWANCE"]
