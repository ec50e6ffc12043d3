"""Devices and dtypes: where a model's weights go and in what precision (`resolve_placement`); "auto" is the
visible GPUs with accelerate's device_map="auto" in the config's dtype, else the CPU in float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from monitor.errors import ModelNotAvailable

if TYPE_CHECKING:
    import torch

log = logging.getLogger("overthink.models")

DTYPES = ("auto", "bfloat16", "float16", "float32")
# names (and aliases) -> torch dtype attribute names; torch is imported only when a dtype is needed, so the CLI's
# parser (which lists DTYPES) starts without it
_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16",
                "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16"}
_CUDA_INSTALL = ("install torch from the CUDA index (e.g. `pip install torch --index-url "
                 "https://download.pytorch.org/whl/cu128`, see the README's 'Your own model'), or use --device cpu")


def as_dtype(dtype: Any) -> torch.dtype | str:
    """A torch dtype, or "auto"."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower() == "auto":
        return "auto"
    if isinstance(dtype, str) and dtype.strip().lower() in _DTYPE_NAMES:
        return getattr(torch, _DTYPE_NAMES[dtype.strip().lower()])
    raise ValueError(f"dtype must be a torch.dtype or one of {', '.join(DTYPES)}; got {dtype!r}")


def dtype_name(dtype: Any) -> str:
    """The canonical name of a dtype given as text or torch.dtype: "auto", "bfloat16", "float16" or "float32"
    (aliases such as bf16, fp16, half, fp32 accepted); a ValueError names the choices otherwise."""
    dt = as_dtype(dtype)
    return dt if isinstance(dt, str) else str(dt).replace("torch.", "")


@dataclass(frozen=True)
class Placement:
    """Where and in what precision a model's weights go.

    device: "cpu", "cuda:N", or "auto" (accelerate's device_map="auto": the model is split over the visible
    GPUs, then CPU memory, as it fits); dtype: the torch dtype the weights are loaded in."""

    device: str
    dtype: torch.dtype

    @property
    def device_map(self) -> Any:
        return "auto" if self.device == "auto" else None

    @property
    def on_gpu(self) -> bool:
        return self.device != "cpu"


def resolve_device(device: str | None = "auto") -> str:
    """"cpu", "cuda:N" or "auto" (only when CUDA is available), with errors that say how to fix them.

    "auto" means accelerate's device_map="auto" when a CUDA GPU is visible, and the CPU otherwise; "cuda" is
    "cuda:0"."""
    d = str(device or "auto").strip().lower()
    if d == "cpu":
        return "cpu"
    import torch

    cuda = torch.cuda.is_available()
    if d == "auto":
        return "auto" if cuda else "cpu"
    if d == "cuda" or d.startswith("cuda:"):
        if not cuda:
            raise ModelNotAvailable(f"--device {device}: no CUDA GPU is visible to torch "
                                    f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}); "
                                    + _CUDA_INSTALL)
        idx = d.partition(":")[2] or "0"
        if not idx.isdigit():
            raise ValueError(f"--device {device}: expected cuda:N with N a GPU index, e.g. cuda:0")
        n = torch.cuda.device_count()
        if int(idx) >= n:
            raise ModelNotAvailable(f"--device {device}: only {n} CUDA device(s) are visible (cuda:0..cuda:{n - 1})")
        return f"cuda:{int(idx)}"
    raise ValueError(f"--device must be cpu, cuda, cuda:N or auto; got {device!r}")


def _config_dtype(config: Any) -> torch.dtype | None:
    import torch

    raw = None
    if isinstance(config, dict):
        raw = config.get("dtype") or config.get("torch_dtype")
    elif config is not None:
        raw = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(raw, torch.dtype):
        return raw
    name = _DTYPE_NAMES.get(str(raw).replace("torch.", "").lower()) if raw else None
    return getattr(torch, name) if name else None


def resolve_placement(device: str | None = "auto", dtype: Any = "auto", config: Any = None) -> Placement:
    """Device and dtype for loading a model whose config is `config` (a PretrainedConfig or config.json dict).

    dtype "auto": float32 on a CPU; on a GPU the dtype the config asks for when it is bfloat16 or float16
    (bfloat16 falls back to float16 on GPUs without bf16), else float32.

    Example:
        >>> resolve_placement("cpu", "auto", {"torch_dtype": "bfloat16"})
        Placement(device='cpu', dtype=torch.float32)
    """
    import torch

    dev = resolve_device(device)
    dt = as_dtype(dtype)
    if dt == "auto":
        dt = torch.float32
        if dev != "cpu":
            want = _config_dtype(config)
            if want == torch.bfloat16:
                dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            elif want == torch.float16:
                dt = torch.float16
    elif dev == "cpu" and dt == torch.float16:
        log.warning("float16 on the CPU is slow and some kernels lack it; bfloat16 or float32 are the usual choices")
    return Placement(dev, dt)  # type: ignore[arg-type]


def placement_kwargs(pl: Placement) -> dict[str, Any]:
    """from_pretrained arguments: `dtype` (transformers 5.x), and device_map for GPUs (accelerate)."""
    kw: dict[str, Any] = {"dtype": pl.dtype}
    if pl.device == "auto":
        kw["device_map"] = "auto"
    elif pl.device != "cpu":
        kw["device_map"] = {"": pl.device}
    return kw


def model_device(model: Any) -> torch.device:
    """The device a model's inputs go to: its input embeddings' device (the first shard of a split model)."""
    import torch

    try:
        return model.get_input_embeddings().weight.device
    except Exception:
        return getattr(model, "device", torch.device("cpu"))
