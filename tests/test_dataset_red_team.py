"""The red-team dataset kinds: each is skipped-and-counted with one line, or handled the same way as
everywhere else (EXIF), or detected on reuse (edited labels)."""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DatasetConfig
from pipeline.datasets import DatasetInfo, prepare
from pipeline.datasets.images import MAX_PIXELS, inspect

LOG = logging.getLogger("test.red_team")
BOX = "0.5 0.5 0.2 0.2"


def prep(path: Path, results: Path, **cfg) -> DatasetInfo:
    return prepare(DatasetConfig(path=str(path), val_fraction=0.25, **cfg), results, 0, LOG)


def jpg(path: Path, size=(64, 48), orientation: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(size[0])
    im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    if orientation is None:
        im.save(path, quality=90)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(path, quality=90, exif=exif)


def darknet(root: Path, extra: dict[str, str]) -> Path:
    """3 good labelled images (classes a, b) plus `extra` label files (each with its own image)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("a\nb\n")
    for i in range(3):
        jpg(root / f"g{i}.jpg")
        (root / f"g{i}.txt").write_text(f"{i % 2} 0.5 0.5 0.3 0.3\n")
    for stem, text in extra.items():
        jpg(root / f"{stem}.jpg")
        (root / f"{stem}.txt").write_text(text)
    return root


def labels(info: DatasetInfo) -> dict[str, list[list[float]]]:
    return {f.stem: [[float(v) for v in ln.split()] for ln in f.read_text().splitlines()]
            for f in (info.root / "labels").rglob("*.txt")}


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(side: int = 40000) -> bytes:
    """A valid greyscale PNG of side x side black pixels: ~1.5 MB for 40000 (zeros compress 1000:1)."""
    row = b"\x00" * (side + 1)  # filter byte + pixels
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def test_decompression_bomb_png_is_skipped_and_counted_with_the_pixel_limit(tmp_path, caplog):
    src = darknet(tmp_path / "src", {})
    bomb = bomb_png()
    assert len(bomb) < 2_000_000  # the red-team file: tiny on disk, 1.6 gigapixels decoded
    (src / "big.png").write_bytes(bomb)
    (src / "big.txt").write_text(f"0 {BOX}\n")
    check = inspect(src / "big.png")
    assert (check.action, check.defect, check.width * check.height) == ("skip", "huge_image", 40000**2)
    with caplog.at_level(logging.WARNING, logger="test.red_team"):
        info = prep(src, tmp_path / "r")
    assert info.defects == {"huge_image": 1}
    assert sum(info.counts.values()) == 3 and "big" not in labels(info)
    [line] = [r.getMessage() for r in caplog.records if "huge" in r.getMessage() or "2**30" in r.getMessage()]
    assert "2**30 pixels" in line and f"{MAX_PIXELS:,} px" in line and "40000x40000" in line


def test_image_whose_every_label_is_rejected_is_dropped_not_background(tmp_path):
    src = darknet(tmp_path / "src", {
        "allbad": f"7 {BOX}\n0 1.5 0.5 0.2 0.2\n0 abc 0.5 0.2 0.2\n",  # class, outside, not a number
        "onegood": f"7 {BOX}\n1 {BOX}\n",  # keeps its good line
        "background": "",  # an empty label file stays a background image
    })
    info = prep(src, tmp_path / "r")
    assert info.defects == {"class_out_of_range": 2, "box_outside_image": 1, "non_numeric_value": 1,
                            "empty_label_file": 1, "all_labels_rejected": 1}
    assert sum(info.counts.values()) == 5  # 3 good + onegood + background; allbad is gone
    assert not any(p.stem == "allbad" for p in (info.root / "images").rglob("*"))
    assert labels(info)["onegood"] == [[1, 0.5, 0.5, 0.2, 0.2]]
    report = json.loads(info.report_path.read_text())
    assert report["defect_examples"]["all_labels_rejected"][0].startswith("allbad")


@pytest.mark.parametrize("fmt", ["kitti", "coco"])
def test_exif_rotated_pixel_boxes_are_normalised_by_the_displayed_size(tmp_path, fmt):
    """Stored 120x80 with orientation 6: displayed 80x120, the size labels, Ultralytics and infer use.
    A box drawn on the displayed image (x 10..50, y 20..100) lands where it was drawn."""
    names = ["car"]
    if fmt == "kitti":
        root = tmp_path / "kitti"
        for i in range(4):
            jpg(root / "image_2" / f"{i:06d}.jpg", size=(120, 80), orientation=6)
            (root / "label_2").mkdir(parents=True, exist_ok=True)
            (root / "label_2" / f"{i:06d}.txt").write_text("Car 0 0 0 10 20 50 100 0 0 0 0 0 0 0\n")
        names = ["Car"]
        path = root
    else:
        root = tmp_path / "coco"
        images = [{"id": i, "file_name": f"c{i}.jpg", "width": 80, "height": 120} for i in range(4)]
        anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [10, 20, 40, 80], "iscrowd": 0} for i in range(4)]
        for i in range(4):
            jpg(root / "images" / f"c{i}.jpg", size=(120, 80), orientation=6)
        (root / "annotations").mkdir(parents=True)
        path = root / "annotations" / "instances.json"
        path.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": 1, "name": "car"}]}))
    info = prep(path, tmp_path / "r")
    assert info.names == names and info.defects == {}  # COCO's width/height agree with the displayed size
    for rows in labels(info).values():
        assert np.allclose(rows, [[0, 30 / 80, 60 / 120, 40 / 80, 80 / 120]], atol=1e-6)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_editing_the_converted_labels_changes_the_dataset_artifact(tmp_path):
    """data.yaml (the artifact whose sha256 enters config_hash) carries a hash of the labels and image
    list: reuse after an edit of the converted copy is a new input, not the old run."""
    src = darknet(tmp_path / "src", {"x": f"1 {BOX}\n"})
    first = prep(src, tmp_path / "r")
    before = _sha(first.data_yaml)
    assert prep(src, tmp_path / "r").data_yaml.read_bytes() == first.data_yaml.read_bytes()  # unchanged: same
    label = next((first.root / "labels").rglob("x.txt"))
    label.write_text(f"0 {BOX}\n")  # relabelled by hand in the copy
    again = prep(src, tmp_path / "r")
    assert again.root == first.root and _sha(again.data_yaml) != before
