"""The one evaluation function: any model artifact, any backend, COCO-style mAP and TAO's VOC AP.

Detections come from Ultralytics' own validator (`DetectionValidator` through `AutoBackend`), so a
`.pt`, a float or QDQ `.onnx`, an OpenVINO IR folder and a TensorRT `.engine` are run, letterboxed,
NMS'ed and matched to the ground truth the same way, and numbers compare along the chain.

From the validator's matched statistics (per detection: correct at IoU 0.50:0.05:0.95, confidence,
class; per label: class) this module computes the AP itself:

- `coco` (default): COCO's 101-point interpolated AP (pycocotools' `accumulate`: the precision
  envelope sampled at recall 0, 0.01, ..., 1 and averaged), per class, then averaged over the classes
  that have labels. mAP50 is the IoU 0.5 column, mAP50_95 the mean of the ten IoU columns.
  Ultralytics' printed mAP integrates the same envelope with the trapezoid rule and caps a perfect
  detector at 0.995; ours gives 1.0 and matches pycocotools on the same detections (tests check it).
- `voc11` / `voc_integrate`: TAO's AP at IoU 0.5 (`SAMPLE`: VOC2007 11-point; `INTEGRATE`: area under
  the interpolated curve, VOC2010+), reported as `ap50_voc` and `per_class_ap50_voc` on top of the COCO
  figures.

precision / recall are Ultralytics' (at the confidence that maximises the mean F1 over classes).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from pipeline import safe_load
from pipeline.devices import CoreMeter, threads_kept, use_cores
from pipeline.errors import UserError
from pipeline.imgsz import model_imgsz
from pipeline.yolo_env import verbose

AP_MODES = ("coco", "voc11", "voc_integrate")
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # the validator's iouv (COCO's IoU thresholds)
_COCO_RECALLS = np.linspace(0.0, 1.0, 101)
_VOC11_RECALLS = np.linspace(0.0, 1.0, 11)
_STAT_KEYS = ("tp", "conf", "pred_cls", "target_cls")
PLOT_FILES = ("BoxPR_curve.png", "confusion_matrix.png", "confusion_matrix_normalized.png")

log = logging.getLogger("pipeline")


def evaluate(
    model: str | Path | nn.Module,
    data_yaml: str | Path,
    *,
    split: str = "val",
    imgsz: int | list[int] | None = None,
    batch: int = 16,
    conf: float = 0.001,
    iou: float = 0.7,
    ap_mode: str = "coco",
    device: str = "cpu",
    save_dir: str | Path | None = None,
    plots: bool = False,
    threads: int = 0,
) -> dict[str, Any]:
    """mAP50, mAP50_95, precision, recall, per-class AP of `model` on `split` of the dataset.

    `model` is a path to any artifact Ultralytics' AutoBackend runs (.pt, .onnx, `*_openvino_model/`,
    .engine) or an in-memory nn.Module (the validator works on a copy: it fuses Conv+BN in place).
    `imgsz=None` uses the model's training/export size. With `plots`, the PR curve and confusion matrix
    PNGs are written to `save_dir` and listed under the returned key "plots".
    """
    if ap_mode not in AP_MODES:
        raise UserError(f"ap_mode={ap_mode!r} is not valid; choose one of: {', '.join(AP_MODES)}")
    data = _read_data_yaml(data_yaml)
    if split not in available_splits(data_yaml):
        have = ", ".join(available_splits(data_yaml))
        raise UserError(f"split={split} is not in the dataset {data_yaml} (it has: {have}); choose one of those")
    if not isinstance(model, nn.Module):
        model = Path(model)
        if not model.exists():
            raise UserError(f"model {model} does not exist; give the path of a model file or folder")
        if model.suffix == ".pt":
            safe_load.check(model)  # Ultralytics' loader below unpickles in full
        if model.is_dir():  # an *_openvino_model/ folder: compiled at the float precision it records
            from pipeline.engines.openvino import honour_recorded_precision

            honour_recorded_precision()
        if model.suffix == ".engine":
            from pipeline.engines.tensorrt import check_compatible

            check_compatible(model, strict=False)  # no TensorRT / another GPU: one line, exit 2
            from pipeline.engines.tensorrt import profile_max_batch

            batch = min(batch, profile_max_batch(model) or batch)  # TensorRT refuses batches above its profile
    names = _names(data)
    size = imgsz or model_imgsz(model) or 640

    with contextlib.ExitStack() as stack:
        out = Path(save_dir) if save_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        out.mkdir(parents=True, exist_ok=True)
        args = {
            "task": "detect", "mode": "val", "data": str(data_yaml), "split": split, "imgsz": size, "batch": batch,
            "conf": conf, "iou": iou, "device": device, "plots": plots, "verbose": False, "rect": True,
            "save_json": False, "model": None if isinstance(model, nn.Module) else str(model),
        }
        validator = _recorder_class()(save_dir=out, args=args)
        validator.data_names = names
        validator.cpu_threads = int(threads)  # read by _every_core (0 = the free cores, pipeline.devices)
        validator.cpu_meter = CoreMeter()  # measures while the validator loads the model and data
        validator.add_callback("on_val_start", _every_core)
        with threads_kept():
            # A module is deep-copied by the validator (get_model) before AutoBackend fuses it.
            validator(model=model if isinstance(model, nn.Module) else str(model))
        result = summarize(validator.matched, names, ap_mode=ap_mode)
        result["images"] = int(validator.seen)
        used = validator.args.imgsz  # an export of fixed shape is run at its own size, whatever was asked
        result["imgsz"] = int(used) if isinstance(used, int) else [int(v) for v in used]
        if validator.mapped_classes is not None:
            result["class_map"] = validator.mapped_classes
        if plots:
            result["plots"] = [str(out / f) for f in PLOT_FILES if (out / f).exists()]
    return result


def _every_core(validator: Any) -> None:
    """on_val_start (after the validator's select_device): a CPU evaluation computes on every core."""
    if getattr(validator.device, "type", None) == "cpu":
        use_cores(getattr(validator, "cpu_threads", 0), getattr(validator, "cpu_meter", None))


@functools.cache
def _recorder_class() -> type:
    """Ultralytics' DetectionValidator that checks the model's classes against the dataset's, matches the
    boxes a user receives (in the image's pixels, clipped to it) and keeps the matched statistics it
    clears after its own metrics."""
    from ultralytics.models.yolo.detect import DetectionValidator
    from ultralytics.utils import ops

    class MatchRecorder(DetectionValidator):
        matched: dict[str, np.ndarray]
        data_names: dict[int, str]
        mapped_classes: dict[str, int] | None = None  # model class name -> dataset class id, when reordered
        _remap: torch.Tensor | None = None

        def get_dataloader(self, dataset_path: str, batch_size: int) -> Any:
            # Here the model is loaded (self.names are its classes) and no label has been dropped yet:
            # Ultralytics would silently drop the labels of classes a smaller model lacks.
            remap = class_remap(self.names, self.data_names)
            if remap is not None:
                self._remap = torch.as_tensor(remap, dtype=torch.float32)
                self.mapped_classes = {str(self.names[i]): int(d) for i, d in enumerate(remap)}
                log.info("evaluate: the model's classes %s are the dataset's %s in another order; predictions are "
                         "mapped by name", list(self.names.values()), list(self.data_names.values()))
            return super().get_dataloader(dataset_path, batch_size)

        def init_metrics(self, model: nn.Module) -> None:
            super().init_metrics(model)
            if self._remap is not None:  # predictions carry the dataset's ids from here on
                self.names = self.metrics.names = dict(self.data_names)
                self.confusion_matrix.names = list(self.data_names.values())

        def _prepare_pred(self, pred: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            pred = super()._prepare_pred(pred)
            if self._remap is not None and len(pred["cls"]):
                pred["cls"] = self._remap.to(pred["cls"].device)[pred["cls"].long()]
            return pred

        def _process_batch(self, preds: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, np.ndarray]:
            # Match in the original image's pixels with the detections clipped to the image, as a user
            # receives them from predict (scale_boxes clips); the letterbox frame would let a box reach
            # into the padding. The labels lie inside the image, so clipping leaves them as they are.
            if preds["cls"].shape[0] and batch["cls"].shape[0]:
                def to_image(boxes: torch.Tensor) -> torch.Tensor:
                    return ops.scale_boxes(batch["imgsz"], boxes.clone(), batch["ori_shape"],
                                           ratio_pad=batch["ratio_pad"])

                preds = {**preds, "bboxes": to_image(preds["bboxes"])}
                batch = {**batch, "bboxes": to_image(batch["bboxes"])}
            return super()._process_batch(preds, batch)

        def get_desc(self) -> str:
            # The progress bar's title; Ultralytics' is its table header, whose rows we leave out
            # (one mAP per evaluation: ours) unless verbose=true.
            return super().get_desc() if verbose() else f"{'evaluate':>22}"

        def get_stats(self) -> dict[str, Any]:
            stats = self.metrics.stats
            self.matched = concat_stats([{k: np.concatenate(stats[k], 0) for k in _STAT_KEYS}] if stats["tp"] else [])
            return super().get_stats()

    return MatchRecorder


def class_remap(model_names: dict[int, str], data_names: dict[int, str]) -> list[int] | None:
    """Dataset class id of each model class id when the model has the dataset's classes in another order;
    None when they are in the same order. Different classes raise UserError naming both lists.

    A model without recorded names (Ultralytics' placeholders class0, class1, ...) is compared by count.
    """
    model = [str(model_names[k]) for k in sorted(model_names)]
    data = [str(data_names[k]) for k in sorted(data_names)]
    unnamed = model == [f"class{i}" for i in range(len(model))]
    if model == data or (unnamed and len(model) == len(data)):
        return None
    if unnamed or sorted(model) != sorted(data) or len(set(data)) != len(data):
        raise UserError(f"the model's classes {model} are not the dataset's {data}: evaluate it on the dataset it "
                        "was trained on (dataset.path) or give a model trained on this one (evaluate.input)")
    return [data.index(n) for n in model]


def summarize(stats: dict[str, np.ndarray], names: dict[int, str] | list[str], ap_mode: str = "coco") -> dict[str, Any]:
    """Metrics from matched statistics: tp (N, 10) bool, conf (N,), pred_cls (N,), target_cls (M,)."""
    from ultralytics.utils.metrics import ap_per_class

    names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else {int(k): str(v) for k, v in names.items()}
    tp = np.asarray(stats["tp"], dtype=bool).reshape(-1, len(IOU_THRESHOLDS))
    conf = np.asarray(stats["conf"], dtype=float).reshape(-1)
    pred_cls = np.asarray(stats["pred_cls"]).reshape(-1).astype(int)
    target_cls = np.asarray(stats["target_cls"]).reshape(-1).astype(int)

    classes, n_gt = np.unique(target_cls, return_counts=True)
    ap = np.zeros((len(classes), tp.shape[1]))
    ap50_voc = np.zeros(len(classes))
    for ci, (c, n) in enumerate(zip(classes, n_gt, strict=True)):
        sel = np.flatnonzero(pred_cls == c)
        hits = tp[sel[np.argsort(-conf[sel], kind="stable")]]
        ap[ci] = average_precision(hits, int(n), "coco")
        if ap_mode != "coco":
            ap50_voc[ci] = average_precision(hits[:, :1], int(n), ap_mode)[0]

    precision = recall = 0.0
    if len(classes) and len(conf):
        p, r = ap_per_class(tp, conf, pred_cls, target_cls)[2:4]
        precision, recall = float(p.mean()), float(r.mean())
    label = [names.get(int(c), str(int(c))) for c in classes]
    result: dict[str, Any] = {
        "mAP50": float(ap[:, 0].mean()) if len(classes) else 0.0,
        "mAP50_95": float(ap.mean()) if len(classes) else 0.0,
        "precision": precision,
        "recall": recall,
        "per_class": {k: round(float(v), 6) for k, v in zip(label, ap.mean(1), strict=True)},
        "per_class_ap50": {k: round(float(v), 6) for k, v in zip(label, ap[:, 0], strict=True)},
        "instances": int(len(target_cls)),
        "ap_mode": ap_mode,
    }
    if ap_mode != "coco":
        result["ap50_voc"] = float(ap50_voc.mean()) if len(classes) else 0.0
        result["per_class_ap50_voc"] = {k: round(float(v), 6) for k, v in zip(label, ap50_voc, strict=True)}
    return result


def average_precision(hits: np.ndarray, n_gt: int, mode: str = "coco") -> np.ndarray:
    """AP per IoU column of one class; `hits` (N, K) are the detections' correctness, highest confidence first."""
    hits = np.asarray(hits, dtype=bool)
    hits = hits.reshape(len(hits), -1) if hits.ndim != 2 else hits
    k = hits.shape[1]
    if n_gt <= 0 or len(hits) == 0:
        return np.zeros(k)
    tpc = np.cumsum(hits, 0)
    fpc = np.cumsum(~hits, 0)
    recall = tpc / n_gt
    precision = tpc / np.maximum(tpc + fpc, np.finfo(float).eps)
    out = np.zeros(k)
    for j in range(k):
        if mode == "voc_integrate":
            mrec = np.concatenate(([0.0], recall[:, j], [1.0]))
            mpre = np.concatenate(([0.0], precision[:, j], [0.0]))
            mpre = np.maximum.accumulate(mpre[::-1])[::-1]
            i = np.flatnonzero(mrec[1:] != mrec[:-1])
            out[j] = float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))
        else:
            # Sampled envelope: precision at the first detection whose recall reaches each threshold
            # (= max precision at recall >= threshold), 0 where the recall is never reached.
            thresholds = _COCO_RECALLS if mode == "coco" else _VOC11_RECALLS
            envelope = np.maximum.accumulate(precision[::-1, j])[::-1]
            idx = np.searchsorted(recall[:, j], thresholds, side="left")
            out[j] = float(np.where(idx < len(envelope), envelope[np.minimum(idx, len(envelope) - 1)], 0.0).mean())
    return out


def match_detections(
    pred_boxes: np.ndarray, pred_conf: np.ndarray, pred_cls: np.ndarray, gt_boxes: np.ndarray, gt_cls: np.ndarray
) -> dict[str, np.ndarray]:
    """One image's matched statistics with the validator's own matcher (boxes xyxy in one coordinate frame)."""
    from ultralytics.models.yolo.detect import DetectionValidator
    from ultralytics.utils.metrics import box_iou

    order = np.argsort(-np.asarray(pred_conf, dtype=float), kind="stable")  # the matcher expects NMS order
    pb = torch.as_tensor(np.asarray(pred_boxes, dtype=np.float32).reshape(-1, 4)[order])
    pc = torch.as_tensor(np.asarray(pred_cls, dtype=np.float32).reshape(-1)[order])
    gb = torch.as_tensor(np.asarray(gt_boxes, dtype=np.float32).reshape(-1, 4))
    gc = torch.as_tensor(np.asarray(gt_cls, dtype=np.float32).reshape(-1))
    if len(gb) and len(pb):
        matcher = SimpleNamespace(iouv=torch.as_tensor(IOU_THRESHOLDS, dtype=torch.float32))
        tp = DetectionValidator.match_predictions(matcher, pc, gc, box_iou(gb, pb)).numpy()
    else:
        tp = np.zeros((len(pb), len(IOU_THRESHOLDS)), dtype=bool)
    return {"tp": tp, "conf": np.asarray(pred_conf, dtype=float).reshape(-1)[order], "pred_cls": pc.numpy(),
            "target_cls": gc.numpy()}


def concat_stats(per_image: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Join per-image statistics from `match_detections` into one set for `summarize`."""
    if not per_image:
        return {"tp": np.zeros((0, len(IOU_THRESHOLDS)), bool), "conf": np.zeros(0), "pred_cls": np.zeros(0),
                "target_cls": np.zeros(0)}
    return {k: np.concatenate([s[k] for s in per_image], 0) for k in _STAT_KEYS}


def available_splits(data_yaml: str | Path) -> list[str]:
    """The splits (train, val, test) a data.yaml names."""
    data = _read_data_yaml(data_yaml)
    return [s for s in ("train", "val", "test") if data.get(s)]


def _read_data_yaml(data_yaml: str | Path) -> dict[str, Any]:
    p = Path(data_yaml)
    if not p.is_file():
        raise UserError(f"dataset file {p} does not exist")
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or "names" not in data:
        raise UserError(f"{p} is not an Ultralytics data.yaml (no 'names')")
    return data


def _names(data: dict[str, Any]) -> dict[int, str]:
    names = data["names"]
    return dict(enumerate(map(str, names))) if isinstance(names, list) else {int(k): str(v) for k, v in names.items()}
