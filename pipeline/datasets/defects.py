"""The defect kinds validation counts, what is done about each, and a counter that keeps examples."""

from __future__ import annotations

from collections import Counter

# kind -> (what was found, what the importer did about it). The one list of kinds: the report,
# the docs and the tests read it from here.
DEFECTS: dict[str, tuple[str, str]] = {
    # boxes
    "coord_out_of_range": ("box coordinates negative or beyond the image", "clipped to the image"),
    "zero_area_box": ("box narrower or lower than one pixel", "box dropped"),
    "box_outside_image": ("box entirely outside the image", "box dropped"),
    "swapped_corners": ("KITTI box with x2 < x1 or y2 < y1", "corners swapped"),
    "class_out_of_range": ("class id or name not in the class list", "box dropped"),
    "non_integer_class": ("class id that is not a whole number", "box dropped"),
    "bad_column_count": ("label line with the wrong number of fields", "line dropped"),
    "non_numeric_value": ("label value that is not a number", "line dropped"),
    "non_finite_value": ("NaN or infinite label value", "line dropped"),
    "duplicate_box": ("the same box twice in one image", "duplicate dropped"),
    "polygon_to_box": ("segmentation polygon in a detection label", "converted to its bounding box"),
    # label files
    "empty_label_file": ("label file without any line", "image kept as background"),
    "all_labels_rejected": ("image whose every label line or box was rejected", "image skipped"),
    "image_without_label": ("image without a label file", "image kept as background"),
    "label_without_image": ("label file (or COCO annotation) without an image", "ignored"),
    "unreadable_label": ("label file that is not text", "image skipped"),
    # images
    "unreadable_image": ("image file that cannot be decoded (or is empty)", "image skipped"),
    "truncated_image": ("image file cut short", "image skipped"),
    "repaired_image": ("image with a missing end marker or trailing bytes that still decodes", "re-encoded"),
    "tiny_image": ("image smaller than 10 pixels on a side", "image skipped"),
    "huge_image": ("image above 2**30 pixels, the most OpenCV's imread (training) reads", "image skipped"),
    "missing_image": ("image listed (train.txt, COCO, data.yaml list) but not on disk", "entry skipped"),
    "duplicate_image": ("the same image listed twice in one split", "second entry skipped"),
    "split_overlap": ("image in more than one split (inflates validation mAP)", "kept in each split"),
    "unlisted_image": ("image in the folder but in none of the split lists", "ignored"),
    "cmyk_image": ("CMYK image", "converted to RGB 8-bit"),
    "high_bit_depth_image": ("16-bit or float image", "converted to RGB 8-bit"),
    "palette_image": ("palette (indexed colour) image", "converted to RGB 8-bit"),
    "unusual_mode_image": ("bilevel or other unusual pixel format", "converted to RGB 8-bit"),
    "unsupported_format": ("image format Ultralytics cannot read (e.g. GIF, PPM)", "converted to PNG"),
    "image_size_mismatch": ("COCO width/height differ from the image file", "boxes normalised by the JSON's size"),
    # files and folders
    "renamed_file": ("file name with spaces, control characters or invalid UTF-8", "renamed in the copy"),
    "symlinked_folder": ("symbolic link to a folder", "followed once"),
}

MAX_EXAMPLES = 10

# Kinds that reject a label line or box: an image left without boxes by these alone is not a
# background image (its objects are there, unlabelled) and is skipped as all_labels_rejected.
REJECTED_LABELS = frozenset({
    "zero_area_box", "box_outside_image", "class_out_of_range", "non_integer_class", "bad_column_count",
    "non_numeric_value", "non_finite_value",
})


# Labels dropped on purpose, not defects: counted so the report adds up.
DROPPED_BY_DESIGN: dict[str, str] = {
    "kitti_dontcare": "KITTI DontCare regions (not objects)",
    "coco_crowd": "COCO crowd annotations (iscrowd=1)",
}


class Defects:
    """Counts per defect kind plus up to MAX_EXAMPLES example locations per kind."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.dropped: Counter[str] = Counter()  # DROPPED_BY_DESIGN kinds

    def add(self, kind: str, where: str = "", n: int = 1) -> None:
        if kind not in DEFECTS:
            raise KeyError(f"unknown defect kind {kind!r}")
        self.counts[kind] += n
        if where:
            ex = self.examples.setdefault(kind, [])
            if len(ex) < MAX_EXAMPLES:
                ex.append(where)

    def drop(self, kind: str, n: int = 1) -> None:
        """Count a label dropped on purpose (a DROPPED_BY_DESIGN kind)."""
        if kind not in DROPPED_BY_DESIGN:
            raise KeyError(f"unknown dropped kind {kind!r}")
        self.dropped[kind] += n

    def merge(self, other: Defects) -> None:
        self.dropped.update(other.dropped)
        for kind, n in other.counts.items():
            self.counts[kind] += n
        for kind, ex in other.examples.items():
            mine = self.examples.setdefault(kind, [])
            mine.extend(ex[: MAX_EXAMPLES - len(mine)])

    def as_dict(self) -> dict[str, int]:
        """Non-zero counts in DEFECTS order."""
        return {k: self.counts[k] for k in DEFECTS if self.counts[k]}
