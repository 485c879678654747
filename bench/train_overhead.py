"""Overhead of stage=train over plain Ultralytics: one training epoch, same data, same settings.

    .venv/bin/python bench/train_overhead.py [--repeats 3] [--images 300] [--imgsz 160] [--epochs 1]

"ours" is the whole stage through the runner (`run_stage(cfg, "train")`: manifest record, model
build, Ultralytics' trainer through pipeline.training.fit, evaluation of best.pt, params/GFLOPs,
curves.png, checksums). "plain" is `YOLO("yolov8n.yaml").train(...)` with the same arguments on the
same data.yaml (the pipeline's embedded synthetic dataset, generated once); its final re-validation of
best.pt is the counterpart of our evaluation. Runs are interleaved (ABBA) in one process, so machine
load hits both alike; the ratio of medians is printed.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pipeline  # noqa: E402,F401  (offline-safe Ultralytics before it is imported)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_out, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="pairs of runs (ours, plain), interleaved ABBA")
    ap.add_argument("--images", type=int, default=300, help="synthetic training images (default experiment: 300)")
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    add_out(ap, "train_overhead")
    a = ap.parse_args()

    from hydra import compose, initialize_config_dir

    from pipeline.config import register
    from pipeline.datasets import prepare
    from pipeline.runner import run_stage
    from pipeline.training import TRAINER_KEYS

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("ultralytics").setLevel(logging.WARNING)  # keep the timing lines readable
    work = Path(tempfile.mkdtemp(prefix="train-overhead-"))
    overrides = [
        "stage=train", f"results_dir={work / 'results'}", "seed=0",
        f"dataset.synthetic_train={a.images}", f"dataset.synthetic_val={max(a.images // 4, 8)}",
        "dataset.synthetic_unlabeled=0", f"dataset.synthetic_imgsz={a.imgsz}",
        f"train.epochs={a.epochs}", f"train.imgsz={a.imgsz}", f"train.batch={a.batch}", "train.workers=0",
        "train.plots=false", "train.close_mosaic=0", "train.device=cpu", "device=cpu", "train.sparsity=none",
    ]
    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    info = prepare(cfg.dataset, Path(cfg.results_dir).resolve(), seed=0, log=logging.getLogger("bench"))
    tc = cfg.train
    # Exactly the Ultralytics arguments stage=train passes (sparsity off: plain Ultralytics has none).
    plain_args = {k: tc[k] for k in TRAINER_KEYS} | {
        "data": str(info.data_yaml), "seed": 0, "device": "cpu", "amp": False, "workers": 0,
    }

    def ours() -> float:
        t0 = time.perf_counter()
        record = run_stage(cfg, "train", [])
        assert record["status"] == "succeeded"
        return time.perf_counter() - t0

    def plain(i: int) -> float:
        from ultralytics import YOLO

        t0 = time.perf_counter()
        YOLO("yolov8n.yaml").train(**plain_args, project=str(work / "plain"), name=f"run{i + 1}", exist_ok=True)
        return time.perf_counter() - t0

    ours(), plain(-1)  # warm-up: imports, dataset label caches, first-run allocations
    times: dict[str, list[float]] = {"ours": [], "plain": []}
    for i in range(a.repeats):
        order = ("ours", "plain") if i % 2 == 0 else ("plain", "ours")
        for name in order:
            times[name].append(ours() if name == "ours" else plain(i))
        print(f"repeat {i + 1}: ours {times['ours'][-1]:.2f} s, plain {times['plain'][-1]:.2f} s", flush=True)

    m_ours, m_plain = statistics.median(times["ours"]), statistics.median(times["plain"])
    print(f"\n{a.epochs} epoch(s), {a.images} images at {a.imgsz} px, batch {a.batch}, {a.repeats} interleaved pairs")
    for name, median in (("ours", m_ours), ("plain", m_plain)):
        print(f"median {name:5s} {median:.2f} s  ({', '.join(f'{t:.2f}' for t in times[name])})")
    print(f"ratio ours/plain = {m_ours / m_plain:.3f}  (overhead {100 * (m_ours / m_plain - 1):+.1f}%)")
    write(a.out, {"epochs": a.epochs, "images": a.images, "imgsz": a.imgsz, "batch": a.batch, "repeats": a.repeats,
                  "seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
                  "median_s": {"ours": round(m_ours, 2), "plain": round(m_plain, 2)},
                  "ratio_ours_over_plain": round(m_ours / m_plain, 4), "goal_ratio_below": 1.05})


if __name__ == "__main__":
    main()
