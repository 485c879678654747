"""Device selection (`auto` means the first CUDA GPU when there is one, else the CPU) and CPU threads.

CPU threads: Ultralytics' `select_device` sets PyTorch to cores - 1 threads on a CPU (a core kept for
data loader workers), yet its trainer and validator set workers=0 on a CPU (images load in the main
thread, between steps), so that core idles: on a 2-core machine every forward and backward pass ran
on one thread. Training, evaluation and inference here call `use_cores` after select_device: 1.5x
per training epoch and 1.2-2x per prediction on 2 cores (docs/train-evaluate.md, docs/infer.md).

Every core is only right on an idle machine: beside one CPU-bound process, two OpenMP threads on two
cores wait on each other at every barrier while one of them is descheduled, and a training epoch took
1.9x *longer* than on one thread (measured, docs/train-evaluate.md). So `threads=0` means "auto": the
cores of this process's affinity that other processes are not using, measured from /proc/stat (CPU
time of those cores minus this process's own) over a short window, at least 1. Training re-measures at
every epoch start over the epoch that just ran, so it follows load that comes and goes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator

from pipeline.yolo_env import DETAIL

log = logging.getLogger("pipeline")

# A core counts as taken when other processes use at least this much of one over the window.
TAKEN_CORE = 0.3
FIRST_WINDOW_S = 0.2  # the shortest window of a first measurement (it counts from the meter's creation)
# A later measurement over less than this keeps the previous answer: 10 ms clock ticks make a short
# window read another process's full core as idle (measured: epoch 1 then ran on 2 threads beside a hog).
MIN_WINDOW_S = 2.0


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


def use_cores(threads: int = 0, meter: CoreMeter | None = None) -> int:
    """PyTorch computes on `threads` CPU threads; 0 = the cores other processes leave free. Returns the count."""
    import torch

    n = int(threads) or (meter or CoreMeter()).free_cores()
    torch.set_num_threads(n)
    return n


def cpu_threads(threads: int) -> int:
    """The thread count a `threads` key stands for: itself, or (0) the cores other processes leave free."""
    return int(threads) or CoreMeter().free_cores()


class CoreMeter:
    """How many of this process's cores other processes leave free, from successive /proc/stat samples.

    Create it early (before loading a model, building a trainer): the first answer then covers the
    time since, without waiting; our own CPU time in the window is subtracted, so our work does not count.
    """

    def __init__(self) -> None:
        self.cpus = _affinity()
        self._last = _sample(self.cpus)
        self.other_load: float | None = None  # cores' worth of CPU time used by other processes, last window
        self._free: int | None = None

    def free_cores(self) -> int:
        """Cores not busy with other work since the previous answer (or since the meter was made)."""
        n = cpu_count()
        if self._last is None or n == 1:
            return n  # no /proc/stat (not Linux): every core, as before
        if self._free is None:
            time.sleep(max(0.0, FIRST_WINDOW_S - (time.monotonic() - self._last[0])))
        elif time.monotonic() - self._last[0] < MIN_WINDOW_S:
            return self._free
        now = _sample(self.cpus)
        if now is None:
            return n
        wall, busy, own = (a - b for a, b in zip(now, self._last, strict=True))
        self._last = now
        if wall <= 0:
            return self._free or n
        self.other_load = max(0.0, busy - own) / wall
        taken = max(0, int(self.other_load + 1.0 - TAKEN_CORE))
        self._free = max(1, n - taken)
        if self._free < n:
            log.info("CPU threads: %d of %d (other processes use %.2f cores)", self._free, n, self.other_load,
                     extra=DETAIL)
        return self._free


def _affinity() -> list[int]:
    """The CPU ids this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _sample(cpus: list[int]) -> tuple[float, float, float] | None:
    """(wall s, CPU s spent busy on `cpus` by every process, CPU s of this process), or None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{i}" for i in cpus}
    ticks = 0
    for line in lines:
        parts = line.split()
        if parts and parts[0] in wanted:
            # user nice system idle iowait irq softirq steal: everything but idle and iowait is busy
            values = [int(v) for v in parts[1:9]]
            ticks += sum(values) - values[3] - values[4]
    own = os.times()
    return time.monotonic(), ticks / os.sysconf("SC_CLK_TCK"), own.user + own.system


def cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's cpuset), at least 1."""
    return max(1, len(_affinity()))
