"""Datasets: the synthetic generator, each importer, reuse/rebuild, the seeded split, real data."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, VINID, run_cli, write_rect_dataset
from PIL import Image

from pipeline.config import DatasetConfig
from pipeline.datasets import DatasetInfo, prepare
from pipeline.datasets.build import seeded_split
from pipeline.datasets.synthetic import SHAPES, Painter

LOG = logging.getLogger("test.datasets")


def prep(results: Path, seed: int = 0, **cfg) -> DatasetInfo:
    return prepare(DatasetConfig(**cfg), results, seed, LOG)


def small_synthetic(results: Path, seed: int = 0, **over) -> DatasetInfo:
    cfg = {"synthetic_train": 12, "synthetic_val": 4, "synthetic_unlabeled": 2, "synthetic_imgsz": 96,
           "synthetic_classes": 5, **over}
    return prep(results, seed, **cfg)


def image(path: Path, size: tuple[int, int] = (64, 48), colour=(90, 120, 150)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def labels_of(info: DatasetInfo, split: str) -> dict[str, list[list[float]]]:
    out = {}
    for f in sorted((info.root / "labels" / split).glob("*.txt")):
        out[f.stem] = [[float(v) for v in line.split()] for line in f.read_text().splitlines()]
    return out


# -- synthetic ---------------------------------------------------------------------------------

def test_synthetic_layout_counts_and_boxes(tmp_path):
    info = small_synthetic(tmp_path)
    assert info.names == list(SHAPES)
    assert info.counts == {"train": 12, "val": 4, "unlabeled": 2}
    assert info.defects == {}
    assert info.root.parent == tmp_path / "datasets" and info.root.name.startswith("synthetic-")
    data = yaml.safe_load(info.data_yaml.read_text())
    assert data["path"] == str(info.root) and data["names"] == dict(enumerate(SHAPES)) and data["nc"] == 5
    assert len(list((info.root / "images" / "train").glob("*.jpg"))) == 12
    assert len(list(info.unlabeled_dir.glob("*.jpg"))) == 2
    boxes = [b for lines in labels_of(info, "train").values() for b in lines]
    assert len(boxes) >= 12  # at least one object per image
    arr = np.array(boxes)
    assert set(arr[:, 0].astype(int)) <= set(range(5))
    assert (arr[:, 1:] >= 0).all() and (arr[:, 1:] <= 1).all()
    x1, x2 = arr[:, 1] - arr[:, 3] / 2, arr[:, 1] + arr[:, 3] / 2
    assert (x1 >= -1e-6).all() and (x2 <= 1 + 1e-6).all()  # objects lie inside the image
    sides = arr[:, 3:5].max(1) * 96
    assert sides.min() < 20 and sides.max() > 25  # small and large objects
    with Image.open(next((info.root / "images" / "val").glob("*.jpg"))) as im:
        assert im.size == (96, 96) and im.mode == "RGB"


def test_synthetic_is_seeded_and_per_image_stable(tmp_path):
    a = small_synthetic(tmp_path / "a", seed=3)
    b = small_synthetic(tmp_path / "b", seed=3)
    c = small_synthetic(tmp_path / "c", seed=4)
    more = small_synthetic(tmp_path / "d", seed=3, synthetic_train=15)
    assert labels_of(a, "train") == labels_of(b, "train")
    assert labels_of(a, "train") != labels_of(c, "train")
    # adding images keeps the ones already there
    assert {k: v for k, v in labels_of(more, "train").items() if k in labels_of(a, "train")} == labels_of(a, "train")
    assert a.root.name != c.root.name


def test_synthetic_colour_does_not_give_the_class_away():
    painter = Painter(128, 3, seed=0)
    colours: dict[int, list[np.ndarray]] = {0: [], 1: [], 2: []}
    for i in range(40):
        img, boxes = painter.draw(np.random.default_rng([0, 0, i]))
        arr = np.asarray(img).astype(float)
        for cls, (x1, y1, x2, y2) in boxes:
            cx, cy = int((x1 + x2) / 2 * 128), int((y1 + y2) / 2 * 128)
            if cls != 2:  # a triangle's box centre can fall outside the triangle
                colours[cls].append(arr[cy, cx])
    means = [np.mean(colours[c], axis=0) for c in (0, 1)]
    spread = np.std(colours[0], axis=0).mean()
    assert spread > 40  # colours vary within a class...
    assert np.abs(means[0] - means[1]).max() < 40  # ...and do not separate the classes


# -- importers ---------------------------------------------------------------------------------

def darknet_folder(root: Path, n: int = 10, names=("cat", "dog")) -> Path:
    for i in range(n):
        image(root / f"img{i}.jpg", colour=(i * 20, 100, 100))
        (root / f"img{i}.txt").write_text(f"{i % 2} 0.5 0.5 0.25 0.5\n")
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    return root


def test_darknet_flat_folder(tmp_path):
    src = darknet_folder(tmp_path / "shop", n=10)
    info = prep(tmp_path / "r", path=str(src), val_fraction=0.3)
    assert info.name == "shop"  # name follows the folder when dataset.name is left at "synthetic"
    assert info.names == ["cat", "dog"]
    assert info.counts == {"train": 7, "val": 3} and info.defects == {}
    lines = {**labels_of(info, "train"), **labels_of(info, "val")}
    assert lines["img3"] == [[1, 0.5, 0.5, 0.25, 0.5]]
    assert yaml.safe_load(info.data_yaml.read_text())["names"] == {0: "cat", 1: "dog"}
    # same filesystem: images are hard links, not copies
    out = next((info.root / "images").rglob("img0.jpg"))
    assert os.stat(out).st_ino == os.stat(src / "img0.jpg").st_ino
    explicit = prep(tmp_path / "r", path=str(src), name="pets")
    assert explicit.name == "pets" and explicit.root.name.startswith("pets-")


def test_darknet_obj_data_lists_and_names(tmp_path):
    data = tmp_path / "darknet" / "data"
    for i in range(6):
        image(data / "obj" / f"p{i}.jpg")
        (data / "obj" / f"p{i}.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (data / "obj.names").write_text("a\nb\nc\n")
    (data / "train.txt").write_text("".join(f"data/obj/p{i}.jpg\n" for i in range(4)))
    (data / "valid.txt").write_text("data/obj/p4.jpg\n")
    (data / "obj.data").write_text("classes = 3\ntrain = data/train.txt\nvalid = data/valid.txt\n"
                                   "names = data/obj.names\nbackup = backup/\n")
    info = prep(tmp_path / "r", path=str(data / "obj.data"))
    assert info.names == ["a", "b", "c"]
    assert info.counts == {"train": 4, "val": 1}
    assert info.defects == {"unlisted_image": 1}  # p5 is in no list
    assert sorted(labels_of(info, "val")) == ["obj__p4"]


def test_yolo_data_yaml(tmp_path):
    data_yaml = write_rect_dataset(tmp_path / "rects", n_train=6, n_val=3)
    info = prep(tmp_path / "r", path=str(data_yaml))
    assert info.name == "rects" and info.names == ["red", "blue"]
    assert info.counts == {"train": 6, "val": 3} and info.defects == {}
    src_labels = (tmp_path / "rects" / "labels" / "val" / "0001.txt").read_text().split()
    ours = labels_of(info, "val")["0001"]
    assert np.allclose([float(v) for v in src_labels], np.ravel(ours), atol=1e-6)
    # A folder holding data.yaml works too, and a .txt image list as the train entry.
    root = tmp_path / "rects"
    (root / "train.txt").write_text("".join(f"./images/train/{i:04d}.jpg\n" for i in range(4)))
    (root / "list.yaml").write_text(f"path: {root}\ntrain: train.txt\nval: images/val\nnames: [red, blue]\n")
    listed = prep(tmp_path / "r2", path=str(root / "list.yaml"))
    assert listed.counts == {"train": 4, "val": 3}


def test_yolo_without_val_gets_a_seeded_split(tmp_path):
    root = tmp_path / "only_train"
    write_rect_dataset(root, n_train=10, n_val=0)
    (root / "data.yaml").write_text("train: images/train\nnames: {0: red, 1: blue}\n")
    info = prep(tmp_path / "r", path=str(root), val_fraction=0.2)
    assert info.counts == {"train": 8, "val": 2}


def write_kitti(root: Path) -> Path:
    for i in range(5):
        image(root / "training" / "image_2" / f"{i:06d}.png", size=(200, 100))
        lines = [f"Car 0.00 0 0.00 {10 + i} 20 {110 + i} 70 1.5 1.6 3.9 1.0 1.5 20.0 0.0",
                 "Pedestrian 0.00 0 0.00 150 10 170 90 1.7 0.6 0.8 0.0 0.0 0.0 0.0",
                 "DontCare -1 -1 -10 0 0 30 30 -1 -1 -1 -1000 -1000 -1000 -10"]
        (root / "training" / "label_2" / f"{i:06d}.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / "training" / "label_2" / f"{i:06d}.txt").write_text("\n".join(lines) + "\n")
    image(root / "testing" / "image_2" / "000100.png", size=(200, 100))
    return root


def test_kitti_import_converts_pixel_boxes(tmp_path):
    src = write_kitti(tmp_path / "kitti")
    info = prep(tmp_path / "r", path=str(src), val_fraction=0.2)
    assert info.names == ["Car", "Pedestrian"]  # collected from the labels, sorted, DontCare left out
    assert info.counts == {"train": 4, "val": 1, "unlabeled": 1}
    assert info.unlabeled_dir == src / "testing" / "image_2"
    assert info.defects == {}
    report = json.loads(info.report_path.read_text())
    assert report["dropped_by_design"] == {"kitti_dontcare": 5} and report["format"] == "kitti"
    lines = {**labels_of(info, "train"), **labels_of(info, "val")}
    car, ped = lines["000000"]
    assert np.allclose(car, [0, 60 / 200, 45 / 100, 100 / 200, 50 / 100], atol=1e-6)
    assert np.allclose(ped, [1, 160 / 200, 50 / 100, 20 / 200, 80 / 100], atol=1e-6)


def write_coco(root: Path) -> Path:
    images, anns = [], []
    for i in range(4):
        image(root / "images" / f"c{i}.jpg", size=(100, 50))
        images.append({"id": 10 + i, "file_name": f"c{i}.jpg", "width": 100, "height": 50})
        anns.append({"id": 100 + i, "image_id": 10 + i, "category_id": 7, "bbox": [10, 5, 40, 20], "iscrowd": 0})
        anns.append({"id": 200 + i, "image_id": 10 + i, "category_id": 3, "bbox": [60, 10, 30, 30], "iscrowd": 0})
    anns.append({"id": 300, "image_id": 10, "category_id": 3, "bbox": [0, 0, 50, 50], "iscrowd": 1})
    cats = [{"id": 7, "name": "bottle"}, {"id": 3, "name": "box"}]  # ids neither contiguous nor ordered
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / "instances_default.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def test_coco_import(tmp_path):
    path = write_coco(tmp_path / "coco")
    info = prep(tmp_path / "r", path=str(path), val_fraction=0.25)
    assert info.name == "coco"
    assert info.names == ["box", "bottle"]  # sorted by category id: 3, 7
    assert info.counts == {"train": 3, "val": 1} and info.defects == {}
    report = json.loads(info.report_path.read_text())
    assert report["dropped_by_design"] == {"coco_crowd": 1}
    lines = {**labels_of(info, "train"), **labels_of(info, "val")}
    bottle, box = lines["c0"]
    assert np.allclose(bottle, [1, 30 / 100, 15 / 50, 40 / 100, 20 / 50], atol=1e-6)
    assert np.allclose(box, [0, 75 / 100, 25 / 50, 30 / 100, 30 / 50], atol=1e-6)
    # the folder works as dataset.path too (auto-detected)
    assert prep(tmp_path / "r2", path=str(tmp_path / "coco")).counts == {"train": 3, "val": 1}


def test_format_can_be_forced(tmp_path):
    src = darknet_folder(tmp_path / "d", n=4)
    info = prep(tmp_path / "r", path=str(src), format="darknet")
    assert info.counts["train"] + info.counts["val"] == 4


# -- reuse and the split --------------------------------------------------------------------------

def test_reuse_when_unchanged_rebuild_when_changed(tmp_path, caplog):
    src = darknet_folder(tmp_path / "src", n=6)
    first = prep(tmp_path / "r", path=str(src))
    stamp = os.stat(first.data_yaml).st_mtime_ns
    with caplog.at_level(logging.INFO, logger="test.datasets"):
        again = prep(tmp_path / "r", path=str(src))
    assert again.root == first.root and "reusing" in caplog.text
    assert os.stat(again.data_yaml).st_mtime_ns == stamp  # not rewritten
    (src / "img2.txt").write_text("1 0.5 0.5 0.1 0.1\n0 0.2 0.2 0.1 0.1\n")
    changed = prep(tmp_path / "r", path=str(src))
    assert changed.root != first.root
    assert len(labels_of(changed, "train").get("img2", labels_of(changed, "val").get("img2", []))) == 2
    # the config is part of the hash as well
    assert prep(tmp_path / "r", path=str(src), val_fraction=0.5).root not in (first.root, changed.root)
    # a damaged copy is rebuilt, not reused
    victim = next((changed.root / "images" / "train").iterdir())
    victim.unlink()
    rebuilt = prep(tmp_path / "r", path=str(src))
    assert rebuilt.root == changed.root and victim.exists()


def test_results_dir_inside_the_source_is_not_imported(tmp_path):
    src = darknet_folder(tmp_path / "src", n=6)
    first = prep(src / "results", path=str(src))
    image(src / "results" / "train" / "run1" / "plot.png")  # what later stages write there
    again = prep(src / "results", path=str(src))
    assert again.root == first.root  # the listing hash ignores the results folder
    assert first.counts == {"train": 5, "val": 1} and first.defects == {}


def test_moved_results_dir_gets_its_data_yaml_path_fixed(tmp_path):
    small_synthetic(tmp_path / "r")
    (tmp_path / "r").rename(tmp_path / "moved")
    again = small_synthetic(tmp_path / "moved")
    assert yaml.safe_load(again.data_yaml.read_text())["path"] == str(again.root)


def test_seeded_split_is_deterministic(tmp_path):
    keys = [f"k{i}.jpg" for i in range(50)]
    a, b, c = seeded_split(keys, 0.2, 0), seeded_split(list(reversed(keys)), 0.2, 0), seeded_split(keys, 0.2, 1)
    assert a == b and len(a) == 10 and a != c and a <= set(keys)
    assert seeded_split(keys[:2], 0.01, 0) and len(seeded_split(keys[:2], 0.99, 0)) == 1  # both splits non-empty
    assert seeded_split(keys, 0.0, 0) == set()
    src = darknet_folder(tmp_path / "src", n=12)
    one, two = prep(tmp_path / "r1", path=str(src), seed=5), prep(tmp_path / "r2", path=str(src), seed=5)
    assert labels_of(one, "val").keys() == labels_of(two, "val").keys()


def test_val_fraction_zero_validates_on_train(tmp_path):
    src = darknet_folder(tmp_path / "src", n=4)
    info = prep(tmp_path / "r", path=str(src), val_fraction=0.0)
    assert info.counts == {"train": 4}
    assert yaml.safe_load(info.data_yaml.read_text())["val"] == "images/train"
    assert any("validating on the training images" in n for n in json.loads(info.report_path.read_text())["notes"])


def test_parallel_prepare_builds_once(tmp_path):
    src = darknet_folder(tmp_path / "src", n=8)
    code = ("import logging, sys; from pathlib import Path; from pipeline.config import DatasetConfig; "
            "from pipeline.datasets import prepare; "
            f"print(prepare(DatasetConfig(path={str(src)!r}), Path({str(tmp_path / 'r')!r}), 0, "
            "logging.getLogger('x')).root)")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    roots = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(roots) == 1
    assert [p.name for p in (tmp_path / "r" / "datasets").iterdir() if not p.name.endswith(".lock")] == \
        [Path(roots.pop()).name]  # no leftover temp folders


def test_ultralytics_reads_the_converted_dataset(tmp_path):
    from ultralytics.data.utils import check_det_dataset

    info = small_synthetic(tmp_path)
    data = check_det_dataset(str(info.data_yaml))
    assert data["nc"] == 5 and Path(data["train"]) == info.root / "images" / "train"


# -- real data and the CLI ----------------------------------------------------------------------------

@pytest.mark.skipif(not (VINID / "img").is_dir(), reason="shared vinid-products dataset absent")
def test_vinid_products_imports_100_images_5_classes(tmp_path):
    info = prep(tmp_path, path=str(VINID / "img"))
    assert info.names == ["bia", "cafe", "mytom", "nuoctuong", "sua"]
    assert info.counts["train"] + info.counts["val"] == 100 and info.counts["val"] == 20
    report = json.loads(info.report_path.read_text())
    assert report["boxes"]["total"] >= 100 and all(n > 0 for n in report["boxes"]["per_class"].values())


def test_cli_stage_dataset_records_the_summary(tmp_path):
    proc = run_cli("stage=dataset", "experiment=smoke", f"results_dir={tmp_path}", timeout=300)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads((tmp_path / "manifest.json").read_text())["runs"]
    rec = runs[-1]
    assert rec["stage"] == "dataset" and rec["status"] == "succeeded"
    assert {o["role"] for o in rec["outputs"]} == {"dataset", "report"}
    assert rec["metrics"]["images_train"] == 32 and rec["metrics"]["classes"] == 3
    assert rec["dataset"]["images"] == {"train": 32, "val": 16, "unlabeled": 4}
