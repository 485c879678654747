"""QDQ placement rules for Ultralytics YOLO: one INT8 scale per tensor, so the runtime fuses.

ModelOpt's placement (through Ultralytics' `prepare_qat`) quantises convolution inputs only. In a
YOLO graph a tensor often feeds several quantised consumers at once (a C2f `Split` feeds the next
bottleneck and the `Concat`; a neck feature feeds an `Upsample` + `Concat` and a strided conv), each
with its own trained scale, while the `Concat`s, `Split`s, `MaxPool`s and residual `Add`s between
them stay float. A runtime then cannot emit INT8 from the producing convolution: it writes float,
re-quantises once per consumer and keeps float islands with reorders around the concatenations.

`apply` rewrites the exported QDQ ONNX by NVIDIA's rules for YOLO QAT on TensorRT (yolo_deepstream,
"Guidance of QAT performance optimization"), which hold for OpenVINO's CPU plugin too:

- ops that only move values (Concat, Split, Slice, MaxPool, nearest Resize) share one scale between
  their inputs and outputs, so they run on INT8 data without requantisation;
- both inputs of every residual `Add` are quantised, with the scale of the Add's output group;
- every tensor then carries one QuantizeLinear/DequantizeLinear pair, placed right after its
  producer, and every consumer reads it.

A group's scale is the largest trained scale among its tensors (the widest range, so nothing that
QAT kept in range is clipped); tensors without a quantiser of their own are quantised with it. The
Detect head's decode (DFL, box and class decode after the output convolutions) is left untouched.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from pipeline.onnx_graph import GraphIndex

# Ops whose outputs hold only values of their inputs: INT8 in, the same INT8 out.
SCALE_PRESERVING = ("Concat", "Split", "Slice", "MaxPool", "Resize")


class _Groups:
    """Union-find over tensor names."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, t: str) -> str:
        self.parent.setdefault(t, t)
        while self.parent[t] != t:
            self.parent[t] = self.parent[self.parent[t]]
            t = self.parent[t]
        return t

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def _layer(name: str) -> int | None:
    """Index of the Ultralytics layer a node belongs to ("/model.12/cv1/..." -> 12), None outside them."""
    parts = name.split("/")
    if len(parts) > 1 and parts[1].startswith("model.") and parts[1][6:].isdigit():
        return int(parts[1][6:])
    return None


def apply(model: Any, residual_add: bool = True) -> dict[str, int]:
    """Rewrite a QDQ ONNX ModelProto in place by the rules in the module docstring; returns counts.

    `residual_add`: also quantise both inputs of residual `Add`s (with the Add output's scale).
    A graph the pass has already rewritten is left as it is (all counts 0). A float graph (no
    activation quantisers) is left as it is too.
    """
    import onnx

    g = model.graph
    layers = [i for i in (_layer(n.name) for n in g.node) if i is not None]
    head = max(layers, default=0)  # the Detect layer; nodes after it (NMS in the graph) have no layer
    index = GraphIndex(g)
    producer, consumers, value, is_constant = index.producer, index.consumers, index.value, index.is_constant

    # Activation quantisers: tensor -> its Q nodes (each with its DQ consumers).
    quantisers: dict[str, list[Any]] = defaultdict(list)
    for n in g.node:
        if n.op_type == "QuantizeLinear" and not is_constant(n.input[0]) and value(n.input[1]).size == 1:
            quantisers[n.input[0]].append(n)

    def base(t: str) -> str:
        """The float tensor behind a DequantizeLinear(QuantizeLinear(t)) output, else t itself."""
        p = producer.get(t)
        if p is not None and p.op_type == "DequantizeLinear":
            q = producer.get(p.input[0])
            if q is not None and q.op_type == "QuantizeLinear" and not is_constant(q.input[0]):
                return q.input[0]
        return t

    groups = _Groups()
    derived: set[str] = set()  # tensors made by a scale-preserving op from group members
    for n in g.node:
        layer = _layer(n.name)
        if layer is None or layer >= head:
            continue
        if n.op_type in SCALE_PRESERVING and not (n.op_type == "Resize" and _resize_mode(n) != "nearest"):
            data = list(n.input) if n.op_type == "Concat" else [n.input[0]]
            for t in data:
                for o in n.output:
                    groups.union(base(t), o)
            derived.update(n.output)
        elif n.op_type == "Add" and residual_add and len(n.input) == 2 and not any(map(is_constant, n.input)):
            for t in n.input:
                groups.union(base(t), n.output[0])
    for t in quantisers:
        groups.find(t)

    members: dict[str, list[str]] = defaultdict(list)
    for t in list(groups.parent):
        members[groups.find(t)].append(t)

    run = sum(i.name.endswith("/scale") and i.name.startswith("qdq_rules/") for i in g.initializer)  # unique names
    stats = {"groups": 0, "quantisers_added": 0, "quantisers_removed": 0}
    new_nodes: list[Any] = []
    removed: set[int] = set()
    for tensors in members.values():
        qs = [q for t in tensors for q in quantisers.get(t, [])]
        if not qs:
            continue  # no trained scale to share (e.g. a group wholly inside float layers)
        scale = max(float(value(q.input[1])) for q in qs)
        if (all(len(quantisers.get(t, [])) == (t not in derived) for t in tensors)
                and all(float(value(q.input[1])) == scale for q in qs)):
            continue  # already one pair per tensor, on one scale (e.g. a graph this pass has rewritten)
        stats["groups"] += 1
        zp = value(qs[0].input[2]) if len(qs[0].input) > 2 else np.zeros((), np.int8)
        tag = f"qdq_rules/{run}/{stats['groups']}"
        scale_name, zp_name = f"{tag}/scale", f"{tag}/zero_point"
        g.initializer.append(onnx.numpy_helper.from_array(np.asarray(scale, np.float32), scale_name))
        g.initializer.append(onnx.numpy_helper.from_array(np.asarray(zp).astype(zp.dtype), zp_name))
        for t in tensors:
            # Drop the tensor's own quantisers: their consumers read the group's pair (a root) or
            # the tensor itself (a derived tensor is already on the group's grid).
            for q in quantisers.get(t, []):
                removed.add(id(q))
                stats["quantisers_removed"] += 1
                for dq in consumers[q.output[0]]:
                    removed.add(id(dq))
                    for c in consumers[dq.output[0]]:
                        _rename_input(c, dq.output[0], t)
                        consumers[t].append(c)
            if t in derived:
                # Already on the group's grid. A pair here too was measured worse on OpenVINO: the
                # plugin then re-quantises after every Split/Concat (more f32 ops and reorders).
                continue
            q_out, dq_out = f"{tag}/{t}/q", f"{tag}/{t}/dq"
            readers = [c for c in consumers[t] if id(c) not in removed]
            new_nodes.append((t, onnx.helper.make_node("QuantizeLinear", [t, scale_name, zp_name], [q_out],
                                                       name=f"{tag}/{t}/QuantizeLinear")))
            new_nodes.append((t, onnx.helper.make_node("DequantizeLinear", [q_out, scale_name, zp_name], [dq_out],
                                                       name=f"{tag}/{t}/DequantizeLinear")))
            for c in readers:
                _rename_input(c, t, dq_out)
            stats["quantisers_added"] += 1
    kept = [n for n in g.node if id(n) not in removed]
    after: dict[str, list[Any]] = defaultdict(list)
    for t, node in new_nodes:
        after[t].append(node)
    ordered = [node for t, nodes in after.items() if t not in producer for node in nodes]  # on graph inputs
    for n in kept:
        ordered.append(n)
        for o in n.output:
            ordered.extend(after.get(o, []))
    used = {name for n in ordered for name in n.input}
    ordered = [n for n in ordered if n.op_type != "Constant" or n.output[0] in used]  # the dropped pairs' scales
    del g.node[:]
    g.node.extend(ordered)
    onnx.checker.check_model(model)
    return stats


def _rename_input(node: Any, old: str, new: str) -> None:
    for i, name in enumerate(node.input):
        if name == old:
            node.input[i] = new


def _resize_mode(node: Any) -> str:
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
    return mode.decode() if isinstance(mode, bytes) else str(mode)
