"""Batched detection over a folder of images, with any model artifact the pipeline makes.

The forward pass goes through Ultralytics' `AutoBackend` (PyTorch .pt, ONNX float or QDQ, OpenVINO
IR folders, TensorRT engines); the loop around it is ours: images are probed and decoded by a thread
pool while the model runs, letterboxed into batches of similar aspect ratio, run in one forward
pass per batch, filtered by NMS and mapped back to original-image pixels.

Coordinates are those of the image as displayed: EXIF orientation is applied first, as viewers and
Ultralytics' own loaders do, so labels written from them line up with the pixels a trainer reads.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from pipeline.datasets.fs import walk
from pipeline.datasets.images import IMAGE_EXTENSIONS, displayed_size, letterbox, read_image
from pipeline.devices import CoreMeter, use_cores
from pipeline.engines.common import fixed_batches
from pipeline.errors import UserError


@dataclass
class ImageItem:
    """One image file of the source folder."""

    path: Path  # the file
    rel: str  # path relative to the source folder (posix), as the user knows it
    key: str  # output name without suffix, relative (posix): rel's stem unless renamed (see unique_keys)
    width: int = 0  # displayed size (EXIF orientation applied), from the header probe
    height: int = 0


@dataclass
class Skipped:
    """A file that could not be used, and why."""

    rel: str
    reason: str


@dataclass
class Prediction:
    """Detections of one image, in original-image pixels (xyxy), sorted by confidence (high first)."""

    item: ImageItem
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float64 x1 y1 x2 y2
    conf: np.ndarray  # (N,) float64
    cls: np.ndarray  # (N,) int64
    image: np.ndarray | None = None  # decoded RGB image at original size (only when keep_images)


@dataclass
class FolderScan:
    """What a folder holds: usable images, image files that cannot be read, other files."""

    images: list[ImageItem] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # files without an image suffix
    renamed: dict[str, str] = field(default_factory=dict)  # rel -> key, where rel's stem could not be kept


# -- reading a folder -------------------------------------------------------------------------------


def list_files(source: Path, recursive: bool) -> tuple[list[str], list[str]]:
    """Relative posix paths of image files and of other files under `source`, sorted.

    Dot-files, dot-folders and results folders of this pipeline are left out (the datasets walker).
    """
    if recursive:
        files = walk(source).files
    else:
        files = sorted(e for e in source.iterdir() if e.is_file() and not e.name.startswith("."))
    images, others = [], []
    for f in files:
        rel = f.relative_to(source).as_posix()
        (images if f.suffix.lower() in IMAGE_EXTENSIONS else others).append(rel)
    return images, others


def unique_keys(rels: list[str]) -> dict[str, str]:
    """Output name (relative path without suffix) for each image, unique and safe for Ultralytics' layout.

    Images that share a stem in one folder (a.jpg, a.png) would share a label file, so each of them is
    named `<stem>_<ext>` instead. A folder named `images` inside the source is renamed `images_`,
    because Ultralytics finds a label by replacing the last `/images/` of an image path with `/labels/`.
    """
    def parts(rel: str) -> tuple[str, str, str]:
        p = PurePosixPath(rel)
        folder = "/".join("images_" if d == "images" else d for d in p.parent.parts)
        return folder, p.stem, p.suffix

    by_stem: dict[tuple[str, str], list[str]] = {}
    for rel in rels:
        folder, stem, _ = parts(rel)
        by_stem.setdefault((folder, stem), []).append(rel)
    keys: dict[str, str] = {}
    taken = {f"{folder}/{stem}" if folder else stem for folder, stem in by_stem}
    for (folder, stem), group in by_stem.items():
        for rel in group:
            name = stem
            if len(group) > 1:
                name = f"{stem}_{parts(rel)[2].lstrip('.').lower()}"
                base, n = name, 1
                while (f"{folder}/{name}" if folder else name) in taken:
                    n += 1
                    name = f"{base}{n}"
                taken.add(f"{folder}/{name}" if folder else name)
            keys[rel] = f"{folder}/{name}" if folder else name
    return keys


def _reason(exc: BaseException) -> str:
    """One line saying why a file cannot be used."""
    if isinstance(exc, ImportError) or type(exc).__name__ == "UnidentifiedImageError":
        # Ultralytics' patched Image.open answers an unknown file by trying the HEIF plugin.
        return "not an image PIL can identify"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def scan_folder(source: Path, recursive: bool, workers: int = 2) -> FolderScan:
    """List the images of `source` and probe their headers (in parallel); unreadable ones are skipped."""
    rels, others = list_files(source, recursive)
    keys = unique_keys(rels)
    scan = FolderScan(ignored=others, renamed={r: k for r, k in keys.items() if k != str(PurePosixPath(r).with_suffix(""))})

    def probe(rel: str) -> tuple[int, int] | Skipped:
        try:
            return displayed_size(source / rel)
        except Exception as exc:  # any decoder error means "not a usable image", never a crash
            return Skipped(rel, _reason(exc))

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for rel, res in zip(rels, pool.map(probe, rels), strict=True):
            if isinstance(res, Skipped):
                scan.skipped.append(res)
            else:
                scan.images.append(ImageItem(source / rel, rel, keys[rel], *res))
    return scan


# -- batching -------------------------------------------------------------------------------------------


def batch_shapes(items: list[ImageItem], imgsz: tuple[int, int], stride: int, batch: int,
                 rect: bool) -> list[tuple[list[ImageItem], tuple[int, int]]]:
    """Split items into batches with one input shape each.

    With `rect` (models that take any input size) images are ordered by aspect ratio and each batch
    gets the smallest stride-multiple shape that holds all of its images at full scale, as
    Ultralytics' rectangular validation does; otherwise every batch has the model's fixed shape.
    """
    if not rect or imgsz[0] != imgsz[1]:
        return [(items[i:i + batch], imgsz) for i in range(0, len(items), batch)]
    ordered = sorted(items, key=lambda it: (it.height / it.width, it.rel))
    out = []
    for i in range(0, len(ordered), batch):
        chunk = ordered[i:i + batch]
        ars = [it.height / it.width for it in chunk]
        lo, hi = min(ars), max(ars)
        rel_shape = (hi, 1.0) if hi < 1 else (1.0, 1 / lo) if lo > 1 else (1.0, 1.0)
        shape = tuple(int(math.ceil(s * imgsz[0] / stride) * stride) for s in rel_shape)
        out.append((chunk, shape))
    return out


# -- the predictor ---------------------------------------------------------------------------------


class Predictor:
    """A model artifact behind Ultralytics' AutoBackend, with our batching, decoding and NMS around it."""

    def __init__(self, model_path: str | Path, device: str = "cpu", imgsz: int | None = None, batch: int = 8,
                 conf: float = 0.25, iou: float = 0.7, max_det: int = 300, workers: int = 2,
                 fast_decode: bool = True, threads: int = 0):
        import torch
        from ultralytics.nn.autobackend import AutoBackend
        from ultralytics.utils.torch_utils import select_device

        self.path = Path(model_path)
        self.batch, self.conf, self.iou, self.max_det = int(batch), float(conf), float(iou), int(max_det)
        self.workers, self.fast_decode = max(1, int(workers)), bool(fast_decode)
        meter = CoreMeter()  # measures while the model loads (pipeline.devices)
        self.device = select_device(device, verbose=False)
        trained_imgsz = None
        if self.path.suffix == ".pt":
            from pipeline.models import load_model

            module = load_model(self.path)
            trained_imgsz = (getattr(module, "args", None) or {}).get("imgsz")
            weights: Any = module
        else:
            if self.path.is_dir():  # an *_openvino_model/ folder: compiled at the float precision it records
                from pipeline.engines.openvino import honour_recorded_precision

                honour_recorded_precision()
            if self.path.suffix == ".engine":
                from pipeline.engines.tensorrt import check_compatible

                check_compatible(self.path, strict=False)  # no TensorRT / another GPU: one line, exit 2
            weights = str(self.path)
        try:
            self.backend = AutoBackend(weights, device=self.device, fuse=True, verbose=False)
        except (TypeError, StopIteration, FileNotFoundError) as exc:
            raise UserError(f"infer.input={self.path} is not a model this pipeline can run ({_reason(exc)}); "
                            "give a .pt, .onnx, .engine file or an *_openvino_model/ folder") from None
        self.format = self.backend.format
        self.stride = int(max(getattr(self.backend, "stride", 32) or 32, 32))
        fixed_hw, fixed_batch = self._input_spec()
        self.rect = fixed_hw is None
        self.imgsz = self._choose_imgsz(imgsz, fixed_hw, trained_imgsz)
        self.forward_batch = fixed_batch  # None: any batch size
        self.names = self._names()
        self._torch = torch
        # oneDNN's CPU convolutions run NHWC without a reorder per layer: 1.2-1.4x for a PyTorch model
        # here (docs/infer.md); the decoded images are NHWC already.
        self.memory_format = torch.contiguous_format
        if self.format == "pt" and self.device.type == "cpu":
            self.memory_format = torch.channels_last
            self.backend.model.to(memory_format=self.memory_format)
        if self.device.type == "cpu":
            # Decoding runs on its own threads, which mostly wait on I/O and libjpeg (pipeline.devices).
            use_cores(threads, meter)

    # -- model facts ---------------------------------------------------------------------------------
    def _input_spec(self) -> tuple[tuple[int, int] | None, int | None]:
        """(fixed (h, w) or None, fixed batch or None) of the artifact's input."""
        b = self.backend
        if self.format == "pt":
            return None, None
        dims: list[Any] | None = None
        if self.format == "onnx" and hasattr(b, "session"):
            dims = list(b.session.get_inputs()[0].shape)
        elif self.format == "openvino" and hasattr(b, "ov_compiled_model"):
            ps = b.ov_compiled_model.input().get_partial_shape()
            dims = [d.get_length() if d.is_static else None for d in ps]
        elif self.format == "engine" and hasattr(b, "bindings"):
            dims = list(b.bindings["images"].shape)
        if dims is None or len(dims) != 4:
            imgsz = getattr(b, "imgsz", None) or [640, 640]
            return (int(imgsz[0]), int(imgsz[-1])), int(getattr(b, "batch", 1) or 1)
        static = [isinstance(d, int) and d > 0 for d in dims]
        hw = (int(dims[2]), int(dims[3])) if static[2] and static[3] else None
        if hw is None and self.format == "openvino" and getattr(b, "read_model", None) is not None:
            # AutoBackend recompiles this INT8 model for every new shape (an OpenVINO bug on AMX CPUs):
            # one fixed shape, as Ultralytics itself does there.
            imgsz = getattr(b, "imgsz", None) or [640, 640]
            hw = (int(imgsz[0]), int(imgsz[-1]))
        if self.format == "engine":
            # An engine's optimisation profile bounds its shapes; run it at the size it was exported for
            # (AutoBackend binds the profile's max shape, which for rectangular evaluation is above it).
            imgsz = getattr(b, "imgsz", None)
            hw = (int(imgsz[0]), int(imgsz[-1])) if imgsz else (int(dims[2]), int(dims[3]))
        return hw, (int(dims[0]) if static[0] else None)

    def _choose_imgsz(self, requested: int | None, fixed_hw: tuple[int, int] | None,
                      trained: Any) -> tuple[int, int]:
        if fixed_hw is not None:
            if requested is not None and tuple(fixed_hw) != (requested, requested):
                raise UserError(
                    f"infer.imgsz={requested} does not fit {self.path.name}, whose input is fixed at "
                    f"{fixed_hw[0]}x{fixed_hw[1]}; leave infer.imgsz unset or export the model with that size")
            return fixed_hw
        if requested is None:
            meta = getattr(self.backend, "imgsz", None)
            requested = int(trained) if isinstance(trained, (int, float)) else int(meta[0]) if meta else 640
        size = int(math.ceil(requested / self.stride) * self.stride)
        return size, size

    def _names(self) -> dict[int, str]:
        names = {int(k): str(v) for k, v in dict(self.backend.names or {}).items()}
        if len(names) == 999 and names.get(0) == "class0":
            # AutoBackend's stand-in for an artifact without metadata; the real count comes from the output.
            return {}
        return names

    # -- running -------------------------------------------------------------------------------------
    def _load(self, item: ImageItem, shape: tuple[int, int], keep_image: bool):
        """Decode + letterbox one image (runs on a worker thread)."""
        min_size = None
        if self.fast_decode and not keep_image:
            r = min(shape[0] / item.height, shape[1] / item.width)
            min_size = (max(1, math.ceil(item.width * r)), max(1, math.ceil(item.height * r)))
        img, size = read_image(item.path, min_size)
        boxed, geometry = letterbox(img, shape, size)
        return boxed, geometry, size, (img if keep_image else None)

    def predict(self, items: Iterable[ImageItem], keep_images: bool = False,
                nms_conf: float | None = None) -> Iterator[Prediction | Skipped]:
        """Yield one Prediction per readable image and one Skipped per image that fails to decode.

        Boxes with confidence >= `nms_conf` (default: the predictor's conf) survive NMS; callers that
        want the best sub-threshold score of an image (review lists) pass a lower one and filter.
        Images come back grouped by batch, not in input order.
        """
        plan = batch_shapes(list(items), self.imgsz, self.stride, self.batch, self.rect)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="decode") as pool:
            pending: deque[list[tuple[ImageItem, Future]]] = deque()
            ahead = 2  # batches decoded ahead of the one running: enough to hide decoding, bounded memory

            def submit(k: int) -> None:
                chunk, shape = plan[k]
                pending.append([(it, pool.submit(self._load, it, shape, keep_images)) for it in chunk])

            for k in range(min(ahead + 1, len(plan))):
                submit(k)
            nxt = len(pending)
            while pending:
                jobs = pending.popleft()
                if nxt < len(plan):
                    submit(nxt)
                    nxt += 1
                loaded = []
                for it, fut in jobs:
                    try:
                        loaded.append((it, *fut.result()))
                    except Exception as exc:  # truncated/corrupt data: report the file, keep going
                        yield Skipped(it.rel, _reason(exc))
                if loaded:
                    yield from self._run_batch(loaded, self.conf if nms_conf is None else nms_conf)

    def _run_batch(self, loaded: list, nms_conf: float) -> Iterator[Prediction]:
        from ultralytics.utils.nms import non_max_suppression

        torch = self._torch
        x = torch.from_numpy(np.stack([b[1] for b in loaded])).to(self.device)
        x = x.permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format)
        x = (x.half() if self.backend.fp16 else x.float()).div_(255)
        with torch.inference_mode():
            if self.forward_batch is not None and x.shape[0] != self.forward_batch:
                preds = self._forward_fixed(x)
            else:
                preds = self.backend(x)
            dets = non_max_suppression(preds, nms_conf, self.iou, max_det=self.max_det, nc=0,
                                       end2end=bool(getattr(self.backend, "end2end", False)))
        if not self.names:
            out = preds[0] if isinstance(preds, (list, tuple)) else preds
            self.names = {i: f"class{i}" for i in range(int(out.shape[1]) - 4)}
        for (item, _, (left, top, nw, nh), (w, h), image), d in zip(loaded, dets, strict=True):
            d = d.detach().float().cpu().numpy().astype(np.float64)
            boxes = d[:, :4].copy()
            boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - left) * (w / nw)).clip(0, w)
            boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - top) * (h / nh)).clip(0, h)
            order = np.argsort(-d[:, 4], kind="stable")
            yield Prediction(item, w, h, boxes[order], d[order, 4], d[order, 5].astype(np.int64), image)

    def _forward_fixed(self, x):
        """Run a fixed-batch artifact: split larger batches, pad a short last one (engines.common.fixed_batches)."""
        outs = []
        for part, n in fixed_batches(x, self.forward_batch):
            y = self.backend(part)
            y = y[0] if isinstance(y, (list, tuple)) else y
            outs.append(y[:n].clone())
        return self._torch.cat(outs)

    def describe(self) -> dict[str, Any]:
        """Facts about the model run, for the summary and the manifest."""
        return {"model": str(self.path), "backend": self.format, "imgsz": list(self.imgsz),
                "rect_batches": self.rect, "device": str(self.device), "classes": dict(self.names)}


def draw_boxes(image: np.ndarray, pred: Prediction, names: dict[int, str]) -> np.ndarray:
    """BGR copy of `image` (RGB) with labelled boxes, line width scaled to the image size."""
    import cv2
    from ultralytics.utils.plotting import colors

    out = np.ascontiguousarray(image[..., ::-1])
    lw = max(round(sum(out.shape[:2]) / 2 * 0.003), 2)
    for (x1, y1, x2, y2), c, k in zip(pred.boxes, pred.conf, pred.cls, strict=True):
        colour = colors(int(k), bgr=True)
        p1, p2 = (int(x1), int(y1)), (int(x2), int(y2))
        cv2.rectangle(out, p1, p2, colour, lw, cv2.LINE_AA)
        text = f"{names.get(int(k), int(k))} {c:.2f}"
        fs = lw / 3
        (tw, th), _ = cv2.getTextSize(text, 0, fs, max(lw - 1, 1))
        above = p1[1] - th - 3 >= 0
        q2 = (p1[0] + tw, p1[1] - th - 3 if above else p1[1] + th + 3)
        cv2.rectangle(out, p1, q2, colour, -1, cv2.LINE_AA)
        cv2.putText(out, text, (p1[0], p1[1] - 2 if above else p1[1] + th + 2), 0, fs, (255, 255, 255),
                    max(lw - 1, 1), cv2.LINE_AA)
    return out
