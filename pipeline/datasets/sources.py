"""What an importer hands to the converter (`Source`, `Item`) and the protocol it follows.

An importer is built from `dataset.path` cheaply (`roots()` names what the reuse hash covers),
then `scan()` lists images, class names and per-image label references without decoding any
image. Labels are read per image by `Source.read_labels`, in the converter's thread pool, once
the image size is known. The importers build on this module; which importer reads a path is
`pipeline.datasets.formats`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.datasets.boxes import Box
from pipeline.datasets.defects import Defects
from pipeline.datasets.images import IMAGE_EXTENSIONS, ImageCheck

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
