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


_DISK_FULL_ERRNOS = (28, 122)  # ENOSPC, EDQUOT
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def resource_error(exc: BaseException, stage: str, results_dir: str, batch: int | None, imgsz: int | None,
                   recorded: bool = False) -> UserError | None:
    """A clear UserError for running out of disk or memory, or None when `exc` is neither.

    `recorded`: the run's failure record was written (the message says so only then; a full disk
    can refuse that write too).

    Disk full: an OSError with ENOSPC/EDQUOT anywhere in the exception chain (Ultralytics and
    torch.save re-raise them wrapped). Out of memory: torch.OutOfMemoryError (CUDA), MemoryError,
    or the CPU allocator's RuntimeError ("DefaultCPUAllocator: can't allocate memory").
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            where = f" writing {e.filename}" if e.filename else ""
            record = "the run is recorded as failed; " if recorded else ""
            return UserError(f"disk full{where} during stage={stage}: free space on the disk of "
                             f"results_dir={results_dir} or choose another results_dir, then rerun "
                             f"({record}nothing half-written is registered)")
        text = str(e).lower()
        if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(m in text for m in _OOM_MARKERS)):
            knobs = " and ".join(f"{stage}.{k}={v}" for k, v in (("batch", batch), ("imgsz", imgsz)) if v)
            hint = f"lower {knobs}" if knobs else "use a smaller model or input size"
            return UserError(f"out of memory during stage={stage} ({type(e).__name__}): {hint}, "
                             "or free memory on this machine, then rerun")
        e = e.__cause__ or e.__context__
    return None
