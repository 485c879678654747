"""The evaluator: AP on hand-made detections with known answers, pycocotools agreement, any artifact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import UserError
from pipeline.evaluation import (
    average_precision,
    class_remap,
    concat_stats,
    evaluate,
    match_detections,
    model_imgsz,
    summarize,
)

NAMES = {0: "red", 1: "blue"}


# -- AP of one class from a ranked hit list ----------------------------------------------------------

@pytest.mark.parametrize("mode", ["coco", "voc11", "voc_integrate"])
def test_perfect_ranking_is_one_and_no_detections_zero(mode):
    assert average_precision(np.ones((4, 1), bool), 4, mode)[0] == pytest.approx(1.0)
    assert average_precision(np.zeros((0, 1), bool), 4, mode)[0] == 0.0
    assert average_precision(np.zeros((3, 1), bool), 4, mode)[0] == 0.0


@pytest.mark.parametrize("mode,expected", [
    # 4 labels; ranked detections TP, FP, TP (two labels never found): recall .25 .25 .5, precision 1 .5 .667
    ("coco", (26 * 1.0 + 25 * 2 / 3) / 101),  # recall thresholds 0..0.25 -> 1, 0.26..0.50 -> 2/3
    ("voc11", (3 * 1.0 + 3 * 2 / 3) / 11),  # thresholds 0, .1, .2 -> 1; .3, .4, .5 -> 2/3
    ("voc_integrate", 0.25 * 1.0 + 0.25 * 2 / 3),  # area under the envelope
])
def test_mixed_ranking_known_ap(mode, expected):
    hits = np.array([[True], [False], [True]])
    assert average_precision(hits, 4, mode)[0] == pytest.approx(expected, abs=1e-9)


def test_false_positive_first_costs_precision():
    assert average_precision(np.array([[False], [True]]), 1, "coco")[0] == pytest.approx(0.5)


# -- whole images through the validator's matcher ----------------------------------------------------

def _img(gt, pred):
    """gt: [(cls, box)], pred: [(cls, conf, box)] -> matched statistics of one image."""
    gb = np.array([b for _, b in gt], float).reshape(-1, 4)
    gc = np.array([c for c, _ in gt], float)
    pb = np.array([b for _, _, b in pred], float).reshape(-1, 4)
    return match_detections(pb, np.array([s for _, s, _ in pred], float), np.array([c for c, _, _ in pred], float),
                            gb, gc)


GT = [(0, [10, 10, 50, 50]), (1, [60, 60, 90, 95]), (0, [5, 60, 40, 90])]


@pytest.mark.parametrize("ap_mode", ["coco", "voc11", "voc_integrate"])
def test_perfect_predictions_score_one(ap_mode):
    stats = concat_stats([_img(GT, [(c, 0.9, b) for c, b in GT]), _img(GT[:1], [(0, 0.8, GT[0][1])])])
    m = summarize(stats, NAMES, ap_mode=ap_mode)
    assert m["mAP50"] == pytest.approx(1.0) and m["mAP50_95"] == pytest.approx(1.0)
    assert m["per_class"] == {"red": pytest.approx(1.0), "blue": pytest.approx(1.0)}
    assert m["precision"] == pytest.approx(1.0, abs=1e-3) and m["recall"] == pytest.approx(1.0, abs=1e-3)
    assert m["instances"] == 4
    if ap_mode != "coco":
        assert m["ap50_voc"] == pytest.approx(1.0)
        assert m["per_class_ap50_voc"] == {"red": pytest.approx(1.0), "blue": pytest.approx(1.0)}


def test_no_predictions_score_zero():
    m = summarize(concat_stats([_img(GT, [])]), NAMES, ap_mode="voc11")
    assert m["mAP50"] == m["mAP50_95"] == m["ap50_voc"] == 0.0
    assert m["per_class"] == {"red": 0.0, "blue": 0.0}


def test_wrong_class_is_not_a_hit():
    m = summarize(concat_stats([_img(GT, [(1 - c, 0.9, b) for c, b in GT])]), NAMES)
    assert m["mAP50"] == 0.0


def test_iou_decides_how_many_thresholds_a_box_passes():
    # One label, one detection shifted so that IoU = 0.72: a hit at IoU 0.50..0.70 (5 of 10 thresholds).
    gt = [(0, [0, 0, 100, 100])]
    shift = 100 * (1 - 0.72) / (1 + 0.72)  # IoU of two 100x100 squares offset by `shift` along x
    m = summarize(concat_stats([_img(gt, [(0, 0.9, [shift, 0, 100 + shift, 100])])]), NAMES)
    assert m["mAP50"] == pytest.approx(1.0)
    assert m["mAP50_95"] == pytest.approx(0.5)
    assert list(m["per_class"]) == ["red"]  # classes without labels are not averaged in


def test_known_mixed_case_two_classes():
    # red: 2 labels, detections TP (0.9), FP (0.8), TP (0.7) -> COCO AP50 = (51*1 + 50*2/3)/101
    # blue: 1 label, found -> 1.0
    red1, red2 = [0, 0, 40, 40], [50, 50, 90, 90]
    img = _img([(0, red1), (0, red2), (1, [0, 50, 30, 90])],
               [(0, 0.9, red1), (0, 0.8, [200, 200, 240, 240]), (0, 0.7, red2), (1, 0.6, [0, 50, 30, 90])])
    m = summarize(concat_stats([img]), NAMES, ap_mode="voc_integrate")
    red = (51 * 1.0 + 50 * 2 / 3) / 101
    assert m["per_class_ap50"]["red"] == pytest.approx(red, abs=1e-6)
    assert m["per_class_ap50"]["blue"] == pytest.approx(1.0)
    assert m["mAP50"] == pytest.approx((red + 1.0) / 2, abs=1e-6)
    assert m["per_class_ap50_voc"]["red"] == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    assert m["ap50_voc"] == pytest.approx((0.5 + 0.5 * 2 / 3 + 1.0) / 2)


# -- agreement with an independent implementation ----------------------------------------------------

def _random_scene(rng, n_images=40, nc=3):
    """Ground truth boxes and noisy detections (jittered hits, misses, false positives, wrong classes)."""
    images = []
    for _ in range(n_images):
        gt, pred = [], []
        for _ in range(int(rng.integers(0, 6))):
            w, h = rng.uniform(10, 120, 2)
            x, y = rng.uniform(0, 500, 2)
            c = int(rng.integers(0, nc))
            gt.append((c, [x, y, x + w, y + h]))
            if rng.random() < 0.8:  # found, with localisation noise
                j = rng.normal(0, 0.08, 4) * [w, h, w, h]
                cls = c if rng.random() < 0.9 else int(rng.integers(0, nc))
                pred.append((cls, float(rng.uniform(0.05, 1)), list(np.array([x, y, x + w, y + h]) + j)))
        for _ in range(int(rng.integers(0, 4))):  # false positives
            x, y = rng.uniform(0, 500, 2)
            pred.append((int(rng.integers(0, nc)), float(rng.uniform(0.01, 0.7)), [x, y, x + 40, y + 30]))
        images.append((gt, pred))
    return images


def _coco_stats(gt, detections):
    """pycocotools' (AP@[.5:.95], AP@.5) of `detections` against the COCO-format ground truth `gt`."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = COCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    ev = COCOeval(coco_gt, coco_gt.loadRes(detections), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats[0], ev.stats[1]


def _pycocotools_map(images, nc):
    gt = {"images": [], "annotations": [], "categories": [{"id": c + 1} for c in range(nc)]}
    dt = []
    for i, (boxes, preds) in enumerate(images):
        gt["images"].append({"id": i + 1})
        for c, (x1, y1, x2, y2) in boxes:
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i + 1, "category_id": c + 1,
                                      "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                      "iscrowd": 0})
        for c, s, (x1, y1, x2, y2) in preds:
            dt.append({"image_id": i + 1, "category_id": c + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    return _coco_stats(gt, dt)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_agrees_with_pycocotools(seed):
    pytest.importorskip("pycocotools")
    rng = np.random.default_rng(seed)
    images = _random_scene(rng)
    ours = summarize(concat_stats([_img(g, p) for g, p in images]), {0: "a", 1: "b", 2: "c"})
    coco_5095, coco_50 = _pycocotools_map(images, 3)
    assert 0.2 < ours["mAP50_95"] < 0.95  # a non-trivial case
    assert ours["mAP50"] == pytest.approx(coco_50, abs=1e-3)  # the issue asks 0.005; measured ~1e-5
    assert ours["mAP50_95"] == pytest.approx(coco_5095, abs=1e-3)


# -- evaluate(): artifacts, options, errors ----------------------------------------------------------

def test_evaluate_checkpoint_and_module_agree(tiny_model_pt, tiny_data_yaml, tmp_path):
    from pipeline.models import load_model

    by_file = evaluate(tiny_model_pt, tiny_data_yaml, imgsz=64, batch=8, ap_mode="voc11", plots=True,
                       save_dir=tmp_path / "plots")
    assert by_file["images"] == 8 and by_file["instances"] > 0
    assert set(by_file) >= {"mAP50", "mAP50_95", "precision", "recall", "per_class", "per_class_ap50",
                            "ap50_voc", "per_class_ap50_voc"}
    assert {p.rsplit("/", 1)[1] for p in by_file["plots"]} == {
        "BoxPR_curve.png", "confusion_matrix.png", "confusion_matrix_normalized.png"}

    module = load_model(tiny_model_pt)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())
    by_module = evaluate(module, tiny_data_yaml, imgsz=64, batch=8)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules()) == n_bn  # not fused in place
    for key in ("mAP50", "mAP50_95", "precision", "recall"):
        assert by_module[key] == pytest.approx(by_file[key], abs=1e-6)


def test_cpu_evaluation_computes_on_every_core(tiny_model_pt, tiny_data_yaml, monkeypatch):
    """Ultralytics leaves torch one thread short of the cores; evaluate() takes them all, then puts the
    caller's count back."""
    from pipeline import devices, evaluation

    seen = []
    original = evaluation._every_core

    def recorded(validator):
        original(validator)
        seen.append(torch.get_num_threads())

    monkeypatch.setattr(devices, "cpu_count", lambda: 3)
    monkeypatch.setattr(devices, "TAKEN_CORE", 1e9)  # no other load counts: every (faked) core is free
    monkeypatch.setattr(evaluation, "_every_core", recorded)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        evaluate(tiny_model_pt, tiny_data_yaml, imgsz=64, batch=8)
        assert seen == [3]
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_evaluate_refuses_what_the_user_can_fix(tiny_model_pt, tiny_data_yaml, tmp_path):
    with pytest.raises(UserError, match="split=test"):
        evaluate(tiny_model_pt, tiny_data_yaml, split="test")
    with pytest.raises(UserError, match="ap_mode"):
        evaluate(tiny_model_pt, tiny_data_yaml, ap_mode="voc07")
    with pytest.raises(UserError, match="does not exist"):
        evaluate(tmp_path / "missing.pt", tiny_data_yaml)


def test_class_remap_maps_reordered_names_and_refuses_other_classes():
    assert class_remap({0: "red", 1: "blue"}, {0: "red", 1: "blue"}) is None
    assert class_remap({0: "blue", 1: "red"}, {0: "red", 1: "blue"}) == [1, 0]
    assert class_remap({0: "class0", 1: "class1"}, {0: "red", 1: "blue"}) is None  # unnamed, same count
    for model in ({0: "red", 1: "blue", 2: "green"}, {0: "red", 1: "cat"}, {0: "class0"}):
        with pytest.raises(UserError, match=r"model's classes \[.*\] are not the dataset's \['red', 'blue'\]"):
            class_remap(model, {0: "red", 1: "blue"})


def test_evaluate_refuses_a_dataset_of_other_classes(tiny_model_pt, tiny_data_yaml, tmp_path):
    """A 2-class model on a 3-class dataset exits 2 naming both lists, instead of scoring a near-zero mAP."""
    other = tmp_path / "three.yaml"
    root = tiny_data_yaml.parent
    other.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames: [red, blue, green]\n")
    with pytest.raises(UserError, match=r"\['red', 'blue'\] are not the dataset's \['red', 'blue', 'green'\]"):
        evaluate(tiny_model_pt, other, imgsz=64, batch=8)


def _boxing_model(tmp_path):
    """An untrained yolov8n (red, blue) whose head outputs ~24 px boxes at every stride-8 cell with scores
    near 0.5: on the rectangles dataset some boxes hit, so AP is above zero and depends on the classes."""
    from pipeline.models import build_model, save_checkpoint

    model = build_model("yolov8n", nc=2)
    model.names = {0: "red", 1: "blue"}
    head = model.model[-1]
    for seq in head.cv3:
        seq[-1].bias.data.zero_()
    for seq in head.cv2:  # DFL distances of 1.5 strides on each side, whatever the features
        seq[-1].weight.data.zero_()
        bias = torch.full((4, head.reg_max), -10.0)
        bias[:, 1:3] = 0.0
        seq[-1].bias.data = bias.flatten()
    return save_checkpoint(model, tmp_path / "boxing.pt")


def test_evaluate_maps_the_same_classes_in_another_order(tiny_data_yaml, tmp_path, caplog):
    """The dataset with its class ids swapped (names blue, red) scores exactly as the original: predictions
    are mapped by name, and the result says so."""
    import shutil

    root = tmp_path / "swapped"
    shutil.copytree(tiny_data_yaml.parent / "images", root / "images")
    for label in (tiny_data_yaml.parent / "labels").rglob("*.txt"):
        out = root / label.relative_to(tiny_data_yaml.parent)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(f"{1 - int(line[0])}{line[1:]}" for line in label.read_text().splitlines(True)))
    swapped = root / "data.yaml"
    swapped.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames: [blue, red]\n")

    model = _boxing_model(tmp_path)
    plain = evaluate(model, tiny_data_yaml, imgsz=64, batch=8)
    with caplog.at_level("INFO", logger="pipeline"):
        mapped = evaluate(model, swapped, imgsz=64, batch=8)
    assert "class_map" not in plain
    assert mapped["class_map"] == {"red": 1, "blue": 0}
    assert "in another order" in caplog.text
    assert min(plain["per_class"].values()) > 0  # the comparison means something
    assert mapped["per_class"] == pytest.approx(plain["per_class"], abs=1e-9)
    assert mapped["mAP50_95"] == pytest.approx(plain["mAP50_95"], abs=1e-9)


def _noisy_detections(rng, gt_boxes, gt_cls, shape):
    """Detections of one image from its labels (letterbox pixels): jittered hits, some pushed past the
    image edge (clipping matters), wrong classes, misses, false positives; random confidences."""
    h, w = shape
    boxes, cls = [], []
    for box, c in zip(gt_boxes.tolist(), gt_cls.tolist(), strict=True):
        if rng.random() < 0.15:
            continue
        bw, bh = box[2] - box[0], box[3] - box[1]
        box = np.asarray(box) + rng.normal(0, 0.08, 4) * [bw, bh, bw, bh]
        if rng.random() < 0.4:
            box[:2] -= rng.uniform(0, 0.5, 2) * [bw, bh]  # past the left/top edge when the object is near it
        boxes.append(box)
        cls.append(c if rng.random() < 0.9 else 1 - c)
    for _ in range(int(rng.integers(0, 3))):
        x, y = rng.uniform(-10, w, 2)
        boxes.append([x, y, x + rng.uniform(8, 30), y + rng.uniform(8, 30)])
        cls.append(float(rng.integers(0, 2)))
    n = len(boxes)
    return {"bboxes": torch.tensor(np.reshape(boxes, (n, 4)), dtype=torch.float32),
            "conf": torch.tensor(rng.uniform(0.05, 1, n), dtype=torch.float32),
            "cls": torch.tensor(cls, dtype=torch.float32), "extra": torch.zeros((n, 0))}


def test_evaluate_agrees_with_pycocotools_on_the_boxes_a_user_receives(tiny_model_pt, tmp_path, monkeypatch):
    """End to end through the validator: detections as a user receives them (scaled to the image and
    clipped, Ultralytics' own COCO JSON writer), the ground truth as COCO JSON from the YOLO labels;
    pycocotools' AP on those equals ours. Matching the unclipped letterbox boxes differed by 0.005 on a
    real model; here a third of the detections reach past the image edge."""
    pytest.importorskip("pycocotools")
    from conftest import write_rect_dataset

    from pipeline import evaluation

    data_yaml = write_rect_dataset(tmp_path / "data", n_train=2, n_val=40, size=96, seed=3)
    rng = np.random.default_rng(0)
    seen = []

    class Collect(evaluation._recorder_class()):
        def update_metrics(self, preds, batch):
            # The model's detections replaced by known noisy ones, before the validator matches them
            fake = []
            for si in range(len(preds)):
                pbatch = self._prepare_batch(si, batch)
                fake.append(_noisy_detections(rng, pbatch["bboxes"].numpy(), pbatch["cls"].numpy(),
                                              pbatch["imgsz"]))
            super().update_metrics(fake, batch)
            seen.append(self)
            for si, pred in enumerate(fake):  # what save_json writes: scaled to the image, clipped
                pbatch = self._prepare_batch(si, batch)
                if len(pred["cls"]):
                    self.pred_to_json(self.scale_preds(pred, pbatch), pbatch)

    monkeypatch.setattr(evaluation, "_recorder_class", lambda: Collect)
    ours = evaluate(tiny_model_pt, data_yaml, imgsz=64, batch=8)
    detections = seen[-1].jdict
    assert 0.1 < ours["mAP50_95"] < 0.9  # a non-trivial case

    root = data_yaml.parent
    gt = {"images": [], "annotations": [], "categories": [{"id": c + 1} for c in range(2)]}
    for image in sorted((root / "images" / "val").iterdir()):
        w, h = Image.open(image).size
        image_id = int(image.stem) if image.stem.isnumeric() else image.stem  # as pred_to_json names it
        gt["images"].append({"id": image_id, "width": w, "height": h})
        for line in (root / "labels" / "val" / f"{image.stem}.txt").read_text().splitlines():
            c, cx, cy, bw, bh = map(float, line.split())
            box = [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id,
                                      "category_id": int(c) + 1, "bbox": box, "area": box[2] * box[3],
                                      "iscrowd": 0})
    ap, ap50 = _coco_stats(gt, detections)
    assert ours["mAP50_95"] == pytest.approx(ap, abs=0.002)
    assert ours["mAP50"] == pytest.approx(ap50, abs=0.002)


def test_model_imgsz_from_checkpoint_args(tmp_path):
    from pipeline.models import build_model, save_checkpoint

    model = build_model("yolov8n", nc=2)
    model.args = {"imgsz": 160}
    assert model_imgsz(save_checkpoint(model, tmp_path / "m.pt")) == 160
    assert model_imgsz(model) == 160


@pytest.mark.slow
def test_trained_model_scores_alike_through_pt_onnx_and_ultralytics(tmp_path):
    """A model that detects: our number vs Ultralytics' own, and the .pt vs its ONNX export."""
    from conftest import write_rect_dataset
    from ultralytics import YOLO

    from pipeline.models import build_model
    from pipeline.training import fit

    data = write_rect_dataset(tmp_path / "data", n_train=64, n_val=16, size=96, seed=1)
    torch.manual_seed(0)
    result = fit(build_model("yolov8n", nc=2), data, tmp_path / "run",
                 {"epochs": 30, "imgsz": 96, "batch": 16, "nbs": 16, "workers": 0, "device": "cpu", "seed": 0,
                  "close_mosaic": 5})
    ours = result.metrics
    assert ours["mAP50"] > 0.5, ours  # it learned something, so the comparisons below mean something

    ultra = YOLO(str(result.best)).val(data=str(data), imgsz=96, batch=16, device="cpu", plots=False,
                                       project=str(tmp_path), name="ultra", verbose=False)
    # Same matches, different AP interpolation (trapezoid vs COCO's 101-point sampling).
    assert ours["mAP50"] == pytest.approx(ultra.box.map50, abs=0.01)
    assert ours["mAP50_95"] == pytest.approx(ultra.box.map, abs=0.01)

    onnx = YOLO(str(result.best)).export(format="onnx", imgsz=96, dynamic=True, simplify=False)
    by_onnx = evaluate(onnx, data, batch=16)
    assert by_onnx["mAP50_95"] == pytest.approx(ours["mAP50_95"], abs=0.01)
