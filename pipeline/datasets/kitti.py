"""KITTI importer: `image_2/` + `label_2/` (15-field lines, pixel boxes); DontCare dropped.

Layouts: `<path>/{image_2,label_2}`, `<path>/training/{image_2,label_2}`, or split folders
`<path>/{train,val,test}/{image_2,label_2}` (TAO's); `testing/image_2` (or a `test/image_2`
without labels) becomes the unlabeled folder.
Class names come from `classes.txt` beside the folders when there is one, else from the labels
(sorted, so ids do not depend on file order).
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.datasets.boxes import KITTI_FIELDS, Box, normalize
from pipeline.datasets.defects import Defects
from pipeline.datasets.fs import printable, walk
from pipeline.datasets.images import ImageCheck
from pipeline.datasets.labels import DONTCARE, check_names, decode_label, parse_kitti_line, read_names_file
from pipeline.datasets.sources import SPLITS, Item, LabelReader, Source, is_image
from pipeline.errors import UserError


def find_kitti_splits(path: Path) -> dict[str | None, tuple[Path, Path]]:
    """{split or None: (image_2, label_2)} for the KITTI layouts found at `path`."""
    if not path.is_dir():
        return {}
    if path.name == "image_2":
        path = path.parent
    for base in (path, path / "training"):
        if (base / "image_2").is_dir() and (base / "label_2").is_dir():
            return {None: (base / "image_2", base / "label_2")}
    return {s: (path / s / "image_2", path / s / "label_2") for s in SPLITS
            if (path / s / "image_2").is_dir() and (path / s / "label_2").is_dir()}


def kitti_reader(root: Path, class_ids: dict[str, int]) -> LabelReader:
    def read(item: Item, check: ImageCheck, defects: Defects) -> list[tuple[int, Box]] | None:
        if item.label is None:
            defects.add("image_without_label", item.key)
            return []
        where = printable(os.path.relpath(item.label, root))
        try:
            text = decode_label(item.label.read_bytes())
        except OSError as exc:
            text, where = None, f"{where} ({exc.strerror})"
        if text is None:
            defects.add("unreadable_label", where)
            return None
        boxes = []
        dontcare = 0
        for i, line in enumerate(text.splitlines(), 1):
            parsed = parse_kitti_line(line, class_ids)
            if parsed is None:
                continue
            if parsed == DONTCARE:
                defects.drop("kitti_dontcare")
                dontcare += 1
                continue
            if isinstance(parsed, str):
                defects.add(parsed, f"{where}:{i}")
                continue
            cls, box, swapped = parsed
            if swapped:
                defects.add("swapped_corners", f"{where}:{i}")
            boxes.append((cls, normalize(box, check.width, check.height)))
        if not boxes and not dontcare and not text.strip():
            defects.add("empty_label_file", where)
        return boxes

    return read


class KittiImporter:
    format = "kitti"

    def __init__(self, path: Path):
        self.root = path.parent if path.name == "image_2" else path
        self.splits = find_kitti_splits(path)
        if not self.splits:
            raise UserError(f"dataset.path={path} (dataset.format=kitti): no image_2/ and label_2/ folders "
                            "(looked in the folder, in training/, and in train/ val/ test/)")

    def roots(self) -> list[Path]:
        return [self.root]

    def _collect_names(self, label_files: list[Path]) -> list[str]:
        found: set[str] = set()
        for f in label_files:
            text = decode_label(f.read_bytes()) or ""
            for line in text.splitlines():
                fields = line.split()
                if len(fields) in (KITTI_FIELDS, KITTI_FIELDS + 1) and fields[0] != DONTCARE:
                    found.add(fields[0])
        if not found:
            raise UserError(f"dataset.path={self.root} (dataset.format=kitti): no labelled object in any label_2 "
                            "file, so there are no classes; check the labels (15 fields a line)")
        return check_names(sorted(found), f"dataset.path={self.root}")

    def scan(self) -> Source:
        items: list[Item] = []
        labels: list[Path] = []
        defects = Defects()
        for split, (image_dir, label_dir) in self.splits.items():
            tree = walk(image_dir)
            for d in tree.linked_dirs:
                defects.add("symlinked_folder", printable(Path(os.path.relpath(image_dir, self.root)) / d))
            label_files = walk(label_dir).files if label_dir.is_dir() else []
            labels += [f for f in label_files if f.suffix == ".txt"]
            by_stem = {os.path.splitext(os.path.relpath(f, label_dir))[0]: f for f in label_files if f.suffix == ".txt"}
            seen = set()
            for img in (f for f in tree.files if is_image(f)):
                stem = os.path.splitext(os.path.relpath(img, image_dir))[0]
                seen.add(stem)
                items.append(Item(Path(os.path.relpath(img, image_dir)).as_posix(), img, split, by_stem.get(stem)))
            for stem, f in by_stem.items():
                if stem not in seen:
                    defects.add("label_without_image", printable(os.path.relpath(f, self.root)))
        names_file = self.root / "classes.txt"
        key = f"dataset.path={self.root}"
        names = read_names_file(names_file, key) if names_file.is_file() else self._collect_names(labels)
        # KITTI's testing/ (or a test/ without labels) is the unlabeled folder infer reads.
        unlabeled = next((d for d in (self.root / "testing" / "image_2", self.root / "test" / "image_2")
                          if d.is_dir() and not (d.parent / "label_2").is_dir()), None)
        return Source(self.format, self.root, names, items, kitti_reader(self.root, {n: i for i, n in enumerate(names)}),
                      defects=defects, unlabeled_dir=unlabeled)
