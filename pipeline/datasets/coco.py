"""COCO JSON importer: an instances file (images, annotations, categories) plus its images folder.

`dataset.path` is the .json file, or a folder holding `annotations/*.json` (or *.json): one file
is split by seed; several are assigned to train/val/test by the words in their names
(instances_train2017.json -> train). Category ids need not be contiguous: classes are the
categories sorted by id. Crowd annotations (iscrowd=1) are dropped, as Ultralytics' converter does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.datasets.boxes import Box, normalize
from pipeline.datasets.defects import Defects
from pipeline.datasets.fs import printable
from pipeline.datasets.images import ImageCheck
from pipeline.datasets.labels import check_names, parse_coco_bbox
from pipeline.datasets.sources import SPLITS, Item, LabelReader, Source
from pipeline.errors import UserError

REQUIRED = {
    "images": ("id", "file_name"),
    "annotations": ("image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def find_coco_jsons(folder: Path) -> list[Path]:
    """Instances files in `folder/annotations/` or `folder/` (files named instances_* preferred)."""
    if not folder.is_dir():
        return []
    found = sorted(p for d in (folder / "annotations", folder) if d.is_dir() for p in d.glob("*.json") if p.is_file())
    instances = [p for p in found if "instances" in p.name]
    return instances or found


def _split_of(path: Path) -> str | None:
    name = path.stem.lower()
    hits = [s for s in SPLITS if s in name or (s == "val" and "valid" in name)]
    return hits[0] if len(hits) == 1 else None


def _require(entries: Any, section: str, where: str) -> list[dict[str, Any]]:
    if not isinstance(entries, list):
        raise UserError(f"{where}: '{section}' must be a list")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise UserError(f"{where}: {section}[{i}] is not an object")
        for key in REQUIRED[section]:
            if key not in e:
                raise UserError(f"{where}: {section}[{i}] has no '{key}' key; every {section} entry needs "
                                f"{', '.join(REQUIRED[section])}")
    return entries


def load_coco(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The three sections of a COCO file, each entry checked for its required keys."""
    where = f"dataset.path={path}"
    try:
        data = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{where} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{where} is not a COCO file (top level is not an object)")
    for section in REQUIRED:
        if section not in data:
            raise UserError(f"{where}: the COCO file has no '{section}' key; an instances file needs "
                            "images, annotations and categories")
    return {s: _require(data[s], s, where) for s in REQUIRED}


def coco_reader(class_ids: dict[Any, int]) -> LabelReader:
    def read(item: Item, check: ImageCheck, defects: Defects) -> list[tuple[int, Box]] | None:
        anns, width, height = item.label
        if width and height and (width, height) != (check.width, check.height):
            defects.add("image_size_mismatch", f"{item.key}: JSON {width}x{height}, file {check.width}x{check.height}")
        else:
            width, height = check.width, check.height
        if not anns:
            defects.add("image_without_label", item.key)
            return []
        boxes = []
        for ann in anns:
            if ann.get("iscrowd"):
                defects.drop("coco_crowd")
                continue
            parsed = parse_coco_bbox(ann, class_ids)
            if isinstance(parsed, str):
                defects.add(parsed, f"{item.key}: annotation id {ann.get('id')}")
                continue
            cls, box = parsed
            boxes.append((cls, normalize(box, width, height)))
        return boxes

    return read


class CocoImporter:
    format = "coco"

    def __init__(self, path: Path):
        if path.is_file():
            self.jsons = {None: path}
            self.root = path.parent.parent if path.parent.name == "annotations" else path.parent
            return
        self.root = path
        found = find_coco_jsons(path)
        if not found:
            raise UserError(f"dataset.path={path} (dataset.format=coco): no .json file in the folder or in annotations/")
        if len(found) == 1:
            self.jsons = {None: found[0]}
            return
        by_split: dict[str | None, Path] = {}
        for p in found:
            split = _split_of(p)
            if split is None or split in by_split:
                raise UserError(f"dataset.path={path}: several COCO files ({', '.join(p.name for p in found)}) and "
                                f"{p.name} is not clearly train/val/test; set dataset.path to one .json file")
            by_split[split] = p
        self.jsons = by_split

    def roots(self) -> list[Path]:
        return [self.root, *(p for p in self.jsons.values() if not p.resolve().is_relative_to(self.root.resolve()))]

    def _image_dir(self, json_path: Path, images: Sequence[dict[str, Any]]) -> Path:
        stem = json_path.stem.replace("instances_", "")
        candidates = [json_path.parent, json_path.parent / "images", self.root / "images", self.root / "images" / stem,
                      self.root / stem, self.root]
        sample = [str(im["file_name"]) for im in images[:20]]
        if not sample:
            return json_path.parent
        scores = [sum((c / f).is_file() for f in sample) for c in candidates]
        best = max(range(len(candidates)), key=lambda i: (scores[i], -i))
        if scores[best] == 0:
            raise UserError(f"dataset.path={json_path}: none of the first images ({sample[0]}, ...) exists under "
                            f"{', '.join(str(c) for c in dict.fromkeys(candidates))}; put the images beside the "
                            "annotations folder in images/")
        return candidates[best]

    def scan(self) -> Source:
        names: list[str] | None = None
        class_ids: dict[Any, int] = {}
        items: list[Item] = []
        defects = Defects()
        for split, json_path in self.jsons.items():
            data = load_coco(json_path)
            cats = sorted(data["categories"], key=lambda c: (str(type(c["id"])), c["id"]))
            these = check_names([c["name"] for c in cats], f"dataset.path={json_path} (categories)")
            if names is None:
                names, class_ids = these, {c["id"]: i for i, c in enumerate(cats)}
            elif these != names:
                raise UserError(f"dataset.path={self.root}: {json_path.name} lists other categories than "
                                f"{next(iter(self.jsons.values())).name}; the files must share one category list")
            by_image: dict[Any, list[dict[str, Any]]] = {im["id"]: [] for im in data["images"]}
            for ann in data["annotations"]:
                if ann["image_id"] in by_image:
                    by_image[ann["image_id"]].append(ann)
                else:
                    defects.add("label_without_image", f"{json_path.name}: annotation id {ann.get('id')} "
                                                       f"(image_id {ann['image_id']})")
            image_dir = self._image_dir(json_path, data["images"])
            for im in data["images"]:
                file_name = str(im["file_name"])
                path = image_dir / file_name
                if not path.is_file():
                    defects.add("missing_image", f"{json_path.name}: {printable(file_name)}")
                    continue
                size = (im.get("width"), im.get("height"))
                size = size if all(isinstance(v, int) and v > 0 for v in size) else (None, None)
                items.append(Item(Path(file_name).as_posix(), path, split, (by_image[im["id"]], *size)))
        assert names is not None
        return Source(self.format, self.root, names, items, coco_reader(class_ids), defects=defects)
