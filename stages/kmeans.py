"""kmeans stage: anchor shapes and box-size analytics of the training labels (TAO's `kmeans`).

YOLOv8 / YOLO11 heads are anchor-free, so these anchors never feed the Ultralytics model. They
describe the dataset's box shapes, drive the input-size recommendation when many boxes are tiny,
and export to anchor-based tools (TAO yolo_v4, Darknet). See docs/kmeans.md.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import anchors as A
from pipeline.context import StageContext, StageResult
from pipeline.errors import UserError
from pipeline.manifest import atomic_write_bytes, atomic_write_text

PLOT_POINTS = 20000  # boxes drawn in the scatter plot (a seeded sample when there are more)


def run(cfg: Any, ctx: StageContext) -> StageResult:
    k_cfg = cfg.kmeans
    k, width, height = int(k_cfg.num_clusters), int(k_cfg.width), int(k_cfg.height)
    ctx.log.info(
        "kmeans: %s heads are anchor-free; these anchors are dataset analytics and an export for "
        "anchor-based tools (TAO yolo_v4, Darknet), not an input to the model", cfg.model.name,
    )
    info = ctx.dataset()
    boxes = A.read_yolo_boxes(info.root / "images" / "train", info.root / "labels" / "train")
    if boxes.skipped_lines:
        ctx.warn(f"kmeans: {boxes.skipped_lines} label lines are not boxes and were skipped")
    wh = A.scale_boxes(boxes, width, height, k_cfg.resize)
    valid = (wh > 0).all(1)
    kept = valid & (wh.min(1) >= float(k_cfg.min_box_px))
    ignored = int(valid.sum() - kept.sum())
    if ignored:
        ctx.log.info("kmeans: %d boxes with a side below kmeans.min_box_px=%s px ignored", ignored, k_cfg.min_box_px)
    fit_boxes = wh[kept]
    if not len(fit_boxes):
        raise UserError(
            f"kmeans found no usable boxes in {info.root / 'labels' / 'train'} ({len(wh)} boxes, {ignored} below "
            f"kmeans.min_box_px={k_cfg.min_box_px}); check the dataset labels or lower kmeans.min_box_px"
        )
    distinct = A.distinct_boxes(fit_boxes)
    if k > distinct:
        raise UserError(
            f"kmeans.num_clusters={k} is more than the {distinct} distinct box shapes in the training labels; "
            f"use kmeans.num_clusters<={distinct}"
        )
    fit = A.kmedians(fit_boxes, k, seed=int(cfg.seed), max_steps=int(k_cfg.max_steps))
    if not fit.converged:
        ctx.warn(f"kmeans: stopped at kmeans.max_steps={k_cfg.max_steps} before the clusters settled")

    imgsz = max(width, height)
    native = int(np.median(boxes.image_wh.max(1))) if len(boxes.image_wh) else imgsz
    sizes = np.sqrt(wh[valid].prod(1))
    small, recommended = A.recommend_imgsz(sizes, imgsz, native)
    if recommended > imgsz:
        ctx.warn(
            f"kmeans: {small:.0%} of boxes are under {A.SMALL_BOX_PX:g} px at {width}x{height}; "
            f"consider train.imgsz={recommended}"
        )
    anchors = np.round(fit.anchors, 1)
    anchors = anchors[np.argsort(anchors.prod(1), kind="stable")]  # rounding may swap near-equal areas
    metrics: dict[str, Any] = {
        "k": k,
        "anchors": anchors.tolist(),
        "mean_iou": round(A.mean_best_iou(fit_boxes, fit.anchors), 4),
        "bpr": round(A.best_possible_recall(fit_boxes, fit.anchors), 4),
        "boxes": int(len(fit_boxes)),
        "ignored_boxes": ignored,
        "images": boxes.images,
        "small_box_fraction": round(small, 4),
        "recommended_imgsz": recommended,
        "steps": fit.steps,
        "reseeded_clusters": fit.reseeded,
    }
    ctx.log.info("kmeans: anchors %s (mean IoU %.3f, BPR %.3f)", metrics["anchors"], metrics["mean_iou"], metrics["bpr"])

    out = ctx.run_dir
    summary = {**metrics, "width": width, "height": height, "resize": k_cfg.resize, "seed": int(cfg.seed),
               "converged": fit.converged, "bpr_ratio": A.BPR_RATIO}
    atomic_write_text(out / "anchors.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "anchors.txt", A.darknet_line(anchors) + "\n")
    outputs: list[tuple[str, Path]] = [("anchors", out / "anchors.json"), ("darknet", out / "anchors.txt")]
    if k >= 3:
        if k % 3:
            ctx.warn(f"kmeans.num_clusters={k} does not split evenly over TAO's 3 scales; use a multiple of 3 for TAO")
        atomic_write_text(out / "tao_yolo_v4_anchors.txt", A.tao_spec(anchors))
        outputs.append(("tao_spec", out / "tao_yolo_v4_anchors.txt"))
    else:
        ctx.warn(f"kmeans.num_clusters={k}: no TAO spec written (TAO yolo_v4 needs anchors for 3 scales)")
    plot = out / "anchors.png"
    _plot(wh[valid], fit.anchors, plot, f"{width}x{height} {k_cfg.resize}", metrics, int(cfg.seed))
    outputs.append(("plot", plot))
    return StageResult(outputs=outputs, metrics=metrics)


def _plot(wh: np.ndarray, anchors: np.ndarray, path: Path, size: str, metrics: dict[str, Any], seed: int) -> None:
    """Scatter of box width/height (a sample) with the anchors on top."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if len(wh) > PLOT_POINTS:
        wh = wh[np.random.default_rng(seed).choice(len(wh), PLOT_POINTS, replace=False)]
    fig = Figure(figsize=(6, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(wh[:, 0], wh[:, 1], s=4, alpha=0.3, color="tab:blue", label=f"boxes ({metrics['boxes']})")
    ax.scatter(anchors[:, 0], anchors[:, 1], s=90, marker="x", color="tab:red", linewidths=2,
               label=f"anchors (k={metrics['k']})")
    ax.set_xlabel(f"box width (px, {size})")
    ax.set_ylabel("box height (px)")
    ax.set_title(f"mean IoU {metrics['mean_iou']:.3f}, BPR {metrics['bpr']:.3f}")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
