"""Lookups over an ONNX graph for the passes that rewrite exported models (qdq_rules, graph_merge)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np


class GraphIndex:
    """A graph's initializers, Constant nodes, the producer of every tensor and its consumers, as the
    graph stands when the index is built (a pass that rewires nodes keeps `consumers` up to date)."""

    def __init__(self, graph: Any) -> None:
        self.inits = {i.name: i for i in graph.initializer}
        self.consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for n in graph.node:
            for name in n.input:
                self.consumers[name].append(n)

    def is_constant(self, name: str) -> bool:
        return name in self.inits or name in self.consts

    def value(self, name: str) -> np.ndarray | None:
        """The array of an initializer or a Constant node's output; None for a computed tensor."""
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        if name in self.consts:
            return numpy_helper.to_array(next(a.t for a in self.consts[name].attribute if a.name == "value"))
        return None
