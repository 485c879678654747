"""engine.float_precision: ours to choose, recorded with the IR, applied wherever the IR is compiled.

The assertions are about what we set and what the compiled model reports back; none depends on
what a given CPU would choose by itself (bf16 on BF16 CPUs, f32 elsewhere).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import yaml
from test_export import _onnx_of, float_export, stage  # noqa: F401 (fixtures)

from pipeline.engines import openvino as ovb
from pipeline.engines.common import onnx_metadata

log = logging.getLogger("test")


@pytest.fixture(scope="module")
def fp32_ir(float_export, tmp_path_factory):  # noqa: F811
    src = _onnx_of(*float_export)
    folder = tmp_path_factory.mktemp("fp") / "fp32_openvino_model"
    info = ovb.build(src, folder, "fp32", False, None, onnx_metadata(src), log, float_precision="f32")
    return src, folder, info


def test_the_ir_records_the_chosen_precision(fp32_ir):
    _, folder, info = fp32_ir
    assert info["float_precision"] == "f32"
    assert yaml.safe_load((folder / "metadata.yaml").read_text())["float_precision"] == "f32"
    assert ovb.recorded_precision(folder) == "f32" and ovb.recorded_precision(folder / "model.xml") == "f32"


def test_compile_static_applies_the_recorded_precision_and_reads_it_back(fp32_ir):
    _, folder, _ = fp32_ir
    compiled = ovb.compile_static(folder / "model.xml", (1, 3, 64, 64), 2)
    m = ovb.executed_precision(compiled)
    assert m["inference_precision_hint"] == "f32"
    assert m["executed_precision"] == "fp32" and set(m["runtime_precisions"]) == {"f32"}


def test_a_chosen_hint_reaches_the_compile_options():
    assert ovb.compile_config("bf16", {"PERFORMANCE_HINT": "LATENCY"}) == {
        "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16"}
    assert ovb.compile_config("auto", {"X": 1}) == {"X": 1}  # auto: the runtime's own choice
    with pytest.raises(ValueError, match="float_precision"):
        ovb.build(None, None, "fp32", False, None, {}, log, float_precision="fp64")


def test_an_ir_without_a_record_is_left_to_the_runtime(tmp_path):
    (tmp_path / "metadata.yaml").write_text("names: {0: a}\n")
    assert ovb.recorded_precision(tmp_path) == "auto"
    assert ovb.recorded_precision(tmp_path / "missing") == "auto"


def test_autobackend_compiles_our_ir_at_its_recorded_precision(fp32_ir):
    """The evaluate and infer paths load IRs through Ultralytics' AutoBackend."""
    import torch
    from ultralytics.nn.autobackend import AutoBackend

    src, folder, _ = fp32_ir
    ovb.honour_recorded_precision()
    ovb.honour_recorded_precision()  # idempotent: one subclass, not a chain
    backend = AutoBackend(str(folder), device=torch.device("cpu"), verbose=False)
    hint = backend.backend.ov_compiled_model.get_property("INFERENCE_PRECISION_HINT").to_string()
    assert hint == "f32"
    assert type(backend.backend).__mro__[1].__name__ == "OpenVINOBackend"
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    out = backend.backend.ov_compiled_model(x)
    assert next(iter(out.values())).shape[0] == 1


def test_engine_stage_records_the_precision_it_set(float_export, tiny_data_yaml):  # noqa: F811
    results, _ = float_export
    record = stage(results, "engine", "engine.backend=openvino", "engine.precision=fp32", "engine.evaluate=false",
                   "engine.float_precision=f32", f"dataset.path={tiny_data_yaml.parent}", "dataset.name=tiny")
    m = record["metrics"]
    assert m["float_precision"] == "f32" and m["inference_precision_hint"] == "f32"
    assert m["executed_precision"] == "fp32"
