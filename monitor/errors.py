"""Which exceptions are the user's to fix (bad usage or input: exit code 2) rather than bugs."""

from __future__ import annotations


class UsageError(Exception):
    """Bad usage or input: printed as one line, exit code 2."""


class ModelNotAvailable(RuntimeError):
    """The model a spec names cannot be loaded here (wheel not installed, not in the local cache, ...).

    The message says how to fix it (the exact install command where there is one)."""


def is_user_error(e: BaseException) -> bool:
    """Usage errors, missing files or models and permission problems are the user's to fix; so is a ValueError
    that OUR code raised (format and validation errors: TraceFormatError, DataFormatError and the configs' checks
    subclass it or raise it with a message that names the fix). A ValueError raised inside a library (numpy,
    torch, transformers, ...) is a bug of ours: it reached the library through our code, so it is not reported
    as the user's fault (exit 1, "unexpected error")."""
    if isinstance(e, (UsageError, FileNotFoundError, PermissionError, IsADirectoryError, ModelNotAvailable)):
        return True
    return isinstance(e, ValueError) and _raised_by_us(e)


def _our_dirs() -> tuple[str, ...]:
    """The directories of Overthink's packages (as imported: a checkout or site-packages)."""
    import importlib.util
    import os

    dirs = []
    for name in ("monitor", "probes", "serve", "calibration"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            dirs += [os.path.normpath(d) + os.sep for d in spec.submodule_search_locations]
    return tuple(dirs)


def _raised_by_us(e: BaseException) -> bool:
    """Whether the innermost frame of `e`'s traceback is in one of Overthink's packages."""
    import os

    tb = e.__traceback__
    if tb is None:
        return True  # constructed, not raised: only our code hands errors around like that
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.normpath(tb.tb_frame.f_code.co_filename).startswith(_our_dirs())
