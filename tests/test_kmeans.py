"""kmeans: the k-medians algorithm (pipeline.anchors) on planted data, and the stage through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import VINID, run_cli, write_rect_dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline import anchors as A

SHAPES = np.array([[12.0, 30.0], [40.0, 40.0], [120.0, 60.0]])


def planted(n_per: int = 300, noise: float = 0.05, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([s * rng.normal(1.0, noise, (n_per, 2)) for s in SHAPES])


def test_recovers_planted_clusters():
    boxes = planted()
    fit = A.kmedians(boxes, 3, seed=0)
    assert fit.converged
    np.testing.assert_allclose(fit.anchors, SHAPES, rtol=0.03)  # sorted by area, like SHAPES
    assert A.mean_best_iou(boxes, fit.anchors) > 0.9
    assert A.best_possible_recall(boxes, fit.anchors) == 1.0
    # each planted group is one cluster
    assert np.bincount(fit.assign).tolist() == [300, 300, 300]
    assert (fit.assign == np.repeat([0, 1, 2], 300)).all()


def test_same_seed_same_anchors_other_seed_similar_quality():
    boxes = np.random.default_rng(1).lognormal(3.0, 0.6, (3000, 2))
    a = A.kmedians(boxes, 9, seed=7)
    b = A.kmedians(boxes, 9, seed=7)
    np.testing.assert_array_equal(a.anchors, b.anchors)
    ious = [A.mean_best_iou(boxes, A.kmedians(boxes, 9, seed=s).anchors) for s in range(4)]
    assert max(ious) - min(ious) < 0.02, ious
    assert min(ious) > 0.6


def test_anchors_sorted_by_area_and_median_is_a_box_median():
    boxes = planted(seed=3)[::-1]  # order of input must not matter for sorting
    fit = A.kmedians(boxes, 3, seed=2)
    areas = fit.anchors.prod(1)
    assert (np.diff(areas) > 0).all()
    for c in range(3):  # centres are the per-axis medians of their members
        np.testing.assert_allclose(fit.anchors[c], np.median(boxes[fit.assign == c], axis=0))


def test_empty_cluster_takes_worst_fitting_box():
    boxes = planted(n_per=50)[:100]  # shapes 12x30 and 40x40
    # identical starting centres: the second cluster is empty on the first step
    fit = A.kmedians(boxes, 2, init=[[12.0, 30.0], [12.0, 30.0]])
    assert fit.reseeded == 1 and fit.converged
    np.testing.assert_allclose(fit.anchors, SHAPES[:2], rtol=0.03)


def test_duplicated_boxes_and_k_equal_distinct():
    boxes = np.array([[5, 5]] * 50 + [[10, 10]] * 3 + [[20, 5], [5, 20], [30, 30]], dtype=float)
    fit = A.kmedians(boxes, 5, seed=0)
    assert sorted(map(tuple, fit.anchors.tolist())) == [(5, 5), (5, 20), (10, 10), (20, 5), (30, 30)]
    assert (np.bincount(fit.assign, minlength=5) > 0).all()
    assert A.mean_best_iou(boxes, fit.anchors) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="distinct"):
        A.kmedians(boxes, 6, seed=0)


@settings(max_examples=60, deadline=None)
@given(
    sides=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=40),
    k=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_every_cluster_non_empty_and_sorted(sides, k, seed):
    boxes = np.array(sides, dtype=float)
    k = min(k, A.distinct_boxes(boxes))
    fit = A.kmedians(boxes, k, seed=seed, max_steps=200)
    assert fit.anchors.shape == (k, 2) and np.isfinite(fit.anchors).all()
    assert (np.bincount(fit.assign, minlength=k) > 0).all()
    assert (np.diff(fit.anchors.prod(1)) >= 0).all()


def test_bpr_is_ultralytics_ratio_metric():
    anchors = np.array([[10.0, 10.0]])
    boxes = np.array([[10.0, 10.0], [39.0, 10.0], [40.0, 10.0], [10.0, 2.6], [10.0, 2.5]])
    # ratio < 4 on both sides fits; exactly 4 does not
    assert A.best_possible_recall(boxes, anchors) == pytest.approx(3 / 5)


def _non_square_folder(root: Path) -> tuple[Path, Path]:
    """Two 200x100 images, each with one box of half the image width and height."""
    images, labels = root / "images" / "train", root / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (200, 100)).save(images / f"{i}.png")
        (labels / f"{i}.txt").write_text("0 0.5 0.5 0.5 0.5\n1 0.25 0.25 0.1 0.2\n")
    Image.new("RGB", (64, 64)).save(images / "background.png")  # no label file
    (labels / "0.txt").write_text((labels / "0.txt").read_text() + "0 0.5 0.5 bad 0.1\n")
    return images, labels


def test_stretch_vs_letterbox_on_non_square_images(tmp_path):
    boxes = A.read_yolo_boxes(*_non_square_folder(tmp_path))
    assert boxes.images == 3 and len(boxes.wh) == 4 and boxes.skipped_lines == 1
    np.testing.assert_array_equal(boxes.image_wh[0], [200, 100])
    stretch = A.scale_boxes(boxes, 100, 100, "stretch")
    letter = A.scale_boxes(boxes, 100, 100, "letterbox")
    # 100x50 px box in a 200x100 image; stretch squeezes x only, letterbox halves both sides
    np.testing.assert_allclose(stretch[0], [50, 50])
    np.testing.assert_allclose(letter[0], [50, 25])
    np.testing.assert_allclose(letter[1], [10, 10])
    np.testing.assert_allclose(stretch[1], [10, 20])
    # on a square input, both agree when the image is square too
    square = A.Boxes(wh=np.array([[0.5, 0.25]]), image_wh=np.array([[300.0, 300.0]]), images=1, skipped_lines=0)
    np.testing.assert_allclose(A.scale_boxes(square, 64, 64, "stretch"), A.scale_boxes(square, 64, 64, "letterbox"))


def test_recommend_imgsz():
    rng = np.random.default_rng(0)
    big = rng.uniform(20, 60, 1000)
    assert A.recommend_imgsz(big, 320, native=1280) == (0.0, 320)
    tiny = np.concatenate([rng.uniform(3, 6, 300), rng.uniform(20, 60, 700)])  # 30% under 8 px
    frac, size = A.recommend_imgsz(tiny, 320, native=1280)
    assert frac == pytest.approx(0.3)
    low = np.percentile(tiny, 10)
    assert size % 32 == 0 and size >= 320 * 8 / low and size - 32 < 320 * 8 / low
    assert A.recommend_imgsz(tiny, 320, native=500)[1] == 512  # capped at the images' own size
    assert A.recommend_imgsz(tiny, 640, native=500)[1] == 640  # never below the current size


def test_export_formats():
    anchors = np.array([[1.2, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0], [11.0, 12.0],
                        [13.0, 14.0], [15.0, 16.0], [17.4, 18.6]])
    assert A.darknet_line(anchors) == "anchors = 1,2,  3,4,  5,6,  7,8,  9,10,  11,12,  13,14,  15,16,  17,19"
    spec = A.tao_spec(anchors)
    assert 'big_anchor_shape: "[(13.0, 14.0), (15.0, 16.0), (17.4, 18.6)]"' in spec
    assert 'small_anchor_shape: "[(1.2, 2.0), (3.0, 4.0), (5.0, 6.0)]"' in spec


def test_cli_smoke(tmp_path):
    results = tmp_path / "r"
    proc = run_cli("stage=kmeans", "experiment=smoke", f"results_dir={results}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "anchor-free" in proc.stdout + proc.stderr
    record = json.loads((results / "manifest.json").read_text())["runs"][-1]
    assert record["stage"] == "kmeans" and record["status"] == "succeeded"
    m = record["metrics"]
    anchors = np.array(m["anchors"])
    assert anchors.shape == (9, 2) and m["k"] == 9
    assert (np.diff(anchors.prod(1)) >= 0).all()
    assert 0.5 < m["mean_iou"] <= 1.0 and 0.0 < m["bpr"] <= 1.0
    assert m["boxes"] > 9 and 0.0 <= m["small_box_fraction"] <= 1.0 and m["recommended_imgsz"] >= 96
    roles = {o["role"]: results / o["path"] for o in record["outputs"]}
    assert set(roles) == {"anchors", "darknet", "tao_spec", "plot"}
    assert json.loads(roles["anchors"].read_text())["anchors"] == m["anchors"]
    assert roles["darknet"].read_text().startswith("anchors = ")
    assert roles["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(e["role"] == "dataset" for e in record["inputs"])


def test_cli_too_many_clusters_names_the_key(tmp_path):
    data = write_rect_dataset(tmp_path / "few", n_train=2, n_val=2)
    proc = run_cli("stage=kmeans", "experiment=smoke", f"results_dir={tmp_path / 'r'}", f"dataset.path={data.parent}",
                   "dataset.name=few", "dataset.format=yolo", "kmeans.num_clusters=9")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "kmeans.num_clusters=9" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(not VINID.exists(), reason="vinid-products dataset not present")
def test_cli_real_data_letterbox_vs_stretch(tmp_path):
    results = tmp_path / "r"
    metrics = {}
    for resize in ("letterbox", "stretch"):
        proc = run_cli("stage=kmeans", "dataset=vinid", f"results_dir={results}", f"kmeans.resize={resize}",
                       "kmeans.width=320", "kmeans.height=320")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        metrics[resize] = json.loads((results / "manifest.json").read_text())["runs"][-1]["metrics"]
    for m in metrics.values():
        assert len(m["anchors"]) == 9 and m["mean_iou"] > 0.7 and m["bpr"] > 0.9 and m["boxes"] > 50
        assert max(max(a) for a in m["anchors"]) <= 320
    # the photos are not square: stretching changes the box shapes letterboxing keeps
    assert metrics["letterbox"]["anchors"] != metrics["stretch"]["anchors"]
