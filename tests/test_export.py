"""stage=export: ONNX parity with PyTorch, metadata, QDQ for QAT models, NMS with the standard operator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import REPO, run_cli
from hydra import compose, initialize_config_dir

from pipeline.config import register, validate
from pipeline.engines import onnxruntime as ortb
from pipeline.engines.common import onnx_metadata
from pipeline.manifest import Manifest
from pipeline.runner import run_stage

IMGSZ = 64


def stage(results: Path, name: str, *overrides: str) -> dict:
    """Run one stage in this process (as the CLI would) and return its manifest record."""
    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"stage={name}", "experiment=smoke", f"results_dir={results}", *overrides])
    validate(cfg)
    return run_stage(cfg, name, list(overrides))


def tiny_dataset(data_yaml: Path) -> list[str]:
    """Overrides that import conftest's tiny rectangle dataset (2 classes, like the tiny models)."""
    return [f"dataset.path={data_yaml.parent}", "dataset.name=tiny"]


@pytest.fixture(scope="session")
def qat_pt(tiny_data_yaml, tiny_model_pt, tmp_path_factory) -> Path:
    """A QAT checkpoint made the way Ultralytics makes them: one epoch of training with quantize=8."""
    from ultralytics import YOLO

    out = tmp_path_factory.mktemp("qat_train")
    YOLO(str(tiny_model_pt)).train(data=str(tiny_data_yaml), epochs=1, imgsz=IMGSZ, batch=8, workers=0,
                                   device="cpu", quantize=8, plots=False, val=False, amp=False,
                                   warmup_epochs=0, project=str(out), name="qat", exist_ok=True, verbose=False)
    return out / "qat" / "weights" / "last.pt"


@pytest.fixture(scope="session")
def float_export(tiny_data_yaml, tiny_model_pt, tmp_path_factory) -> tuple[Path, dict]:
    results = tmp_path_factory.mktemp("export_float")
    record = stage(results, "export", f"export.input={tiny_model_pt}", f"export.imgsz={IMGSZ}",
                   *tiny_dataset(tiny_data_yaml))
    return results, record


@pytest.fixture(scope="session")
def qat_export(tiny_data_yaml, qat_pt, tmp_path_factory) -> tuple[Path, dict]:
    results = tmp_path_factory.mktemp("export_qat")
    record = stage(results, "export", f"export.input={qat_pt}", "export.evaluate=false", *tiny_dataset(tiny_data_yaml))
    return results, record


def _onnx_of(results: Path, record: dict) -> Path:
    return Manifest(results).abs(next(o for o in record["outputs"] if o["role"] == "model")["path"])


def test_fp32_export_matches_pytorch_and_carries_metadata(float_export):
    results, record = float_export
    m = record["metrics"]
    assert record["status"] == "succeeded"
    assert m["max_abs_diff"] <= 1e-3 and m["parity_images"] == 8
    assert m["qdq_nodes"] == 0 and m["qat"] is False
    assert 0.0 <= m["mAP50_95"] <= m["mAP50"] <= 1.0
    assert m["params"] > 3_000_000 and m["gflops"] > 0 and m["latency_ms"] > 0
    path = _onnx_of(results, record)
    assert m["size_mb"] == pytest.approx(path.stat().st_size / 1e6, abs=1e-3)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch by default
    meta = onnx_metadata(path)
    assert meta["names"] == {0: "red", 1: "blue"} and meta["imgsz"] == [IMGSZ, IMGSZ] and meta["stride"] == 32
    sess = ortb.session(path)
    assert sess.run(None, {"images": np.zeros((3, 3, IMGSZ, IMGSZ), np.float32)})[0].shape[0] == 3


def test_qat_export_keeps_qdq(qat_export):
    results, record = qat_export
    m = record["metrics"]
    assert m["qat"] is True and m["qdq_nodes"] > 0
    assert m["qdq_nodes"] == sum(n.op_type in ("QuantizeLinear", "DequantizeLinear")
                                 for n in onnx.load(str(_onnx_of(results, record))).graph.node)
    assert m["max_abs_diff"] < 1e-2  # fake-quant in PyTorch vs QDQ in ONNX Runtime
    assert m["qdq_rules"]["groups"] > 0 and m["parity_scope"].endswith("before the QDQ placement rules")
    assert m["imgsz"] == IMGSZ  # taken from the checkpoint's training size


def test_fixed_batch_and_half(tiny_data_yaml, tiny_model_pt, tmp_path):
    fixed = stage(tmp_path / "fixed", "export", f"export.input={tiny_model_pt}", f"export.imgsz={IMGSZ}",
                  "export.dynamic=false", "export.batch=2", "export.evaluate=false", *tiny_dataset(tiny_data_yaml))
    dims = onnx.load(str(_onnx_of(tmp_path / "fixed", fixed))).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, IMGSZ, IMGSZ]
    assert fixed["metrics"]["max_abs_diff"] <= 1e-3 and fixed["metrics"]["latency_batch"] == 2

    half = stage(tmp_path / "half", "export", f"export.input={tiny_model_pt}", f"export.imgsz={IMGSZ}",
                 "export.half=true", "export.evaluate=false", *tiny_dataset(tiny_data_yaml))
    proto = onnx.load(str(_onnx_of(tmp_path / "half", half)))
    onnx.checker.check_model(proto, full_check=True)  # ONNX Runtime's FP16 converter alone leaves it unsorted
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert half["metrics"]["size_mb"] < 0.6 * fixed["metrics"]["size_mb"]
    assert 0 < half["metrics"]["max_abs_diff"] < 1.0  # pixels at 64 px: FP16 rounding, not a broken graph


def test_nms_in_graph_uses_the_standard_operator(tiny_data_yaml, tiny_model_pt, tmp_path):
    record = stage(tmp_path, "export", f"export.input={tiny_model_pt}", f"export.imgsz={IMGSZ}", "export.nms=true",
                   "export.batch=2", "export.nms_conf=0.001", *tiny_dataset(tiny_data_yaml))
    proto = onnx.load(str(_onnx_of(tmp_path, record)))
    ops = {(n.domain or "ai.onnx", n.op_type) for n in proto.graph.node}
    assert ("ai.onnx", "NonMaxSuppression") in ops
    assert all(domain == "ai.onnx" for domain, _ in ops)  # no custom plugin or contrib op
    assert record["metrics"]["parity_scope"] == "network outputs before NMS"
    assert record["metrics"]["max_abs_diff"] <= 1e-3 and "mAP50_95" in record["metrics"]
    out = ortb.session(_onnx_of(tmp_path, record)).run(None, {"images": np.zeros((2, 3, IMGSZ, IMGSZ), np.float32)})
    assert out[0].shape == (2, 300, 6)  # x1, y1, x2, y2, score, class per kept box, zero-padded


def test_export_refuses_what_it_cannot_export(qat_pt, float_export, tmp_path):
    results, record = float_export
    onnx_path = _onnx_of(results, record)
    proc = run_cli("stage=export", "experiment=smoke", f"results_dir={tmp_path}", f"export.input={onnx_path}",
                   timeout=300)
    assert proc.returncode == 2 and "not a PyTorch checkpoint" in proc.stderr
    proc = run_cli("stage=export", "experiment=smoke", f"results_dir={tmp_path}", f"export.input={qat_pt}",
                   "export.half=true", timeout=300)
    assert proc.returncode == 2 and "QAT model" in proc.stderr and "Traceback" not in proc.stderr


def test_toposort_orders_producers_first():
    from onnx import TensorProto, helper

    from stages.export import _toposort

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    nodes = [helper.make_node("Relu", ["b"], ["y"], name="last"), helper.make_node("Neg", ["a"], ["b"], name="mid"),
             helper.make_node("Abs", ["x"], ["a"], name="first")]
    graph = helper.make_graph(nodes, "g", [x], [y])
    _toposort(graph)
    assert [n.name for n in graph.node] == ["first", "mid", "last"]
    onnx.checker.check_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_a_qat_model_exported_at_another_size_gets_its_activation_ranges_measured_there(
        qat_export, qat_pt, tiny_data_yaml, tmp_path):
    from pipeline import qat
    from pipeline.engines.common import load_batch, split_images

    # The measurement itself: the first conv's input is the image, so its range is the mean over the
    # batches of the 99.99th percentile of the image values; weight ranges (what QAT trained) stay.
    model = qat.load(qat_pt)
    weights = {n: m.amax.clone() for n, m in model.named_modules() if n.endswith("weight_quantizer") and m.is_enabled}
    x = load_batch(split_images(tiny_data_yaml, "train")[:4], (96, 96))

    def pct(a: np.ndarray) -> float:
        v = np.sort(np.abs(a).ravel())
        return float(v[round(v.size * qat.RECALIBRATION_PERCENTILE / 100) - 1])

    assert qat.recalibrate_activations(model, [x[:2], x[2:]]) == len(qat.activation_quantisers(model)) > 0
    first = qat.activation_quantisers(model)[0]
    assert float(first.amax) == pytest.approx((pct(x[:2]) + pct(x[2:])) / 2, rel=1e-4)
    qat.recalibrate_activations(model, [x * 0.5])
    assert float(first.amax) == pytest.approx(pct(x) * 0.5, rel=1e-4)
    assert all(np.array_equal(m.amax, weights[n]) for n, m in model.named_modules() if n in weights)

    # The stage: auto recalibrates at a size other than the trained one, and not at the trained one.
    assert "recalibrated" not in qat_export[1]["metrics"]
    record = stage(tmp_path, "export", f"export.input={qat_pt}", "export.imgsz=96", "export.evaluate=false",
                   *tiny_dataset(tiny_data_yaml))
    m = record["metrics"]
    assert m["recalibrated"] is True and m["recalibrated_imgsz"] == 96 and m["calib_images"] > 0
    assert m["recalibrated_quantisers"] > 0 and m["qdq_nodes"] > 0

    def scales(proto: onnx.ModelProto) -> list[float]:
        init = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
        return [float(init[n.input[1]]) for n in proto.graph.node
                if n.op_type == "QuantizeLinear" and n.input[1] in init and init[n.input[1]].size == 1]

    trained = scales(onnx.load(str(_onnx_of(*qat_export))))
    assert scales(onnx.load(str(_onnx_of(tmp_path, record)))) != trained
