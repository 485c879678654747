"""Shared fixtures: tiny generated data and models, so tests never need downloads."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

import pipeline  # noqa: F401  (offline-safe Ultralytics environment)

# Hypothesis' per-example deadline (200 ms) is a timing assertion: on a loaded 2-core CI machine a
# first example that imports or warms a cache can exceed it and fail a correct test. Speed is
# measured by bench/, never asserted in tests.
settings.register_profile("pipeline", deadline=None)
settings.load_profile("pipeline")

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PIPELINE_SHARED", REPO.parent / "shared"))
VINID = SHARED / "datasets" / "vinid-products"


def write_rect_dataset(root: Path, n_train: int = 24, n_val: int = 8, size: int = 96, seed: int = 0) -> Path:
    """A minimal YOLO-layout dataset of filled rectangles (class 0 red, class 1 blue); returns data.yaml."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    colours = [(220, 40, 40), (40, 60, 220)]
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(90, 160, 3)))
            draw = ImageDraw.Draw(img)
            lines = []
            for _ in range(int(rng.integers(1, 3))):
                c = int(rng.integers(0, 2))
                w, h = rng.integers(size // 5, size // 2, 2)
                x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
                draw.rectangle([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=colours[c])
                lines.append(f"{c} {(x0 + w / 2) / size:.6f} {(y0 + h / 2) / size:.6f} {w / size:.6f} {h / size:.6f}")
            img.save(root / "images" / split / f"{i:04d}.jpg", quality=95)
            (root / "labels" / split / f"{i:04d}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: red\n  1: blue\n")
    return data


@pytest.fixture(scope="session")
def tiny_data_yaml(tmp_path_factory) -> Path:
    return write_rect_dataset(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_model_pt(tmp_path_factory) -> Path:
    """An untrained yolov8n (2 classes) saved in the pipeline's checkpoint format."""
    from pipeline.models import build_model, save_checkpoint

    model = build_model("yolov8n", nc=2)
    model.names = {0: "red", 1: "blue"}
    return save_checkpoint(model, tmp_path_factory.mktemp("tiny_model") / "yolov8n.pt")


@pytest.fixture
def results_dir(tmp_path) -> Path:
    return tmp_path / "results"


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 900, fresh: bool = False):
    """Run `python -m pipeline ARGS`; returns a CompletedProcess (text).

    The run is a child forked from a warm interpreter that has imported torch and Ultralytics once
    (tests/cli_zygote.py), the same code path as a fresh `python -m pipeline` without its seconds of
    imports. A fresh subprocess instead with `fresh=True`, when the environment differs from the one
    the session started with (variables read at import time would not take effect in a fork), when
    another run holds the warm one, or with PIPELINE_TESTS_FRESH_CLI=1.
    """
    import subprocess
    import sys

    argv = [sys.executable, "-m", "pipeline", *args]
    warm = None if fresh or os.environ.get("PIPELINE_TESTS_FRESH_CLI") == "1" else _Zygote.get()
    if warm is not None and warm.serves(os.environ):
        if warm.lock.acquire(blocking=False):
            try:
                return warm.run(argv, args, cwd, timeout)
            finally:
                warm.lock.release()
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)


_SESSION_ENV = dict(os.environ)


class _Zygote:
    """The warm interpreter of tests/cli_zygote.py (started on first use, one per test session)."""

    _instance = None
    _failed = False

    def __init__(self, proc, log: Path, scratch: Path):
        import threading

        self.proc, self.log, self.scratch, self.lock = proc, log, scratch, threading.Lock()
        self.calls, self.buffer, self.imported = 0, b"", {}

    def serves(self, env) -> bool:
        """Whether a run in `env` may be forked: the session's environment, but for the variables the
        imports set (in this process too once a test imports Ultralytics) and pytest's own."""
        def key(e):
            return {k: v for k, v in e.items() if k not in self.imported and k != "PYTEST_CURRENT_TEST"}

        return key(env) == key(_SESSION_ENV)

    @classmethod
    def get(cls):
        if cls._instance is None and not cls._failed:
            cls._instance = cls._start()
            cls._failed = cls._instance is None
        return cls._instance

    @classmethod
    def _start(cls):
        import atexit
        import json
        import subprocess
        import sys
        import tempfile

        scratch = Path(tempfile.mkdtemp(prefix="pipeline-cli-"))
        log = scratch / "zygote.err"
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cli_zygote.py"))], cwd=REPO,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1,
                                    env=_SESSION_ENV)
        atexit.register(proc.kill)
        warm = cls(proc, log, scratch)
        try:
            hello = json.loads(warm._line(300))
            ready, warm.imported = hello.get("ready"), hello.get("imported", {})
        except (TimeoutError, RuntimeError, ValueError):
            ready = False
        # Anything the imports print would reach a fresh run's stderr but not a forked one's: then
        # every run stays a fresh subprocess, so tests of the console see what users see.
        if not ready or log.read_text().strip():
            proc.kill()
            return None
        return warm

    def run(self, argv: list[str], args: tuple[str, ...], cwd: Path, timeout: float):
        import json
        import signal
        import subprocess

        self.calls += 1
        out, err = self.scratch / f"{self.calls}.out", self.scratch / f"{self.calls}.err"
        env = {**self.imported, **os.environ}  # what a fresh run has once it has imported them
        req = {"args": list(args), "cwd": str(cwd), "env": env, "out": str(out), "err": str(err),
               "main": str(REPO / "pipeline" / "__main__.py")}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self._line(None))["pid"]
        try:
            rc, timed_out = json.loads(self._line(timeout))["rc"], False
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            rc, timed_out = json.loads(self._line(None))["rc"], True
        stdout = out.read_text(errors="replace")
        stderr = err.read_text(errors="replace")
        out.unlink(missing_ok=True)
        err.unlink(missing_ok=True)
        if timed_out:
            raise subprocess.TimeoutExpired(argv, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(argv, rc, stdout, stderr)

    def _line(self, timeout: float | None) -> str:
        """The zygote's next answer line, read from the pipe itself (no buffer hides a line from select)."""
        import select
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], wait)[0]:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"the CLI zygote ended; its stderr: {self.log.read_text()[-2000:]}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()
