"""TensorRT 10/11 backend: everything around the builder on CPUs (version dispatch, profiles, inspector
parsing, PTQ to QDQ, a fake `tensorrt` module driving build()), and real builds on GPU hosts."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock

import numpy as np
import onnx
import pytest
from omegaconf import OmegaConf
from test_export import _onnx_of, float_export, qat_export, qat_pt, stage  # noqa: F401 (fixtures)

from pipeline.engines import BACKENDS, onnx_ptq
from pipeline.engines import tensorrt as trtb
from pipeline.engines.common import (
    CalibrationSet,
    decode_layer,
    keep_float,
    load_batch,
    qdq_nodes,
    split_images,
)
from pipeline.errors import UserError
from pipeline.manifest import Manifest

log = logging.getLogger("test")


def _out(results: Path, record: dict, role: str = "model") -> Path:
    return Manifest(results).abs(next(o for o in record["outputs"] if o["role"] == role)["path"])


# -- version dispatch -----------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["10.0.1", "10.9.0.34", "10.13.3.9"])
def test_tensorrt_10_builds_weakly_typed_with_precision_flags(version):
    fp16 = trtb.build_plan(version, "fp16", qdq=False)
    assert (fp16.typing, fp16.autocast_fp16, fp16.ptq, fp16.flags, fp16.decode_fp32) == ("weak", False, False,
                                                                                         ("FP16",), True)
    ptq = trtb.build_plan(version, "int8", qdq=False)
    assert ptq.ptq and set(ptq.flags) == {"INT8", "FP16"} and not ptq.autocast_fp16
    qat = trtb.build_plan(version, "int8", qdq=True)
    assert not qat.ptq and set(qat.flags) == {"INT8", "FP16"}
    fp32 = trtb.build_plan(version, "fp32", qdq=False)
    assert fp32.flags == () and not fp32.decode_fp32
    assert fp16.record()["tensorrt_path"] == "10.x"


@pytest.mark.parametrize("version", ["11.0.0", "11.4.0.5", "12.1"])
def test_tensorrt_11_builds_strongly_typed_with_fp16_in_the_graph(version):
    for precision, qdq in (("fp16", False), ("int8", False), ("int8", True)):
        plan = trtb.build_plan(version, precision, qdq)
        assert plan.typing == "strong" and plan.flags == () and plan.autocast_fp16 and not plan.decode_fp32
        assert plan.ptq is (precision == "int8" and not qdq)
    fp32 = trtb.build_plan(version, "fp32", qdq=False)
    assert fp32.typing == "strong" and not fp32.autocast_fp16
    assert trtb.build_plan(version, "int8", True).record() == {
        "typing": "strong", "autocast_fp16": True, "ptq": None, "builder_flags": [],
        "tensorrt_path": f"{version.split('.')[0]}.x"}


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0"])
def test_tensorrt_before_10_is_refused(version):
    with pytest.raises(UserError, match=r"TensorRT 10 or 11"):
        trtb.build_plan(version, "fp16", qdq=False)


def test_unknown_precision_names_the_key():
    with pytest.raises(UserError, match="engine.precision=bf16"):
        trtb.build_plan("10.9.0", "bf16", qdq=False)


# -- optimisation profile ---------------------------------------------------------------------------
def _ultralytics_rect_shapes(hw: list[tuple[int, int]], imgsz: int, stride: int, batch: int) -> list[tuple[int, int]]:
    """Batch shapes of Ultralytics' own rectangular validation (BaseDataset.set_rectangle, val padding)."""
    from ultralytics.data.base import BaseDataset

    ds = SimpleNamespace(ni=len(hw), batch_size=batch, labels=[{"shape": s} for s in hw],
                         im_files=[f"{i}.jpg" for i in range(len(hw))], imgsz=imgsz, stride=stride, pad=0.5)
    BaseDataset.set_rectangle(ds)
    return [tuple(int(v) for v in s) for s in ds.batch_shapes]


def test_profile_covers_ultralytics_rectangular_validation():
    sizes = [(100, 2000), (2000, 100), (480, 640), (640, 480), (500, 500), (1080, 1920), (37, 41)]
    profile = trtb.profile_shapes((640, 640), 32, 1, 1, 8, rect=True)
    assert profile == {"min": (1, 3, 32, 32), "opt": (1, 3, 640, 640), "max": (8, 3, 672, 672)}
    shapes = _ultralytics_rect_shapes(sizes, 640, 32, batch=1)
    for h, w in shapes:
        assert profile["min"][2] <= h <= profile["max"][2] and profile["min"][3] <= w <= profile["max"][3], (h, w)
    assert max(max(s) for s in shapes) > 640  # an imgsz-only profile (the old one) refused these batches


def test_profile_for_a_fixed_size_or_square_run():
    profile = trtb.profile_shapes((320, 480), 32, 2, 4, 16, rect=False)
    assert profile == {"min": (2, 3, 320, 480), "opt": (4, 3, 320, 480), "max": (16, 3, 320, 480)}
    # Evaluation runs at max(imgsz): the rectangular range follows the long side.
    assert trtb.profile_shapes((320, 480), 32, 1, 1, 8, rect=True)["max"] == (8, 3, 512, 512)


@pytest.mark.parametrize("batches", [(2, 1, 8), (1, 9, 8), (0, 1, 8)])
def test_profile_batches_out_of_order_name_the_keys(batches):
    with pytest.raises(UserError, match=r"engine\.min_batch=.*engine\.max_batch="):
        trtb.profile_shapes((640, 640), 32, *batches, rect=True)


def test_evaluation_batch_is_clamped_to_the_profile():
    profile = trtb.profile_shapes((640, 640), 32, 1, 1, 8, rect=True)
    assert trtb.evaluation_batch(16, profile) == 8  # the default config: evaluate.batch=16, engine.max_batch=8
    assert trtb.evaluation_batch(4, profile) == 4


def test_evaluate_clamps_its_batch_to_an_engine_profile(monkeypatch, tmp_path, tiny_data_yaml):
    """stage=evaluate on an engine of ours: evaluate.batch above the profile's max batch is lowered to it."""
    from pipeline import evaluation

    engine = tmp_path / "model.engine"
    header = json.dumps({"imgsz": [64, 64], "pipeline": {"max_batch": 4}}).encode()
    engine.write_bytes(len(header).to_bytes(4, "little") + header + b"plan")
    monkeypatch.setattr(trtb, "check_compatible", lambda path, strict=True: None)
    seen = {}

    class Stop(Exception):
        pass

    def recorder(save_dir, args):
        seen.update(batch=args["batch"])
        raise Stop

    monkeypatch.setattr(evaluation, "_recorder_class", lambda: recorder)
    for asked, used in ((16, 4), (2, 2)):
        with pytest.raises(Stop):
            evaluation.evaluate(engine, tiny_data_yaml, batch=asked)
        assert seen["batch"] == used


def test_engine_stage_evaluates_at_the_clamped_batch(monkeypatch, tmp_path):
    """The engine stage, driving the TensorRT backend, hands the evaluator the profile's max batch, not evaluate.batch."""
    import stages.engine as stage_mod

    cfg = OmegaConf.create({"engine": {"threads": 1, "latency_runs": 1, "evaluate": True},
                            "evaluate": {"batch": 16}})
    batch = np.zeros((8, 3, 64, 64), np.float32)
    profile = {"min": [1, 3, 32, 32], "opt": [1, 3, 64, 64], "max": [8, 3, 96, 96]}
    built = {"sidecar": tmp_path / "m.json", "timing_cache": tmp_path / "m.timing.cache", "qdq_onnx": None,
             "built_onnx": tmp_path / "m.fp16.onnx", "profile": profile, "typing": "strong",
             "executed_precision": "fp16", "int8_layers": 0, "compute_layers": 3, "layer_precision": {"fp16": 3}}
    runner = MagicMock(fixed_batch=None, return_value=batch)
    runner.latency_ms.return_value = 1.5
    monkeypatch.setattr(stage_mod, "_reference", lambda *a: (batch, batch))
    monkeypatch.setattr(stage_mod, "real_batch", lambda ctx, imgsz, n: batch[:n])
    monkeypatch.setattr(trtb, "build", lambda *a, **k: dict(built))
    monkeypatch.setattr(trtb, "check_compatible", lambda path: None)
    monkeypatch.setattr(trtb, "Runner", lambda path: runner)
    seen = {}
    monkeypatch.setattr(stage_mod, "evaluate_artifact",
                        lambda cfg, ctx, path, imgsz, device, batch: seen.update(batch=batch) or {"mAP50_95": 0.5})
    ctx = SimpleNamespace(run_dir=tmp_path, log=log, warn=log.warning, device="0")
    outputs, metrics = stage_mod.deploy(cfg, ctx, BACKENDS["tensorrt"], tmp_path / "m.onnx", False, "fp16", None,
                                        (64, 64), {})
    assert seen["batch"] == 8 and metrics["eval_batch"] == 8
    assert metrics["max_abs_diff_vs_onnx"] == 0.0 and metrics["typing"] == "strong"
    assert [r for r, _ in outputs] == ["model", "sidecar", "timing_cache"]


# -- inspector ---------------------------------------------------------------------------------
# What IEngineInspector.get_engine_information(LayerInformationFormat.JSON) returns for a small QDQ
# YOLO at detailed verbosity: 10.x folds the type into "Format/Datatype" and lists "Bindings".
INSPECTOR_10 = {
    "Layers": [
        {"Name": "Reformatting CopyNode for Input Tensor 0 to /model.0/conv/Conv", "LayerType": "Reformat",
         "Inputs": [{"Name": "images", "Location": "Device", "Dimensions": [1, 3, 640, 640],
                     "Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Name": "images copy", "Location": "Device", "Dimensions": [1, 3, 640, 640],
                      "Format/Datatype": "Four wide channel vectorized row major Int8 format"}],
         "ParameterType": "Reformat", "Origin": "REFORMAT", "TacticValue": "0x0000000000000000"},
        {"Name": "/model.0/conv/Conv + PWN(/model.0/act/Sigmoid, /model.0/act/Mul)", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "images copy", "Location": "Device", "Dimensions": [1, 3, 640, 640],
                     "Format/Datatype": "Four wide channel vectorized row major Int8 format"}],
         "Outputs": [{"Name": "/model.0/act/Mul_output_0", "Location": "Device", "Dimensions": [1, 16, 320, 320],
                      "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
         "ParameterType": "Convolution", "Kernel": [3, 3], "Stride": [2, 2], "Groups": 1,
         "TacticName": "sm80_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32", "TacticValue": "0x1a2b"},
        {"Name": "/model.22/cv2.0/cv2.0.2/Conv", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "/model.22/cv2.0/cv2.0.1/act/Mul_output_0", "Location": "Device",
                     "Dimensions": [1, 64, 80, 80], "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
         "Outputs": [{"Name": "/model.22/cv2.0/cv2.0.2/Conv_output_0", "Location": "Device",
                      "Dimensions": [1, 64, 80, 80], "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
         "ParameterType": "Convolution", "TacticValue": "0x3c4d"},
        {"Name": "/model.22/dfl/Softmax", "LayerType": "CaskSoftMax",
         "Inputs": [{"Name": "a", "Dimensions": [1, 4, 16, 8400], "Format/Datatype": "Row major linear FP16 format"}],
         "Outputs": [{"Name": "b", "Dimensions": [1, 4, 16, 8400], "Format/Datatype": "Row major linear FP16 format"}]},
        {"Name": "/model.22/Sigmoid", "LayerType": "PointWiseV2",
         "Inputs": [{"Name": "c", "Dimensions": [1, 2, 8400], "Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Name": "d", "Dimensions": [1, 2, 8400], "Format/Datatype": "Row major linear FP32"}]},
        {"Name": "Reformatting CopyNode for Output Tensor 0 to /model.22/Concat_5", "LayerType": "Reformat",
         "Inputs": [{"Name": "e", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
         "Outputs": [{"Name": "output0", "Format/Datatype": "Row major linear FP32"}]},
        {"Name": "/model.22/Shape", "LayerType": "Shape",
         "Inputs": [], "Outputs": [{"Name": "s", "Format/Datatype": "Row major linear Int64"}]},
    ],
    "Bindings": ["images", "output0"],
}
# 11.x: "DataType" apart from "Format", and "I/O Tensors" objects instead of "Bindings".
INSPECTOR_11 = {
    "Layers": [
        {"Name": "/model.0/conv/Conv", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "x", "DataType": "Int8", "Format": "Thirty-two wide channel vectorized row major format"}],
         "Outputs": [{"Name": "y", "DataType": "Int8", "Format": "Thirty-two wide channel vectorized row major format"}]},
        {"Name": "/model.22/dfl/conv/Conv", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "y", "DataType": "Half", "Format": "Channel major format where channel % 8 == 0"}],
         "Outputs": [{"Name": "z", "DataType": "Half", "Format": "Channel major format where channel % 8 == 0"}]},
        {"Name": "/model.22/Mul_2", "LayerType": "PointWiseV2",
         "Inputs": [{"Name": "z", "DataType": "Float", "Format": "Row major linear format"}],
         "Outputs": [{"Name": "output0", "DataType": "Float", "Format": "Row major linear format"}]},
        {"Name": "Reformatting CopyNode for Input Tensor 0 to /model.22/Mul_2", "LayerType": "Reformat",
         "Inputs": [{"Name": "z", "DataType": "Half"}], "Outputs": [{"Name": "z'", "DataType": "Float"}]},
    ],
    "I/O Tensors": [{"Name": "images", "IOMode": "Input", "DataType": "Float", "Dimensions": [-1, 3, -1, -1]},
                    {"Name": "output0", "IOMode": "Output", "DataType": "Float", "Dimensions": [-1, 6, -1]}],
}


def test_inspector_json_of_tensorrt_10_counts_layers_by_precision():
    counts = trtb.layer_precisions(json.dumps(INSPECTOR_10))
    # int8: the stem conv (INT8 in and out) and the head conv that reads INT8 and writes FP16.
    assert counts == {"layers": 7, "int8": 2, "fp16": 1, "fp32": 1, "other": 1, "reformat": 2}
    assert trtb.executed_precision(counts) == "int8"


def test_inspector_json_of_tensorrt_11_reads_the_separate_datatype():
    counts = trtb.layer_precisions(json.dumps(INSPECTOR_11))
    assert counts == {"layers": 4, "int8": 1, "fp16": 1, "fp32": 1, "other": 0, "reformat": 1}


def test_inspector_without_detail_gives_no_precision():
    counts = trtb.layer_precisions(json.dumps({"Layers": ["/model.0/conv/Conv", "/model.22/Sigmoid"],
                                               "Bindings": ["images", "output0"]}))
    assert counts["layers"] == 2 and counts["unknown"] == 2 and trtb.executed_precision(counts) is None
    fp16_only = trtb.layer_precisions(json.dumps({"Layers": INSPECTOR_10["Layers"][3:5]}))
    assert trtb.executed_precision(fp16_only) == "fp16"


# -- build() driven by a fake tensorrt module ----------------------------------------------------
def _fake_trt(version: str, accept_shape: bool = True) -> MagicMock:
    trt = MagicMock(name="tensorrt")
    trt.__version__ = version
    trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED = 1
    network = trt.Builder.return_value.create_network.return_value
    network.get_input.return_value.shape = (-1, 3, -1, -1)
    network.get_input.return_value.name = "images"
    layers = []
    for name in ("/model.0/conv/Conv", "/model.22/cv2.0/cv2.0.2/Conv", "/model.22/Sigmoid"):
        layer = MagicMock(num_outputs=1)
        layer.name = name
        layer.get_output.return_value.dtype = trt.float32
        layers.append(layer)
    network.num_layers = len(layers)
    network.get_layer.side_effect = layers.__getitem__
    trt.OnnxParser.return_value.parse_from_file.return_value = True
    config = trt.Builder.return_value.create_builder_config.return_value
    config.get_timing_cache.return_value.serialize.return_value = b"timings"
    trt.Builder.return_value.build_serialized_network.return_value = b"plan"
    engine = trt.Runtime.return_value.deserialize_cuda_engine.return_value
    engine.num_io_tensors = 2
    engine.get_tensor_name.side_effect = ["images", "output0"].__getitem__
    engine.get_tensor_mode.side_effect = lambda n: trt.TensorIOMode.INPUT if n == "images" else trt.TensorIOMode.OUTPUT
    engine.create_execution_context.return_value.set_input_shape.return_value = accept_shape
    engine.create_engine_inspector.return_value.get_engine_information.return_value = json.dumps(INSPECTOR_10)
    return trt


def _drive_build(monkeypatch, tmp_path: Path, trt: MagicMock, precision: str, qdq: bool) -> tuple[dict, list]:
    calls: list = []
    monkeypatch.setattr(trtb, "require", lambda *a: trt)
    monkeypatch.setattr(trtb, "device_facts", lambda: {"tensorrt_version": trt.__version__, "gpu_name": "H200",
                                                       "compute_capability": "9.0"})

    def ptq(src, out, calib, log):
        calls.append(("ptq", src, out))
        return {"ptq_qdq_nodes": 10}

    def cast(src, out, sample, log):
        calls.append(("autocast", src, out))
        return {}

    monkeypatch.setattr(onnx_ptq, "quantize_qdq", ptq)
    monkeypatch.setattr(onnx_ptq, "autocast_fp16", cast)
    e = SimpleNamespace(workspace_gb=1.0, min_batch=1, opt_batch=1, max_batch=8)
    calib = CalibrationSet([tmp_path / "a.jpg"], (640, 640), 1, "test images")
    info = trtb.build(tmp_path / "model.onnx", tmp_path / "model.engine", precision, qdq, calib, e, (640, 640),
                      {"stride": 32}, log, sample=np.zeros((1, 3, 640, 640), np.float32))
    return info, calls


def _flags_set(trt: MagicMock) -> list:
    config = trt.Builder.return_value.create_builder_config.return_value
    return [c.args[0] for c in config.set_flag.call_args_list]


@pytest.mark.parametrize("precision,qdq", [("int8", False), ("int8", True), ("fp16", False)])
def test_tensorrt_11_build_sets_no_precision_flag_and_parses_the_autocast_graph(monkeypatch, tmp_path, precision, qdq):
    trt = _fake_trt("11.4.0.5")
    info, calls = _drive_build(monkeypatch, tmp_path, trt, precision, qdq)
    assert trt.BuilderFlag.INT8 not in _flags_set(trt) and trt.BuilderFlag.FP16 not in _flags_set(trt)
    trt.Builder.return_value.create_network.assert_called_once_with(1 << 1)  # STRONGLY_TYPED
    assert [c[0] for c in calls] == (["ptq"] if not qdq and precision == "int8" else []) + ["autocast"]
    parsed = trt.OnnxParser.return_value.parse_from_file.call_args.args[0]
    assert parsed == str(tmp_path / "model.fp16.onnx")
    assert info["typing"] == "strong" and info["autocast_fp16"] is True
    assert info["profile"] == {"min": [1, 3, 32, 32], "opt": [1, 3, 640, 640], "max": [8, 3, 672, 672]}
    assert info["layer_precision"]["int8"] == 2 and info["executed_precision"] == "int8"
    assert info["int8_layers"] == 2 and info["compute_layers"] == 5  # 7 layers, 2 of them reformats
    assert (tmp_path / "model.timing.cache").read_bytes() == b"timings"
    sidecar = json.loads((tmp_path / "model.json").read_text())
    assert sidecar["typing"] == "strong" and sidecar["built_from"] == "model.fp16.onnx"
    offset, meta = trtb._header(tmp_path / "model.engine")
    assert meta["pipeline"]["max_batch"] == 8 and (tmp_path / "model.engine").read_bytes()[offset:] == b"plan"
    assert trtb.profile_max_batch(tmp_path / "model.engine") == 8  # what stage=evaluate clamps its batch to
    profile = trt.Builder.return_value.create_optimization_profile.return_value
    profile.set_shape.assert_called_once_with("images", (1, 3, 32, 32), (1, 3, 640, 640), (8, 3, 672, 672))


def test_tensorrt_10_build_is_weakly_typed_with_int8_and_fp16_flags(monkeypatch, tmp_path):
    trt = _fake_trt("10.9.0.34")
    info, calls = _drive_build(monkeypatch, tmp_path, trt, "int8", False)
    assert set(_flags_set(trt)) == {trt.BuilderFlag.INT8, trt.BuilderFlag.FP16,
                                    trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS}
    trt.Builder.return_value.create_network.assert_called_once_with(0)
    assert [c[0] for c in calls] == ["ptq"]  # PTQ to QDQ, no AutoCast, no calibrator
    assert trt.OnnxParser.return_value.parse_from_file.call_args.args[0] == str(tmp_path / "model.qdq.onnx")
    config = trt.Builder.return_value.create_builder_config.return_value
    assert "int8_calibrator" not in vars(config)  # explicit quantisation only: no calibrator is ever set
    layers = [trt.Builder.return_value.create_network.return_value.get_layer(i) for i in range(3)]
    assert layers[2].precision == trt.float32  # the decode's sigmoid asked for FP32
    assert layers[1].precision != trt.float32 and layers[0].precision != trt.float32  # cv2 convs and backbone free
    assert info["typing"] == "weak" and info["autocast_fp16"] is False and info["decode_fp32_layers"] == 1
    assert info["qdq_onnx"] == tmp_path / "model.qdq.onnx"


def test_a_refused_input_shape_raises(monkeypatch, tmp_path):
    trt = _fake_trt("11.4.0.5", accept_shape=False)
    with pytest.raises(RuntimeError, match="refused the profile's own opt shape"):
        _drive_build(monkeypatch, tmp_path, trt, "fp16", False)


def _fake_runner(monkeypatch, tmp_path: Path, trt: MagicMock) -> trtb.Runner:
    import torch

    engine = tmp_path / "model.engine"
    engine.write_bytes(b"plan")
    monkeypatch.setattr(trtb, "require", lambda *a: trt)
    monkeypatch.setattr(torch.cuda, "Stream", MagicMock())
    trt.Runtime.return_value.deserialize_cuda_engine.return_value.get_tensor_shape.return_value = (-1, 3, -1, -1)
    trt.Runtime.return_value.deserialize_cuda_engine.return_value.get_tensor_profile_shape.return_value = [
        (1, 3, 32, 32), (1, 3, 640, 640), (8, 3, 672, 672)]
    return trtb.Runner(engine)


def test_runner_raises_when_set_input_shape_refuses(monkeypatch, tmp_path):
    runner = _fake_runner(monkeypatch, tmp_path, _fake_trt("10.9.0.34", accept_shape=False))
    assert runner.max_batch == 8 and runner.fixed_batch is None
    with pytest.raises(RuntimeError, match=r"refused input shape \(16, 3, 640, 640\): outside"):
        runner.bind(np.zeros((16, 3, 640, 640), np.float32))


def test_runner_raises_when_execute_async_v3_fails(monkeypatch, tmp_path):
    runner = _fake_runner(monkeypatch, tmp_path, _fake_trt("11.4.0.5"))
    runner.context.execute_async_v3.return_value = False
    with pytest.raises(RuntimeError, match="execute_async_v3 returned False"):
        runner.enqueue()
    runner.stream.synchronize.assert_not_called()  # nothing is waited for (or timed) after a refused enqueue


# -- ModelOpt ONNX PTQ and AutoCast on a real exported model (CPU) ---------------------------------
def _modelopt_onnx_missing() -> str | None:
    try:
        import modelopt.onnx  # noqa: F401
    except ImportError as exc:
        return f"modelopt.onnx does not import here ({str(exc).splitlines()[0]}); it needs nvidia-modelopt[onnx]"
    return None


needs_modelopt_onnx = pytest.mark.skipif(_modelopt_onnx_missing() is not None, reason=str(_modelopt_onnx_missing()))


def _produced_by(model: onnx.ModelProto) -> dict[str, str]:
    return {o: n.op_type for n in model.graph.node for o in n.output}


@needs_modelopt_onnx
def test_ptq_gives_a_qdq_graph_with_the_decode_float(float_export, tiny_data_yaml, tmp_path):  # noqa: F811
    results, record = float_export
    src = _onnx_of(results, record)
    calib = CalibrationSet(split_images(tiny_data_yaml, "train")[:16], (64, 64), 4, "train split")
    out = tmp_path / "model.qdq.onnx"
    info = onnx_ptq.quantize_qdq(src, out, calib, log)
    model = onnx.load(str(out))
    assert info["ptq_qdq_nodes"] == qdq_nodes(model) > 0
    names = [n.name for n in model.graph.node]
    head = decode_layer(names)
    producer = _produced_by(model)
    quantised = [n for n in model.graph.node if n.op_type == "Conv" and not keep_float(n.name, head)
                 and producer.get(n.input[0]) == "DequantizeLinear"]
    assert quantised  # the backbone and the head's cv2/cv3 convolutions read INT8
    for n in model.graph.node:
        # (Shape reads only a tensor's dimensions: a dequantised input changes nothing it computes)
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear", "Shape") and keep_float(n.name, head):
            assert not any(producer.get(i) == "DequantizeLinear" for i in n.input), n.name
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):  # symmetric, as TensorRT requires
        if len(q.input) > 2:
            zp = next(t for t in model.graph.initializer if t.name == q.input[2])
            assert not onnx.numpy_helper.to_array(zp).any()


@needs_modelopt_onnx
def test_autocast_keeps_io_and_decode_fp32(float_export, tiny_data_yaml, tmp_path):  # noqa: F811
    results, record = float_export
    src = _onnx_of(results, record)
    sample = load_batch(split_images(tiny_data_yaml, "val")[:2], (64, 64))
    out = tmp_path / "model.fp16.onnx"
    onnx_ptq.autocast_fp16(src, out, sample, log)
    model = onnx.load(str(out))
    f32 = onnx.TensorProto.FLOAT
    assert model.graph.input[0].type.tensor_type.elem_type == f32
    assert model.graph.output[0].type.tensor_type.elem_type == f32
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.output)}
    head = decode_layer(n.name for n in model.graph.node)
    decode = [n for n in model.graph.node if n.op_type != "Cast" and keep_float(n.name, head)]
    body = [n for n in model.graph.node if n.op_type == "Conv" and not keep_float(n.name, head)]
    # (decode outputs are f32, or integer for Shape/Gather of dimensions: never fp16)
    assert decode and not any(types.get(n.output[0]) == onnx.TensorProto.FLOAT16 for n in decode)
    assert any(types.get(n.output[0]) == onnx.TensorProto.FLOAT16 for n in body)


def _tiny_yolo_onnx(path: Path) -> Path:
    """A float graph named like an Ultralytics export: backbone conv, head cv2 conv, DFL conv, decode sigmoid."""
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 3, 1, 1], np.eye(3, dtype=np.float32).ravel().tolist())
    nodes = [helper.make_node("Conv", ["images", "w"], ["a"], name="/model.0/conv/Conv"),
             helper.make_node("Conv", ["a", "w"], ["b"], name="/model.22/cv2.0/cv2.0.2/Conv"),
             helper.make_node("Conv", ["b", "w"], ["c"], name="/model.22/dfl/conv/Conv"),
             helper.make_node("Sigmoid", ["c"], ["output0"], name="/model.22/Sigmoid")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                            ["batch", 3, "height", "width"])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, None)], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _modelopt_params(relative: str, function: str) -> set[str]:
    """Parameter names of a function in the installed ModelOpt, read from its source (no import needed)."""
    import ast
    import importlib.util

    root = Path(next(iter(importlib.util.find_spec("modelopt").submodule_search_locations)))
    tree = ast.parse((root / relative).read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    return {a.arg for a in (*fn.args.args, *fn.args.kwonlyargs)}


def test_ptq_and_autocast_call_modelopt_as_its_api_says(monkeypatch, tmp_path):
    """The calls onnx_ptq makes (checked against the installed ModelOpt's own signatures), on CPU
    without modelopt.onnx: real calibration batches, whole steps only, decode nodes excluded."""
    import sys
    import types

    src = _tiny_yolo_onnx(tmp_path / "model.onnx")
    calls: dict[str, dict] = {}

    def quantize(onnx_path, **kwargs):
        calls["quantize"] = {"onnx_path": onnx_path, **kwargs}
        onnx.save(onnx.load(onnx_path), kwargs["output_path"])

    def convert_to_mixed_precision(onnx_path, **kwargs):
        calls["autocast"] = {"onnx_path": onnx_path, **kwargs}
        return onnx.load(onnx_path)

    fake = types.ModuleType("modelopt.onnx")
    fake.quantization = types.SimpleNamespace(quantize=quantize)
    fake.autocast = types.SimpleNamespace(convert_to_mixed_precision=convert_to_mixed_precision)
    monkeypatch.setitem(sys.modules, "modelopt.onnx", fake)
    monkeypatch.setitem(sys.modules, "modelopt.onnx.quantization", fake.quantization)
    images = tmp_path / "images"
    images.mkdir()
    import cv2

    for i in range(7):
        cv2.imwrite(str(images / f"{i}.jpg"), np.full((48, 80, 3), 30 * i, np.uint8))
    calib = CalibrationSet(sorted(images.glob("*.jpg")), (64, 64), 3, str(images))
    info = onnx_ptq.quantize_qdq(src, tmp_path / "model.qdq.onnx", calib, log)
    q = calls["quantize"]
    assert set(q) - {"onnx_path"} <= _modelopt_params("onnx/quantization/quantize.py", "quantize")
    data = q["calibration_data"]["images"]
    assert data.shape == (6, 3, 64, 64) and data.dtype == np.float32  # 7 images -> two whole steps of 3
    assert 0.0 <= data.min() and data.max() <= 1.0 and data.std() > 0  # letterboxed real images, not noise
    assert q["calibration_shapes"] == "images:3x3x64x64" and q["calibration_eps"] == ["cpu"]
    assert q["quantize_mode"] == "int8" and q["high_precision_dtype"] == "fp32"
    import re

    excluded = [n for n in ("/model.0/conv/Conv", "/model.22/cv2.0/cv2.0.2/Conv", "/model.22/dfl/conv/Conv",
                            "/model.22/Sigmoid") if any(re.match(p, n) for p in q["nodes_to_exclude"])]
    assert excluded == ["/model.22/dfl/conv/Conv", "/model.22/Sigmoid"]  # the decode; cv2 and backbone quantised
    assert info["ptq_float_nodes"] == 2

    onnx_ptq.autocast_fp16(src, tmp_path / "model.fp16.onnx", data[:2], log)
    a = calls["autocast"]
    assert set(a) - {"onnx_path"} <= _modelopt_params("onnx/autocast/convert.py", "convert_to_mixed_precision")
    assert a["keep_io_types"] is True and a["low_precision_type"] == "fp16"
    assert a["calibration_data"]["images"].shape == (2, 3, 64, 64)
    assert [n for n in ("/model.0/conv/Conv", "/model.22/Sigmoid")
            if any(re.match(p, n) for p in a["nodes_to_exclude"])] == ["/model.22/Sigmoid"]
    assert (tmp_path / "model.fp16.onnx").is_file()


def test_ptq_without_modelopt_onnx_is_a_user_error(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_modelopt(name, *args, **kwargs):
        if name.startswith("modelopt.onnx"):
            raise ImportError("No module named 'onnx_graphsurgeon'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_modelopt)
    with pytest.raises(UserError, match=r"nvidia-modelopt\[onnx\]"):
        onnx_ptq.autocast_fp16(tmp_path / "m.onnx", tmp_path / "o.onnx", np.zeros((1, 3, 8, 8), np.float32), log)


# -- real builds (GPU hosts and the Docker image only) --------------------------------------------
@pytest.mark.parametrize("precision", ["fp16", "int8"])
@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not trtb.available()[0], reason=f"TensorRT not usable: {trtb.available()[1]}")
def test_tensorrt_engine_records_its_build_and_refuses_others(float_export, tiny_data_yaml, precision):  # noqa: F811
    results, _ = float_export
    record = stage(results, "engine", "engine.backend=tensorrt", f"engine.precision={precision}",
                   f"dataset.path={tiny_data_yaml.parent}", "dataset.name=tiny")
    m = record["metrics"]
    assert m["tensorrt_version"] and m["gpu_name"] and m["compute_capability"]
    assert m["latency_ms"] > 0 and 0.0 <= m["mAP50_95"] <= 1.0 and m["mean_rel_diff_vs_onnx"] < 0.5
    assert m["executed_precision"] == precision and m["layer_precision"][precision] > 0
    sidecar = json.loads(_out(results, record, "sidecar").read_text())
    assert sidecar["tensorrt_version"] == m["tensorrt_version"] and sidecar["precision"] == precision
    assert _out(results, record, "timing_cache").stat().st_size > 0
    if precision == "int8":
        assert qdq_nodes(onnx.load(str(_out(results, record, "qdq_onnx")))) > 0
    engine = _out(results, record)
    trtb.check_compatible(engine)
    offset, meta = trtb._header(engine)
    meta["pipeline"]["tensorrt_version"] = "0.0.0"
    header = json.dumps(meta).encode()
    forged = engine.with_name("other.engine")
    forged.write_bytes(len(header).to_bytes(4, "little") + header + engine.read_bytes()[offset:])
    with pytest.raises(UserError, match="rebuild it"):
        trtb.check_compatible(forged)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not trtb.available()[0], reason=f"TensorRT not usable: {trtb.available()[1]}")
def test_tensorrt_builds_a_qdq_model_as_int8(qat_export, tiny_data_yaml):  # noqa: F811
    results, _ = qat_export
    record = stage(results, "engine", "engine.backend=tensorrt", f"dataset.path={tiny_data_yaml.parent}",
                   "dataset.name=tiny")
    import tensorrt as trt

    m = record["metrics"]
    assert m["typing"] == ("strong" if int(trt.__version__.split(".")[0]) >= 11 else "weak")
    assert "calib_images" not in m and m["ptq"] is None and m["executed_precision"] == "int8"
    assert m["latency_ms"] > 0 and 0.0 <= m["mAP50_95"] <= 1.0


# -- bench/gpu_check.py without a GPU -------------------------------------------------------------
def test_gpu_check_without_a_gpu_records_every_skip_and_exits_0(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["environment"]["cuda_available"] is False and "onnxruntime_providers" in report["environment"]
    assert set(report["skipped"]) == {"smoke_chain", "engines", "ultralytics"}
    assert all("no CUDA GPU" in why for why in report["skipped"].values())
