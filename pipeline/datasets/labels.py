"""Label parsers (YOLO/Darknet lines, KITTI lines, COCO annotations) and class-name lists.

Parsers are pure: they take one line or annotation and return a box or the defect kind that
rejects it, so each rule is testable on its own. Boxes come back as xyxy corners, normalised for
YOLO and in pixels for KITTI and COCO (the caller knows the image size).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.datasets.boxes import KITTI_FIELDS, Box, coco_to_xyxy, yolo_to_xyxy
from pipeline.errors import UserError

DONTCARE = "DontCare"


def _numbers(fields: Sequence[Any]) -> list[float] | str:
    """Fields as floats, or the defect kind that rejects them."""
    try:
        values = [float(f) for f in fields]
    except (TypeError, ValueError):
        return "non_numeric_value"
    if not all(math.isfinite(v) for v in values):
        return "non_finite_value"
    return values


def _class_id(value: float, nc: int) -> int | str:
    if value != int(value):
        return "non_integer_class"
    cls = int(value)
    return cls if 0 <= cls < nc else "class_out_of_range"


def parse_yolo_line(line: str, nc: int) -> tuple[int, Box, bool] | str | None:
    """`class cx cy w h` (or `class x1 y1 x2 y2 ...` polygon) -> (class, normalised xyxy, was_polygon).

    Returns None for a blank line and the defect kind (a DEFECTS key) for a rejected one.
    """
    fields = line.split()
    if not fields:
        return None
    polygon = len(fields) >= 7 and len(fields) % 2 == 1
    if len(fields) != 5 and not polygon:
        return "bad_column_count"
    values = _numbers(fields)
    if isinstance(values, str):
        return values
    cls = _class_id(values[0], nc)
    if isinstance(cls, str):
        return cls
    if polygon:
        xs, ys = values[1::2], values[2::2]
        return cls, (min(xs), min(ys), max(xs), max(ys)), True
    return cls, yolo_to_xyxy(*values[1:]), False


def parse_kitti_line(line: str, class_ids: dict[str, int]) -> tuple[int, Box, bool] | str | None:
    """A KITTI line -> (class, pixel xyxy, corners_were_swapped); DONTCARE for DontCare regions.

    Returns None for a blank line and the defect kind for a rejected one. 15 fields, or 16 with a
    trailing score (what TAO inference writes).
    """
    fields = line.split()
    if not fields:
        return None
    if fields[0] == DONTCARE:
        return DONTCARE
    if len(fields) not in (KITTI_FIELDS, KITTI_FIELDS + 1):
        return "bad_column_count"
    values = _numbers(fields[1:])
    if isinstance(values, str):
        return values
    if fields[0] not in class_ids:
        return "class_out_of_range"
    x1, y1, x2, y2 = values[3:7]
    swapped = x2 < x1 or y2 < y1
    return class_ids[fields[0]], (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)), swapped


def parse_coco_bbox(ann: dict[str, Any], class_ids: dict[Any, int]) -> tuple[int, Box] | str:
    """A COCO annotation -> (class, pixel xyxy), or the defect kind."""
    bbox = ann["bbox"]
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return "bad_column_count"
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in bbox):
        return "non_numeric_value"
    values = _numbers(bbox)
    if isinstance(values, str):
        return values
    cat = ann["category_id"]
    if isinstance(cat, bool) or cat not in class_ids:
        return "class_out_of_range"
    return class_ids[cat], coco_to_xyxy(*values)


def decode_label(data: bytes) -> str | None:
    """Label file bytes as text (BOM tolerated); None when the file is binary, not text."""
    if b"\0" in data:
        return None
    return data.decode("utf-8-sig", errors="replace")


def check_names(names: Iterable[Any], key: str) -> list[str]:
    """Class names as strings; refuses an empty list or duplicates, naming them and `key`."""
    names = [str(n).strip() for n in names]
    if not names:
        raise UserError(f"{key}: the class list is empty; name at least one class")
    if any(not n for n in names):
        raise UserError(f"{key}: the class list has an empty name at id {names.index('')}")
    seen: dict[str, int] = {}
    dups = []
    for i, n in enumerate(names):
        if n in seen:
            dups.append(f"{n!r} (ids {seen[n]} and {i})")
        seen.setdefault(n, i)
    if dups:
        raise UserError(f"{key}: the class list names a class twice: {', '.join(dups)}; make each name unique")
    return names


def read_names_file(path: Path, key: str) -> list[str]:
    """classes.txt / obj.names: one class name a line, blank lines ignored."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{key}: cannot read class names from {path} ({exc})") from None
    return check_names([ln.strip() for ln in text.splitlines() if ln.strip()], f"{key} ({path})")
