"""The embedded synthetic dataset: shapes on textured, noisy backgrounds, generated from a seed.

Classes are shapes (circle, square, triangle, cross, ring), never colours: every object gets a
random colour that contrasts with the background under it, so a detector has to learn shape.
Objects vary in size (some only ~10 px), aspect and rotation; backgrounds are smooth colour
fields with stripes or a grid, thin clutter lines and pixel noise. Each image is drawn from its
own seed (seed, split, index), so changing the image counts keeps the images already there.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageChops, ImageDraw

from pipeline.datasets.boxes import Box, yolo_line

SHAPES = ("circle", "square", "triangle", "cross", "ring")
_SPLIT_CODE = {"train": 0, "val": 1, "unlabeled": 2}
MAX_OBJECTS = 6
MAX_IOU = 0.1  # objects overlap at most this much, so each stays recognisable


def _colour_field(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth random colour field: a few random colours, bilinearly blown up."""
    k = int(rng.integers(2, 7))
    return Image.fromarray(rng.integers(0, 256, (k, k, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A colour field, on two images of three overlaid with stripes or a grid of a second field."""
    base = _colour_field(rng, size)
    kind = int(rng.integers(3))
    if not kind:
        return base
    period = rng.uniform(6, 40)
    theta = rng.uniform(0, math.pi)
    t = np.arange(size, dtype=np.float32) * (2 * math.pi / period)
    wave = np.sin(np.add.outer(t * math.sin(theta), t * math.cos(theta)))
    if kind == 2:  # grid: the product of two waves at right angles
        wave = wave * np.sin(np.add.outer(t * math.cos(theta), -t * math.sin(theta)))
    strength = rng.uniform(0.2, 0.6)
    mask = Image.fromarray((127.5 + 127.5 * strength * wave).astype(np.uint8))
    return Image.composite(_colour_field(rng, size), base, mask)


def _polygon(shape: str, cx: float, cy: float, w: float, h: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a square/triangle/cross of extent w x h around (cx, cy), rotated by `angle` rad."""
    if shape == "square":
        pts = [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]
    elif shape == "triangle":
        pts = [(0.0, -0.5), (0.5, 0.5), (-0.5, 0.5)]
    else:  # cross: a plus sign with arms a third of the extent wide
        a = 1 / 6
        pts = [(-a, -0.5), (a, -0.5), (a, -a), (0.5, -a), (0.5, a), (a, a),
               (a, 0.5), (-a, 0.5), (-a, a), (-0.5, a), (-0.5, -a), (-a, -a)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + px * w * c - py * h * s, cy + px * w * s + py * h * c) for px, py in pts]


def _iou(a: Box, b: Box) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _contrasting(rng: np.random.Generator, under: np.ndarray) -> tuple[int, int, int]:
    """A random colour far (L1 > 150) from the mean colour under the object."""
    mean = under.reshape(-1, 3).mean(0)
    best, best_d = None, -1.0
    for _ in range(12):
        colour = rng.integers(0, 256, 3)
        d = float(np.abs(colour - mean).sum())
        if d > 150:
            return tuple(int(v) for v in colour)
        if d > best_d:
            best, best_d = colour, d
    return tuple(int(v) for v in best)


class Painter:
    """Draws images of one size; holds the pixel-noise tiles every image crops its noise from."""

    NOISE_SIGMAS = (4, 9, 16)

    def __init__(self, size: int, n_classes: int, seed: int):
        if not 1 <= n_classes <= len(SHAPES):
            raise ValueError(f"n_classes must be 1..{len(SHAPES)}")
        self.size, self.n_classes = size, n_classes
        rng = np.random.default_rng([seed, 99])
        # Gaussian noise centred on 128, twice the image size: a random crop per image is cheap
        # (generating noise per image was the generator's slowest step).
        self.noise = [Image.fromarray(np.clip(128 + rng.normal(0, s, (2 * size, 2 * size, 3)), 0, 255).astype(np.uint8))
                      for s in self.NOISE_SIGMAS]

    def _place(self, rng: np.random.Generator, shape: str, taken: list[Box]) -> tuple[Box, list[tuple[float, float]]] | None:
        """A box (and polygon) for `shape` inside the image, overlapping others at most MAX_IOU."""
        size = self.size
        smin, smax = max(10.0, 0.04 * size), 0.38 * size
        for _attempt in range(20):
            extent = math.exp(rng.uniform(math.log(smin), math.log(smax)))
            aspect = math.exp(rng.uniform(-0.25, 0.25))
            w, h = extent * math.sqrt(aspect), extent / math.sqrt(aspect)
            if shape in ("circle", "ring"):
                pts: list[tuple[float, float]] = []
                lo, hi = (-w / 2, -h / 2), (w / 2, h / 2)
            else:
                pts = _polygon(shape, 0.0, 0.0, w, h, math.radians(rng.uniform(-30, 30)))
                lo = (min(p[0] for p in pts), min(p[1] for p in pts))
                hi = (max(p[0] for p in pts), max(p[1] for p in pts))
            if hi[0] - lo[0] >= size - 2 or hi[1] - lo[1] >= size - 2:
                continue
            cx = rng.uniform(1 - lo[0], size - 1 - hi[0])
            cy = rng.uniform(1 - lo[1], size - 1 - hi[1])
            box = (cx + lo[0], cy + lo[1], cx + hi[0], cy + hi[1])
            if all(_iou(box, b) <= MAX_IOU for b in taken):
                return box, [(x + cx, y + cy) for x, y in pts]
        return None

    def draw(self, rng: np.random.Generator) -> tuple[Image.Image, list[tuple[int, Box]]]:
        """One image and its boxes (class id, normalised xyxy)."""
        size = self.size
        img = _background(rng, size)
        pixels = np.asarray(img)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(0, 5))):  # clutter: thin lines are not objects
            x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, size, 4))
            draw.line([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
                      width=int(rng.integers(1, 3)))
        boxes: list[tuple[int, Box]] = []
        for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
            cls = int(rng.integers(self.n_classes))
            shape = SHAPES[cls]
            placed = self._place(rng, shape, [b for _, b in boxes])
            if placed is None:
                continue
            box, pts = placed
            x0, y0, x1, y1 = (int(v) for v in box)
            colour = _contrasting(rng, pixels[y0:y1 + 1, x0:x1 + 1])
            if shape == "circle":
                draw.ellipse(box, fill=colour)
            elif shape == "ring":
                draw.ellipse(box, outline=colour, width=max(2, int(0.18 * min(box[2] - box[0], box[3] - box[1]))))
            else:
                draw.polygon(pts, fill=colour)
            boxes.append((cls, box))

        gain = rng.uniform(0.75, 1.15)
        img = img.point([min(255, int(i * gain)) for i in range(256)] * 3)
        ox, oy = (int(v) for v in rng.integers(0, size, 2))
        noise = self.noise[int(rng.integers(len(self.noise)))].crop((ox, oy, ox + size, oy + size))
        img = ImageChops.add(img, noise, 1.0, -128)
        return img, [(c, (b[0] / size, b[1] / size, b[2] / size, b[3] / size)) for c, b in boxes]


def generate(out: Path, *, n_train: int, n_val: int, n_unlabeled: int, imgsz: int, n_classes: int, seed: int) -> Path:
    """Write the dataset in YOLO layout under `out` (plus `unlabeled/`); returns its data.yaml."""
    painter = Painter(imgsz, n_classes, seed)
    jobs = [(split, i) for split, n in (("train", n_train), ("val", n_val), ("unlabeled", n_unlabeled)) for i in range(n)]
    for split in ("train", "val"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    (out / "unlabeled").mkdir(parents=True, exist_ok=True)

    def one(job: tuple[str, int]) -> None:
        split, i = job
        img, boxes = painter.draw(np.random.default_rng([seed, _SPLIT_CODE[split], i]))
        stem = f"{split}_{i:05d}"
        if split == "unlabeled":
            img.save(out / "unlabeled" / f"{stem}.jpg", quality=90)
            return
        img.save(out / "images" / split / f"{stem}.jpg", quality=90)
        text = "".join(yolo_line(c, b) + "\n" for c, b in boxes)
        (out / "labels" / split / f"{stem}.txt").write_text(text, encoding="utf-8")

    # PIL and numpy release the GIL in their C loops: threads overlap drawing and encoding.
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        list(pool.map(one, jobs))
    data = {"path": str(out), "train": "images/train", "val": "images/val",
            "names": dict(enumerate(SHAPES[:n_classes]))}
    (out / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return out / "data.yaml"
