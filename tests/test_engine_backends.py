"""The backend interface: every registered backend implements it, the engine stage drives any backend
through it (a fake one here) up to the manifest, and engine.backend=auto walks the registry in order."""

from __future__ import annotations

import inspect
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir
from onnx import TensorProto, helper, numpy_helper

import stages.engine as stage_mod
from pipeline import engines
from pipeline.config import register
from pipeline.engines import AUTO_ORDER, BACKENDS, require_backend, select_backend
from pipeline.engines import onnxruntime as ortb
from pipeline.engines.backend import Backend, BuildSettings, Built
from pipeline.errors import UserError
from pipeline.manifest import Manifest
from pipeline.runner import run_stage

SIDE = 64
CLASSES = 1


def tiny_detector(path: Path, scale: float = 1.0) -> Path:
    """A YOLO-shaped ONNX (N x 3 x 64 x 64 -> N x (4 + 1) x 4096) with Ultralytics' metadata: a 1x1 conv, reshaped."""
    weight = (np.arange(5 * 3, dtype=np.float32).reshape(5, 3, 1, 1) / 10.0) * scale
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["conv"]),
         helper.make_node("Reshape", ["conv", "shape"], ["output0"])],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 4 + CLASSES, SIDE * SIDE])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.array([0, 4 + CLASSES, -1], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (("imgsz", f"[{SIDE}, {SIDE}]"), ("stride", "32"), ("names", "{0: 'thing'}"), ("batch", "1")):
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


class FakeRunner:
    """Runs the fake artifact with ONNX Runtime and shifts every output by OFFSET: a known parity gap."""

    OFFSET = 0.5
    fixed_batch = None

    def __init__(self, path: Path) -> None:
        self.sess = ortb.session(path, 1)
        self.timed: list[tuple[int, ...]] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run(None, {"images": x})[0] + np.float32(self.OFFSET)

    def latency_ms(self, x: np.ndarray, runs: int) -> float | None:
        self.timed.append(tuple(x.shape))
        return 1.25  # a stand-in figure: the stage records what the runner reports


class FakeBackend(Backend):
    """A backend that 'builds' a graph with doubled weights and says it executes INT8."""

    name = "fake"
    label = "Fake"
    device = "cuda"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.runners: list[FakeRunner] = []

    def available(self) -> tuple[bool, str]:
        return False, "fake runtime absent"

    def require(self, int8_ptq: bool) -> None:
        self.calls.append(f"require int8_ptq={int8_ptq}")

    def build(self, src: Path, out_dir: Path, precision: str, qdq: bool, calib: Any,
              settings: BuildSettings, log: Any) -> Built:
        self.calls.append(f"build {precision} qdq={qdq} sample={settings.sample.shape} imgsz={settings.imgsz}")
        out = tiny_detector(out_dir / "model.fake", scale=2.0)
        # The graph the artifact stands for: parity must compare with it, not with src.
        reference = shutil.copyfile(out, out_dir / "reference.onnx")
        return Built(artifact=out, outputs=[("model", out)], record={"fake_build": "doubled weights"},
                     reference=reference)

    def runner(self, built: Built, shape: tuple[int, ...], threads: int) -> FakeRunner:
        self.calls.append(f"runner {shape}")
        self.runners.append(FakeRunner(built.artifact))
        return self.runners[-1]

    def executed_precision(self, built: Built, runner: Any) -> dict[str, Any]:
        return {"executed_precision": "int8", "int8_layers": 1, "compute_layers": 1}

    def facts(self, threads: int) -> dict[str, Any]:
        return {"fake_runtime_version": "0.1"}

    def review(self, record: dict[str, Any], qdq: bool, engine: Any) -> list[str]:
        return [f"fake review saw max_abs_diff_vs_onnx={record['max_abs_diff_vs_onnx']}"]

    def mismatch_hint(self, qdq: bool) -> str:
        return " (fake hint)"

    def evaluation_batch(self, built: Built, requested: int) -> int | None:
        return min(requested, 2)


def _cfg(results: Path, *overrides: str) -> Any:
    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=["stage=engine", "experiment=smoke", f"results_dir={results}", *overrides])


def test_every_registered_backend_implements_the_interface():
    assert set(BACKENDS) == {"tensorrt", "openvino", "onnxruntime"} and set(AUTO_ORDER) == set(BACKENDS)
    abstract = Backend.__abstractmethods__
    assert abstract == {"available", "require", "build", "runner", "executed_precision"}
    for key, backend in BACKENDS.items():
        assert isinstance(backend, Backend) and backend.name == key and backend.label
        assert backend.device in ("cpu", "cuda")
        for method in ("available", "require", "check", "build", "runner", "executed_precision", "facts", "review",
                       "mismatch_hint", "evaluation_batch"):
            ours, base = getattr(type(backend), method), getattr(Backend, method)
            assert list(inspect.signature(ours).parameters) == list(inspect.signature(base).parameters), (key, method)
        ok, why = backend.available()
        assert isinstance(ok, bool) and isinstance(why, str) and why
    assert BACKENDS["tensorrt"].device == "cuda" and BACKENDS["onnxruntime"].device == "cpu"


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_cpu_backends_build_run_and_read_back_through_the_interface(name, tmp_path):
    """fp32 through each CPU backend's interface: the artifact runs and matches ONNX Runtime on the source."""
    backend = BACKENDS[name]
    if not backend.available()[0]:
        pytest.skip(backend.available()[1])
    src = tiny_detector(tmp_path / "src.onnx")
    x = np.random.default_rng(0).random((2, 3, SIDE, SIDE), dtype=np.float32)
    settings = BuildSettings(engine=_cfg(tmp_path).engine, imgsz=(SIDE, SIDE), meta={"imgsz": [SIDE, SIDE]}, sample=x)
    out = tmp_path / "out"
    out.mkdir()
    backend.check("fp32", False)
    backend.require(False)
    built = backend.build(src, out, "fp32", False, None, settings, logging.getLogger("test"))
    assert built.outputs[0] == ("model", built.artifact) and built.artifact.exists()
    runner = backend.runner(built, (1, 3, SIDE, SIDE), 1)
    assert backend.executed_precision(built, runner)["executed_precision"] == "fp32"
    ref = ortb.run(ortb.session(src, 1), x)
    np.testing.assert_allclose(runner(x), ref, rtol=1e-4, atol=1e-4)
    assert runner.latency_ms(x[:1], 2) > 0


def test_onnxruntime_refuses_fp16_on_a_float_model():
    with pytest.raises(UserError, match="engine.precision=fp16"):
        BACKENDS["onnxruntime"].check("fp16", False)
    BACKENDS["onnxruntime"].check("fp16", True)  # a QDQ model runs INT8 whatever was asked


def test_engine_stage_drives_a_registered_backend_into_the_manifest(monkeypatch, tmp_path):
    fake = FakeBackend()
    monkeypatch.setitem(engines.BACKENDS, "fake", fake)
    seen: dict[str, Any] = {}

    def evaluate_artifact(cfg, ctx, path, imgsz, device="cpu", batch=None):
        seen.update(path=path, device=device, batch=batch)
        return {"mAP50": 0.75, "mAP50_95": 0.5}

    monkeypatch.setattr(stage_mod, "evaluate_artifact", evaluate_artifact)
    results = tmp_path / "results"
    src = tiny_detector(tmp_path / "model.onnx")
    cfg = _cfg(results, "engine.precision=fp32", "engine.evaluate=true", "device=cpu")
    cfg.engine.backend = "fake"  # not a choice config validation offers: the registry is what the stage reads
    record = run_stage(cfg, "engine", explicit_input=src)

    assert record["status"] == "succeeded"
    assert fake.calls[0] == "require int8_ptq=False"
    assert fake.calls[1] == f"build fp32 qdq=False sample=(8, 3, {SIDE}, {SIDE}) imgsz=({SIDE}, {SIDE})"
    assert fake.calls[2] == f"runner (1, 3, {SIDE}, {SIDE})"
    assert fake.runners[0].timed == [(1, 3, SIDE, SIDE)]
    stored = next(r for r in Manifest(results).runs() if r["run_id"] == record["run_id"])
    m = stored["metrics"]
    assert m["backend"] == "fake" and m["backend_reason"] == "engine.backend=fake"
    assert m["precision"] == "fp32" and m["qdq_input"] is False and m["imgsz"] == [SIDE, SIDE]
    assert m["fake_build"] == "doubled weights" and m["fake_runtime_version"] == "0.1"
    assert m["executed_precision"] == "int8" and m["latency_ms"] == 1.25
    # Against the doubled-weight reference the gap is the runner's offset alone; against src it would be far more.
    assert m["max_abs_diff_vs_onnx"] == pytest.approx(FakeRunner.OFFSET, abs=1e-5)
    assert not (Path(results) / stored["run_dir"] / "reference.onnx").exists()  # the scratch reference is removed
    assert m["mAP50_95"] == 0.5 and m["eval_batch"] == 2
    assert seen == {"path": Path(results) / stored["run_dir"] / "model.fake", "device": "0", "batch": 2}
    assert [o["role"] for o in stored["outputs"]] == ["model"] and isinstance(m["size_mb"], float)
    warnings = " | ".join(stored["warnings"])
    assert "fake review saw max_abs_diff_vs_onnx=0.5" in warnings
    assert "engine.precision=fp32 was asked for, but fake executes int8 on this machine (fake hint)" in warnings


class _Stub(Backend):
    """Availability only, for the auto order."""

    def __init__(self, name: str, label: str, ok: bool) -> None:
        self.name, self.label, self.ok = name, label, ok

    def available(self) -> tuple[bool, str]:
        return self.ok, f"{self.label} {'here' if self.ok else 'absent'}"

    def require(self, int8_ptq: bool) -> None:
        raise UserError(f"engine.backend={self.name}: {self.label} absent")

    def build(self, *args: Any) -> Built:
        raise NotImplementedError

    def runner(self, *args: Any) -> Any:
        raise NotImplementedError

    def executed_precision(self, *args: Any) -> dict[str, Any]:
        raise NotImplementedError


@pytest.mark.parametrize(("usable", "chosen", "reason"), [
    ({"tensorrt", "openvino", "onnxruntime"}, "tensorrt", "auto: TensorRT here"),
    ({"openvino", "onnxruntime"}, "openvino", "auto: not TensorRT (TensorRT absent); OpenVINO here"),
    ({"onnxruntime"}, "onnxruntime",
     "auto: not TensorRT (TensorRT absent); not OpenVINO (OpenVINO absent); ONNX Runtime is the portable fallback"),
    (set(), "onnxruntime",  # the fallback is taken even when it is missing: its require says how to install it
     "auto: not TensorRT (TensorRT absent); not OpenVINO (OpenVINO absent); ONNX Runtime is the portable fallback"),
])
def test_auto_walks_the_registry_in_order(monkeypatch, usable, chosen, reason):
    for name, label in (("tensorrt", "TensorRT"), ("openvino", "OpenVINO"), ("onnxruntime", "ONNX Runtime")):
        monkeypatch.setitem(engines.BACKENDS, name, _Stub(name, label, name in usable))
    assert select_backend("auto") == (chosen, reason)
    assert select_backend("openvino") == ("openvino", "engine.backend=openvino")
    with pytest.raises(UserError, match="engine.backend=onnxruntime: ONNX Runtime absent"):
        require_backend("onnxruntime", int8_ptq=False)


def test_engine_backend_choices_are_the_registry():
    """`engine.backend=` accepts exactly auto and the registered backends (a new row is a new choice)."""
    from pipeline.config import _CHOICES, EngineConfig

    assert set(_CHOICES[EngineConfig]["backend"]) == {"auto", *BACKENDS}
