"""What an importer hands to the converter (`Source`, `Item`), and format auto-detection.

An importer is built from `dataset.path` cheaply (`roots()` names what the reuse hash covers),
then `scan()` lists images, class names and per-image label references without decoding any
image. Labels are read per image by `Source.read_labels`, in the converter's thread pool, once
the image size is known.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.datasets.boxes import Box
from pipeline.datasets.defects import Defects
from pipeline.datasets.images import IMAGE_EXTENSIONS, ImageCheck
from pipeline.errors import UserError

SPLITS = ("train", "val", "test")


@dataclass
class Item:
    """One source image: where it is, its split (None: the seeded split decides) and its labels."""

    key: str  # path relative to the source root: names the image in reports and seeds the split
    image: Path
    split: str | None = None
    label: Any = None  # format-specific: a label file Path, a list of COCO annotations, or None


# (item, image check, defects of this image) -> [(class, normalised xyxy)]; None skips the image.
LabelReader = Callable[[Item, ImageCheck, Defects], "list[tuple[int, Box]] | None"]


@dataclass
class Source:
    """A scanned dataset: class names, images, and how to read one image's labels."""

    format: str
    root: Path
    names: list[str]
    items: list[Item]
    read_labels: LabelReader
    defects: Defects = field(default_factory=Defects)  # found while scanning (orphan labels, symlinks...)
    unlabeled_dir: Path | None = None
    notes: list[str] = field(default_factory=list)


class Importer(Protocol):
    format: str

    def roots(self) -> list[Path]:
        """Files and folders whose listing decides whether a converted copy is still valid."""

    def scan(self) -> Source:
        """List images and labels (no image decoding)."""


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _has_images(folder: Path, depth: int = 2) -> bool:
    try:
        entries = list(folder.iterdir())
    except OSError:
        return False
    if any(e.is_file() and is_image(e) for e in entries):
        return True
    return depth > 0 and any(e.is_dir() and not e.name.startswith(".") and _has_images(e, depth - 1) for e in entries)


def detect(path: Path) -> str:
    """The format of `path` (dataset.format=auto), or a UserError that says what was looked for."""
    from pipeline.datasets.coco import find_coco_jsons
    from pipeline.datasets.kitti import find_kitti_splits
    from pipeline.datasets.yolo import find_data_yaml

    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".yaml", ".yml"):
            return "yolo"
        if suffix == ".json":
            return "coco"
        if suffix in (".data", ".names", ".txt"):
            return "darknet"
        raise UserError(
            f"dataset.path={path} is a {suffix or 'suffix-less'} file; give a data.yaml, a COCO .json, an obj.data, "
            "or a folder (and dataset.format if auto-detection picks wrong)"
        )
    if find_data_yaml(path) is not None:
        return "yolo"
    if find_kitti_splits(path):
        return "kitti"
    if find_coco_jsons(path):
        return "coco"
    if _has_images(path):
        return "darknet"
    raise UserError(
        f"dataset.path={path} holds no dataset: no data.yaml, no KITTI image_2/label_2, no COCO .json, "
        "and no images; point dataset.path at the dataset folder"
    )


def open_source(path_value: str, fmt: str) -> Importer:
    """The importer for `dataset.path` / `dataset.format`."""
    from pipeline.datasets.coco import CocoImporter
    from pipeline.datasets.kitti import KittiImporter
    from pipeline.datasets.yolo import DarknetImporter, YoloImporter

    path = Path(str(path_value)).expanduser()
    if not path.exists():
        raise UserError(f"dataset.path={path_value} does not exist; give a dataset folder or file "
                        "(or leave dataset.path unset for the embedded synthetic dataset)")
    path = Path(os.path.abspath(path))  # absolute, ".." folded, symlinks kept
    if fmt == "auto":
        fmt = detect(path)
    importers = {"yolo": YoloImporter, "darknet": DarknetImporter, "kitti": KittiImporter, "coco": CocoImporter}
    return importers[fmt](path)
