"""CPU threads: `threads=0` takes the cores other processes leave free, measured, at least one."""

from __future__ import annotations

import pytest

from pipeline import devices


class FakeStat:
    """Successive (wall s, busy CPU s of our cores by everyone, our own CPU s) samples."""

    def __init__(self, samples):
        self.samples = iter(samples)

    def __call__(self, cpus):
        return next(self.samples)


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(devices, "cpu_count", lambda: 4)
    monkeypatch.setattr(devices, "_affinity", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(devices.time, "sleep", lambda s: None)


@pytest.mark.parametrize(("others_busy", "ours", "free"), [
    (0.0, 0.0, 4),   # idle machine: every core
    (0.1, 0.0, 4),   # a light background task does not cost a thread
    (1.0, 0.0, 3),   # one CPU-bound process: one core fewer
    (1.0, 2.5, 3),   # our own CPU time is not someone else's load
    (2.2, 1.0, 2),   # a core counts as taken from 0.3 of it on
    (2.4, 1.0, 1),
    (9.0, 0.0, 1),   # overloaded: still one thread
])
def test_free_cores_subtracts_what_other_processes_use(four_cores, monkeypatch, others_busy, ours, free):
    monkeypatch.setattr(devices, "_sample", FakeStat([(0.0, 0.0, 0.0), (1.0, others_busy + ours, ours)]))
    meter = devices.CoreMeter()
    assert meter.free_cores() == free
    assert meter.other_load == pytest.approx(others_busy)


def test_later_measurements_cover_the_time_since_the_previous_one(four_cores, monkeypatch):
    """Training asks at every epoch start: the load of the epoch that just ran decides the next one."""
    monkeypatch.setattr(devices, "_sample", FakeStat([(0, 0, 0), (1, 2.0, 1.0), (11, 2.0 + 20.0, 1.0 + 20.0),
                                                      (21, 22.0 + 15.0, 21.0 + 5.0)]))
    meter = devices.CoreMeter()
    assert meter.free_cores() == 3  # 1 core of other load
    assert meter.free_cores() == 4  # the other process stopped: 0 over 10 s
    assert meter.free_cores() == 3  # 10 core-seconds of others over 10 s


def test_without_proc_stat_every_core_is_used(monkeypatch):
    monkeypatch.setattr(devices, "cpu_count", lambda: 3)
    monkeypatch.setattr(devices, "_sample", lambda cpus: None)
    assert devices.CoreMeter().free_cores() == 3


def test_an_explicit_count_is_kept_and_zero_asks_the_meter(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        assert devices.use_cores(1) == 1 and torch.get_num_threads() == 1

        class Two:
            def free_cores(self):
                return 2

        assert devices.use_cores(0, Two()) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_real_sample_reads_this_machine():
    sample = devices._sample(devices._affinity())
    if sample is None:
        pytest.skip("no /proc/stat here")
    wall, busy, own = sample
    assert wall > 0 and busy >= 0 and own >= 0
    assert 1 <= devices.CoreMeter().free_cores() <= devices.cpu_count()


def test_a_short_window_keeps_the_previous_answer(four_cores, monkeypatch):
    """10 ms clock ticks cannot see a busy core in a few ms: under MIN_WINDOW_S the last answer stands."""
    clock = [100.0]
    monkeypatch.setattr(devices.time, "monotonic", lambda: clock[0])
    samples = iter([(100.0, 0.0, 0.0), (101.0, 1.0, 0.0), (101.01, 1.0, 0.0), (104.0, 1.0, 0.0)])
    monkeypatch.setattr(devices, "_sample", lambda cpus: next(samples))
    meter = devices.CoreMeter()
    clock[0] = 101.0
    assert meter.free_cores() == 3  # one other core busy over the first second
    clock[0] = 101.01
    assert meter.free_cores() == 3  # 10 ms later: not re-measured (it would read 4)
    clock[0] = 104.0
    assert meter.free_cores() == 4  # a real window: the other process has stopped
