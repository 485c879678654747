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


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 900):
    """Run `python -m pipeline ARGS` in a subprocess; returns CompletedProcess (text)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
