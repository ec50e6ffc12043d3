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

__all__ = ["atomic_writer", "atomic_write_text", "atomic_write_bytes", "check_output", "LineSink", "OutputError",
           "directory_lock",
           "same_file"]


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
    tmp = os.path.join(parent, f"{name}.tmp-{secrets.token_hex(4)}")
    try:
        os.makedirs(parent, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:  # name the file the user asked for, not our temporary one
        raise _clean_os_error(e, os.fspath(path)) from None
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
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _clean_os_error(e, os.fspath(path)) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(parent)


def _clean_os_error(e: OSError, path: str) -> OSError:
    """The same kind of OSError, with a message about `path` (the errno text, no temporary file names)."""
    why = e.strerror or str(e)
    err = type(e)(f"cannot write {path}: {why}" + (
        f" (directory {os.path.dirname(os.path.abspath(path))})" if e.errno in (13, 30) else ""))
    err.errno = e.errno
    return err


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


# --------------------------------------------------------------------------- one write discipline
class OutputError(ValueError):
    """An output path that cannot be used (it is an input, a directory, not writable, or locked): the user's
    to fix, so it is a ValueError (exit code 2 in the CLI)."""


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name the same file (after symlinks; hard links too when both exist)."""
    ra, rb = os.path.realpath(os.fspath(a)), os.path.realpath(os.fspath(b))
    if ra == rb:
        return True
    try:
        return os.path.samefile(ra, rb)
    except OSError:
        return False


def check_output(path: str | os.PathLike[str], flag: str, inputs: dict[str, Any] | None = None,
                 is_dir: bool = False) -> None:
    """Check an output location before any expensive work: it is not one of the command's inputs (a file,
    or a file inside an input directory, by `inputs` = {flag: path or [paths]}), not a directory (unless
    `is_dir`), and its directory exists or can be created and is writable. Raises OutputError naming the flag."""
    name = os.fspath(path)
    for in_flag, value in (inputs or {}).items():
        for p in ([value] if isinstance(value, (str, os.PathLike)) else list(value or [])):
            if p is None:
                continue
            if same_file(name, p):
                raise OutputError(f"{flag} {name} is the same file as {in_flag} {os.fspath(p)}: writing it would "
                                  f"destroy the input; choose another {flag}")
            if os.path.isdir(p) and os.path.realpath(os.path.dirname(os.path.realpath(name))) == os.path.realpath(p) \
                    and not is_dir:
                raise OutputError(f"{flag} {name} is inside the input directory {in_flag} {os.fspath(p)}: it could "
                                  f"overwrite that data; choose a path outside it")
    if not is_dir and os.path.isdir(name):
        raise OutputError(f"{flag} {name} is a directory; give a file name such as "
                          f"{os.path.join(name.rstrip('/'), 'out')}")
    if is_dir and os.path.exists(name) and not os.path.isdir(name):
        raise OutputError(f"{flag} {name} exists and is not a directory")
    parent = name if is_dir and os.path.isdir(name) else (os.path.dirname(os.path.abspath(name)) or ".")
    probe = parent
    while not os.path.exists(probe):  # the first existing ancestor decides whether we can create the rest
        up = os.path.dirname(probe)
        if up == probe:
            break
        probe = up
    if not os.path.isdir(probe):
        raise OutputError(f"cannot write {flag} {name}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {flag} {name}: directory {probe} is not writable")


class LineSink:
    """JSON Lines results appended as they finish: whole lines, flushed, under an exclusive lock.

    - A fresh file (append=False) is written to `<name>.tmp-<random>` as results come and renamed over `path` by
      `close()` (also on Ctrl-C or SIGTERM, with what it holds): the previous file stays intact until then, and a
      hard kill leaves the results so far in the temporary file.
    - append=True checks the existing file first with `validate(path)` (it must be whole lines of valid records),
      then appends to it directly, one flushed line at a time.
    - A second process writing the same path is refused at once (a `filelock` lock, see `lock_path`).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.jsonl"
        >>> with LineSink(p) as sink:
        ...     sink.write_lines(['{"a": 1}'])
        >>> p.read_text()
        '{"a": 1}\\n'
    """

    def __init__(self, path: str | os.PathLike[str], append: bool = False, flag: str = "--out",
                 validate: Any = None, live: bool = False) -> None:
        self.path = os.fspath(path)
        self.append, self.flag, self.validate = append, flag, validate
        self.live = live  # with append: a new file is written in place too (a server's log: readers see each line)
        self.count = 0
        self._lock: Any = None
        self._f: IO[bytes] | None = None
        self._tmp: str | None = None

    def __enter__(self) -> LineSink:
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def open(self) -> None:
        check_output(self.path, self.flag)
        target = os.path.realpath(self.path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        self._lock = _acquire_lock(self.path, self.flag)
        try:
            has_lines = os.path.exists(target) and os.path.getsize(target) > 0
            if self.append and (has_lines or self.live):
                if has_lines:
                    _check_whole_lines(target, self.flag)
                    if self.validate is not None:
                        self.validate(target)
                self._f = open(target, "ab")
            else:
                parent, name = os.path.split(target)
                self._tmp = os.path.join(parent, f"{name}.tmp-{secrets.token_hex(4)}")
                self._f = open(self._tmp, "xb")
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(self._tmp, stat.S_IMODE(os.stat(target).st_mode))
        except BaseException:
            self._release()
            raise

    def write_lines(self, lines: Iterator[str] | list[str]) -> None:
        """Append whole lines (each a JSON record without its newline) and flush them to the disk."""
        if self._f is None:
            raise RuntimeError("LineSink is not open")
        data = b"".join(line.encode("utf-8") + b"\n" for line in lines)
        n = data.count(b"\n")
        with signals_deferred():  # Ctrl-C / SIGTERM land after the lines are written and counted, never between
            self._f.write(data)
            self._f.flush()
            os.fsync(self._f.fileno())
            self.count += n

    def close(self) -> None:
        """Finish: a fresh file replaces `path` (even when interrupted, with the lines it holds)."""
        f, self._f = self._f, None
        try:
            if f is not None:
                f.close()
                if self._tmp is not None:
                    os.replace(self._tmp, os.path.realpath(self.path))
                    self._tmp = None
                    _fsync_dir(os.path.dirname(os.path.realpath(self.path)))
        finally:
            if self._tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self._tmp)
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(Exception):
                self._lock.release()
            self._lock = None


@contextlib.contextmanager
def directory_lock(path: str | os.PathLike[str], flag: str = "--out") -> Iterator[None]:
    """Hold the one-writer lock of an output directory (or file) for the `with` block; refuse at once when
    another process holds it."""
    lock = _acquire_lock(path, flag)
    try:
        yield
    finally:
        lock.release()


def _acquire_lock(path: str | os.PathLike[str], flag: str) -> Any:
    """Take the one-writer lock of `path` at once, or refuse with an OutputError naming the flag."""
    from filelock import FileLock, Timeout

    lock = FileLock(lock_path(os.path.realpath(os.fspath(path))), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputError(f"{flag} {os.fspath(path)} is being written by another process; wait for it to finish, "
                          "or write to another file or directory") from None
    return lock


def lock_path(target: str) -> str:
    """The lock file guarding writes to `target`: one per real path, in Overthink's cache (never deleted, so two
    processes can never hold locks on two different lock files for the same target)."""
    import hashlib

    root = os.environ.get("OVERTHINK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "overthink")
    d = os.path.join(root, "locks")
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, hashlib.sha256(os.path.realpath(target).encode()).hexdigest()[:24] + ".lock")


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the block; their handlers run when it ends.

    A thread signal mask is not enough: the kernel hands a process-wide signal to any thread that does not block
    it (torch keeps worker threads), and Python then runs the handler in the main thread between any two
    bytecodes, inside the block. So the main thread swaps in a handler that only notes the signal, and replays
    what it noted through the previous handlers afterwards. Off the main thread, handlers cannot be set (and do
    not run there): the block runs as is.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[tuple[int, Any]] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.getsignal(s) for s in sigs}
    for s in sigs:
        signal.signal(s, lambda signum, frame: held.append((signum, frame)))
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for signum, frame in held:
            handler = old[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


def _check_whole_lines(path: str, flag: str) -> None:
    """An existing file to append to must be UTF-8 text ending in a newline (no truncated or binary tail)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 1))
        last = f.read(1)
        f.seek(0)
        head = f.read(1 << 16)
    if b"\0" in head:
        raise OutputError(f"cannot append to {flag} {path}: it is a binary file, not JSON Lines")
    if last != b"\n":
        raise OutputError(f"cannot append to {flag} {path}: its last line is truncated (an interrupted writer?); "
                          "delete that line or write a new file")
