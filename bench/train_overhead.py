"""Overhead of stage=train over plain Ultralytics: one training epoch, same data, same settings.

    .venv/bin/python bench/train_overhead.py [--repeats 3] [--images 300] [--imgsz 160] [--epochs 1]

"ours" is the whole stage through the runner (`run_stage(cfg, "train")`: manifest record, model
build, Ultralytics' trainer through pipeline.training.fit, evaluation of best.pt, params/GFLOPs,
curves.png, checksums). "plain" is `YOLO("yolov8n.yaml").train(...)` with the same arguments on the
same data.yaml (the pipeline's embedded synthetic dataset, generated once); its final re-validation of
best.pt is the counterpart of our evaluation. Runs are interleaved (ABBA) in one process, so machine
load hits both alike; the ratio of medians is printed.

On a CPU stage=train computes on every core where Ultralytics keeps cores - 1 threads
(`train.threads`, docs/train-evaluate.md). So that the ratio measures overhead, "plain" gets the same
thread count (a callback); "plain_default" is Ultralytics untouched, and ours / plain_default is the
speed-up a user sees (`--no-default` skips it).
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
    ap.add_argument("--no-default", action="store_true", help="skip plain Ultralytics with its own thread count")
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

    import torch

    from pipeline.devices import cpu_count

    threads = int(cfg.train.threads) or cpu_count()

    def plain(i: int, same_threads: bool = True) -> float:
        from ultralytics import YOLO

        model = YOLO("yolov8n.yaml")
        if same_threads:
            model.add_callback("on_pretrain_routine_end", lambda trainer: torch.set_num_threads(threads))
        t0 = time.perf_counter()
        model.train(**plain_args, project=str(work / "plain"), name=f"run{i + 1}", exist_ok=True)
        return time.perf_counter() - t0

    runners = {"ours": ours, "plain": plain}
    if not a.no_default:
        runners["plain_default"] = lambda i: plain(i, same_threads=False)
    ours(), plain(-1)  # warm-up: imports, dataset label caches, first-run allocations
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(a.repeats):
        order = list(runners) if i % 2 == 0 else list(reversed(runners))
        for name in order:
            times[name].append(ours() if name == "ours" else runners[name](i))
        print(f"repeat {i + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in runners), flush=True)

    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"\n{a.epochs} epoch(s), {a.images} images at {a.imgsz} px, batch {a.batch}, {a.repeats} interleaved rounds, "
          f"{threads} compute threads (plain_default: Ultralytics' own)")
    for name, median in med.items():
        print(f"median {name:13s} {median:.2f} s  ({', '.join(f'{t:.2f}' for t in times[name])})")
    ratio = med["ours"] / med["plain"]
    print(f"ratio ours/plain = {ratio:.3f}  (overhead {100 * (ratio - 1):+.1f}%)")
    result = {"epochs": a.epochs, "images": a.images, "imgsz": a.imgsz, "batch": a.batch, "repeats": a.repeats,
              "threads": threads, "seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
              "median_s": {k: round(v, 2) for k, v in med.items()},
              "ratio_ours_over_plain": round(ratio, 4), "goal_ratio_below": 1.05}
    if "plain_default" in med:
        result["ratio_ours_over_plain_default_threads"] = round(med["ours"] / med["plain_default"], 4)
        print(f"ratio ours/plain_default = {result['ratio_ours_over_plain_default_threads']:.3f}  "
              "(the speed-up over Ultralytics as it comes)")
    write(a.out, result)


if __name__ == "__main__":
    main()
