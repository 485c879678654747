"""A generated corpus of bad inputs: each is fixed with a counted defect, or refused with a clear
UserError (exit code 2 through the CLI, no traceback). Property tests for the parsers and boxes."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.config import DatasetConfig
from pipeline.datasets import DatasetInfo, prepare
from pipeline.datasets.boxes import (
    clean_box,
    coco_to_xyxy,
    denormalize,
    kitti_line,
    normalize,
    xyxy_to_coco,
    xyxy_to_yolo,
    yolo_line,
    yolo_to_xyxy,
)
from pipeline.datasets.build import seeded_split
from pipeline.datasets.defects import DEFECTS, Defects
from pipeline.datasets.fs import safe_stem
from pipeline.datasets.labels import parse_coco_bbox, parse_kitti_line, parse_yolo_line
from pipeline.errors import UserError

LOG = logging.getLogger("test.bad_inputs")


# -- file makers ---------------------------------------------------------------------------------

def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def jpg(size=(64, 48)) -> bytes:
    rng = np.random.default_rng(size[0])
    return encoded(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)), "JPEG")


def png(mode: str = "RGB", size=(64, 48)) -> bytes:
    if mode == "I;16":
        return encoded(Image.fromarray(np.full((size[1], size[0]), 40000, dtype=np.uint16)), "PNG")
    im = Image.new(mode, size)
    if mode == "P":
        im.putpalette([v for i in range(256) for v in (i, 255 - i, 128)])
    return encoded(im, "PNG")


def write(root: Path, files: dict) -> None:
    """Write {name: bytes|str}; a bytes name is written as raw (possibly non-UTF-8) bytes."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        path = os.path.join(os.fsencode(root), name) if isinstance(name, bytes) else root / name
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


GOOD = {f"g{i}.jpg": None for i in range(3)}  # filled in by darknet(): 3 labelled images


def darknet(root: Path, files: dict, names: str = "a\nb\n") -> Path:
    """A usable Darknet folder (3 good labelled images, classes a, b) plus `files`."""
    base = {"classes.txt": names}
    for i in range(3):
        base[f"g{i}.jpg"] = jpg()
        base[f"g{i}.txt"] = f"{i % 2} 0.5 0.5 0.3 0.3\n"
    write(root, {**base, **files})
    return root


def prep(path: Path, fmt: str = "auto", tmp: Path | None = None) -> DatasetInfo:
    results = (tmp or path.parent) / "results"
    return prepare(DatasetConfig(path=str(path), format=fmt, val_fraction=0.25), results, 0, LOG)


def total(info: DatasetInfo) -> int:
    return sum(n for k, n in info.counts.items() if k != "unlabeled")


def labels(info: DatasetInfo) -> dict[str, list[list[float]]]:
    return {f.stem: [[float(v) for v in ln.split()] for ln in f.read_text().splitlines()]
            for f in (info.root / "labels").rglob("*.txt")}


def output_image(info: DatasetInfo, stem: str) -> Path:
    hits = [p for p in (info.root / "images").rglob("*") if p.stem == stem]
    assert len(hits) == 1, f"{stem} not in the converted dataset"
    return hits[0]


# -- fixed with a counted defect (Darknet flat folder) ----------------------------------------------

BOX = "0.5 0.5 0.2 0.2"
FIXED: list[tuple[str, dict, dict[str, int], int]] = [
    # id, extra files, expected defects, expected image count
    ("negative_coords", {"x.jpg": jpg(), "x.txt": "0 0.05 0.5 0.2 0.2\n"}, {"coord_out_of_range": 1}, 4),
    ("beyond_image", {"x.jpg": jpg(), "x.txt": "1 0.95 0.9 0.3 0.3\n"}, {"coord_out_of_range": 1}, 4),
    ("zero_area", {"x.jpg": jpg(), "x.txt": f"0 0.5 0.5 0 0.2\n0 {BOX}\n"}, {"zero_area_box": 1}, 4),
    ("outside_image", {"x.jpg": jpg(), "x.txt": f"0 1.5 0.5 0.2 0.2\n0 {BOX}\n"}, {"box_outside_image": 1}, 4),
    ("class_out_of_range", {"x.jpg": jpg(), "x.txt": f"7 {BOX}\n-1 {BOX}\n1 {BOX}\n"}, {"class_out_of_range": 2}, 4),
    ("non_integer_class", {"x.jpg": jpg(), "x.txt": f"0.5 {BOX}\n1.0 {BOX}\n"}, {"non_integer_class": 1}, 4),
    ("wrong_column_count", {"x.jpg": jpg(), "x.txt": f"0 0.5 0.5 0.2\n0 {BOX} 0.9\n1 {BOX}\n"},
     {"bad_column_count": 2}, 4),
    ("non_numeric", {"x.jpg": jpg(), "x.txt": f"0 abc 0.5 0.2 0.2\n1 {BOX}\n"}, {"non_numeric_value": 1}, 4),
    ("nan_inf", {"x.jpg": jpg(), "x.txt": f"0 nan 0.5 0.2 0.2\n0 0.5 inf 0.2 0.2\n1 {BOX}\n"},
     {"non_finite_value": 2}, 4),
    ("duplicate_boxes", {"x.jpg": jpg(), "x.txt": f"0 {BOX}\n0 {BOX}\n1 {BOX}\n"}, {"duplicate_box": 1}, 4),
    ("polygon", {"x.jpg": jpg(), "x.txt": "0 0.1 0.1 0.4 0.1 0.4 0.4\n"}, {"polygon_to_box": 1}, 4),
    ("empty_label", {"x.jpg": jpg(), "x.txt": ""}, {"empty_label_file": 1}, 4),
    ("image_without_label", {"x.jpg": jpg()}, {"image_without_label": 1}, 4),
    ("label_without_image", {"orphan.txt": f"0 {BOX}\n"}, {"label_without_image": 1}, 3),
    ("binary_label", {"x.jpg": jpg(), "x.txt": b"\x00\x01\x02garbage"}, {"unreadable_label": 1}, 3),
    ("garbage_image", {"x.jpg": b"this is not an image", "x.txt": f"0 {BOX}\n"}, {"unreadable_image": 1}, 3),
    ("empty_image_file", {"x.png": b"", "x.txt": f"0 {BOX}\n"}, {"unreadable_image": 1}, 3),
    ("corrupt_png_chunk", {"x.png": (lambda b: b[:60] + bytes([b[60] ^ 0xFF]) + b[61:])(png("RGB", (64, 48))),
                           "x.txt": f"0 {BOX}\n"}, {"unreadable_image": 1}, 3),
    ("truncated_jpeg", {"x.jpg": jpg((200, 150))[:4000], "x.txt": f"0 {BOX}\n"}, {"truncated_image": 1}, 3),
    ("trailing_bytes_jpeg", {"x.jpg": jpg() + b"junk" * 50, "x.txt": f"0 {BOX}\n"}, {"repaired_image": 1}, 4),
    ("tiny_1x1", {"x.png": png(size=(1, 1)), "x.txt": f"0 {BOX}\n"}, {"tiny_image": 1}, 3),
    ("cmyk", {"x.jpg": encoded(Image.new("CMYK", (64, 48), (0, 50, 100, 0)), "JPEG"), "x.txt": f"0 {BOX}\n"},
     {"cmyk_image": 1}, 4),
    ("16_bit", {"x.png": png("I;16"), "x.txt": f"0 {BOX}\n"}, {"high_bit_depth_image": 1}, 4),
    ("palette", {"x.png": png("P"), "x.txt": f"0 {BOX}\n"}, {"palette_image": 1}, 4),
    ("bilevel", {"x.png": png("1"), "x.txt": f"0 {BOX}\n"}, {"unusual_mode_image": 1}, 4),
    ("gif", {"x.gif": encoded(Image.new("RGB", (64, 48), (10, 200, 30)), "GIF"), "x.txt": f"0 {BOX}\n"},
     {"unsupported_format": 1}, 4),
    ("space_in_name", {"my image.jpg": jpg(), "my image.txt": f"0 {BOX}\n"}, {"renamed_file": 1}, 4),
    ("non_utf8_name", {b"caf\xe9.jpg": jpg(), b"caf\xe9.txt": f"0 {BOX}\n"}, {"renamed_file": 1}, 4),
    ("crlf_and_bom", {"x.jpg": jpg(), "x.txt": f"\ufeff0 {BOX}\r\n1 {BOX}\r\n"}, {}, 4),
    ("lists", {"x.jpg": jpg(), "x.txt": f"0 {BOX}\n", "train.txt": "g0.jpg\ng1.jpg\ng1.jpg\nnope.jpg\n",
               "valid.txt": "g2.jpg\n"}, {"duplicate_image": 1, "missing_image": 1, "unlisted_image": 1}, 3),
]


@pytest.mark.parametrize("case,files,expected,n_images", FIXED, ids=[c[0] for c in FIXED])
def test_fixed_and_counted(tmp_path, case, files, expected, n_images):
    info = prep(darknet(tmp_path / "src", files))
    assert info.defects == expected
    assert total(info) == n_images
    report = json.loads(info.report_path.read_text())
    assert report["defects"] == expected
    for kind in expected:
        assert report["defect_examples"][kind], f"no example recorded for {kind}"
        assert kind in (info.root / "validation_report.txt").read_text()
    # whatever was kept is clean: every box inside the image, 5 columns, a known class
    for rows in labels(info).values():
        for cls, cx, cy, w, h in rows:
            assert cls in (0, 1) and w > 0 and h > 0
            assert 0 <= cx - w / 2 + 1e-6 and cx + w / 2 <= 1 + 1e-6 and 0 <= cy - h / 2 + 1e-6 and cy + h / 2 <= 1 + 1e-6


def test_unreadable_image_with_ultralytics_imported(tmp_path):
    import ultralytics.utils.patches  # noqa: F401  (patches PIL.Image.open: unidentified -> HEIF plugin import)

    info = prep(darknet(tmp_path / "src", {"x.jpg": b"not an image", "x.txt": f"0 {BOX}\n"}))
    assert info.defects == {"unreadable_image": 1}


def test_conversions_write_8bit_rgb(tmp_path):
    files = {"c.jpg": encoded(Image.new("CMYK", (64, 48), (0, 50, 100, 0)), "JPEG"), "c.txt": f"0 {BOX}\n",
             "s.png": png("I;16"), "s.txt": f"0 {BOX}\n", "p.png": png("P"), "p.txt": f"0 {BOX}\n",
             "g.gif": encoded(Image.new("RGB", (64, 48)), "GIF"), "g.txt": f"0 {BOX}\n",
             "t.jpg": jpg() + b"junk" * 50, "t.txt": f"0 {BOX}\n"}
    info = prep(darknet(tmp_path / "src", files))
    for stem in "cspgt":
        out = output_image(info, stem)
        with Image.open(out) as im:
            im.load()
            assert im.mode == "RGB" and out.suffix in (".jpg", ".png")
        assert not os.path.samefile(out, tmp_path / "src" / next(f for f in files if f.startswith(stem)))
    with Image.open(output_image(info, "s")) as im:
        assert abs(np.asarray(im)[0, 0, 0] - 40000 / 257) <= 1  # 16-bit scaled, not clipped
    assert output_image(info, "t").read_bytes().endswith(b"\xff\xd9")


def test_clipped_box_values(tmp_path):
    info = prep(darknet(tmp_path / "src", {"x.jpg": jpg(), "x.txt": "0 0.05 0.5 0.2 0.2\n"}))
    [[cls, cx, cy, w, h]] = labels(info)["x"]
    assert (cls, cx - w / 2, cx + w / 2) == (0, 0.0, pytest.approx(0.15, abs=1e-6))


def test_renamed_files_keep_their_labels(tmp_path):
    info = prep(darknet(tmp_path / "src", {"my image.jpg": jpg(), "my image.txt": "1 0.5 0.5 0.2 0.2\n",
                                           b"caf\xe9.jpg": jpg(), b"caf\xe9.txt": "0 0.5 0.5 0.2 0.2\n"}))
    rows = labels(info)
    assert rows["my_image"][0][0] == 1 and rows["caf_"][0][0] == 0
    assert output_image(info, "my_image").suffix == ".jpg"


def test_symlinked_folder_is_followed_once(tmp_path):
    other = tmp_path / "elsewhere"
    write(other, {"s.jpg": jpg(), "s.txt": f"1 {BOX}\n"})
    src = darknet(tmp_path / "src", {})
    os.symlink(other, src / "linked")
    os.symlink(src, src / "loop")  # a cycle must not hang the walk
    info = prep(src)
    assert info.defects == {"symlinked_folder": 1}
    assert total(info) == 4 and "linked__s" in labels(info)


# -- other formats -------------------------------------------------------------------------------

def kitti(root: Path, extra_lines: str = "", names: str | None = None) -> Path:
    good = "Car 0.00 0 0.00 10 10 40 30 1.5 1.6 3.9 1.0 1.5 20.0 0.0\n"
    files = {}
    for i in range(3):
        files[f"image_2/{i:06d}.png"] = png(size=(64, 48))
        files[f"label_2/{i:06d}.txt"] = good + (extra_lines if i == 0 else "")
    if names is not None:
        files["classes.txt"] = names
    write(root, files)
    return root


def coco(root: Path, mutate: Callable[[dict], None] = lambda d: None) -> Path:
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "can"}]}
    for i in range(3):
        write(root / "images", {f"i{i}.jpg": jpg()})
        data["images"].append({"id": i, "file_name": f"i{i}.jpg", "width": 64, "height": 48})
        data["annotations"].append({"id": i, "image_id": i, "category_id": 1 + i % 2, "bbox": [5, 5, 20, 20]})
    mutate(data)
    write(root, {"annotations/instances.json": json.dumps(data)})
    return root / "annotations" / "instances.json"


def test_kitti_short_line_and_swapped_corners(tmp_path):
    extra = ("Car 0.00 0 0.00 10 10 40\n"  # too few fields
             "Car 0.00 0 0.00 48 36 16 12 1.5 1.6 3.9 1.0 1.5 20.0 0.0\n"  # x2 < x1, y2 < y1
             "Truck 0.00 0 0.00 10 10 40 30 1.5 1.6 3.9 1.0 1.5 20.0 0.0\n")  # not in classes.txt
    info = prep(kitti(tmp_path / "k", extra, names="Car\n"))
    assert info.defects == {"bad_column_count": 1, "swapped_corners": 1, "class_out_of_range": 1}
    assert labels(info)["000000"][1] == pytest.approx([0, 32 / 64, 24 / 48, 32 / 64, 24 / 48])  # swapped back


def test_coco_defects(tmp_path):
    def mutate(d):
        d["images"][0]["width"] = 128  # JSON says 128x48, file is 64x48
        d["images"].append({"id": 9, "file_name": "missing.jpg"})
        d["annotations"].append({"id": 50, "image_id": 77, "category_id": 1, "bbox": [1, 1, 5, 5]})
        d["annotations"].append({"id": 51, "image_id": 1, "category_id": 5, "bbox": [1, 1, 5, 5]})
        d["annotations"].append({"id": 52, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5]})
        d["annotations"].append({"id": 53, "image_id": 1, "category_id": 1, "bbox": ["a", 1, 5, 5]})
    info = prep(coco(tmp_path / "c", mutate))
    assert info.defects == {"class_out_of_range": 1, "bad_column_count": 1, "non_numeric_value": 1,
                            "label_without_image": 1, "missing_image": 1, "image_size_mismatch": 1}
    [[_, cx, _, w, _]] = labels(info)["i0"]
    assert cx == pytest.approx(15 / 128, abs=1e-6) and w == pytest.approx(20 / 128, abs=1e-6)  # by the JSON size


def test_yolo_val_equal_to_train_is_flagged(tmp_path):
    root = darknet(tmp_path / "y", {})
    write(root, {"data.yaml": "path: .\ntrain: .\nval: .\nnames: [a, b]\n"})
    info = prep(root / "data.yaml")
    assert info.defects == {"split_overlap": 3}
    assert info.counts == {"train": 3, "val": 3}


# -- refused with a clear message ----------------------------------------------------------------------

def _all_unreadable(root: Path) -> Path:
    return darknet(root, {f"g{i}.jpg": b"garbage" for i in range(3)})


REFUSED: list[tuple[str, Callable[[Path], Path], str, str]] = [
    # id, builder -> dataset.path, dataset.format, message pattern
    ("missing_path", lambda r: r / "nope", "auto", r"dataset.path=.*nope does not exist"),
    ("duplicate_classes", lambda r: darknet(r, {}, names="a\nb\na\n"), "auto", r"names a class twice: 'a' \(ids 0 and 2\)"),
    ("empty_classes", lambda r: darknet(r, {}, names="\n\n"), "auto", r"class list is empty"),
    ("no_classes_file", lambda r: (darknet(r, {}), (r / "classes.txt").unlink())[0], "auto", r"has no class names"),
    ("empty_folder", lambda r: (r.mkdir(), r)[1], "auto", r"holds no dataset"),
    ("no_labelled_image", lambda r: (write(r, {"a.jpg": jpg(), "b.jpg": jpg(), "classes.txt": "a\n"}), r)[1], "auto",
     r"no image has a usable label"),
    ("all_images_unreadable", _all_unreadable, "auto", r"none of the 3 images is usable"),
    ("yaml_path_nowhere", lambda r: (write(r, {"data.yaml": "path: /does/not/exist\ntrain: images\nnames: [a]\n"}),
                                     r / "data.yaml")[1], "auto", r"path: /does/not/exist points nowhere"),
    ("yaml_train_nowhere", lambda r: (write(r, {"data.yaml": "train: images/train\nnames: [a]\n"}), r / "data.yaml")[1],
     "auto", r"train: images/train points nowhere"),
    ("yaml_names_gap", lambda r: (write(r, {"data.yaml": "train: .\nnames: {0: a, 2: c}\n", "x.jpg": jpg()}),
                                  r / "data.yaml")[1], "auto", r"without gaps"),
    ("yaml_unparseable", lambda r: (write(r, {"data.yaml": "train: [unclosed\n"}), r / "data.yaml")[1], "auto",
     r"not readable YAML"),
    ("coco_missing_key", lambda r: coco(r, lambda d: d.pop("annotations")), "auto", r"has no 'annotations' key"),
    ("coco_annotation_missing_bbox", lambda r: coco(r, lambda d: d["annotations"][1].pop("bbox")), "auto",
     r"annotations\[1\] has no 'bbox' key"),
    ("coco_duplicate_category", lambda r: coco(r, lambda d: d["categories"].append({"id": 3, "name": "box"})), "auto",
     r"names a class twice: 'box'"),
    ("coco_not_json", lambda r: (write(r, {"x.json": "{not json"}), r / "x.json")[1], "auto", r"not readable JSON"),
    ("kitti_no_objects", lambda r: (write(r, {"image_2/a.png": png(), "label_2/a.txt": "DontCare 0 0 0 1 1 5 5\n"}), r)[1],
     "auto", r"no labelled object"),
    ("format_mismatch", lambda r: darknet(r, {}), "kitti", r"dataset.format=kitti\): no image_2/ and label_2/"),
    ("unknown_file_kind", lambda r: (write(r, {"x.csv": "a,b\n"}), r / "x.csv")[1], "auto", r"is a \.csv file"),
]


@pytest.mark.parametrize("case,build,fmt,pattern", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_with_user_error(tmp_path, case, build, fmt, pattern):
    path = build(tmp_path / "src")
    with pytest.raises(UserError) as err:
        prep(path, fmt, tmp=tmp_path)
    message = str(err.value)
    assert re.search(pattern, message), message
    assert "dataset." in message and "\n" not in message  # names the key, one line
    assert not list((tmp_path / "results" / "datasets").glob(".build-*"))  # no half-built copy left


CLI_CASES = ["missing_path", "duplicate_classes", "yaml_path_nowhere", "coco_missing_key"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_refuses_with_exit_2(tmp_path, case):
    _, build, fmt, pattern = next(c for c in REFUSED if c[0] == case)
    path = build(tmp_path / "src")
    proc = run_cli("stage=dataset", "experiment=smoke", f"results_dir={tmp_path / 'r'}", f"dataset.path={path}",
                   timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), proc.stderr


@pytest.mark.parametrize("override", ["dataset.format=voc", "dataset.synthetic_train=0"])
def test_cli_bad_dataset_value_exit_2(tmp_path, override):
    proc = run_cli("stage=dataset", "experiment=smoke", f"results_dir={tmp_path}", override, timeout=300)
    key = override.split("=")[0]
    assert proc.returncode == 2 and f"error: {key}=" in proc.stderr and "Traceback" not in proc.stderr


# -- files given as a model that are not one: one line, exit 2 -------------------------------------

def junk_onnx(root: Path) -> Path:
    write(root, {"junk.onnx": np.random.default_rng(0).bytes(2048)})
    return root / "junk.onnx"


def conv_onnx(root: Path) -> Path:
    """A valid ONNX model of one 3x3 convolution on a 1x1x8x8 input (not an image batch)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 6, 6])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    root.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(root / "conv.onnx"))
    return root / "conv.onnx"


def linear_pt(root: Path) -> Path:
    import torch

    root.mkdir(parents=True, exist_ok=True)
    torch.save({"model": torch.nn.Linear(4, 2)}, root / "linear.pt")
    return root / "linear.pt"


NOT_MODELS: list[tuple[str, Callable[[Path], Path], str]] = [
    ("junk_onnx", junk_onnx, r"is not a readable ONNX model"),
    ("other_input_onnx", conv_onnx, r"is an ONNX model with input 1x1x8x8 and output 1x1x6x6; expected a YOLO "
                                    r"detector: one image input N x 3 x H x W"),
    ("text_file", lambda r: (write(r, {"notes.txt": "not a model\n"}), r / "notes.txt")[1],
     r"is a text file \(\.txt\); expected a \.pt checkpoint, an \.onnx or \.engine file"),
    ("empty_folder", lambda r: (r.mkdir(parents=True), r)[1], r"is an empty folder; expected a \.pt checkpoint"),
    ("linear_pt", linear_pt, r"holds a torch\.nn\.modules\.linear\.Linear, not a YOLO detection model"),
]


@pytest.mark.parametrize("key", ["evaluate.input", "export.input", "infer.input"])
@pytest.mark.parametrize("case,build,pattern", NOT_MODELS, ids=[c[0] for c in NOT_MODELS])
def test_cli_refuses_a_file_that_is_not_a_model(tmp_path, key, case, build, pattern):
    path = build(tmp_path / "src")
    proc = run_cli(f"stage={key.split('.')[0]}", "experiment=smoke", f"results_dir={tmp_path / 'r'}", f"{key}={path}",
                   timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {key}={path} "), proc.stderr
    assert re.search(pattern, errors[0]), errors[0]


def test_every_defect_kind_is_covered():
    covered = {k for _, _, expected, _ in FIXED for k in expected}
    covered |= {"swapped_corners", "image_size_mismatch", "split_overlap", "symlinked_folder",
                "huge_image", "all_labels_rejected"}  # tests/test_dataset_red_team.py
    assert covered == set(DEFECTS)


# -- property tests: parsers never crash, conversions round-trip ----------------------------------------------

unit = st.floats(0.0, 1.0, allow_nan=False)
pixels = st.floats(0.0, 4000.0, allow_nan=False)
anything = st.one_of(st.floats(), st.integers(), st.text(max_size=8), st.none(), st.booleans())


@given(st.text(max_size=80), st.integers(1, 10))
def test_yolo_parser_never_crashes(line, nc):
    r = parse_yolo_line(line, nc)
    assert r is None or r in DEFECTS or (isinstance(r, tuple) and 0 <= r[0] < nc and all(map(math.isfinite, r[1])))


@given(st.integers(0, 9), unit, unit, unit, unit)
def test_yolo_line_round_trip(cls, cx, cy, w, h):
    cls_back, box, polygon = parse_yolo_line(f"{cls} {cx!r} {cy!r} {w!r} {h!r}", 10)
    assert cls_back == cls and not polygon
    assert np.allclose(xyxy_to_yolo(*box), (cx, cy, w, h), atol=1e-9)


@given(st.lists(st.text(alphabet="0123456789.-e naif", max_size=6), max_size=18))
def test_kitti_parser_never_crashes(fields):
    r = parse_kitti_line("Car " + " ".join(fields), {"Car": 0})
    assert r is None or r in DEFECTS or (isinstance(r, tuple) and r[1][0] <= r[1][2] and r[1][1] <= r[1][3])


@given(pixels, pixels, pixels, pixels, st.sampled_from(["Car", "Van"]), st.one_of(st.none(), unit))
def test_kitti_line_round_trip(x1, y1, x2, y2, name, score):
    box = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
    cls, back, swapped = parse_kitti_line(kitti_line(name, box, score), {"Car": 0, "Van": 1})
    assert cls == ["Car", "Van"].index(name) and not swapped
    assert np.allclose(back, box, atol=0.006)


@given(st.lists(anything, max_size=6), anything)
def test_coco_parser_never_crashes(bbox, cat):
    r = parse_coco_bbox({"bbox": bbox, "category_id": cat}, {1: 0, 2: 1})
    assert r in DEFECTS or (isinstance(r, tuple) and r[0] in (0, 1))


@given(pixels, pixels, pixels, pixels)
def test_box_conversions_round_trip(x, y, w, h):
    assert np.allclose(xyxy_to_coco(*coco_to_xyxy(x, y, w, h)), (x, y, w, h), atol=1e-6)
    assert np.allclose(xyxy_to_yolo(*yolo_to_xyxy(x, y, w, h)), (x, y, w, h), atol=1e-6)
    box = coco_to_xyxy(x, y, w, h)
    assert np.allclose(denormalize(normalize(box, 640, 480), 640, 480), box, atol=1e-6)
    # COCO pixels -> normalised -> YOLO line -> parsed back -> COCO pixels
    if w > 0 and h > 0:
        line = yolo_line(0, normalize(box, 4000, 4000))
        _, back, _ = parse_yolo_line(line, 1)
        assert np.allclose(xyxy_to_coco(*denormalize(back, 4000, 4000)), (x, y, w, h), atol=0.01)


@given(st.tuples(st.floats(-2, 3), st.floats(-2, 3), st.floats(-2, 3), st.floats(-2, 3)), st.integers(10, 2000),
       st.integers(10, 2000))
def test_clean_box_is_inside_and_idempotent(box, width, height):
    d = Defects()
    c = clean_box(box, width, height, d, "x")
    if c is None:
        assert set(d.counts) <= {"zero_area_box", "box_outside_image"} and sum(d.counts.values()) == 1
        return
    assert all(0.0 <= v <= 1.0 for v in c) and (c[2] - c[0]) * width >= 1 and (c[3] - c[1]) * height >= 1
    again = Defects()
    assert clean_box(c, width, height, again, "x") == c and not again.counts


@given(st.text(max_size=30))
def test_safe_stem_is_clean(name):
    stem, _ = safe_stem(name + ".jpg")
    assert stem and not re.search(r"\s", stem) and "/" not in stem
    stem.encode("utf-8")


@settings(max_examples=30)
@given(st.sets(st.text(min_size=1, max_size=8), min_size=2, max_size=40), st.floats(0.05, 0.9), st.integers(0, 99))
def test_seeded_split_properties(keys, fraction, seed):
    keys = sorted(keys)
    val = seeded_split(keys, fraction, seed)
    assert val == seeded_split(list(reversed(keys)), fraction, seed)
    assert 1 <= len(val) <= len(keys) - 1 and val <= set(keys)
