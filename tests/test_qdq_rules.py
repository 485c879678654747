"""pipeline.qdq_rules on real exported QDQ graphs of tiny (untrained) yolov8n / yolo11n QAT models."""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pipeline import qdq_rules

IMGSZ = 64
PASS_THROUGH = ("Split", "Slice", "MaxPool", "Resize", "Concat")


def _qat_onnx(name: str, data_yaml: Path, out: Path) -> onnx.ModelProto:
    """ModelOpt's default placement, as stage=retrain builds it and Ultralytics exports it."""
    import torch
    from ultralytics import YOLO

    from pipeline import qat
    from pipeline.models import build_model

    torch.manual_seed(0)
    model = build_model(name, nc=2)
    model.names = {0: "red", 1: "blue"}
    quantised = qat.prepare(model, qat.calibration_batches(data_yaml, IMGSZ, 4, 2))
    pt = qat.save(quantised, out / f"{name}_qat.pt")
    f = YOLO(str(pt), task="detect").export(format="onnx", imgsz=IMGSZ, opset=17, dynamic=True, simplify=True,
                                            device="cpu", verbose=False)
    return onnx.load(str(f))


@pytest.fixture(scope="module", params=["yolov8n", "yolo11n"])
def exported(request, tiny_data_yaml, tmp_path_factory) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(default placement, after qdq_rules.apply)."""
    pytest.importorskip("modelopt.torch.quantization")
    default = _qat_onnx(request.param, tiny_data_yaml, tmp_path_factory.mktemp(request.param))
    ruled = copy.deepcopy(default)
    qdq_rules.apply(ruled)
    return default, ruled


class Graph:
    def __init__(self, model: onnx.ModelProto):
        self.nodes = list(model.graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                self.consumers[i].append(n)
        consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in self.nodes if n.op_type == "Constant"}
        self.values = {**consts, **{i.name: numpy_helper.to_array(i) for i in model.graph.initializer}}
        self.head = max(qdq_rules._layer(n.name) or 0 for n in self.nodes)

    def scale(self, tensor: str) -> float | None:
        """The INT8 scale `tensor` is on: its DequantizeLinear, followed back through value-moving ops."""
        p = self.producer.get(tensor)
        while p is not None and p.op_type in PASS_THROUGH and p.op_type != "Concat":
            p = self.producer.get(p.input[0])
        if p is None:
            return None
        if p.op_type == "Concat":
            scales = {self.scale(i) for i in p.input}
            return scales.pop() if len(scales) == 1 else None
        return float(self.values[p.input[1]]) if p.op_type == "DequantizeLinear" else None

    def in_body(self, node: onnx.NodeProto) -> bool:
        layer = qdq_rules._layer(node.name)
        return layer is not None and layer < self.head

    def residual_adds(self) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if n.op_type == "Add" and self.in_body(n) and "/m." in n.name]

    def concats(self) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if n.op_type == "Concat" and self.in_body(n)
                and all(i not in self.values for i in n.input)]


def test_default_placement_leaves_what_the_rules_fix(exported):
    """The check below can fail: ModelOpt's own graph has float Add inputs and mixed Concat scales."""
    g = Graph(exported[0])
    assert any(g.scale(i) is None for n in g.residual_adds() for i in n.input)
    assert any(len({g.scale(i) for i in n.input}) > 1 for n in g.concats())


def test_residual_adds_have_quantised_inputs(exported):
    g = Graph(exported[1])
    adds = g.residual_adds()
    assert adds, "no C2f/C3k2 bottleneck Add found"
    for n in adds:
        assert all(g.scale(i) is not None for i in n.input), n.name


def test_concat_inputs_share_one_scale(exported):
    g = Graph(exported[1])
    concats = g.concats()
    assert len(concats) >= 8  # every C2f/C3k2, SPPF and the four neck Concats
    for n in concats:
        scales = {g.scale(i) for i in n.input}
        assert len(scales) == 1 and None not in scales, (n.name, scales)


def test_every_tensor_has_at_most_one_activation_quantiser(exported):
    g = Graph(exported[1])
    for tensor, readers in g.consumers.items():
        if tensor not in g.values:
            assert sum(c.op_type == "QuantizeLinear" for c in readers) <= 1, tensor


def test_detect_decode_stays_float(exported):
    default, ruled = (Graph(m) for m in exported)

    def head_conv(name: str) -> bool:
        # the Detect layer's convolutions: its Conv blocks and the box/class output convs (cv2.i.2 /
        # cv3.i.2, quantised by retrain.qat_head as NNCF's PTQ quantises them)
        return "/conv/" in name or ".conv." in name or re.search(r"/cv[23]\.\d+\.\d+/", name) is not None

    def decode_qdq(g: Graph) -> list[str]:
        # The decode: everything in the Detect layer except its convolutions' own quantisers.
        return [n.name for n in g.nodes if qdq_rules._layer(n.name) == g.head
                and n.op_type in ("QuantizeLinear", "DequantizeLinear") and not head_conv(n.name)]

    assert decode_qdq(ruled) == decode_qdq(default) == []
    outputs = [n for n in ruled.nodes if qdq_rules._layer(n.name) == ruled.head and n.op_type == "Conv"
               and re.search(r"/cv[23]\.\d+/cv[23]\.\d+\.2/", n.name)]
    assert outputs and all(ruled.producer[n.input[1]].op_type == "DequantizeLinear" for n in outputs)  # INT8 weights
    decode = [n for n in ruled.nodes if qdq_rules._layer(n.name) == ruled.head and n.op_type != "Constant"
              and not head_conv(n.name)]
    assert any("dfl" in n.name for n in decode)
    for n in decode:
        for i in n.input:
            p = ruled.producer.get(i)
            assert p is None or p.op_type != "DequantizeLinear" or head_conv(p.name), n.name


def test_rules_keep_the_outputs(exported):
    """Same detections up to re-quantisation: the rules move and share scales, they change no weights."""
    import onnxruntime as ort

    x = np.random.default_rng(0).random((2, 3, IMGSZ, IMGSZ), np.float32)
    a, b = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
            for m in exported)
    assert a.shape == b.shape
    assert np.abs(a - b).mean() / np.abs(a).mean() < 0.05


def test_apply_is_idempotent(exported):
    again = copy.deepcopy(exported[1])
    stats = qdq_rules.apply(again)
    assert stats["quantisers_added"] == 0 and stats["quantisers_removed"] == 0


def test_openvino_runs_fewer_float_ops_with_the_rules(exported, tmp_path):
    """Read back from the compiled model (executed_precision): the float islands the rules remove."""
    ov = pytest.importorskip("openvino")
    from pipeline.engines import openvino as ovb

    counts = []
    for i, model in enumerate(exported):
        path = tmp_path / f"{i}.onnx"
        onnx.save(model, str(path))
        ir = tmp_path / f"{i}.xml"
        ov.save_model(ov.convert_model(str(path)), str(ir))
        executed = ovb.executed_precision(ovb.compile_static(ir, (1, 3, IMGSZ, IMGSZ), 1, "f32"))
        assert executed["executed_precision"] == "int8" and executed["inference_precision_hint"] == "f32"
        assert executed["reorders"] >= 0 and executed["ops_by_precision"]["int8"] > 0
        counts.append(executed["ops_by_precision"])
    default, ruled = counts
    assert ruled["f32"] < default["f32"] and ruled["int8"] >= default["int8"]


def test_float_graph_is_left_alone(tiny_model_pt, tmp_path):
    import shutil

    from ultralytics import YOLO

    pt = tmp_path / "float.pt"
    shutil.copyfile(tiny_model_pt, pt)
    model = onnx.load(YOLO(str(pt), task="detect").export(format="onnx", imgsz=IMGSZ, device="cpu", verbose=False))
    before = model.SerializeToString()
    assert qdq_rules.apply(model) == {"groups": 0, "quantisers_added": 0, "quantisers_removed": 0}
    assert model.SerializeToString() == before
