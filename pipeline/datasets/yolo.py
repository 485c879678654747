"""Ultralytics data.yaml and Darknet/YOLO flat-folder importers (both use YOLO text labels)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from pipeline.datasets.boxes import Box
from pipeline.datasets.defects import Defects
from pipeline.datasets.fs import printable, walk
from pipeline.datasets.images import ImageCheck
from pipeline.datasets.labels import check_names, decode_label, parse_yolo_line, read_names_file
from pipeline.datasets.sources import SPLITS, Item, LabelReader, Source, is_image
from pipeline.errors import UserError

YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml")
NAMES_FILES = ("classes.txt", "obj.names", "classes.names")
LIST_FILES = {"train": ("train.txt",), "val": ("valid.txt", "val.txt"), "test": ("test.txt",)}
UNLABELED = "unlabeled"  # a folder of this name inside a Darknet source is not imported: it feeds infer


def label_path_for(image: Path) -> Path | None:
    """Ultralytics' rule (last /images/ -> /labels/, suffix .txt), else a .txt beside the image."""
    s = str(image)
    sep_images, sep_labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if sep_images in s:
        head, tail = s.rsplit(sep_images, 1)
        candidate = Path(os.path.splitext(head + sep_labels + tail)[0] + ".txt")
        if candidate.is_file():
            return candidate
    beside = image.with_suffix(".txt")
    return beside if beside.is_file() else None


def yolo_reader(root: Path, nc: int) -> LabelReader:
    """Reads YOLO text labels: one `class cx cy w h` line per box, normalised."""

    def read(item: Item, check: ImageCheck, defects: Defects) -> list[tuple[int, Box]] | None:
        if item.label is None:
            defects.add("image_without_label", item.key)
            return []
        where = printable(os.path.relpath(item.label, root))
        try:
            text = decode_label(item.label.read_bytes())
        except OSError as exc:
            text = None
            where += f" ({exc.strerror})"
        if text is None:
            defects.add("unreadable_label", where)
            return None
        boxes = []
        for i, line in enumerate(text.splitlines(), 1):
            parsed = parse_yolo_line(line, nc)
            if parsed is None:
                continue
            if isinstance(parsed, str):
                defects.add(parsed, f"{where}:{i}")
                continue
            cls, box, polygon = parsed
            if polygon:
                defects.add("polygon_to_box", f"{where}:{i}")
            boxes.append((cls, box))
        if not boxes and not text.strip():
            defects.add("empty_label_file", where)
        return boxes

    return read


def _orphan_labels(txt_files: list[Path], used: set[Path], skip: set[Path], defects: Defects, root: Path) -> None:
    for t in txt_files:
        if t not in used and t not in skip and t.name not in NAMES_FILES:
            defects.add("label_without_image", printable(os.path.relpath(t, root)))


def _int_like(value: Any, where: str) -> int:
    """`nc:` as Ultralytics reads it: an integer, or a text/float that is one ('10', 10.0)."""
    try:
        n = float(value)
        if n != int(n):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{where}: nc: {value} must be a whole number of classes") from None
    return int(n)


def _names_from_yaml(data: dict[str, Any], where: str) -> list[str]:
    """`names` (list, or dict id: name) and `nc`, with the checks Ultralytics' check_det_dataset makes."""
    names = data.get("names")
    nc = _int_like(data["nc"], where) if "nc" in data else None
    if names is None:
        if nc is None:
            raise UserError(f"{where}: has no class list; add `names:` (a list, or a dict id: name)")
        if nc < 1:
            raise UserError(f"{where}: nc: {nc} names no class; set nc to the number of classes, or add `names:`")
        names = [f"class{i}" for i in range(nc)]
    if not isinstance(names, (list, dict)):
        raise UserError(f"{where}: names must be a list, or a dict id: name, not {type(names).__name__}")
    if nc is not None and len(names) != nc:
        raise UserError(f"{where}: nc: {nc} but names lists {len(names)} classes; "
                        "fix or remove `nc:` (Ultralytics refuses this file too)")
    if isinstance(names, dict):
        try:
            by_id = {int(k): v for k, v in names.items()}
        except (TypeError, ValueError):
            raise UserError(f"{where}: names keys must be class ids 0..n-1, got {list(names)[:5]}") from None
        ids = sorted(by_id)
        if ids != list(range(len(ids))):
            raise UserError(f"{where}: names ids must run 0..{len(ids) - 1} without gaps, got {ids[:10]}")
        names = [by_id[i] for i in ids]
    # Ultralytics would name a null entry "None": a class no one chose the name of, kept forever in the model.
    unnamed = [i for i, n in enumerate(names) if n is None]
    if unnamed:
        raise UserError(f"{where}: names: class {unnamed[0]} has no name (null); write a name for every class")
    return check_names(names, where)


def _split_paths(root: Path, value: Any) -> list[tuple[str, list[Path]]]:
    """Each entry of a split with the places Ultralytics' check_det_dataset reads it from, in order.

    A text value is `root / value`, and, when that does not exist and the value starts with `../`,
    `root / value[3:]` (Roboflow's exports write `train: ../train/images` beside the data.yaml);
    list entries get no such second try. `~` is expanded (Ultralytics does not).
    """
    values = value if isinstance(value, list) else [value]
    out = []
    for v in values:
        tries = [(root / Path(v).expanduser()).resolve()]
        if isinstance(value, str) and v.startswith("../"):
            tries.append((root / v[3:]).resolve())
        out.append((v, tries))
    return out


def _resolves(root: Path, data: dict[str, Any], splits: tuple[str, ...]) -> bool:
    """Whether every entry of these splits exists under `root`."""
    return all(any(t.exists() for t in tries) for s in splits if isinstance(data.get(s), (str, list))
               for _, tries in _split_paths(root, data[s]))


def _data_yamls(folder: Path) -> list[Path]:
    """The dataset YAMLs in `folder`: data.yaml & co. by name, else any *.yaml/*.yml naming a `train` split."""
    found = []
    try:
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in (".yaml", ".yml") and f.is_file())
    except OSError:
        return []
    for f in files:
        if f.name.lower() in YAML_NAMES:
            found.append(f)
            continue
        try:
            # A dataset YAML is a few lines; a big one is not worth parsing to find out.
            data = yaml.safe_load(f.read_text(encoding="utf-8")) if f.stat().st_size < 1 << 20 else None
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and "train" in data and any(k in data for k in ("val", "validation", "names", "nc")):
            found.append(f)
    return found


def _names_folder(yaml_file: Path, folder: Path) -> bool:
    """Whether the dataset of `yaml_file` lies in `folder` (its root or one of its splits)."""
    try:
        importer = YoloImporter(yaml_file)
    except UserError:
        return False
    target = folder.resolve()
    paths = [importer.root, *(p for ps in importer.splits.values() for p in ps)]
    return any(p.resolve().is_relative_to(target) for p in paths)


def find_data_yaml(folder: Path) -> Path | None:
    """The data.yaml for a folder given as `dataset.path`: in it, in one of its subfolders, or beside it.

    Beside it (in the parent folder) counts only when that yaml's dataset lies in `folder`, e.g.
    `dataset.path=export/train` of a Roboflow export whose `export/data.yaml` names `../train/images`.
    Several candidates at one level are refused, listing them.
    """
    if not folder.is_dir():
        return None
    levels = [
        _data_yamls(folder),
        [y for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".") for y in _data_yamls(d)],
        [y for y in _data_yamls(folder.parent) if _names_folder(y, folder)],
    ]
    for found in levels:
        if len(found) > 1:
            listed = ", ".join(str(f) for f in found[:6])
            raise UserError(f"dataset.path={folder} has {len(found)} dataset YAMLs ({listed}); "
                            f"pick one with dataset.path=<the yaml>, e.g. dataset.path={found[0]}")
        if found:
            return found[0]
    return None


class YoloImporter:
    """Ultralytics `data.yaml`: `path`, `train`/`val`/`test` (folders, .txt lists or images), `names`.

    Paths resolve as in Ultralytics' `check_det_dataset` (docs/datasets.md says where we differ).
    """

    format = "yolo"
    USED = ("train", "val")  # the splits training reads: these must exist; a missing `test:` is only noted

    def __init__(self, path: Path):
        yaml_file = path if path.is_file() else find_data_yaml(path)
        if yaml_file is None:
            raise UserError(f"dataset.path={path}: no data.yaml in this folder, its subfolders or beside it "
                            "(dataset.format=yolo); give the data.yaml file, or dataset.format=darknet for a "
                            "folder of images + .txt labels")
        self.yaml_file = yaml_file
        self.where = f"dataset.path={yaml_file}"
        self.notes: list[str] = []
        if yaml_file != path:
            self.notes.append(f"dataset.path is a folder: using {yaml_file}")
        try:
            data = yaml.safe_load(yaml_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            mark = getattr(exc, "problem_mark", None)
            why = f"{exc.problem} at line {mark.line + 1}" if mark is not None else " ".join(str(exc).split())
            raise UserError(f"{self.where} is not readable YAML ({why})") from None
        if not isinstance(data, dict):
            raise UserError(f"{self.where} is not a mapping; expected keys path, train, val, names")
        if "val" not in data and "validation" in data:  # Ultralytics renames this key too
            data["val"] = data.pop("validation")
        for key in ("train", "val", "test"):
            value = data.get(key)
            if value is not None and not (isinstance(value, str) or
                                          isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise UserError(f"{self.where}: {key}: must be a path or a list of paths, not {value!r}")
        self.data = data
        self.root = self._root()
        self.splits = {s: e for s in SPLITS if data.get(s) and (e := self._entries(s))}
        if "train" not in self.splits:
            raise UserError(f"{self.where} has no `train:` entry; name the training images")

    def _root(self) -> Path:
        """`path:`, else the yaml's folder. Relative: from the yaml's folder, else the working folder (Ultralytics)."""
        base = self.yaml_file.parent
        value = self.data.get("path")
        if not value:
            return base.resolve()
        if not isinstance(value, str):
            raise UserError(f"{self.where}: path: must be a folder, not {value!r}")
        p = Path(value).expanduser()
        # Ultralytics reads a relative `path:` from the working folder only, so `path: .` would mean
        # another dataset when run from elsewhere; the yaml's folder comes first where its splits exist.
        tries = [p] if p.is_absolute() else [base / p, Path.cwd() / p]
        found = list(dict.fromkeys(t.resolve() for t in tries if t.is_dir()))
        if not found:
            # Ultralytics would go on to look under its own datasets_dir setting; the pipeline's
            # Ultralytics settings are not the user's, so that folder would be a guess.
            tried = ", ".join(str(t) for t in dict.fromkeys(tries))
            raise UserError(f"{self.where}: path: {value} points nowhere (no folder {tried}); write `path:` "
                            "absolute or relative to the data.yaml (Ultralytics' datasets_dir is not searched)")
        root = next((r for r in found if _resolves(r, self.data, self.USED)), found[0])
        if not p.is_absolute() and root != (base / p).resolve():
            self.notes.append(f"path: {value} read from the working folder, as Ultralytics does ({root})")
        return root

    def _entries(self, split: str) -> list[Path]:
        out = []
        for v, tries in _split_paths(self.root, self.data[split]):
            hit = next((t for t in tries if t.exists()), None)
            if hit is not None:
                out.append(hit)
                continue
            missing = f"neither {tries[0]} nor {tries[1]} exists" if len(tries) > 1 else f"{tries[0]} does not exist"
            nowhere = f"{split}: {v} points nowhere ({missing})"
            if split not in self.USED:
                self.notes.append(f"{nowhere}: the {split} split is not imported")
                return []
            raise UserError(f"{self.where}: {nowhere}; fix the data.yaml")
        return out

    def roots(self) -> list[Path]:
        outside = [p for ps in self.splits.values() for p in ps if not p.resolve().is_relative_to(self.root)]
        return [self.yaml_file, self.root, *outside]

    def scan(self) -> Source:
        names = _names_from_yaml(self.data, self.where)
        source = Source(self.format, self.root, names, [], yolo_reader(self.root, len(names)), notes=list(self.notes))
        label_dirs: set[Path] = set()
        for split, entries in self.splits.items():
            before = len(source.items)
            for entry in entries:
                base = entry if entry.is_dir() else self.root
                for image in self._images(entry, source):
                    source.items.append(Item(_key(image, base), image, split, label_path_for(image)))
                if entry.is_dir():
                    label_dirs.add(_labels_dir(entry))
            if len(source.items) == before:
                # Ultralytics refuses an empty split too; a seeded split in its place would hide the mistake.
                value = self.data[split]
                entry_text = ", ".join(value) if isinstance(value, list) else value
                if split == "train":
                    raise UserError(f"{self.where}: train: {entry_text} holds no image; add the training images")
                if split == "val":
                    raise UserError(f"{self.where}: val: {entry_text} holds no image; add its images, or remove "
                                    "the `val:` line to get a seeded split")
                source.notes.append(f"{split}: {entry_text} holds no image")
        used = {i.label for i in source.items if i.label is not None}
        txts = [t for d in sorted(label_dirs) if d.is_dir() for t in walk(d).files if t.suffix == ".txt"]
        lists = {p for ps in self.splits.values() for p in ps if p.is_file()}
        _orphan_labels(txts, used, lists, source.defects, self.root)
        return source

    def _images(self, entry: Path, source: Source) -> list[Path]:
        if entry.is_dir():
            tree = walk(entry)
            for d in tree.linked_dirs:
                source.defects.add("symlinked_folder", printable(Path(os.path.relpath(entry, self.root)) / d))
            return [f for f in tree.files if is_image(f)]
        if is_image(entry):
            return [entry]
        found = []
        for line in entry.read_text(encoding="utf-8-sig", errors="replace").splitlines():
            line = line.strip()
            if not line:
                continue
            p = Path(line)
            if line.startswith("./"):  # Ultralytics: relative to the list's folder
                p = entry.parent / line
            elif not p.is_absolute():
                # Ultralytics reads other lines from the working folder; ours also from path and the list's folder.
                p = next((c for c in (Path.cwd() / p, self.root / p, entry.parent / p) if c.is_file()), self.root / p)
            if p.is_file():
                found.append(p)
            else:
                source.defects.add("missing_image", f"{printable(entry.name)}: {printable(line)}")
        return found


def _labels_dir(images_dir: Path) -> Path:
    """Where Ultralytics looks for the labels of a folder of images (the last `images` -> `labels`)."""
    parts = list(images_dir.parts)
    if "images" not in parts:
        return images_dir
    parts[len(parts) - 1 - parts[::-1].index("images")] = "labels"
    return Path(*parts)


def _key(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix().lstrip("/")


def _parse_obj_data(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8-sig", errors="replace").splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


class DarknetImporter:
    """Darknet/YOLO flat folder: images with a same-stem .txt beside them (or in a parallel labels/).

    Class names from classes.txt / obj.names / *.names (or obj.data's `names=`), in the folder or
    its parent; optional train.txt / valid.txt lists (or obj.data's `train=` / `valid=`).
    """

    format = "darknet"

    def __init__(self, path: Path):
        self.root = path.parent if path.is_file() else path
        self.key = f"dataset.path={path}"
        self.obj_data = path if path.suffix == ".data" else self._first(["obj.data", "*.data"], self.root)
        self.meta = _parse_obj_data(self.obj_data) if self.obj_data else {}
        self.names_file = self._names_file()
        self.lists = self._lists()

    @staticmethod
    def _first(patterns: list[str], folder: Path) -> Path | None:
        for pattern in patterns:
            hits = sorted(p for p in folder.glob(pattern) if p.is_file())
            if hits:
                return hits[0]
        return None

    def _resolve_meta(self, value: str) -> Path | None:
        """A path written in obj.data: darknet resolves it from its own working folder, so try a few bases."""
        p = Path(value)
        if p.is_absolute():
            return p if p.exists() else None
        bases = [self.obj_data.parent if self.obj_data else self.root, self.root, self.root.parent, Path.cwd()]
        for base in bases:
            for cand in (base / p, base / p.name):
                if cand.is_file():
                    return cand
        return None

    def _names_file(self) -> Path | None:
        if "names" in self.meta:
            found = self._resolve_meta(self.meta["names"])
            if found is None:
                raise UserError(f"{self.key}: {self.obj_data.name} says names={self.meta['names']}, which points "
                                "nowhere; fix it or put a classes.txt in the dataset folder")
            return found
        for folder in (self.root, self.root.parent):
            hit = self._first(list(NAMES_FILES) + ["*.names"], folder)
            if hit is not None:
                return hit
        return None

    def _lists(self) -> dict[str, Path]:
        lists = {}
        for split, key in (("train", "train"), ("val", "valid"), ("test", "test")):
            if key in self.meta:
                found = self._resolve_meta(self.meta[key])
                if found is None:
                    raise UserError(f"{self.key}: {self.obj_data.name} says {key}={self.meta[key]}, which points nowhere")
                lists[split] = found
            elif not self.meta:
                hit = self._first(list(LIST_FILES[split]), self.root)
                if hit is not None:
                    lists[split] = hit
        return lists

    def roots(self) -> list[Path]:
        extra = [p for p in [self.names_file, self.obj_data, *self.lists.values()]
                 if p is not None and not p.resolve().is_relative_to(self.root.resolve())]
        return [self.root, *extra]

    def scan(self) -> Source:
        if self.names_file is None:
            raise UserError(f"{self.key} has no class names: add classes.txt (one name a line, in id order) "
                            "or obj.names, or give dataset.format explicitly if this is another format")
        names = read_names_file(self.names_file, self.key)
        unlabeled = self.root / UNLABELED
        tree = walk(self.root, skip=(unlabeled,))
        source = Source(self.format, self.root, names, [], yolo_reader(self.root, len(names)),
                        unlabeled_dir=unlabeled if unlabeled.is_dir() else None)
        for d in tree.linked_dirs:
            source.defects.add("symlinked_folder", printable(d))
        images = [f for f in tree.files if is_image(f)]
        if self.lists:
            listed = self._from_lists(images, source)
        else:
            listed = [(img, None) for img in images]
        for img, split in listed:
            source.items.append(Item(_key(img, self.root), img, split, label_path_for(img)))
        used = {i.label for i in source.items if i.label is not None}
        meta = {p for p in [self.names_file, self.obj_data, *self.lists.values()] if p is not None}
        # Labels of images left out by the lists are not orphans: their images exist.
        used |= {label_path_for(img) for img in images}
        _orphan_labels([f for f in tree.files if f.suffix == ".txt"], used, meta, source.defects, self.root)
        return source

    def _from_lists(self, images: list[Path], source: Source) -> list[tuple[Path, str]]:
        by_name: dict[str, list[Path]] = {}
        for img in images:
            by_name.setdefault(img.name, []).append(img)
        out: list[tuple[Path, str]] = []
        listed: set[Path] = set()
        for split, list_file in self.lists.items():
            for line in list_file.read_text(encoding="utf-8-sig", errors="replace").splitlines():
                line = line.strip()
                if not line:
                    continue
                p = self._resolve_listed(line, list_file, by_name)
                if p is None:
                    source.defects.add("missing_image", f"{printable(list_file.name)}: {printable(line)}")
                    continue
                out.append((p, split))
                listed.add(p.resolve())
        for img in images:
            if img.resolve() not in listed:
                source.defects.add("unlisted_image", printable(os.path.relpath(img, self.root)))
        return out

    def _resolve_listed(self, line: str, list_file: Path, by_name: dict[str, list[Path]]) -> Path | None:
        p = Path(line)
        if p.is_absolute():
            if p.is_file():
                return p
        else:
            for base in (list_file.parent, self.root, self.root.parent, Path.cwd()):
                if (base / p).is_file():
                    return base / p
        hits = by_name.get(p.name, [])
        return hits[0] if len(hits) == 1 else None
