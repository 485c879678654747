"""Anchor shapes from a dataset's boxes: k-medians on 1 - IoU, TAO's kmeans done reproducibly.

The algorithm is TAO's (boxes aligned at a corner, distance 1 - IoU, centres moved to the
cluster median, anchors sorted by area), plus what TAO lacks: a seeded k-means++-style start,
re-seeding of empty clusters, letterbox scaling, and quality figures (mean best IoU, best
possible recall). Everything is vectorised numpy so 100k boxes take well under a second per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.datasets.images import ULTRALYTICS_SUFFIXES, displayed_size
from pipeline.errors import UserError

# Ultralytics' anchor check (YOLOv5 `utils/autoanchor.py`, anchor_t=4.0): a box fits an anchor
# when neither side differs from the anchor's by this factor or more.
BPR_RATIO = 4.0
# A box is "small" when sqrt(w*h) is below one cell of the finest YOLOv8/YOLO11 output (stride 8).
SMALL_BOX_PX = 8.0
# Recommend a larger input when more than this fraction of boxes is small ...
SMALL_FRACTION_LIMIT = 0.10
# ... choosing the size at which this percentile of box sizes reaches SMALL_BOX_PX.
SMALL_PERCENTILE = 10.0


@dataclass
class Boxes:
    """Box sizes of a dataset, normalised (0..1) by their image, with that image's size in pixels."""

    wh: np.ndarray  # (n, 2) float64, normalised width/height
    image_wh: np.ndarray  # (n, 2) float64, original image width/height of each box
    images: int  # images read (with or without labels)
    skipped_lines: int  # label lines that are not boxes (wrong column count, non-numeric)


@dataclass
class AnchorFit:
    """Result of `kmedians`: anchors sorted by area ascending, and how the fit went."""

    anchors: np.ndarray  # (k, 2) float64 in network-input pixels
    assign: np.ndarray  # (n,) cluster index of each box (into the sorted anchors)
    steps: int  # iterations run
    converged: bool  # assignments stopped changing before max_steps
    reseeded: int  # empty clusters re-seeded with the worst-fitting box


# -- reading -------------------------------------------------------------------------------------

def _label_boxes(text: str) -> tuple[list[tuple[float, float]], int]:
    """Normalised (w, h) of each box in a YOLO label file (detection or polygon lines)."""
    boxes, bad = [], 0
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        try:
            values = [float(v) for v in parts[1:]]
        except ValueError:
            bad += 1
            continue
        if len(values) == 4:
            boxes.append((values[2], values[3]))
        elif len(values) >= 6 and len(values) % 2 == 0:  # segment: x1 y1 x2 y2 ...; its bounding box
            xs, ys = values[0::2], values[1::2]
            boxes.append((max(xs) - min(xs), max(ys) - min(ys)))
        else:
            bad += 1
    return boxes, bad


def read_yolo_boxes(images_dir: Path, labels_dir: Path) -> Boxes:
    """Box sizes of every image under `images_dir`, labels at the same relative path in `labels_dir`."""
    if not images_dir.is_dir():
        raise UserError(f"training images folder {images_dir} does not exist; check dataset.path")
    wh: list[tuple[float, float]] = []
    sizes: list[tuple[int, int]] = []
    images = skipped = 0
    for img in sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in ULTRALYTICS_SUFFIXES):
        images += 1
        label = labels_dir / img.relative_to(images_dir).with_suffix(".txt")
        if not label.is_file():
            continue  # background image
        boxes, bad = _label_boxes(label.read_text(encoding="utf-8", errors="replace"))
        skipped += bad
        if boxes:
            try:
                size = displayed_size(img)
            except OSError as exc:
                raise UserError(f"image {img} is unreadable ({exc}); fix or remove it from dataset.path") from None
            wh.extend(boxes)
            sizes.extend([size] * len(boxes))
    return Boxes(
        wh=np.asarray(wh, dtype=np.float64).reshape(-1, 2),
        image_wh=np.asarray(sizes, dtype=np.float64).reshape(-1, 2),
        images=images, skipped_lines=skipped,
    )


def scale_boxes(boxes: Boxes, width: int, height: int, resize: str) -> np.ndarray:
    """Box (w, h) in network-input pixels of a `width` x `height` input.

    stretch (TAO): each image axis is resized to the input independently.
    letterbox (Ultralytics): one factor min(width/W, height/H) per image keeps the aspect ratio.
    """
    if resize == "stretch":
        return boxes.wh * np.array([width, height], dtype=np.float64)
    if resize == "letterbox":
        pixels = boxes.wh * boxes.image_wh
        factor = np.minimum(width / boxes.image_wh[:, 0], height / boxes.image_wh[:, 1])
        return pixels * factor[:, None]
    raise UserError(f"kmeans.resize={resize!r} is not valid; choose letterbox or stretch")


# -- the algorithm -------------------------------------------------------------------------------

def wh_iou(boxes: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """(n, k) IoU of (w, h) boxes and anchors aligned at a common corner."""
    inter = np.minimum(boxes[:, None, 0], anchors[None, :, 0]) * np.minimum(boxes[:, None, 1], anchors[None, :, 1])
    union = (boxes[:, 0] * boxes[:, 1])[:, None] + (anchors[:, 0] * anchors[:, 1])[None, :] - inter
    return inter / union


def _init_centres(boxes: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ on the IoU distance: each next centre drawn with probability ~ distance^2."""
    centres = [boxes[rng.integers(len(boxes))]]
    dist = 1.0 - wh_iou(boxes, centres[0][None])[:, 0]
    for _ in range(1, k):
        weight = dist**2
        total = weight.sum()
        # total is > 0 while fewer than `distinct` centres are chosen (callers check k <= distinct).
        idx = rng.choice(len(boxes), p=weight / total) if total > 0 else int(np.argmax(dist))
        centres.append(boxes[idx])
        dist = np.minimum(dist, 1.0 - wh_iou(boxes, boxes[idx][None])[:, 0])
    return np.array(centres, dtype=np.float64)


def distinct_boxes(boxes: np.ndarray) -> int:
    """Number of distinct (w, h) pairs (to 1e-6 px)."""
    return len(np.unique(np.round(boxes, 6), axis=0)) if len(boxes) else 0


def _nearest(w: np.ndarray, h: np.ndarray, area: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the best-IoU centre of each box and that IoU (first centre wins ties).

    One in-place pass per centre: several times faster than an (n, k) broadcast + argmax.
    """
    best = np.full(len(w), -1.0)
    idx = np.zeros(len(w), dtype=np.int64)
    inter, tmp = np.empty_like(w), np.empty_like(w)
    for j, (cw, ch) in enumerate(centres):
        np.minimum(w, cw, out=inter)
        np.minimum(h, ch, out=tmp)
        inter *= tmp
        np.subtract(area + cw * ch, inter, out=tmp)  # union
        np.divide(inter, tmp, out=inter)  # IoU
        np.copyto(idx, j, where=inter > best)
        np.maximum(best, inter, out=best)
    return idx, best


class _Medians:
    """Per-cluster medians of w and h in O(n) a step: values are sorted once, labels radix-sorted."""

    def __init__(self, boxes: np.ndarray, k: int):
        self.k = k
        self.orders = [np.argsort(boxes[:, d], kind="stable") for d in (0, 1)]
        self.sorted = [boxes[o, d] for d, o in enumerate(self.orders)]

    def __call__(self, assign: np.ndarray) -> np.ndarray:
        out = np.empty((self.k, 2))
        for d in (0, 1):
            labels = assign[self.orders[d]].astype(np.int16)  # int16: numpy's stable sort is a radix sort
            values = self.sorted[d][np.argsort(labels, kind="stable")]  # per cluster, contiguous and sorted
            counts = np.bincount(labels, minlength=self.k)
            starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
            out[:, d] = (values[starts + (counts - 1) // 2] + values[starts + counts // 2]) / 2
        return out


def kmedians(boxes: np.ndarray, k: int, seed: int = 0, max_steps: int = 10000,
             init: np.ndarray | None = None) -> AnchorFit:
    """Cluster (w, h) boxes into k anchors with distance 1 - IoU and median centres (TAO's kmeans).

    Seeded k-means++ start; a cluster left empty takes the box that currently fits its own
    anchor worst (one box per empty cluster, never one whose cluster it would empty). Stops when
    the assignment no longer changes or after `max_steps` iterations. Anchors come back sorted
    by area, ascending. `init` (k, 2) starts from given centres instead (e.g. anchors to refine).
    Raises ValueError when k exceeds the number of distinct boxes.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    distinct = distinct_boxes(boxes)
    if k < 1 or k > distinct:
        raise ValueError(f"k={k} needs at least k distinct boxes; there are {distinct}")
    if init is None:
        centres = _init_centres(boxes, k, np.random.default_rng(seed))
    else:
        centres = np.array(init, dtype=np.float64).reshape(k, 2)
    w, h = np.ascontiguousarray(boxes[:, 0]), np.ascontiguousarray(boxes[:, 1])
    area = w * h
    medians = _Medians(boxes, k)
    assign = np.full(len(boxes), -1)
    steps = reseeded = 0
    converged = False
    while steps < max_steps:
        steps += 1
        new_assign, fit = _nearest(w, h, area, centres)
        counts = np.bincount(new_assign, minlength=k)
        empty = list(np.flatnonzero(counts == 0))
        if empty:
            for i in np.argsort(fit, kind="stable"):  # worst-fitting boxes first
                if not empty:
                    break
                if counts[new_assign[i]] > 1:
                    counts[new_assign[i]] -= 1
                    new_assign[i] = empty.pop(0)
                    reseeded += 1
        if np.array_equal(new_assign, assign):
            converged = True
            break
        assign = new_assign
        centres = medians(assign)
    by_area = np.argsort(centres[:, 0] * centres[:, 1], kind="stable")
    rank = np.empty(k, dtype=np.int64)
    rank[by_area] = np.arange(k)
    return AnchorFit(anchors=centres[by_area], assign=rank[assign], steps=steps, converged=converged,
                     reseeded=reseeded)


# -- quality figures -----------------------------------------------------------------------------

def mean_best_iou(boxes: np.ndarray, anchors: np.ndarray) -> float:
    """Mean over boxes of the IoU with their best anchor (TAO's "avg IoU")."""
    return float(wh_iou(boxes, anchors).max(1).mean())


def best_possible_recall(boxes: np.ndarray, anchors: np.ndarray, ratio: float = BPR_RATIO) -> float:
    """Ultralytics' anchor BPR: fraction of boxes with an anchor where max(w/a, a/w, h/b, b/h) < ratio."""
    r = boxes[:, None, :] / anchors[None, :, :]
    worst_side = np.maximum(r, 1.0 / r).max(2)  # (n, k): the larger mismatch of width or height
    return float((worst_side.min(1) < ratio).mean())


def recommend_imgsz(sizes_px: np.ndarray, imgsz: int, native: int) -> tuple[float, int]:
    """(fraction of small boxes, recommended input side) for boxes of `sizes_px` = sqrt(w*h) at `imgsz`.

    When more than SMALL_FRACTION_LIMIT of the boxes are below SMALL_BOX_PX, the input grows
    until the SMALL_PERCENTILE-th percentile box reaches SMALL_BOX_PX, rounded up to a multiple
    of 32 and capped at the images' own size (`native`, upsampling past it adds pixels, not
    detail); never smaller than `imgsz`.
    """
    if not len(sizes_px):
        return 0.0, imgsz
    small = float((sizes_px < SMALL_BOX_PX).mean())
    if small <= SMALL_FRACTION_LIMIT:
        return small, imgsz
    low = max(float(np.percentile(sizes_px, SMALL_PERCENTILE)), 1e-6)
    wanted = 32 * math.ceil(imgsz * SMALL_BOX_PX / low / 32)
    cap = 32 * math.ceil(native / 32)
    return small, max(imgsz, min(wanted, cap))


# -- export formats ------------------------------------------------------------------------------

def darknet_line(anchors: np.ndarray) -> str:
    """A Darknet cfg `anchors=` line (integer pixels, as Darknet's calc_anchors writes them)."""
    ints = np.maximum(np.rint(anchors), 1).astype(int)
    return "anchors = " + ",  ".join(f"{w},{h}" for w, h in ints)


def scale_groups(anchors: np.ndarray) -> list[np.ndarray]:
    """Anchors split small / mid / big (3 output scales, contiguous by area)."""
    return np.array_split(anchors, 3)


def tao_spec(anchors: np.ndarray) -> str:
    """A TAO yolo_v4 spec snippet: big/mid/small_anchor_shape, largest anchors to big."""
    small, mid, big = scale_groups(anchors)

    def shape(group: np.ndarray) -> str:
        return '"[' + ", ".join(f"({w:.1f}, {h:.1f})" for w, h in group) + ']"'

    return (
        "yolov4_config {\n"
        f"  big_anchor_shape: {shape(big)}\n"
        f"  mid_anchor_shape: {shape(mid)}\n"
        f"  small_anchor_shape: {shape(small)}\n"
        "}\n"
    )
