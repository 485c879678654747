"""pipeline.graph_merge on real exports of a pruned tiny yolov8n: float and QDQ, merged exactly."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from pipeline import graph_merge, qdq_rules
from pipeline.models import build_model, save_checkpoint
from pipeline.modules import SplitFreeC2f
from pipeline.pruning import ChannelPruner

IMGSZ = 64


def _pruned(out: Path) -> tuple[torch.nn.Module, int]:
    """A tiny yolov8n pruned so that the two halves of its C2f blocks keep different widths."""
    torch.manual_seed(0)
    model = build_model("yolov8n", nc=2)
    model.names = {0: "red", 1: "blue"}
    pruner = ChannelPruner(model)
    pruner.apply(pruner.plan(0.95, granularity=1, min_filters=4))
    blocks = [m for m in model.modules() if isinstance(m, SplitFreeC2f)]
    assert any(b.cv1a.conv.out_channels != b.cv1b.conv.out_channels for b in blocks)  # the case that matters
    return model, len(blocks)


def _export(pt: Path) -> onnx.ModelProto:
    from ultralytics import YOLO

    f = YOLO(str(pt), task="detect").export(format="onnx", imgsz=IMGSZ, opset=17, dynamic=True, simplify=True,
                                            device="cpu", verbose=False)
    return onnx.load(str(f))


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def _ops(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> tuple[torch.nn.Module, int, Path]:
    out = tmp_path_factory.mktemp("merge")
    model, blocks = _pruned(out)
    return model, blocks, out


def _check_merged(before: onnx.ModelProto, after: onnx.ModelProto, merged: int, blocks: int, atol: float) -> None:
    assert merged == blocks
    assert len(_ops(after, "Conv")) == len(_ops(before, "Conv")) - blocks
    convs = {n.name for n in _ops(after, "Conv")}
    assert not any("/cv1a/" in c or "/cv1b/" in c for c in convs)
    values = {i.name: numpy_helper.to_array(i) for i in after.graph.initializer}
    sizes = [tuple(values[n.input[1]]) for n in _ops(after, "Split") if n.name.startswith("graph_merge/")]
    assert len(sizes) == blocks and any(a != b for a, b in sizes)  # uneven halves, as pruned
    x = np.random.default_rng(0).random((2, 3, IMGSZ, IMGSZ), dtype=np.float32)
    for y0, y1 in zip(_run(before, x), _run(after, x), strict=True):
        np.testing.assert_allclose(y1, y0, rtol=0, atol=atol)


def test_float_export_merges_every_split_free_block_exactly(pruned):
    model, blocks, out = pruned
    before = _export(save_checkpoint(copy.deepcopy(model), out / "float.pt"))
    after = copy.deepcopy(before)
    _check_merged(before, after, graph_merge.merge_split_convs(after), blocks, atol=1e-5)
    assert graph_merge.merge_split_convs(after) == 0  # nothing left to merge


def test_qdq_export_merges_only_halves_on_one_scale(pruned, tiny_data_yaml):
    pytest.importorskip("modelopt.torch.quantization")
    from pipeline import qat

    model, blocks, out = pruned
    quantised = qat.prepare(copy.deepcopy(model), qat.calibration_batches(tiny_data_yaml, IMGSZ, 4, 2))
    default = _export(qat.save(quantised, out / "qat.pt"))
    # ModelOpt's own placement: one half feeds a conv quantiser, the other a float Concat. Left alone.
    assert graph_merge.merge_split_convs(copy.deepcopy(default)) == 0
    ruled = copy.deepcopy(default)
    qdq_rules.apply(ruled)
    after = copy.deepcopy(ruled)
    merged = graph_merge.merge_split_convs(after)
    # Same INT8 grid on both sides: a rounding-step difference at most where float sums reorder.
    _check_merged(ruled, after, merged, blocks, atol=1e-3)
    for split in (n for n in _ops(after, "Split") if n.name.startswith("graph_merge/")):
        dq = next(n for n in after.graph.node if split.input[0] in n.output)
        assert dq.op_type == "DequantizeLinear"  # the Split reads INT8 values on the halves' shared scale
    weights = [n for n in _ops(after, "QuantizeLinear") if n.name.startswith("graph_merge/") and "weight" in n.name]
    assert len(weights) == blocks and all(next(a.i for a in n.attribute if a.name == "axis") == 0 for n in weights)


def test_export_stage_records_the_merge(results_dir, tiny_data_yaml, pruned):
    from tests.conftest import run_cli

    model, blocks, out = pruned
    pt = save_checkpoint(copy.deepcopy(model), out / "stage.pt")
    for merge in ("true", "false"):
        r = run_cli("stage=export", f"export.input={pt}", f"export.imgsz={IMGSZ}", f"export.merge_convs={merge}",
                    f"dataset.path={tiny_data_yaml.parent}", "dataset.name=tiny", f"results_dir={results_dir}",
                    "export.evaluate=false")
        assert r.returncode == 0, r.stderr[-3000:]
    from pipeline.manifest import Manifest

    records = Manifest(results_dir).succeeded("export")
    assert [r["metrics"]["merged_convs"] for r in records] == [blocks, 0]
    convs = [len(_ops(onnx.load(str(Manifest(results_dir).output_of(r))), "Conv")) for r in records]
    assert convs[0] == convs[1] - blocks
