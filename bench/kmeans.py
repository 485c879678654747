"""Benchmark pipeline.anchors.kmedians on synthetic log-normal box sizes.

    .venv/bin/python bench/kmeans.py [--boxes 100000] [--k 9] [--seeds 3]

Prints, per seed: seconds, iterations, ms per iteration, mean best IoU and BPR.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_out, write  # noqa: E402

from pipeline import anchors as A  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boxes", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=9)
    ap.add_argument("--seeds", type=int, default=3)
    add_out(ap, "kmeans")
    args = ap.parse_args()
    # box sizes in pixels at 640 px: log-normal around ~20 px, like a real detection set
    boxes = np.random.default_rng(0).lognormal(3.0, 0.6, (args.boxes, 2))
    print(f"{args.boxes} boxes, k={args.k}")
    rows = []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        fit = A.kmedians(boxes, args.k, seed=seed)
        dt = time.perf_counter() - t0
        rows.append({"seed": seed, "seconds": round(dt, 3), "steps": fit.steps, "converged": bool(fit.converged),
                     "mean_iou": round(float(A.mean_best_iou(boxes, fit.anchors)), 4),
                     "bpr": round(float(A.best_possible_recall(boxes, fit.anchors)), 4)})
        print(f"seed {seed}: {dt:6.2f} s, {fit.steps:4d} steps ({1000 * dt / fit.steps:5.1f} ms/step), "
              f"converged={fit.converged}, mean IoU {rows[-1]['mean_iou']:.4f}, BPR {rows[-1]['bpr']:.4f}")
    write(args.out, {"boxes": args.boxes, "k": args.k, "rows": rows})


if __name__ == "__main__":
    main()
