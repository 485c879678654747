"""stage=infer and pipeline.predict: labels that come back where the objects are, in every format.

The model is a crafted detector whose answer is known: it finds the red (class 0) and the blue
(class 1) rectangle of an image by colour and reports their boxes with confidence 0.9 (red) and
0.4 (blue), in Ultralytics' raw output layout. Exported to ONNX (dynamic and fixed shapes) and
OpenVINO, and pickled as a .pt, it exercises every backend, the letterbox, the batching and the
mapping back to original pixels, with truth to compare against.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, VINID, run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from pipeline.config import register, validate
from pipeline.datasets.images import letterbox, read_image
from pipeline.manifest import Manifest
from pipeline.predict import Predictor, batch_shapes, scan_folder, unique_keys
from pipeline.runner import run_stage
from pipeline.safe_load import trusting

IMGSZ = 128
RED, BLUE = (220, 30, 30), (30, 40, 220)
SCORES = (0.9, 0.4)  # red is certain, blue falls in the default review band [0.3, 0.5]


class ColourOracle(nn.Module):
    """Boxes of the red and the blue rectangle of each image (absent: score 0)."""

    def __init__(self):
        super().__init__()
        self.names = {0: "red", 1: "blue"}
        self.register_buffer("stride", torch.tensor([8.0, 16.0, 32.0]))
        self.register_buffer("scores", torch.diag(torch.tensor(SCORES)))  # [class, anchor]

    def forward(self, x):
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        h, w = x.shape[2], x.shape[3]
        masks = torch.stack([(r > 0.6) & (g < 0.4) & (b < 0.4), (b > 0.6) & (r < 0.4) & (g < 0.4)], 1).to(x.dtype)
        xs = torch.arange(w, dtype=x.dtype, device=x.device).view(1, 1, 1, -1)
        ys = torch.arange(h, dtype=x.dtype, device=x.device).view(1, 1, -1, 1)
        x2, y2 = (masks * (xs + 1)).amax((2, 3)), (masks * (ys + 1)).amax((2, 3))
        x1, y1 = w - (masks * (w - xs)).amax((2, 3)), h - (masks * (h - ys)).amax((2, 3))
        boxes = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], 1)  # (B, 4, 2 anchors)
        present = masks.amax((2, 3))  # (B, 2)
        cls_scores = present.unsqueeze(1) * self.scores  # anchor k scores class k only
        return torch.cat([boxes, cls_scores], 1)  # (B, 4 + 2, 2)


def _metadata(dynamic: bool, batch: int = 1) -> dict[str, str]:
    return {"names": str({0: "red", 1: "blue"}), "stride": "32", "imgsz": str([IMGSZ, IMGSZ]), "batch": str(batch),
            "task": "detect", "args": str({"dynamic": dynamic, "nms": False})}


def export_onnx(path: Path, dynamic: bool, batch: int = 1) -> Path:
    import onnx

    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch"}} if dynamic else None
    torch.onnx.export(ColourOracle().eval(), torch.zeros(batch, 3, IMGSZ, IMGSZ), str(path), dynamo=False,
                      opset_version=17, input_names=["images"], output_names=["output0"], dynamic_axes=axes)
    proto = onnx.load(str(path))
    for k, v in _metadata(dynamic, batch).items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The oracle as .pt, dynamic ONNX, fixed-shape ONNX (batch 2) and an OpenVINO IR folder."""
    import openvino as ov
    import yaml

    from pipeline.models import save_checkpoint

    d = tmp_path_factory.mktemp("oracle")
    onnx_dyn = export_onnx(d / "oracle.onnx", dynamic=True)
    ir = d / "oracle_openvino_model"
    ir.mkdir()
    ov.save_model(ov.convert_model(str(onnx_dyn)), str(ir / "oracle.xml"), compress_to_fp16=False)
    meta = {k: (yaml.safe_load(v) if k != "args" else {"dynamic": True, "nms": False}) for k, v in _metadata(True).items()}
    meta["names"] = {0: "red", 1: "blue"}
    (ir / "metadata.yaml").write_text(yaml.safe_dump(meta))
    return {"pt": save_checkpoint(ColourOracle(), d / "oracle.pt"), "onnx": onnx_dyn,
            "onnx_fixed": export_onnx(d / "oracle_fixed.onnx", dynamic=False, batch=2), "openvino": ir}


# -- a folder whose truth is known ----------------------------------------------------------------


def draw(size: tuple[int, int], rects: list[tuple[int, int, int, int, int]], bg=(120, 125, 110)) -> Image.Image:
    """RGB image (w, h) with filled rectangles (cls, x1, y1, x2, y2; x2/y2 exclusive)."""
    a = np.empty((size[1], size[0], 3), np.uint8)
    a[:] = bg
    for c, x1, y1, x2, y2 in rects:
        a[y1:y2, x1:x2] = RED if c == 0 else BLUE
    return Image.fromarray(a)


# file -> (displayed size, rectangles). The truth every backend must find.
TRUTH = {
    "land.jpg": ((200, 120), [(0, 20, 30, 90, 100), (1, 120, 10, 190, 60)]),
    "port.png": ((120, 200), [(1, 10, 120, 100, 190)]),
    "sq.jpg": ((160, 160), [(0, 40, 40, 120, 100)]),
    "rotated.jpg": ((180, 110), [(0, 100, 20, 170, 90)]),  # stored rotated, EXIF orientation 6
    "rgba.png": ((150, 100), [(0, 10, 10, 60, 60), (1, 80, 40, 140, 95)]),
    "dup.jpg": ((128, 128), [(0, 10, 10, 50, 50)]),
    "dup.png": ((128, 128), [(1, 60, 60, 110, 120)]),
    "sub/deeper/nested.jpg": ((140, 90), [(1, 30, 20, 100, 70)]),
    "images/inner.jpg": ((100, 100), [(0, 20, 20, 70, 80)]),
    "gray.jpg": ((100, 80), []),
    "deep16.png": ((90, 70), []),
}


def make_source(root: Path) -> Path:
    """Images of TRUTH in several modes, plus a truncated JPEG, a text file named .jpg and a note."""
    for rel, (size, rects) in TRUTH.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        im = draw(size, rects)
        if rel == "rotated.jpg":
            exif = Image.Exif()
            exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
            im.transpose(Image.Transpose.ROTATE_90).save(p, quality=95, exif=exif)
        elif rel == "rgba.png":
            im.convert("RGBA").save(p)
        elif rel == "gray.jpg":
            im.convert("L").save(p, quality=95)
        elif rel == "deep16.png":
            Image.fromarray(np.full((size[1], size[0]), 30000, np.uint16)).save(p)
        elif p.suffix == ".jpg":
            im.save(p, quality=95)
        else:
            im.save(p)
    full = (root / "land.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "fake.jpg").write_text("not an image")
    (root / "notes.txt").write_text("a file that is not an image")
    return root


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("unlabeled"))


def stage(results: Path, *overrides: str) -> dict:
    """Run stage=infer in this process (as the CLI would) and return its manifest record."""
    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["stage=infer", "experiment=smoke", f"results_dir={results}",
                                           "device=cpu", *overrides])
    validate(cfg)
    return run_stage(cfg, "infer", list(overrides))


@pytest.fixture(scope="module")
def cli_run(models, source, tmp_path_factory) -> tuple[Path, dict]:
    """One stage=infer through the CLI on the dynamic ONNX oracle: (run folder, manifest record)."""
    results = tmp_path_factory.mktemp("results")
    proc = run_cli("stage=infer", "experiment=smoke", f"results_dir={results}", f"infer.input={models['onnx']}",
                   f"infer.source={source}", f"infer.imgsz={IMGSZ}", "infer.save_vis=true", "device=cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = Manifest(results).runs()[-1]
    return Manifest(results).abs(record["run_dir"]), record


def read_yolo(path: Path, size: tuple[int, int]) -> list[tuple[int, float, float, float, float]]:
    """YOLO lines as (cls, x1, y1, x2, y2) in pixels of an image of `size` (w, h)."""
    w, h = size
    out = []
    for line in path.read_text().splitlines():
        c, cx, cy, bw, bh = line.split()
        cx, cy, bw, bh = float(cx) * w, float(cy) * h, float(bw) * w, float(bh) * h
        out.append((int(c), cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2))
    return sorted(out)


def assert_boxes(found, truth, tol: float) -> None:
    assert len(found) == len(truth), (found, truth)
    for f, t in zip(sorted(found), sorted(truth), strict=True):
        assert f[0] == t[0], (found, truth)
        assert np.allclose(f[1:5], t[1:5], atol=tol), (found, truth)


# -- the stage end to end -------------------------------------------------------------------------


KEYS = {"dup.jpg": "dup_jpg", "dup.png": "dup_png", "images/inner.jpg": "images_/inner"}


def key_of(rel: str) -> str:
    return KEYS.get(rel, str(Path(rel).with_suffix("")))


def test_labels_round_trip(cli_run):
    """Every known rectangle comes back with its class and box, in original pixels, folders kept."""
    run_dir, record = cli_run
    for rel, (size, rects) in TRUTH.items():
        label = run_dir / "labels" / f"{key_of(rel)}.txt"
        assert label.is_file(), f"no label for {rel}"
        # Letterboxing to 128 px moves an edge by at most a network pixel: <= 1.6 original pixels here.
        assert_boxes(read_yolo(label, size), rects, tol=2.5)
    assert (run_dir / "labels" / "sub" / "deeper" / "nested.txt").is_file()  # structure kept
    assert (run_dir / "images" / "sub" / "deeper" / "nested.jpg").is_file()


def test_kitti_matches_yolo(cli_run):
    run_dir, _ = cli_run
    for rel, (size, _) in TRUTH.items():
        yolo = read_yolo(run_dir / "labels" / f"{key_of(rel)}.txt", size)
        lines = (run_dir / "labels_kitti" / f"{key_of(rel)}.txt").read_text().splitlines()
        kitti = []
        for line in lines:
            f = line.split()
            assert len(f) == 16
            assert f[1:4] == ["0.00", "0", "0.00"] and all(v == "0.00" for v in f[8:15])
            name_to_id = {"red": 0, "blue": 1}
            assert float(f[15]) == pytest.approx(SCORES[name_to_id[f[0]]], abs=1e-3)  # confidence last
            kitti.append((name_to_id[f[0]], *map(float, f[4:8])))
        assert_boxes(kitti, yolo, tol=0.02)  # the same boxes, in pixels of the displayed image


def test_metrics_summary_and_skipped(cli_run):
    run_dir, record = cli_run
    m = record["metrics"]
    assert record["status"] == "succeeded"
    assert m["images"] == len(TRUTH) and m["skipped"] == 2
    n_boxes = sum(len(r) for _, r in TRUTH.values())
    assert m["boxes"] == n_boxes
    assert m["boxes_per_class"] == {"red": sum(c == 0 for _, r in TRUTH.values() for c, *_ in r),
                                    "blue": sum(c == 1 for _, r in TRUTH.values() for c, *_ in r)}
    assert m["images_per_s"] > 0 and m["ignored_files"] == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    reasons = {s["path"]: s["reason"] for s in summary["skipped_files"]}
    assert set(reasons) == {"truncated.jpg", "fake.jpg"}
    assert "truncated" in reasons["truncated.jpg"]
    assert summary["ignored"] == ["notes.txt"]
    assert summary["renamed"] == {"dup.jpg": "dup_jpg", "dup.png": "dup_png", "images/inner.jpg": "images_/inner"}
    assert {o["role"] for o in record["outputs"]} >= {"labels", "labels_kitti", "dataset", "summary"}
    assert any("skipped 2 unreadable" in w for w in record["warnings"])
    assert len(list((run_dir / "vis").rglob("*.jpg"))) == len(TRUTH)  # infer.save_vis=true


def test_review_lists_uncertain_images(cli_run):
    """Images whose best box is the 0.4 blue one are listed; those with a 0.9 red box are not."""
    run_dir, record = cli_run
    lines = [ln.split("\t") for ln in (run_dir / "review.txt").read_text().splitlines() if not ln.startswith("#")]
    expected = sorted(rel for rel, (_, rects) in TRUTH.items() if rects and all(c == 1 for c, *_ in rects))
    assert sorted(p for _, p in lines) == expected
    assert all(float(c) == pytest.approx(0.4, abs=1e-3) for c, _ in lines)
    assert record["metrics"]["review"] == len(expected)


def test_mostly_empty_run_warns_and_names_the_conf_that_gives_boxes(models, source, tmp_path):
    """infer.conf above every score: no image gets a box; the run says so and suggests the median best
    score (0.9: six of the nine images with objects have a red box), and review.txt still lists the
    images nearest the threshold."""
    record = stage(tmp_path / "r", f"infer.input={models['onnx']}", f"infer.source={source}",
                   f"infer.imgsz={IMGSZ}", "infer.conf=0.95", "infer.review_band=[0.6,0.7]")
    assert record["metrics"]["images_with_boxes"] == 0
    [warning] = [w for w in record["warnings"] if "got no box" in w]
    assert f"{len(TRUTH)} of {len(TRUTH)} images got no box at infer.conf=0.95" in warning
    assert "median best score is 0.900" in warning and "infer.conf=0.9 " in warning
    review = (Path(tmp_path / "r") / record["run_dir"] / "review.txt").read_text().splitlines()
    assert "nearest to infer.conf=0.95 (none in infer.review_band=[0.6, 0.7])" in review[0]
    listed = [ln.split("\t") for ln in review if not ln.startswith("#")]
    n_scored = sum(1 for _, rects in TRUTH.values() if rects)
    assert len(listed) == n_scored and float(listed[0][0]) == pytest.approx(0.9, abs=1e-3)  # nearest first


def test_a_run_with_boxes_does_not_warn(cli_run):
    _, record = cli_run
    assert not [w for w in record["warnings"] if "got no box" in w]


def test_output_imports_as_dataset(cli_run, tmp_path):
    """dataset.path=<infer run folder> imports (our importer) and reads in Ultralytics as is."""
    from ultralytics.data.utils import check_det_dataset, img2label_paths

    from pipeline.datasets import prepare

    run_dir, record = cli_run
    cfg = OmegaConf.create({"path": str(run_dir), "name": "pseudo", "format": "auto", "val_fraction": 0.2})
    info = prepare(cfg, tmp_path / "r2", seed=0, log=logging.getLogger("test"))
    assert info.names == ["red", "blue"]
    assert info.counts["train"] + info.counts["val"] == len(TRUTH) and info.counts["val"] >= 1
    report = json.loads(info.report_path.read_text())
    assert report["boxes"]["total"] == record["metrics"]["boxes"]
    assert not {"split_overlap", "label_without_image", "image_without_label"} & set(info.defects)

    data = check_det_dataset(str(run_dir / "data.yaml"))
    assert data["nc"] == 2 and data["names"] == {0: "red", 1: "blue"}
    images = [ln.replace("./", f"{run_dir}/", 1) for ln in (run_dir / "train.txt").read_text().split()]
    images += [ln.replace("./", f"{run_dir}/", 1) for ln in (run_dir / "val.txt").read_text().split()]
    assert len(images) == len(TRUTH) and all(Path(p).is_file() for p in images)
    assert all(Path(p).is_file() for p in img2label_paths(images))  # Ultralytics finds every label


# -- backends, batching, decoding -------------------------------------------------------------------


def predict_dir(model: Path, folder: Path, **kw) -> dict[str, list[tuple]]:
    p = Predictor(model, device="cpu", imgsz=kw.pop("imgsz", None), conf=0.3, **kw)
    out = {}
    for r in p.predict(scan_folder(folder, True).images):
        if hasattr(r, "boxes"):
            out[r.item.rel] = sorted((int(c), *b) for b, c in zip(r.boxes, r.cls, strict=True))
    return out


def test_backends_and_batch_sizes_agree(models, source):
    """.pt, dynamic ONNX (batch 1 and 8), fixed-shape ONNX (batch 2) and OpenVINO find the same boxes."""
    ref = predict_dir(models["onnx"], source, imgsz=IMGSZ, batch=8)
    assert len(ref) == len(TRUTH)
    for name, kw in [("pt", {"batch": 3}), ("onnx", {"batch": 1}), ("onnx_fixed", {"batch": 3}),
                     ("openvino", {"batch": 4})]:
        with trusting([models["pt"]]):  # the oracle is a class of this test module, not an allowlisted one
            got = predict_dir(models[name], source, **kw)  # imgsz from each model (128)
        assert set(got) == set(ref), name
        for rel in ref:
            # Rectangular batches (dynamic models) and the fixed 128x128 input letterbox differently.
            assert_boxes(got[rel], ref[rel], tol=2.5)


def test_cpu_threads_default_to_every_core(models, source, monkeypatch):
    """Ultralytics' select_device leaves torch one thread short of the cores; the predictor takes them all
    (or infer.threads), and the thread count does not change the labels."""
    import torch

    from pipeline import devices

    monkeypatch.setattr(devices, "cpu_count", lambda: 3)
    monkeypatch.setattr(devices, "TAKEN_CORE", 1e9)  # no other load counts: every (faked) core is free
    before = torch.get_num_threads()
    try:
        with trusting([models["pt"]]):  # the oracle is a class of this test module, not an allowlisted one
            Predictor(models["pt"], device="cpu")
            assert torch.get_num_threads() == 3
            one = predict_dir(models["pt"], source, threads=1)
            assert torch.get_num_threads() == 1
            three = predict_dir(models["pt"], source)
            assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert set(one) == set(three) == {rel for rel in TRUTH}
    for rel in one:
        assert_boxes(one[rel], three[rel], tol=0.01)


def test_fixed_model_refuses_other_imgsz(models):
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="infer.imgsz=256"):
        Predictor(models["onnx_fixed"], imgsz=256)


def test_fast_decode_of_big_jpeg(models, tmp_path):
    """A 2400x1600 JPEG decoded at reduced scale gives the same boxes as a full decode."""
    rects = [(0, 300, 200, 1500, 1100), (1, 1700, 900, 2300, 1500)]
    draw((2400, 1600), rects).save(tmp_path / "big.jpg", quality=92)
    item = scan_folder(tmp_path, False).images[0]
    small, size = read_image(item.path, min_size=(128, 86))
    assert size == (2400, 1600) and small.shape[1] < 2400  # decoded at reduced scale
    fast = predict_dir(models["onnx"], tmp_path, imgsz=IMGSZ, fast_decode=True)["big.jpg"]
    full = predict_dir(models["onnx"], tmp_path, imgsz=IMGSZ, fast_decode=False)["big.jpg"]
    scale = 2400 / IMGSZ  # one network pixel in original pixels
    assert_boxes(fast, rects, tol=1.5 * scale)
    assert_boxes(full, rects, tol=1.5 * scale)


def test_read_image_modes(source):
    rgb, size = read_image(source / "rotated.jpg")
    assert size == (180, 110) and rgb.shape == (110, 180, 3)  # EXIF orientation applied
    deep, _ = read_image(source / "deep16.png")
    assert deep.shape == (70, 90, 3) and abs(int(deep[0, 0, 0]) - 30000 // 257) <= 1  # scaled, not clipped
    gray, _ = read_image(source / "gray.jpg")
    assert gray.shape == (80, 100, 3)
    rgba, _ = read_image(source / "rgba.png")
    assert rgba.shape == (100, 150, 3) and tuple(rgba[20, 20]) == RED


def test_letterbox_maps_back():
    img = np.zeros((120, 200, 3), np.uint8)
    out, (left, top, nw, nh) = letterbox(img, (128, 128), (200, 120))
    assert out.shape == (128, 128, 3) and (nw, nh) == (128, 77) and left == 0 and top == 25
    x_net = np.array([0.0, 64.0, 128.0])
    assert np.allclose((x_net - left) * 200 / nw, [0, 100, 200])


def test_batch_shapes_rect_and_fixed():
    from pipeline.predict import ImageItem

    items = [ImageItem(Path(f"{i}"), f"{i}", f"{i}", w, h) for i, (w, h) in
             enumerate([(200, 100), (400, 300), (100, 200), (300, 300), (640, 480)])]
    rect = batch_shapes(items, (640, 640), 32, 2, rect=True)
    assert [len(b) for b, _ in rect] == [2, 2, 1]
    assert rect[0][1] == (480, 640)  # the two landscape images: 0.5 and 0.75 -> 480 x 640
    assert all(s[0] % 32 == 0 and s[1] % 32 == 0 and max(s) == 640 for _, s in rect)
    assert all(s == (640, 640) for _, s in batch_shapes(items, (640, 640), 32, 2, rect=False))


def test_unique_keys():
    keys = unique_keys(["a.jpg", "a.png", "a_png.jpg", "b.jpg", "images/c.jpg", "x/images/d.png"])
    assert keys["b.jpg"] == "b" and keys["a_png.jpg"] == "a_png"
    assert keys["a.jpg"] == "a_jpg" and keys["a.png"] not in ("a_png", "a_jpg")
    assert keys["images/c.jpg"] == "images_/c" and keys["x/images/d.png"] == "x/images_/d"
    assert len(set(keys.values())) == len(keys)


# -- resume, review below the threshold, errors ------------------------------------------------------


def _crash_after_four_images(results, args, monkeypatch) -> None:
    """An infer run that dies after writing the labels of 4 images (a failed record, a partial journal)."""
    import stages.infer as infer_stage

    real_write = infer_stage.Writer.write
    calls = {"n": 0}

    def dying_write(self, pred, names):
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        calls["n"] += 1
        real_write(self, pred, names)

    monkeypatch.setattr(infer_stage.Writer, "write", dying_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        stage(results, *args)
    monkeypatch.setattr(infer_stage.Writer, "write", real_write)


def test_resume_after_failure(models, source, tmp_path, monkeypatch):
    """A run killed after 4 images is resumed: 4 adopted, the rest labelled, same labels as a clean run."""
    results = tmp_path / "r"
    args = (f"infer.input={models['onnx']}", f"infer.source={source}", f"infer.imgsz={IMGSZ}", "infer.batch=2")
    _crash_after_four_images(results, args, monkeypatch)
    assert Manifest(results).runs()[-1]["status"] == "failed"

    resumed = stage(results, *args, "infer.resume=true")
    assert resumed["metrics"]["resumed"] == 4 and resumed["metrics"]["images"] == len(TRUTH)
    clean = stage(results, *args)
    m = Manifest(results)
    a, b = m.abs(resumed["run_dir"]), m.abs(clean["run_dir"])
    for sub in ("labels", "labels_kitti"):
        files = sorted(p.relative_to(a / sub) for p in (a / sub).rglob("*.txt"))
        assert files == sorted(p.relative_to(b / sub) for p in (b / sub).rglob("*.txt"))
        assert all((a / sub / f).read_text() == (b / sub / f).read_text() for f in files)

    other = stage(results, *args, "infer.resume=true", "infer.conf=0.5")  # settings changed: nothing adopted
    assert other["metrics"]["resumed"] == 0
    assert any("no failed infer run" in w or "other settings" in w for w in other["warnings"])


def test_resume_relabels_an_image_replaced_since_the_failed_run(models, tmp_path, monkeypatch):
    """An image replaced between the crash and the resume (same name, other content) is labelled again."""
    source, results = make_source(tmp_path / "src"), tmp_path / "r"
    args = (f"infer.input={models['onnx']}", f"infer.source={source}", f"infer.imgsz={IMGSZ}", "infer.batch=2")
    _crash_after_four_images(results, args, monkeypatch)
    failed = Manifest(results).runs()[-1]
    journalled = [json.loads(line) for line in (Manifest(results).abs(failed["run_dir"]) / "detections.jsonl")
                  .read_text().splitlines()]
    assert len(journalled) == 4 and all(len(e["sha256"]) == 64 and e["bytes"] > 0 for e in journalled)

    # Replace one labelled JPEG by another picture: taller (300 px high), its red box elsewhere.
    rel = next(e["path"] for e in journalled if e["path"].endswith(".jpg") and "/" not in e["path"])
    new_size, new_rects = (200, 300), [(0, 60, 180, 150, 290)]
    draw(new_size, new_rects).save(source / rel, quality=95)

    resumed = stage(results, *args, "infer.resume=true")
    assert resumed["metrics"]["resumed"] == 3 and resumed["metrics"]["images"] == len(TRUTH)
    assert any("1 image(s) changed" in w and rel in w for w in resumed["warnings"])
    run_dir = Manifest(results).abs(resumed["run_dir"])
    assert_boxes(read_yolo(run_dir / "labels" / f"{key_of(rel)}.txt", new_size), new_rects, tol=3.5)
    entry = next(json.loads(line) for line in (run_dir / "detections.jsonl").read_text().splitlines()
                 if json.loads(line)["path"] == rel)
    assert (entry["width"], entry["height"]) == new_size and entry["bytes"] == (source / rel).stat().st_size


def test_review_band_below_threshold(models, source, tmp_path):
    """With conf 0.5 the 0.4 blue boxes are not written, but their images are still listed for review."""
    record = stage(tmp_path / "r", f"infer.input={models['pt']}", f"infer.source={source}", "infer.conf=0.5",
                   "infer.formats=[kitti]", f"trust_pickle=[{models['pt']}]")
    run_dir = Manifest(tmp_path / "r").abs(record["run_dir"])
    n_red = sum(c == 0 for _, rects in TRUTH.values() for c, *_ in rects)
    assert record["metrics"]["boxes_per_class"] == {"red": n_red, "blue": 0}
    assert not (run_dir / "labels").exists() and not (run_dir / "data.yaml").exists()  # kitti only
    listed = [ln.split("\t")[1] for ln in (run_dir / "review.txt").read_text().splitlines() if not ln.startswith("#")]
    assert sorted(listed) == sorted(rel for rel, (_, r) in TRUTH.items() if r and all(c == 1 for c, *_ in r))


@pytest.mark.parametrize("source_arg, message", [
    (None, "infer.source is not set"),
    ("EMPTY", "holds no image files"),
    ("/no/such/folder", "does not exist"),
])
def test_bad_source_exits_2(models, tmp_path, source_arg, message):
    args = ["stage=infer", "experiment=smoke", f"results_dir={tmp_path / 'r'}", f"infer.input={models['onnx']}"]
    if source_arg == "EMPTY":
        (tmp_path / "empty" / "sub").mkdir(parents=True)
        (tmp_path / "empty" / "readme.md").write_text("no images here")
        source_arg = str(tmp_path / "empty")
    if source_arg is not None:
        args.append(f"infer.source={source_arg}")
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(not (VINID / "test").is_dir(), reason="vinid-products dataset not present")
def test_acceptance_vinid_test_plus_truncated(models, tmp_path):
    """The 14 vinid test images plus one truncated JPEG: images=14, skipped=1."""
    folder = tmp_path / "vinid"
    shutil.copytree(VINID / "test", folder)
    data = (VINID / "test" / "bia2.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 3])
    record = stage(tmp_path / "r", f"infer.input={models['onnx']}", f"infer.source={folder}")
    assert record["status"] == "succeeded"
    assert record["metrics"]["images"] == 14 and record["metrics"]["skipped"] == 1


@pytest.mark.slow
def test_infer_output_trains(cli_run, tmp_path):
    """dataset.path=<infer run folder> trains (one smoke epoch through the CLI)."""
    run_dir, _ = cli_run
    proc = run_cli("stage=train", "experiment=smoke", f"results_dir={tmp_path / 'r'}", f"dataset.path={run_dir}",
                   "train.epochs=1", "device=cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
