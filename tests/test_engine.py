"""stage=engine: ONNX Runtime INT8, OpenVINO (QDQ -> INT8, FP32 parity, NNCF PTQ), backend choice, TensorRT."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import yaml
from conftest import REPO, run_cli
from test_export import IMGSZ, _onnx_of, float_export, qat_export, qat_pt, stage  # noqa: F401 (fixtures)

from pipeline.engines import onnxruntime as ortb
from pipeline.engines import openvino as ovb
from pipeline.engines import select_backend
from pipeline.engines import tensorrt as trtb
from pipeline.engines.common import (
    decode_layer,
    folder_images,
    keep_float,
    load_batch,
    onnx_metadata,
)
from pipeline.errors import UserError
from pipeline.manifest import Manifest
from stages._shared import calibration_set

log = logging.getLogger("test")


def _out(results: Path, record: dict, role: str = "model") -> Path:
    return Manifest(results).abs(next(o for o in record["outputs"] if o["role"] == role)["path"])


def _val_batch(data_yaml: Path, n: int = 4) -> np.ndarray:
    return load_batch(folder_images(data_yaml.parent / "images" / "val")[:n], (IMGSZ, IMGSZ))


def test_onnxruntime_int8_engine_runs_and_is_evaluated(float_export, tiny_data_yaml):  # noqa: F811
    results, _ = float_export
    record = stage(results, "engine", "engine.backend=onnxruntime", "engine.precision=int8",
                   f"dataset.path={tiny_data_yaml.parent}", "dataset.name=tiny")
    m = record["metrics"]
    assert record["status"] == "succeeded" and m["backend"] == "onnxruntime"
    assert m["executed_precision"] == "int8" and m["int8_layers"] > 50  # read back from ORT's optimised graph
    assert 0.0 <= m["mAP50_95"] <= 1.0 and "source_mAP50_95" in m and m["latency_ms"] > 0
    assert m["calib_images"] == 16 and m["calib_source"].startswith("train split")
    assert m["max_abs_diff_vs_onnx"] > 0 and m["mean_rel_diff_vs_onnx"] < 0.5  # quantised, not broken
    assert m["params"] > 3_000_000 and m["size_mb"] < 0.5 * float_export[1]["metrics"]["size_mb"]

    path = _out(results, record)
    assert onnx_metadata(path)["names"] == {0: "red", 1: "blue"}  # loads like the float model
    graph = onnx.load(str(path)).graph
    head = decode_layer(n.name for n in graph.node)
    decode = [n for n in graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and keep_float(n.name, head)]
    quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    # Nothing the Detect decode computes (DFL, boxes in pixels next to scores) is ever quantised ...
    assert decode and not quantized & {o for n in decode for o in n.output}
    # ... while the head's class branch convolutions are.
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert any(set(n.input) & dequantized for n in graph.node if f"/model.{head}/cv3." in n.name and n.op_type == "Conv")


def test_openvino_runs_a_qdq_model_as_int8(qat_export, tiny_data_yaml):  # noqa: F811
    results, _ = qat_export
    record = stage(results, "engine", "engine.backend=openvino", f"dataset.path={tiny_data_yaml.parent}",
                   "dataset.name=tiny")
    m = record["metrics"]
    assert m["qdq_input"] and m["quantization"].startswith("qat") and "calib_images" not in m  # no recalibration
    # Most compute layers run in int8: u8 activations x i8 weights on VNNI/AVX2, i8 x i8 on AMX; the
    # Detect decode stays float.
    assert m["executed_precision"] == "int8" and m["int8_layers"] > m["compute_layers"] / 2, m["runtime_precisions"]
    assert 0.0 <= m["mAP50_95"] <= 1.0 and m["latency_ms"] > 0 and m["openvino_version"] and m["cpu_model"]
    assert m["cpu_int8_vnni"] in (True, False, None)
    # 7-bit weight steps by default: no int16 saturation even without VNNI, so OpenVINO's INT8 agrees
    # with ONNX Runtime on the graph it read, whatever this CPU is.
    assert m["overflow_fix"] is True and m["overflow_fix_layers"] > 50
    assert m["mean_rel_diff_vs_onnx"] < 0.01, m["mean_rel_diff_vs_onnx"]
    assert not (record["run_dir"] and list(Manifest(results).abs(record["run_dir"]).glob("*.onnx")))  # scratch removed
    roles = {o["role"]: o for o in record["outputs"]}
    assert set(roles) == {"model", "ir_xml", "ir_bin"} and all(len(o["sha256"]) == 64 for o in roles.values())
    manifest = Manifest(results)
    for entry in roles.values():
        manifest.verify_artifact(entry)  # evaluating the folder left it untouched
    folder = _out(results, record)
    assert folder.name.endswith("_openvino_model")
    assert (folder / "model.bin").stat().st_size < 0.5 * _onnx_of(*qat_export).stat().st_size  # INT8 weights
    assert yaml.safe_load((folder / "metadata.yaml").read_text())["names"] == {0: "red", 1: "blue"}


def test_overflow_fix_widens_weight_steps_only(qat_export, tmp_path):  # noqa: F811
    src = onnx.load(str(_onnx_of(*qat_export)))
    inits = {i.name for i in src.graph.initializer}

    def scales(graph):
        values = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
        consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in graph.graph.node
                  if n.op_type == "Constant"}
        return [(n.op_type, n.input[0] in inits, np.asarray({**values, **consts}[n.input[1]]))
                for n in graph.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]

    before = scales(src)
    widened = ovb.widen_weight_steps(src)
    after = scales(src)
    weights = sum(1 for op, is_weight, _ in before if op == "QuantizeLinear" and is_weight)
    assert widened == weights > 50
    for (op, is_weight, old), (_, _, new) in zip(before, after, strict=True):
        if op == "QuantizeLinear" and is_weight:
            np.testing.assert_allclose(new, 2 * old)  # weights: 7-bit steps
        elif op == "QuantizeLinear":
            np.testing.assert_array_equal(new, old)  # activations: the trained scales, untouched
    q_of = {n.output[0]: n for n in src.graph.node if n.op_type == "QuantizeLinear"}
    for dq in (n for n in src.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in q_of):
        assert dq.input[1] == q_of[dq.input[0]].input[1]  # each pair still shares one scale
    # Weights already on -64..64 codes (widened once, or QAT with retrain.qat_7bit_weights) are left alone.
    assert ovb.widen_weight_steps(src) == 0
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(after, scales(src), strict=True))
    fresh = onnx.load(str(_onnx_of(*qat_export)))
    assert ovb.widen_weight_steps(fresh, first_only=True) == 1


def test_openvino_fp32_matches_onnxruntime_on_the_same_batch(float_export, tiny_data_yaml, tmp_path):  # noqa: F811
    src = _onnx_of(*float_export)
    folder = tmp_path / "fp32_openvino_model"
    ovb.build(src, folder, "fp32", False, None, onnx_metadata(src), log)
    x = _val_batch(tiny_data_yaml)
    compiled = ovb.compile_static(folder / "model.xml", x.shape, 2)
    assert ovb.executed_precision(compiled)["executed_precision"] == "fp32"
    ref = ortb.run(ortb.session(src), x)
    assert np.abs(ovb.infer(compiled, x) - ref).max() <= 1e-3


def test_openvino_int8_ptq_calibrates_on_real_images_and_keeps_decode_float(float_export, tiny_data_yaml):  # noqa: F811
    results, _ = float_export
    record = stage(results, "engine", "engine.backend=openvino", "engine.precision=int8", "engine.evaluate=false",
                   f"dataset.path={tiny_data_yaml.parent}", "dataset.name=tiny")
    m = record["metrics"]
    assert m["quantization"] == "nncf ptq" and m["executed_precision"] == "int8" and m["calib_images"] == 16
    compiled = ovb.compile_static(_out(results, record) / "model.xml", (1, 3, IMGSZ, IMGSZ), 2)
    dfl = [op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ops()
           if "/dfl/" in op.get_rt_info()["originalLayersNames"].astype(str)
           and op.get_rt_info()["layerType"].astype(str) == "Convolution"]
    assert dfl == ["f32"]


def test_auto_picks_tensorrt_then_openvino_then_onnxruntime(monkeypatch):
    monkeypatch.setattr(trtb, "available", lambda: (True, "TensorRT 10.9 imports and a CUDA GPU is present"))
    assert select_backend("auto")[0] == "tensorrt"
    monkeypatch.setattr(trtb, "available", lambda: (False, "no CUDA GPU is visible"))
    monkeypatch.setattr(ovb, "available", lambda: True)
    backend, why = select_backend("auto")
    assert backend == "openvino" and "no CUDA GPU" in why
    monkeypatch.setattr(ovb, "available", lambda: False)
    backend, why = select_backend("auto")
    assert backend == "onnxruntime" and "OpenVINO does not import" in why
    assert select_backend("openvino") == ("openvino", "engine.backend=openvino")


def test_openvino_missing_exits_2(float_export):  # noqa: F811
    results, _ = float_export
    code = ("import sys; sys.modules['openvino'] = None\n"
            "from pipeline.__main__ import main\n"
            f"sys.argv = ['pipeline', 'stage=engine', 'experiment=smoke', 'results_dir={results}', "
            "'engine.backend=openvino']\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "pip install openvino" in proc.stderr and "engine.backend=onnxruntime" in proc.stderr


@pytest.mark.skipif(trtb.available()[0], reason="TensorRT and a GPU are present here")
def test_tensorrt_missing_exits_2_with_how_to_get_it(float_export):  # noqa: F811
    results, _ = float_export
    proc = run_cli("stage=engine", "experiment=smoke", f"results_dir={results}", "engine.backend=tensorrt", timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for hint in ("`gpu` extra", "Docker image", "engine.backend=openvino", "engine.backend=onnxruntime"):
        assert hint in proc.stderr


def test_calibration_uses_real_images_or_refuses(tiny_data_yaml, tmp_path):
    ctx = SimpleNamespace(dataset=lambda: SimpleNamespace(data_yaml=tiny_data_yaml), log=log, warnings=[])
    ctx.warn = ctx.warnings.append
    cfg = SimpleNamespace(seed=0, engine=SimpleNamespace(calib_dir=None, calib_images=10, calib_batch=4))
    calib = calibration_set(cfg, ctx, (IMGSZ, IMGSZ))
    assert len(calib) == 10 and all(p.parent.name == "train" for p in calib.paths)
    batches = list(calib.batches())
    assert [len(b) for b in batches] == [4, 4, 2] and float(batches[0].std()) > 0.05
    cfg.engine.calib_images = 1000
    assert len(calibration_set(cfg, ctx, (IMGSZ, IMGSZ))) == 24 and ctx.warnings  # all it has, loudly
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        cfg.engine.calib_dir = str(folder)
        with pytest.raises(UserError, match="engine.calib_dir"):
            calibration_set(cfg, ctx, (IMGSZ, IMGSZ))


def test_decode_rule_keeps_head_decode_and_nms_float():
    names = ["/model.0/conv/Conv", "/model.21/cv2/conv/Conv", "/model.22/cv2.0/cv2.0.2/Conv",
             "/model.22/cv3.1/cv3.1.0/conv/Conv", "/model.22/dfl/conv/Conv", "/model.22/Sigmoid", "/model.22/Concat_3",
             "/model/model.22/cv3.2/cv3.2.2/Conv", "/NonMaxSuppression"]
    head = decode_layer(names)
    assert head == 22
    assert [keep_float(n, head) for n in names] == [False, False, False, False, True, True, True, False, True]


def test_openvino_and_nncf_do_not_phone_home(float_export, tmp_path):  # noqa: F811
    src = _onnx_of(*float_export)
    net_log = tmp_path / "net.log"
    # Telemetry sends from forked processes, so the trap appends to a file that children share.
    script = textwrap.dedent(f"""
        import socket, sys
        def trap(*args, **kwargs):
            open({str(net_log)!r}, "a").write(repr(args[:2]) + "\\n")
            raise OSError("network blocked by test")
        socket.getaddrinfo = trap
        socket.socket.connect = lambda self, addr: trap(addr)
        sys.path.insert(0, {str(REPO)!r})
        import pipeline  # noqa: F401
        import numpy as np, openvino as ov, nncf
        model = ov.convert_model({str(src)!r})
        model.reshape([1, 3, {IMGSZ}, {IMGSZ}])
        data = nncf.Dataset([np.full((1, 3, {IMGSZ}, {IMGSZ}), v, np.float32) for v in (0.2, 0.8)])
        nncf.quantize(model, data, subset_size=2)
        ov.Core().compile_model(ov.Core().read_model({str(src)!r}), "CPU")
        print("done")
    """)
    home = tmp_path / "home"  # where the telemetry would keep its client id and consent file
    home.mkdir()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HOME": str(home)})
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-2000:]
    assert not net_log.exists(), net_log.read_text()
    assert not any(home.iterdir())


@pytest.mark.skipif(trtb.available()[0], reason="TensorRT is usable here: the engine would be run")
def test_engine_file_without_tensorrt_is_a_user_error(tmp_path, tiny_data_yaml):
    """evaluate and infer on a .engine where TensorRT cannot run: one line naming the file, no traceback."""
    from pipeline.errors import UserError
    from pipeline.evaluation import evaluate
    from pipeline.predict import Predictor

    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match=r"model\.engine \(a TensorRT engine\) cannot run here"):
        evaluate(engine, tiny_data_yaml)
    with pytest.raises(UserError, match=r"model\.engine \(a TensorRT engine\) cannot run here"):
        Predictor(engine, device="cpu")
