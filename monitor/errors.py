"""Which exceptions are the user's to fix (bad usage or input: exit code 2) rather than bugs."""

from __future__ import annotations


def is_user_error(e: BaseException) -> bool:
    """ValueError covers our format errors (TraceFormatError, DataFormatError subclass it); missing files,
    missing models and permission problems are the user's to fix as well."""
    from monitor.cli_args import UsageError

    try:
        from monitor.models import ModelNotAvailable
    except ImportError:  # pragma: no cover
        ModelNotAvailable = ()  # type: ignore[assignment]
    return isinstance(e, (UsageError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError,
                          ModelNotAvailable))
