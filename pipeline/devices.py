"""Device selection (`auto` means the first CUDA GPU when there is one, else the CPU) and CPU threads.

CPU threads: Ultralytics' `select_device` sets PyTorch to cores - 1 threads on a CPU (a core kept for
data loader workers), yet its trainer and validator set workers=0 on a CPU (images load in the main
thread, between steps), so that core idles: on a 2-core machine every forward and backward pass ran
on one thread. Training, evaluation and inference here call `use_cores` after select_device: 1.5x
per training epoch and 1.2-2x per prediction on 2 cores (docs/train-evaluate.md, docs/infer.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


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


@contextlib.contextmanager
def threads_kept() -> Iterator[None]:
    """Put PyTorch's thread count back as it was on entry (select_device and `use_cores` change it)."""
    import torch

    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def use_cores(threads: int = 0) -> None:
    """PyTorch computes on `threads` CPU threads; 0 = every core this process may use."""
    import torch

    torch.set_num_threads(int(threads) or cpu_count())


def cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's cpuset), at least 1."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
