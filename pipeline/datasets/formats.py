"""Which importer reads `dataset.path`: format auto-detection and the table of importers."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.datasets.coco import CocoImporter, find_coco_jsons
from pipeline.datasets.kitti import KittiImporter, find_kitti_splits
from pipeline.datasets.sources import Importer, is_image
from pipeline.datasets.yolo import DarknetImporter, YoloImporter, find_data_yaml
from pipeline.errors import UserError


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
    path = Path(str(path_value)).expanduser()
    if not path.exists():
        raise UserError(f"dataset.path={path_value} does not exist; give a dataset folder or file "
                        "(or leave dataset.path unset for the embedded synthetic dataset)")
    path = Path(os.path.abspath(path))  # absolute, ".." folded, symlinks kept
    if fmt == "auto":
        fmt = detect(path)
    importers = {"yolo": YoloImporter, "darknet": DarknetImporter, "kitti": KittiImporter, "coco": CocoImporter}
    return importers[fmt](path)
