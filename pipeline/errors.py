"""Errors a user can cause: printed as one line, exit code 2, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad path, bad value, missing dependency, missing input)."""

    exit_code = 2


def require(module: str, extra_hint: str) -> object:
    """Import an optional dependency or raise a UserError that says how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"{module} is not installed ({exc}); {extra_hint}") from None
