"""Time TAO-style threshold pruning of a YOLO model built from its YAML (no evaluation).

    .venv/bin/python bench/prune_speed.py [--model yolov8s] [--threads 2] [--repeats 3]

Each repeat starts from the saved checkpoint and times what `stage=prune` does besides measuring
mAP: load, swap C2f/C3k2, trace the dependency graph and score every group, choose channels
(threshold mode at --pth, and target mode, whose bisection runs on the same machinery), cut, and
save. The model is untrained, so its filter norms are near-uniform: --pth 0.95 is where it cuts.
Goal (issue 5): under 20 s for yolov8s on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_out, write  # noqa: E402

from pipeline.models import build_model, count_params, load_model, save_checkpoint  # noqa: E402
from pipeline.pruning import ChannelPruner  # noqa: E402


def prune_once(src: Path, dst: Path, pth: float | None, target: float | None) -> dict[str, float]:
    times: dict[str, float] = {}
    t = time.perf_counter()
    model = load_model(src)
    times["load"] = time.perf_counter() - t
    t = time.perf_counter()
    pruner = ChannelPruner(model)
    times["graph+scores"] = time.perf_counter() - t
    t = time.perf_counter()
    chosen = pth if target is None else pruner.find_pth(target)[0]
    plan = pruner.plan(chosen)
    times["choose"] = time.perf_counter() - t
    t = time.perf_counter()
    pruner.apply(plan)
    times["cut"] = time.perf_counter() - t
    t = time.perf_counter()
    save_checkpoint(model, dst)
    times["save"] = time.perf_counter() - t
    times["total"] = sum(times.values())
    times["kept_params_ratio"] = count_params(model) / pruner.params_before
    times["pth"] = chosen
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="yolov8s")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pth", type=float, default=0.95)
    ap.add_argument("--target", type=float, default=0.5)
    add_out(ap, "prune_speed")
    args = ap.parse_args()
    rows = []
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the same random weights each run
    with tempfile.TemporaryDirectory() as tmp:
        src = save_checkpoint(build_model(args.model, nc=80), Path(tmp) / "src.pt")
        for label, pth, target in (("threshold", args.pth, None), ("target", None, args.target)):
            runs = [prune_once(src, Path(tmp) / "out.pt", pth, target) for _ in range(args.repeats)]
            last = runs[-1]
            steps = ", ".join(f"{k} {statistics.median(r[k] for r in runs):.2f}"
                              for k in ("load", "graph+scores", "choose", "cut", "save"))
            rows.append({"mode": label, "pth": round(last["pth"], 4), "kept_params_ratio": round(last["kept_params_ratio"], 3),
                         "median_s": round(statistics.median(r["total"] for r in runs), 3),
                         "min_s": round(min(r["total"] for r in runs), 3),
                         "steps_median_s": {k: round(statistics.median(r[k] for r in runs), 3)
                                            for k in ("load", "graph+scores", "choose", "cut", "save")}})
            print(f"{args.model} {label:9s} pth={last['pth']:.4f} kept_params_ratio={last['kept_params_ratio']:.3f}: "
                  f"median {statistics.median(r['total'] for r in runs):.2f} s "
                  f"(min {min(r['total'] for r in runs):.2f}) over {args.repeats} runs, {args.threads} threads [{steps}]")
    write(args.out, {"model": args.model, "threads": args.threads, "repeats": args.repeats, "goal_s": 20, "rows": rows})


if __name__ == "__main__":
    main()
