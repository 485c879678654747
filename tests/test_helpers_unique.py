"""Helpers that must agree exist once, and agree with Ultralytics where parity depends on them.

- letterbox: the predictor's, the engine's calibration / parity input and Ultralytics' LetterBox
  give the same pixels for the same image;
- fixed-batch padding: one fill rule for ONNX Runtime, the predictor and parity/latency batches,
  and the real rows' outputs do not depend on it;
- image size: what the engine stage reads from an ONNX is what the evaluator reads, in every
  shape Ultralytics writes it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from ultralytics.data.augment import LetterBox

from pipeline.datasets.images import displayed_size, letterbox, read_image
from pipeline.engines import onnxruntime as ortb
from pipeline.engines.common import fill_batch, fixed_batches, load_batch, network_input, onnx_metadata
from pipeline.imgsz import hw, imgsz_of, model_imgsz, side

# Each of these is defined in exactly one module of pipeline/ or stages/.
ONE_DEFINITION = ("letterbox", "read_image", "displayed_size", "model_imgsz", "imgsz_of", "seeded_split",
                  "kitti_line", "yolo_line", "fill_batch", "fixed_batches")
SUFFIX_LISTS = {"IMAGE_EXTENSIONS", "ULTRALYTICS_SUFFIXES"}  # both in pipeline/datasets/images.py


def _definitions() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(function name -> modules defining it, suffix-set constant -> modules assigning one)."""
    functions: dict[str, list[str]] = {}
    suffix_sets: dict[str, list[str]] = {}
    for package in ("pipeline", "stages"):
        for path in sorted((REPO / package).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    functions.setdefault(node.name, []).append(rel)
                elif isinstance(node, ast.Assign) and isinstance(node.value, (ast.Set, ast.Call)):
                    text = ast.unparse(node.value)
                    if '".jpg"' in text or "'.jpg'" in text:
                        for t in node.targets:
                            suffix_sets.setdefault(ast.unparse(t), []).append(rel)
    return functions, suffix_sets


def test_each_helper_has_one_definition():
    functions, suffix_sets = _definitions()
    for name in ONE_DEFINITION:
        assert len(functions.get(name, [])) == 1, f"{name} is defined in {functions.get(name)}"
    assert set(suffix_sets) == SUFFIX_LISTS, suffix_sets
    assert all(where == ["pipeline/datasets/images.py"] for where in suffix_sets.values()), suffix_sets


# -- letterbox ------------------------------------------------------------------------------------


@pytest.mark.parametrize("h, w, shape", [(120, 200, (128, 128)), (200, 120, (128, 128)), (90, 140, (160, 160)),
                                         (640, 480, (320, 320)), (50, 50, (64, 64)), (300, 170, (96, 128)),
                                         (7, 333, (64, 64))])
def test_letterbox_is_ultralytics_letterbox(h, w, shape):
    img = (np.random.default_rng(h * w).random((h, w, 3)) * 255).astype(np.uint8)
    ours, (left, top, nw, nh) = letterbox(img, shape)
    theirs = LetterBox(new_shape=shape, auto=False)(image=img.copy())
    assert ours.shape == theirs.shape == (*shape, 3)
    assert np.array_equal(ours, theirs)
    assert (nw, nh) == (max(round(w * min(shape[0] / h, shape[1] / w)), 1), max(round(h * min(shape[0] / h, shape[1] / w)), 1))
    assert ours[top:top + nh, left:left + nw].shape[:2] == (nh, nw)


def _photo(path: Path, size: tuple[int, int], orientation: int | None = None) -> Path:
    a = (np.random.default_rng(size[0]).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    a[10:40, 20:60] = (220, 30, 30)  # something that is not noise, so a rotation shows
    im = Image.fromarray(a)
    if orientation is None:
        im.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(path, quality=92, exif=exif)
    return path


def test_calibration_input_is_predictor_input_is_ultralytics_input(tmp_path):
    """One image file through the engine's network_input, the predictor's read + letterbox, and
    Ultralytics' own reader (cv2) + LetterBox: the same array (PNG: bit for bit)."""
    png = _photo(tmp_path / "a.png", (150, 100))
    jpg = _photo(tmp_path / "r.jpg", (140, 90), orientation=6)  # displayed 90 x 140
    assert displayed_size(jpg) == (90, 140)
    for path, tolerance in ((png, 0), (jpg, 2)):  # two JPEG decoders may round an IDCT differently
        engine = network_input(path, (128, 128))
        rgb, size = read_image(path)
        predictor, _ = letterbox(rgb, (128, 128), size)
        ultralytics = LetterBox(new_shape=(128, 128), auto=False)(image=cv2.imread(str(path)))[:, :, ::-1]
        assert engine.shape == (3, 128, 128) and engine.dtype == np.float32
        assert np.array_equal(engine, predictor.transpose(2, 0, 1).astype(np.float32) / 255.0)
        assert np.abs(predictor.astype(int) - ultralytics.astype(int)).max() <= tolerance
    assert network_input(tmp_path / "missing.jpg", (64, 64)) is None
    assert load_batch([png, tmp_path / "missing.jpg", jpg], (64, 64)).shape == (2, 3, 64, 64)


# -- fixed-batch padding ----------------------------------------------------------------------------


def test_fill_batch_cycles_real_rows_for_numpy_and_torch():
    x = np.arange(3 * 2).reshape(3, 2)
    assert fill_batch(x, None) is x and fill_batch(x, 3) is x
    assert fill_batch(x, 2).tolist() == [[0, 1], [2, 3]]
    assert fill_batch(x, 7)[:, 0].tolist() == [0, 2, 4, 0, 2, 4, 0]
    assert torch.equal(fill_batch(torch.from_numpy(x), 7), torch.from_numpy(fill_batch(x, 7)))
    chunks = list(fixed_batches(np.arange(7), 3))
    assert [(c.tolist(), n) for c, n in chunks] == [([0, 1, 2], 3), ([3, 4, 5], 3), ([6, 6, 6], 1)]
    assert [n for _, n in fixed_batches(np.arange(7), None)] == [7]


def _fixed_batch_onnx(path: Path, batch: int) -> Path:
    """A graph with batch fixed at `batch` whose row i output depends on row i only: y = 2x + 1."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["images", "two"], ["t"]), helper.make_node("Add", ["t", "one"], ["out"])], "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 3, 4, 4])],
        [numpy_helper.from_array(np.array(2, np.float32), "two"), numpy_helper.from_array(np.array(1, np.float32), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_fixed_batch_graph_outputs_do_not_depend_on_the_padding(tmp_path):
    sess = ortb.session(_fixed_batch_onnx(tmp_path / "fixed.onnx", 3), threads=1)
    assert ortb.fixed_batch_of(sess) == 3
    x = np.random.default_rng(0).random((5, 3, 4, 4), dtype=np.float32)
    np.testing.assert_allclose(ortb.run(sess, x, 3), 2 * x + 1, rtol=1e-6)
    one = fill_batch(x[:1], 3)  # what a latency run at batch 1 feeds this graph
    np.testing.assert_allclose(sess.run(None, {"images": one})[0], 2 * one + 1, rtol=1e-6)


# -- image size -------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, size", [({"imgsz": 640}, 640), ({"imgsz": [320, 320]}, 320), ({"imgsz": "[96, 128]"}, [96, 128]),
                                         ({"imgsz": [160]}, 160), ({"imgsz": "640"}, 640), ({}, None), (None, None),
                                         ({"imgsz": [1, 2, 3]}, None), ({"imgsz": -32}, None), ({"imgsz": True}, None)])
def test_imgsz_of_every_shape_ultralytics_writes(args, size):
    assert imgsz_of(args) == size


def test_side_and_hw():
    assert side(640) == 640 and side([96, 128]) == 128 and side((320, 320)) == 320
    assert hw(640) == (640, 640) and hw([96, 128]) == (96, 128) and hw([160]) == (160, 160)
    with pytest.raises(ValueError):
        hw([1, 2, 3])


def test_engine_and_evaluator_read_the_same_size_from_an_onnx(tmp_path):
    """The engine stage reads onnx_metadata; the evaluator reads Ultralytics' BaseBackend metadata."""
    import onnx

    path = _fixed_batch_onnx(tmp_path / "m.onnx", 1)
    for written, expected in (("[96, 128]", (96, 128)), ("[160, 160]", (160, 160))):
        proto = onnx.load(str(path))
        del proto.metadata_props[:]
        proto.metadata_props.add(key="imgsz", value=written)
        onnx.save(proto, str(path))
        engine_side = hw(imgsz_of(onnx_metadata(path)))
        evaluator_side = model_imgsz(path)
        assert engine_side == expected == hw(evaluator_side)
