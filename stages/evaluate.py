"""stage=evaluate: mAP of any model artifact on a split of the dataset.

The input is the newest model of this results dir (train, prune, retrain, export or engine output)
or `evaluate.input=PATH`; `.pt`, `.onnx` (float or QDQ), OpenVINO `*_openvino_model/` folders and
TensorRT `.engine` files all go through the same `pipeline.evaluation.evaluate`, so the numbers
compare along the chain. COCO-style mAP50 / mAP50-95 with per-class AP; `evaluate.ap_mode=voc11|
voc_integrate` adds TAO's AP at IoU 0.5 (`ap50_voc`). With `evaluate.plots`, the PR curve and the
confusion matrices are outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline.context import StageContext, StageResult
from pipeline.errors import UserError
from pipeline.evaluation import available_splits, evaluate
from pipeline.imgsz import model_imgsz, side
from pipeline.models import load_model, model_figures, size_mb

PLOT_ROLES = {"BoxPR_curve.png": "pr_curve", "confusion_matrix.png": "confusion_matrix",
              "confusion_matrix_normalized.png": "confusion_matrix_normalized"}


def run(cfg: DictConfig, ctx: StageContext) -> StageResult:
    ec = cfg.evaluate
    data = ctx.dataset()
    splits = available_splits(data.data_yaml)
    if ec.split not in splits:
        raise UserError(f"evaluate.split={ec.split}: the dataset {data.name} has no {ec.split} split "
                        f"(it has: {', '.join(splits)}); choose one of those")
    path = ctx.input_path("model")
    plots_dir = ctx.run_dir / "plots"
    result = evaluate(path, data.data_yaml, split=str(ec.split), imgsz=ec.imgsz, batch=int(ec.batch),
                      conf=float(ec.conf), iou=float(ec.iou), ap_mode=str(ec.ap_mode), device=ctx.device,
                      save_dir=plots_dir if ec.plots else None, plots=bool(ec.plots),
                      threads=int(ec.threads))
    plots = [Path(p) for p in result.pop("plots", [])]
    metrics: dict[str, Any] = {**result, "split": str(ec.split), **_size_figures(ctx, path, ec.imgsz)}
    if metrics["instances"] == 0:
        ctx.warn(f"the {ec.split} split has no labelled boxes: mAP is 0 by definition")
    outputs = [(PLOT_ROLES[p.name], p) for p in plots if p.name in PLOT_ROLES]
    return StageResult(outputs=outputs, metrics=metrics)


def _size_figures(ctx: StageContext, path: Path, imgsz: int | None) -> dict[str, Any]:
    """size_mb of the artifact; params/GFLOPs measured for a .pt, else taken from the record that made it."""
    if path.suffix == ".pt":
        return model_figures(load_model(path), side(imgsz or model_imgsz(path) or 640), path)
    figures: dict[str, Any] = {"size_mb": size_mb(path)}
    record = ctx.input_record()
    if record is not None:
        for key in ("params", "gflops"):
            if record.get("metrics", {}).get(key) is not None:
                figures[key] = record["metrics"][key]
        figures["figures_from"] = record["run_id"]
    return figures
