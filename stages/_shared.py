"""What the export and engine stages share and read from the config and the context.

The deployment code in `pipeline.engines` takes plain arguments (paths, sizes, counts); the choices
that depend on a run (which images to calibrate and check parity on, which evaluation settings)
are made here, once, from `cfg` and the stage context.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.context import StageContext
from pipeline.datasets.images import ULTRALYTICS_SUFFIXES
from pipeline.engines.common import CalibrationSet, folder_images, load_batch, pick, split_images
from pipeline.errors import UserError
from pipeline.evaluation import evaluate
from pipeline.imgsz import side


def calib_dir_images(cfg: Any) -> list[Path] | None:
    """The images of engine.calib_dir (None when it is not set); refuses a folder that is not one or holds none."""
    e = cfg.engine
    if not e.calib_dir:
        return None
    folder = Path(str(e.calib_dir)).expanduser()
    if not folder.is_dir():
        raise UserError(f"engine.calib_dir={e.calib_dir} is not a folder; give a folder of calibration images")
    paths = folder_images(folder)
    if not paths:
        raise UserError(f"engine.calib_dir={e.calib_dir} holds no images ({', '.join(sorted(ULTRALYTICS_SUFFIXES))})")
    return paths


def calibration_set(cfg: Any, ctx: StageContext, imgsz: tuple[int, int]) -> CalibrationSet:
    """engine.calib_dir, else the training split: never random data (TAO's silent fallback)."""
    e = cfg.engine
    folder_paths = calib_dir_images(cfg)
    if folder_paths is not None:
        paths, source = folder_paths, str(Path(str(e.calib_dir)).expanduser())
    else:
        data_yaml = ctx.dataset().data_yaml
        paths, source = split_images(data_yaml, "train"), f"train split of {data_yaml}"
        if not paths:
            raise UserError(f"the training split of {data_yaml} has no images to calibrate on; set engine.calib_dir")
    chosen = pick(paths, int(e.calib_images), seed=int(cfg.seed))
    if len(chosen) < int(e.calib_images):
        ctx.warn(f"INT8 calibration uses {len(chosen)} images (engine.calib_images={e.calib_images}); "
                 "a few hundred give steadier ranges")
    ctx.log.info("INT8 calibration: %d images from %s", len(chosen), source)
    return CalibrationSet(chosen, imgsz, int(e.calib_batch), source)


def calibration_record(ctx: StageContext, calib: CalibrationSet) -> dict[str, Any]:
    """What calibration used, for the record; unreadable files it skipped become a warning."""
    if calib.dropped:
        names = ", ".join(p.name for p in calib.dropped[:3]) + (" ..." if len(calib.dropped) > 3 else "")
        ctx.warn(f"INT8 calibration skipped {len(calib.dropped)} of {len(calib)} images that could not be read "
                 f"({names}); it used {calib.used}")
    return {"calib_images": calib.used, "calib_source": calib.source}


def real_batch(ctx: StageContext, imgsz: tuple[int, int], n: int = 8, split: str = "val") -> np.ndarray:
    """The first n images of a dataset split, letterboxed: the batch parity checks run on."""
    data_yaml = ctx.dataset().data_yaml
    paths = split_images(data_yaml, split)
    if not paths:
        raise UserError(f"the {split} split of {data_yaml} has no images")
    return load_batch(paths[:n], imgsz)


def evaluate_artifact(cfg: Any, ctx: StageContext, path: Path, imgsz: tuple[int, int],
                      device: str = "cpu", batch: int | None = None) -> dict[str, Any]:
    """mAP of an exported artifact on the validation split, through the pipeline's one evaluator.

    `batch` overrides evaluate.batch (a TensorRT engine takes no more than its profile's max batch).
    """
    res = evaluate(str(path), ctx.dataset().data_yaml, split="val", imgsz=side(imgsz),
                   batch=int(cfg.evaluate.batch if batch is None else batch),
                   conf=float(cfg.evaluate.conf), iou=float(cfg.evaluate.iou), device=device)
    return {"mAP50": res["mAP50"], "mAP50_95": res["mAP50_95"]}


def source_metrics(ctx: StageContext) -> dict[str, Any]:
    """Metrics of the record that produced the stage's input model ({} for a file from elsewhere)."""
    record = ctx.input_record()
    return dict((record or {}).get("metrics", {}))
