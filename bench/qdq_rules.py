"""Does the QDQ placement pass make our QAT engine fuse? Default placement vs pipeline.qdq_rules vs NNCF PTQ.

    .venv/bin/python bench/qdq_rules.py RESULTS_DIR [--imgsz 160 640] [--threads 2]

RESULTS_DIR holds a chain's output (stage=all with retrain.qat=true). For every image size, from
the newest retrain run's models, on OpenVINO (the default CPU engine, 7-bit weight overflow fix on
both QDQ rows as the engine stage builds them):

  (a) the QAT QDQ ONNX as ModelOpt's default placement exports it
  (b) the same ONNX after pipeline.qdq_rules.apply (b': with residual_add=False)
  (c) the pruned float model quantised by NNCF PTQ (the no-QAT reference)

timed in ONE process, batch 1, interleaved blocks (bench/cpu_engines.py's helpers), with the ops
the compiled model runs per precision and its reorders, and mAP50-95 at the sizes in --map-imgsz.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_engines as ce  # noqa: E402  (puts the repo on sys.path)
from _common import add_out, write  # noqa: E402

from pipeline import qdq_rules  # noqa: E402
from pipeline.engines import openvino as ovb  # noqa: E402
from pipeline.engines.common import CalibrationSet, load_batch, onnx_metadata, pick, split_images  # noqa: E402


def build(models: dict[str, Any], imgsz: int, work: Path, calib_images: int) -> list[dict[str, Any]]:
    import onnx

    log = SimpleNamespace(info=lambda *a: print(a[0] % a[1:]))
    ours = dict(format="onnx", imgsz=imgsz, opset=17, dynamic=True, simplify=True)  # stage=export's defaults
    qdq = ce.ultralytics_export(models["qat"], work / "q_onnx", **ours)
    ruled = {}
    for add in (True, False):
        proto = onnx.load(str(qdq))
        print(f"qdq_rules (residual_add={add}):", qdq_rules.apply(proto, residual_add=add))
        ruled[add] = work / f"q_rules_{add}.onnx"
        onnx.save(proto, str(ruled[add]))
    pruned = ce.ultralytics_export(models["float"], work / "p_onnx", **ours)
    calib = CalibrationSet(pick(split_images(models["data"], "train"), calib_images), (imgsz, imgsz), 8, "train split")
    rows = [
        {"name": "(a) QAT QDQ, default placement", "src": qdq, "qdq": True},
        {"name": "(b) QAT QDQ + qdq_rules", "src": ruled[True], "qdq": True},
        {"name": "(b') qdq_rules, Add inputs float", "src": ruled[False], "qdq": True},
        {"name": "(c) pruned float, NNCF PTQ", "src": pruned, "qdq": False},
    ]
    for i, row in enumerate(rows):
        row["path"] = work / f"{i}_openvino_model"
        row["runtime"] = "openvino"
        ovb.build(row.pop("src"), row["path"], "int8", row["qdq"], None if row["qdq"] else calib,
                  onnx_metadata(qdq), log, overflow_fix=work / f"{i}_7bit.onnx" if row["qdq"] else None)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="results dir of a chain run with retrain.qat=true")
    ap.add_argument("--imgsz", type=int, nargs="+", default=[160, 640])
    ap.add_argument("--map-imgsz", type=int, nargs="*", default=[160], help="sizes to measure mAP50-95 at")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--per-block", type=int, default=15)
    ap.add_argument("--calib-images", type=int, default=256)
    add_out(ap, "qdq_rules")
    args = ap.parse_args()
    models = ce.chain_models(args.results)
    report: dict[str, Any] = {"results_dir": str(args.results), "threads": args.threads, "batch": 1,
                              "retrain_run": models["retrain_run"], "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-qdq-rules-") as tmp:
        for imgsz in args.imgsz:
            rows = build(models, imgsz, Path(tmp) / str(imgsz), args.calib_images)
            x = load_batch(split_images(models["data"], "val")[:1], (imgsz, imgsz))
            for row in rows:
                executed = ovb.executed_precision(ovb.compile_static(next(row["path"].glob("*.xml")), x.shape,
                                                                     args.threads))
                row.update(ops_by_precision=executed["ops_by_precision"], reorders=executed["reorders"])
            ce.time_interleaved(rows, x, args.threads, args.blocks, args.per_block)
            if imgsz in args.map_imgsz:
                ce.evaluate_rows(rows, models["data"], imgsz)
            for row in rows:
                row["path"] = row["path"].name
            report["sizes"][str(imgsz)] = rows
            print(f"\n{imgsz} px, batch 1, {args.threads} threads ({rows[0]['runs']} runs each, interleaved)")
            for r in rows:
                m = f"{r['mAP50_95']:.3f}" if "mAP50_95" in r else "-"
                print(f"{r['name']:34} {r['latency_ms']:8.2f} ms  best block {r['best_block_median_ms']:7.2f}  "
                      f"mAP50-95 {m}  ops {r['ops_by_precision']}  reorders {r['reorders']}")
    write(args.out, report)


if __name__ == "__main__":
    main()
