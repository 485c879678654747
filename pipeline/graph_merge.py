"""Merge the two 1x1 convs of every pruned C2f back into one conv and a Split, in the exported ONNX.

Pruning needs each C2f / C3k2 computed without its `chunk` (`pipeline.modules.SplitFreeC2f`): the
block's first 1x1 conv becomes two (`cv1a`, `cv1b`) so torch-pruning can cut either half on its own.
Exported as is, every such block costs the runtime one more convolution than Ultralytics' own
graph, which reads the same input twice and, at small inputs where a CPU runtime spends a fixed
time per node, is what the vendor's one-liner does not pay (a yolov8n: 8 more convs of 72).

`merge_split_convs` rewrites the ONNX so the block runs one conv of `ca + cb` filters followed by a
`Split` into the two halves, which computes exactly the same values (the weights, biases and
per-channel weight scales are concatenated; both halves already read one input). In a QDQ graph
the pair is merged only where both outputs carry one quantiser of one scale (what
`pipeline.qdq_rules` gives: both halves enter the same Concat), so the INT8 arithmetic is unchanged
too and the Split runs on INT8 data. Anything else (other activations, a graph output, halves on
different scales) is left as it was.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.onnx_graph import GraphIndex


def _attrs(node: Any) -> dict[str, bytes]:
    return {a.name: a.SerializeToString() for a in node.attribute}


def _int_attr(node: Any, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def merge_split_convs(model: Any) -> int:
    """Merge every `.../cv1a/conv/Conv` + `.../cv1b/conv/Conv` pair of `model` (an ONNX ModelProto,
    float or QDQ) in place into one Conv + Split; returns how many pairs were merged."""
    import onnx
    from onnx import numpy_helper

    g = model.graph
    index = GraphIndex(g)
    producer, consumers, value = index.producer, index.consumers, index.value
    graph_outputs = {o.name for o in g.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)

    def only(name: str) -> list[Any]:
        return [] if name in graph_outputs else consumers.get(name, [])

    def weight(conv: Any) -> dict[str, Any] | None:
        """The conv's float weights, with the per-channel (axis 0) fake-quantiser around them if any."""
        w = conv.input[1]
        if value(w) is not None:
            return {"w": value(w), "nodes": []}
        dq = producer.get(w)
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3 or len(dq.input) < 3:
            return None
        if len(consumers[w]) != 1 or len(consumers[q.output[0]]) != 1:
            return None
        parts = [value(q.input[0]), value(q.input[1]), value(q.input[2]), value(dq.input[1]), value(dq.input[2])]
        if any(p is None for p in parts) or _int_attr(q, "axis", 1) != 0 or _int_attr(dq, "axis", 1) != 0:
            return None
        w0, s, zp, s2, zp2 = parts
        if s.shape != (w0.shape[0],) or not (np.array_equal(s, s2) and np.array_equal(zp, zp2)) or np.any(zp != 0):
            return None
        return {"w": w0, "scale": s, "zp_dtype": zp.dtype, "nodes": [q, dq]}

    def chain(conv: Any) -> dict[str, Any] | None:
        """conv -> Sigmoid -> Mul (SiLU) [-> QuantizeLinear -> DequantizeLinear]: its nodes and output."""
        out = conv.output[0]
        readers = only(out)
        sig = next((n for n in readers if n.op_type == "Sigmoid"), None)
        mul = next((n for n in readers if n.op_type == "Mul"), None)
        if len(readers) != 2 or sig is None or mul is None or sorted(mul.input) != sorted([out, sig.output[0]]):
            return None
        if only(sig.output[0]) != [mul]:
            return None
        w = weight(conv)
        if w is None:
            return None
        found = {"nodes": [conv, sig, mul, *w["nodes"]], "weight": w, "out": mul.output[0], "q": None}
        after = only(mul.output[0])
        if len(after) == 1 and after[0].op_type == "QuantizeLinear" and value(after[0].input[0]) is None:
            q = after[0]
            dqs = only(q.output[0])
            if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear" or list(dqs[0].input[1:]) != list(q.input[1:]):
                return None
            found.update(q=q, out=dqs[0].output[0])
            found["nodes"] += [q, dqs[0]]
        elif any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in after):
            return None
        return found

    by_name = {n.name: n for n in g.node if n.op_type == "Conv"}
    position = {id(n): i for i, n in enumerate(g.node)}
    removed: set[int] = set()
    placed: dict[int, list[Any]] = {}
    merged = 0
    for name, a in by_name.items():
        if "/cv1a/conv/" not in name:
            continue
        b = by_name.get(name.replace("/cv1a/conv/", "/cv1b/conv/"))
        if b is None or a.input[0] != b.input[0] or _attrs(a) != _attrs(b) or _int_attr(a, "group", 1) != 1:
            continue
        ca, cb = chain(a), chain(b)
        if ca is None or cb is None or (ca["q"] is None) != (cb["q"] is None):
            continue
        if ca["q"] is not None and not all(np.array_equal(value(x), value(y)) for x, y in
                                           zip(ca["q"].input[1:], cb["q"].input[1:], strict=True)):
            continue  # halves on different scales: merging would change the INT8 arithmetic
        wa, wb = ca["weight"], cb["weight"]
        if ("scale" in wa) != ("scale" in wb) or wa["w"].shape[1:] != wb["w"].shape[1:]:
            continue
        sizes = [wa["w"].shape[0], wb["w"].shape[0]]
        has_bias = any(len(c.input) > 2 and c.input[2] for c in (a, b))
        biases = [value(c.input[2]) if len(c.input) > 2 and c.input[2] else np.zeros(n, wa["w"].dtype)
                  for c, n in ((a, sizes[0]), (b, sizes[1]))]
        if any(x is None for x in biases):
            continue  # a bias computed in the graph: not the exporter's pattern
        merged += 1
        tag = f"graph_merge/{name.rsplit('/cv1a/conv/', 1)[0].strip('/')}"

        def init(suffix: str, arr: np.ndarray, tag: str = tag) -> str:
            g.initializer.append(numpy_helper.from_array(arr, f"{tag}/{suffix}"))
            return f"{tag}/{suffix}"

        nodes: list[Any] = []
        w_name = init("weight", np.concatenate([wa["w"], wb["w"]]).astype(wa["w"].dtype))
        if "scale" in wa:
            s_name = init("weight_scale", np.concatenate([wa["scale"], wb["scale"]]))
            zp_name = init("weight_zero_point", np.zeros(sum(sizes), wa["zp_dtype"]))
            nodes += [onnx.helper.make_node("QuantizeLinear", [w_name, s_name, zp_name], [f"{tag}/weight_q"],
                                            name=f"{tag}/weight_quantizer/QuantizeLinear", axis=0),
                      onnx.helper.make_node("DequantizeLinear", [f"{tag}/weight_q", s_name, zp_name],
                                            [f"{tag}/weight_dq"], name=f"{tag}/weight_quantizer/DequantizeLinear",
                                            axis=0)]
            w_name = f"{tag}/weight_dq"
        inputs = [a.input[0], w_name]
        if has_bias:
            inputs.append(init("bias", np.concatenate(biases).astype(wa["w"].dtype)))
        conv = onnx.helper.make_node("Conv", inputs, [f"{tag}/conv"], name=f"{tag}/conv/Conv")
        conv.attribute.extend(a.attribute)
        nodes += [conv, onnx.helper.make_node("Sigmoid", [f"{tag}/conv"], [f"{tag}/sigmoid"], name=f"{tag}/act/Sigmoid"),
                  onnx.helper.make_node("Mul", [f"{tag}/conv", f"{tag}/sigmoid"], [f"{tag}/act"], name=f"{tag}/act/Mul")]
        split_in = f"{tag}/act"
        if ca["q"] is not None:
            q = ca["q"]
            nodes += [onnx.helper.make_node("QuantizeLinear", [split_in, *q.input[1:]], [f"{tag}/q"],
                                            name=f"{tag}/QuantizeLinear"),
                      onnx.helper.make_node("DequantizeLinear", [f"{tag}/q", *q.input[1:]], [f"{tag}/dq"],
                                            name=f"{tag}/DequantizeLinear")]
            split_in = f"{tag}/dq"
        outs = [ca["out"], cb["out"]]
        if opset >= 13:
            nodes.append(onnx.helper.make_node("Split", [split_in, init("split", np.asarray(sizes, np.int64))], outs,
                                               name=f"{tag}/Split", axis=1))
        else:
            nodes.append(onnx.helper.make_node("Split", [split_in], outs, name=f"{tag}/Split", axis=1, split=sizes))
        old = ca["nodes"] + cb["nodes"]
        removed.update(id(n) for n in old)
        # At the first of the two convs: their shared input is made before it; the rest are initializers.
        placed[id(a) if position[id(a)] < position[id(b)] else id(b)] = nodes
    if not merged:
        return 0
    ordered: list[Any] = []
    for n in g.node:
        ordered.extend(placed.get(id(n), []))
        if id(n) not in removed:
            ordered.append(n)
    del g.node[:]
    g.node.extend(ordered)
    used = {name for n in g.node for name in n.input} | {o.name for o in g.output}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    onnx.checker.check_model(model)
    return merged
