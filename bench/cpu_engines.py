"""CPU engines side by side: is ours (pruned + QAT -> OpenVINO) ahead of what a user would do anyway?

    .venv/bin/python bench/cpu_engines.py RESULTS_DIR [--imgsz 640 320] [--threads 2]
    .venv/bin/python bench/cpu_engines.py --build [--experiment smoke]   # runs the chain first

RESULTS_DIR holds a chain's output (stage=all, or train ... retrain): the unpruned model is the
newest train output, ours the newest retrain output (its QAT model and its float model). For every
image size the script builds, in a scratch folder (the results dir is only read):

  1. unpruned FP32 ONNX (`yolo export format=onnx`)          on ONNX Runtime   <- the baseline
  2. unpruned INT8 (`yolo export format=openvino int8=True`) on OpenVINO       <- the vendor's best
  3. ours: pruned FP32 ONNX                                   on ONNX Runtime
  4. ours: pruned ORT static INT8                             on ONNX Runtime
  5. ours: pruned + QAT QDQ ONNX -> OpenVINO IR (trained scales) on OpenVINO
  6. ours: pruned FP32 -> OpenVINO INT8 by NNCF PTQ           on OpenVINO       (no-QAT reference)

then times them in ONE process, batch 1, fixed threads, in interleaved blocks (these machines are
noisy: compare ratios, never numbers from different runs), median of >= 50 runs after warm-up,
measures each artifact's own mAP50-95 on the validation split, and writes
bench/results/<date>-<host>.json with `speedup_vs_unpruned_fp32_onnx` per row.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pipeline  # noqa: E402,F401  (offline Ultralytics, OpenVINO telemetry blocked)
from pipeline.engines import onnxruntime as ortb  # noqa: E402
from pipeline.engines import openvino as ovb  # noqa: E402
from pipeline.engines.common import CalibrationSet, cpu_model, load_batch, onnx_metadata, pick, split_images  # noqa: E402
from pipeline.manifest import Manifest  # noqa: E402
from pipeline.models import size_mb  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_out, write  # noqa: E402,I001


BASELINE = "unpruned FP32 ONNX"
OURS = "ours: pruned+QAT -> OpenVINO"


def chain_models(results: Path) -> dict[str, Path]:
    """unpruned .pt, ours QAT .pt and float .pt, and the data.yaml, from a chain's manifest."""
    manifest = Manifest(results)

    def newest(stage: str) -> dict[str, Any]:
        runs = manifest.succeeded(stage)
        if not runs:
            sys.exit(f"{results} has no succeeded {stage} run; run the chain first (or use --build)")
        return runs[-1]

    def output(record: dict[str, Any], role: str) -> Path | None:
        entry = next((o for o in record["outputs"] if o["role"] == role), None)
        return manifest.abs(entry["path"]) if entry else None

    train, retrain = newest("train"), newest("retrain")
    data = next(e for e in retrain["inputs"] + train["inputs"] if e["role"] == "dataset")
    qat, float_ = output(retrain, "model"), output(retrain, "float_model")
    if float_ is None:
        sys.exit(f"retrain run {retrain['run_id']} has no float_model: run the chain with retrain.qat=true")
    return {"unpruned": output(train, "model"), "qat": qat, "float": float_, "data": manifest.abs(data["path"]),
            "train_run": train["run_id"], "retrain_run": retrain["run_id"]}


def ultralytics_export(pt: Path, work: Path, **kwargs: Any) -> Path:
    """Ultralytics' own export of a copy of `pt` (nothing is written beside the original)."""
    from ultralytics import YOLO

    work.mkdir(parents=True, exist_ok=True)
    copy = work / "model.pt"
    shutil.copyfile(pt, copy)
    return Path(YOLO(str(copy), task="detect").export(device="cpu", verbose=False, **kwargs))


def build(models: dict[str, Any], imgsz: int, work: Path, calib_images: int) -> list[dict[str, Any]]:
    """The six artifacts at `imgsz` (see module docstring)."""
    data = models["data"]
    calib = CalibrationSet(pick(split_images(data, "train"), calib_images), (imgsz, imgsz), 8, f"train split of {data}")
    ours = dict(format="onnx", imgsz=imgsz, opset=17, dynamic=True, simplify=True)  # stage=export's defaults
    log = SimpleNamespace(info=lambda *a: print(a[0] % a[1:]))

    base_onnx = ultralytics_export(models["unpruned"], work / "u_onnx", format="onnx", imgsz=imgsz)
    vendor_ov = ultralytics_export(models["unpruned"], work / "u_ov", format="openvino", quantize=8, imgsz=imgsz,
                                   data=str(data))
    pruned = ultralytics_export(models["float"], work / "p_onnx", **ours)
    pruned_int8 = work / "p_int8" / "model.onnx"
    pruned_int8.parent.mkdir(parents=True, exist_ok=True)
    ortb.quantize_int8(pruned, pruned_int8, calib, log)
    qdq = ultralytics_export(models["qat"], work / "q_onnx", **ours)
    qat_ov = work / "q_openvino_model"
    ovb.build(qdq, qat_ov, "int8", True, None, onnx_metadata(qdq), log, overflow_fix=work / "q_7bit.onnx")  # the default
    ptq_ov = work / "p_openvino_model"
    ovb.build(pruned, ptq_ov, "int8", False, calib, onnx_metadata(pruned), log)
    return [
        {"name": BASELINE, "runtime": "onnxruntime", "path": base_onnx},
        {"name": "unpruned INT8 (Ultralytics format=openvino int8)", "runtime": "openvino", "path": vendor_ov},
        {"name": "ours: pruned FP32 ONNX", "runtime": "onnxruntime", "path": pruned},
        {"name": "ours: pruned ORT static INT8", "runtime": "onnxruntime", "path": pruned_int8},
        {"name": OURS, "runtime": "openvino", "path": qat_ov},
        {"name": "ours: pruned FP32 -> OpenVINO INT8 (NNCF PTQ)", "runtime": "openvino", "path": ptq_ov},
    ]


def runner(row: dict[str, Any], x: Any, threads: int) -> Any:
    """A zero-argument callable doing one batch-1 inference of the row's artifact."""
    if row["runtime"] == "onnxruntime":
        sess = ortb.session(row["path"], threads)
        name = sess.get_inputs()[0].name
        return lambda: sess.run(None, {name: x})
    xml = next(Path(row["path"]).glob("*.xml"))
    compiled = ovb.compile_static(xml, x.shape, threads)
    executed = ovb.executed_precision(compiled)
    row["executed_precision"] = executed["executed_precision"]
    row["inference_precision_hint"] = executed["inference_precision_hint"]  # ours: recorded f32; vendor: the CPU's
    return lambda: ovb.infer(compiled, x)


def time_interleaved(rows: list[dict[str, Any]], x: Any, threads: int, blocks: int, per_block: int) -> None:
    """Per-call times for every row, in blocks that rotate the order; fills latency figures in place."""
    calls = [runner(r, x, threads) for r in rows]
    for call in calls:
        for _ in range(5):
            call()
    times: list[list[float]] = [[] for _ in rows]
    block_medians: list[list[float]] = [[] for _ in rows]
    for b in range(blocks):
        order = list(range(len(rows)))[b % len(rows):] + list(range(len(rows)))[: b % len(rows)]
        for i in order:
            call, block = calls[i], []
            call()  # re-warm caches after the previous artifact
            for _ in range(per_block):
                t0 = time.perf_counter()
                call()
                block.append((time.perf_counter() - t0) * 1e3)
            times[i] += block
            block_medians[i].append(statistics.median(block))
    for row, t, bm in zip(rows, times, block_medians, strict=True):
        row.update(latency_ms=round(statistics.median(t), 3), best_block_median_ms=round(min(bm), 3), runs=len(t))


def evaluate_rows(rows: list[dict[str, Any]], data: Path, imgsz: int) -> None:
    from pipeline.evaluation import evaluate

    for row in rows:
        res = evaluate(str(row["path"]), data, split="val", imgsz=imgsz, batch=1, device="cpu")
        row.update(mAP50=res["mAP50"], mAP50_95=res["mAP50_95"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="?", type=Path, help="results dir of a chain run (train ... retrain)")
    ap.add_argument("--build", action="store_true", help="run `stage=all` first into a scratch results dir")
    ap.add_argument("--experiment", default="smoke", help="experiment preset for --build")
    ap.add_argument("--imgsz", type=int, nargs="+", default=[640, 320])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=5, help="interleaved timing blocks")
    ap.add_argument("--per-block", type=int, default=12, help="timed runs per artifact per block")
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--no-map", action="store_true", help="skip the mAP evaluations")
    add_out(ap, "cpu_engines")
    args = ap.parse_args()
    if args.blocks * args.per_block < 50:
        ap.error("--blocks x --per-block must give at least 50 timed runs")

    results = args.results
    if args.build or results is None:
        results = Path(tempfile.mkdtemp(prefix="bench-chain-"))
        subprocess.run([sys.executable, "-m", "pipeline", "stage=all", f"experiment={args.experiment}",
                        f"results_dir={results}"], cwd=REPO, check=True)
    models = chain_models(results)
    report: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"), "host": platform.node(), "cpu_model": cpu_model(),
        "threads": args.threads, "batch": 1, "results_dir": str(results),
        "train_run": models["train_run"], "retrain_run": models["retrain_run"],
        "versions": {m: __import__(m).__version__ for m in ("onnxruntime", "openvino", "ultralytics", "torch")},
        "sizes": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-cpu-engines-") as tmp:
        for imgsz in args.imgsz:
            rows = build(models, imgsz, Path(tmp) / str(imgsz), args.calib_images)
            x = load_batch(split_images(models["data"], "val")[:1], (imgsz, imgsz))
            time_interleaved(rows, x, args.threads, args.blocks, args.per_block)
            if not args.no_map:
                evaluate_rows(rows, models["data"], imgsz)
            base = rows[0]["latency_ms"]
            for row in rows:
                row["speedup_vs_unpruned_fp32_onnx"] = round(base / row["latency_ms"], 3)
                row["size_mb"] = size_mb(row["path"])
                row["path"] = row["path"].name
            report["sizes"][str(imgsz)] = {"rows": rows, "goals": goals(rows)}
            print_table(imgsz, rows)
    write(args.out, report)


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 13's goals for ours vs the vendor's OpenVINO INT8 and the unpruned ONNX, met or not."""
    by = {r["name"]: r for r in rows}
    ours, vendor, base = by[OURS], rows[1], by[BASELINE]
    g: dict[str, Any] = {
        "vs_vendor_openvino_int8": round(vendor["latency_ms"] / ours["latency_ms"], 3),
        "vs_unpruned_fp32_onnx": ours["speedup_vs_unpruned_fp32_onnx"],
    }
    g["faster_goals_met"] = g["vs_vendor_openvino_int8"] >= 2.0 and g["vs_unpruned_fp32_onnx"] >= 5.0
    if "mAP50_95" in ours:
        g["mAP50_95_points_below_unpruned_float"] = round(100 * (base["mAP50_95"] - ours["mAP50_95"]), 2)
        g["accuracy_goal_met"] = g["mAP50_95_points_below_unpruned_float"] <= 1.0
    return g


def print_table(imgsz: int, rows: list[dict[str, Any]]) -> None:
    print(f"\n{imgsz} px, batch 1 ({rows[0]['runs']} runs each, interleaved)")
    print(f"{'artifact':52} {'runtime':12} {'ms':>8} {'best blk':>9} {'speedup':>8} {'mAP50-95':>9} {'MB':>7}")
    for r in rows:
        m = f"{r['mAP50_95']:.3f}" if "mAP50_95" in r else "-"
        print(f"{r['name']:52} {r['runtime']:12} {r['latency_ms']:8.2f} {r['best_block_median_ms']:9.2f} "
              f"{r['speedup_vs_unpruned_fp32_onnx']:7.2f}x {m:>9} {r['size_mb']:7.2f}")


if __name__ == "__main__":
    main()
