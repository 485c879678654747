"""Box conversions between the formats the importers read, and the one box-cleaning rule.

Internally a box is (x1, y1, x2, y2) corners; "normalised" means divided by the image width and
height (0..1). YOLO is (cx, cy, w, h) normalised, COCO (x, y, w, h) in pixels, KITTI (x1, y1, x2,
y2) in pixels at fields 4-7 of a 15-field line.
"""

from __future__ import annotations

from pipeline.datasets.defects import Defects

Box = tuple[float, float, float, float]

# A coordinate clipped by more than this (normalised) counts as out of range; smaller moves are
# rounding noise (labels written with 6 decimals).
CLIP_TOLERANCE = 1e-4
KITTI_FIELDS = 15  # type truncated occluded alpha x1 y1 x2 y2 h w l x y z rotation_y (+ score)


def yolo_to_xyxy(cx: float, cy: float, w: float, h: float) -> Box:
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def xyxy_to_yolo(x1: float, y1: float, x2: float, y2: float) -> Box:
    return (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1


def coco_to_xyxy(x: float, y: float, w: float, h: float) -> Box:
    return x, y, x + w, y + h


def xyxy_to_coco(x1: float, y1: float, x2: float, y2: float) -> Box:
    return x1, y1, x2 - x1, y2 - y1


def normalize(box: Box, width: float, height: float) -> Box:
    x1, y1, x2, y2 = box
    return x1 / width, y1 / height, x2 / width, y2 / height


def denormalize(box: Box, width: float, height: float) -> Box:
    x1, y1, x2, y2 = box
    return x1 * width, y1 * height, x2 * width, y2 * height


def kitti_name(name: str) -> str:
    """KITTI fields are separated by whitespace: a class name cannot hold any."""
    return "_".join(name.split()) or "object"


def kitti_line(name: str, box: Box, score: float | None = None) -> str:
    """A KITTI label line for a pixel xyxy box (3D fields zero, as TAO writes them; score last if given)."""
    x1, y1, x2, y2 = box
    line = f"{kitti_name(name)} 0.00 0 0.00 {x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f} 0.00 0.00 0.00 0.00 0.00 0.00 0.00"
    return line if score is None else f"{line} {score:.4f}"


def yolo_line(cls: int, box: Box) -> str:
    """A YOLO label line for a normalised xyxy box."""
    cx, cy, w, h = xyxy_to_yolo(*box)
    return f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"


def clean_box(box: Box, width: int, height: int, defects: Defects, where: str) -> Box | None:
    """Clip a normalised xyxy box to the image; None (and a counted defect) when nothing is left.

    A box narrower or lower than one pixel is useless for training and is dropped; a box that
    had a size but lies outside the image is counted separately, so a user can tell the two apart.
    """
    x1, y1, x2, y2 = box
    c = (min(max(x1, 0.0), 1.0), min(max(y1, 0.0), 1.0), min(max(x2, 0.0), 1.0), min(max(y2, 0.0), 1.0))
    if (c[2] - c[0]) * width < 1 or (c[3] - c[1]) * height < 1:
        if (x2 - x1) * width >= 1 and (y2 - y1) * height >= 1:
            defects.add("box_outside_image", where)
        else:
            defects.add("zero_area_box", where)
        return None
    if max(abs(a - b) for a, b in zip(c, box, strict=True)) > CLIP_TOLERANCE:
        defects.add("coord_out_of_range", where)
    return c
