"""Atomic file writes for every artifact Overthink produces (traces, probe bundles, reports, tables).

A reader must never see half a file: an interrupted run (Ctrl-C, out of memory, a full disk, an exception
while serializing) has to leave the previous version of the file intact. Every writer therefore writes
to a temporary file in the destination's own directory (so the final `os.replace` is a same-filesystem
rename, which POSIX makes atomic), flushes and fsyncs it, and only then renames it over the destination.
The temporary file is removed on any failure, and the destination's parent directory is created when
missing. Temporary names are `<name>.tmp-<random>`, which `.gitignore` covers for `*.jsonl`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["atomic_writer", "atomic_write_text", "atomic_write_bytes"]


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "w", encoding: str = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file next to `path` for writing; on a clean exit it atomically replaces `path`.

    `mode` is "w" (text, `encoding`, "\\n" line endings on every platform) or "wb" (bytes). If the body of
    the `with` block raises, the temporary file is deleted and `path` is left exactly as it was. A new
    file gets the usual permissions (0666 minus the umask); a replaced file keeps its permission bits.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "out" / "a.txt"
        >>> with atomic_writer(p) as f:
        ...     _ = f.write("hello\\n")
        >>> p.read_text()
        'hello\\n'
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_writer mode must be 'w' or 'wb', got {mode!r}; to append, read the old "
                         "content and write old + new through atomic_writer")
    # Follow a symlink so that the link keeps pointing at the (new) file instead of being replaced.
    target = os.path.realpath(os.fspath(path))
    parent, name = os.path.split(target)
    if os.path.isdir(target):
        raise IsADirectoryError(f"cannot write {os.fspath(path)}: it is a directory; give a file name")
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f"{name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if mode == "wb":
            f: IO[Any] = os.fdopen(fd, "wb")
        else:
            f = os.fdopen(fd, "w", encoding=encoding, newline="\n")
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    try:
        with f:
            with contextlib.suppress(FileNotFoundError):
                os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(parent)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically (see `atomic_writer`); the parent directory is created if missing."""
    with atomic_writer(path, "w", encoding=encoding) as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_writer`); the parent directory is created if missing."""
    with atomic_writer(path, "wb") as f:
        f.write(data)


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable; not possible on every platform/filesystem, and not needed for atomicity.
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
