"""Device selection: `auto` means the first CUDA GPU when there is one, else the CPU."""

from __future__ import annotations


def resolve_device(device: str | int | None) -> str:
    """Return an Ultralytics device string: 'cpu', '0', '0,1', ..."""
    value = "auto" if device is None else str(device).strip()
    if value in ("auto", ""):
        import torch

        return "0" if torch.cuda.is_available() else "cpu"
    if value.startswith("cuda:"):
        return value.split(":", 1)[1]
    if value == "cuda":
        return "0"
    return value


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's cpuset), at least 1."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
