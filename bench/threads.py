"""CPU threads: 1, every core and the default (0 = auto), idle and beside one CPU-bound process.

    .venv/bin/python bench/threads.py [--repeats 2] [--epochs 2] [--out FILE]

Training (the default preset, `--epochs` epochs), evaluation (the trained best.pt on the validation
split) and pseudo-labelling (`stage=infer` on the unlabeled folder) each run as a fresh
`python -m pipeline` process; the figure is the stage's own `seconds` from its manifest record.
"loaded" starts one busy-looping Python process beside it (the shape of a laptop's browser, a second
job on a CI runner, a data loader). Runs are interleaved (every setting once per round) so that drift
on a shared machine spreads over all of them. The JSON holds each setting's median, the best fixed
choice per workload and condition, and how far the default is behind it (goal: never more than 10%).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
from _common import add_out, write  # noqa: E402

from pipeline.devices import cpu_count  # noqa: E402
from pipeline.engines.common import cpu_flags  # noqa: E402


def simd_flags() -> list[str]:
    """The SIMD flags that decide kernels (AVX2, AVX-512 VNNI, BF16, AMX)."""
    return sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))


def pipeline(results: Path, *args: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pipeline", f"results_dir={results}", *args]
    proc = subprocess.run(cmd, cwd=BENCH.parent, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    records = json.loads((results / "manifest.json").read_text())["runs"]
    return records[-1]


def model_of(results: Path, record: dict[str, Any]) -> Path:
    return results / next(o["path"] for o in record["outputs"] if o["role"] == "model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--experiment", default="default")
    add_out(ap, "threads")
    args = ap.parse_args()

    n = cpu_count()
    settings = {"1": 1, f"every core ({n})": n, "default (auto)": 0}
    work = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    base = [f"experiment={args.experiment}"]
    print(f"preparing a trained model in {work}", flush=True)
    trained = pipeline(work, *base, "stage=train", f"train.epochs={args.epochs}", "train.plots=false")
    best = model_of(work, trained)
    # the 100 validation images as the unlabeled folder: the default set's 20 unlabeled ones take <1 s
    unlabeled = next((work / "datasets").glob("*/images/val"))
    workloads = {
        "train": lambda t: [*base, "stage=train", f"train.epochs={args.epochs}", "train.plots=false", f"train.threads={t}"],
        "evaluate": lambda t: [*base, "stage=evaluate", f"evaluate.input={best}", "evaluate.plots=false",
                               f"evaluate.threads={t}"],
        "infer": lambda t: [*base, "stage=infer", f"infer.input={best}", f"infer.source={unlabeled}", f"infer.threads={t}"],
    }
    seconds: dict[str, dict[str, dict[str, list[float]]]] = {
        w: {c: {s: [] for s in settings} for c in ("idle", "loaded")} for w in workloads}
    for rnd in range(args.repeats):
        for condition in ("idle", "loaded"):
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "loaded" else None
            try:
                time.sleep(0.5 if hog else 0)
                for workload, argv in workloads.items():
                    for name, t in settings.items():
                        record = pipeline(work, *argv(t))
                        seconds[workload][condition][name].append(record["seconds"])
                        print(f"round {rnd + 1} {condition:6} {workload:8} {name:16} {record['seconds']:7.2f} s",
                              flush=True)
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()

    rows = []
    for workload, by_condition in seconds.items():
        for condition, by_setting in by_condition.items():
            med = {s: round(statistics.median(v), 2) for s, v in by_setting.items()}
            fixed = {s: v for s, v in med.items() if s != "default (auto)"}
            best_name = min(fixed, key=fixed.get)
            rows.append({"workload": workload, "condition": condition, "median_s": med, "runs": by_setting,
                         "best_fixed": best_name,
                         "default_vs_best": round(med["default (auto)"] / fixed[best_name], 3)})
    table = ["| workload | condition | " + " | ".join(settings) + " | default / best fixed |",
             "|---|---|" + "---|" * len(settings) + "---|"]
    for r in rows:
        table.append(f"| {r['workload']} | {r['condition']} | "
                     + " | ".join(f"{r['median_s'][s]:.2f}" for s in settings) + f" | {r['default_vs_best']:.3f} |")
    print("\n".join(table))
    write(args.out, {"cpu_flags": simd_flags(), "cores": n, "repeats": args.repeats, "epochs": args.epochs,
                     "experiment": args.experiment, "rows": rows, "markdown": "\n".join(table),
                     "goal": "default within 10% of the best fixed choice in every row",
                     "goal_met": all(r["default_vs_best"] <= 1.10 for r in rows)})


if __name__ == "__main__":
    main()
