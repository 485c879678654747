"""Latency-aware channel selection (prune.mode=latency): a measured per-conv latency table and a greedy.

The table: every conv of the model, rebuilt alone (conv + bias + activation: BN folds into the bias
on deploy) at its input resolution, stride, kernel and groups, and timed on the deploy backend
(OpenVINO on CPUs, ONNX Runtime as the fallback): median of `runs` timed calls after a warm-up.
A conv is measured on a grid of the channel counts a plan can give it (multiples of granularity
from the min_filters floor up to the full width, `GRID_LEVELS` of them per side it can lose);
between grid points the prediction is bilinear. Every single-conv call pays the backend's fixed
cost per inference (measured on a 1-channel 1x1 conv): it is taken off each entry and counted
once for the whole model, or the sum of ~70 convs would count it ~70 times. Timings are noisy,
so each conv's grid is made monotone (running maximum along input, then output channels) before
it predicts anything; the raw timings stay in the table file.

The file is `<results_dir>/.latency/<key>.json`, the key naming the CPU model, its core count, the
backend, the thread count and the image size: a second prune on the same machine reuses it, and
entries are keyed by (cin, cout, k, stride, groups, H, W, activation).

The selection: start from the unpruned widths; repeatedly remove, from one group, the next block of
channels (down to the next multiple of granularity, never below min(min_filters, width)) whose
TAO importance lost (sum of the merged normalised scores removed) per predicted latency saved is
smallest; stop once the predicted latency is <= budget. A group's cut changes the output channels
of its producing convs and the input channels of its consumers; both enter the prediction.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pipeline.manifest import atomic_write_text
from pipeline.pruning import ChannelPruner, ConvSite, GroupPlan

log = logging.getLogger("pipeline.prune")

BACKENDS = ("openvino", "onnxruntime")
GRID_LEVELS = 4  # channel counts measured per prunable side of a conv (plus bilinear in between)
WARMUP = 2
# the smallest conv there is: its time is the backend's fixed cost per call, paid once by the whole model
OVERHEAD_KEY = (1, 1, 1, 1, 1, 1, 1, False)

ConvKey = tuple[int, int, int, int, int, int, int, bool]  # cin, cout, k, stride, groups, H, W, activation
Timer = Callable[[ConvKey, int], list[float]]  # (key, runs) -> milliseconds per run


def resolve_backend(name: str) -> str:
    """`auto` -> openvino when it imports, else onnxruntime."""
    if name != "auto":
        return name
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "onnxruntime"
    return "openvino"


def machine_key(backend: str, imgsz: int, threads: int) -> str:
    """File-name-safe key of one table: CPU model, core count, backend, threads, image size."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    raw = f"{cpu}-{os.cpu_count()}cores-{backend}-t{threads}-{imgsz}px"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("_")


def _key_text(key: ConvKey) -> str:
    cin, cout, k, s, g, h, w, act = key
    return f"{cin},{cout},{k},{s},{g},{h},{w},{'act' if act else 'linear'}"


def _text_key(text: str) -> ConvKey:
    cin, cout, k, s, g, h, w, act = text.split(",")
    return int(cin), int(cout), int(k), int(s), int(g), int(h), int(w), act == "act"


# ---------------------------------------------------------------- timers: one conv alone on a backend


def _weights(key: ConvKey) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cin, cout, k, _, g, h, w, _ = key
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((cout, cin // g, k, k)) * 0.05).astype(np.float32)
    return rng.random((1, cin, h, w), dtype=np.float32), weight, np.zeros((1, cout, 1, 1), np.float32)


def _timed(call: Callable[[], Any], runs: int) -> list[float]:
    for _ in range(WARMUP):
        call()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def openvino_timer(threads: int) -> Timer:
    """Times one conv + bias + SiLU built with openvino.opset13, compiled for latency at f32."""
    import openvino as ov
    import openvino.opset13 as ops

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": "f32"}

    def timer(key: ConvKey, runs: int) -> list[float]:
        cin, cout, k, s, g, h, w, act = key
        x, weight, bias = _weights(key)
        p = k // 2  # Ultralytics' autopad
        inp = ops.parameter([1, cin, h, w], np.float32)
        conv_args = {"strides": [s, s], "pads_begin": [p, p], "pads_end": [p, p], "dilations": [1, 1]}
        if g == 1:
            y = ops.convolution(inp, ops.constant(weight), **conv_args)
        else:
            grouped = weight.reshape(g, cout // g, cin // g, k, k)
            y = ops.group_convolution(inp, ops.constant(grouped), **conv_args)
        y = ops.add(y, ops.constant(bias))
        if act:
            y = ops.swish(y)
        request = core.compile_model(ov.Model([y], [inp]), "CPU", config).create_infer_request()
        return _timed(lambda: request.infer({0: x}), runs)

    return timer


def onnxruntime_timer(threads: int) -> Timer:
    """Times the same single conv as an ONNX graph (Conv + Sigmoid * x) on ONNX Runtime's CPU provider."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1

    def timer(key: ConvKey, runs: int) -> list[float]:
        cin, cout, k, s, g, h, w, act = key
        x, weight, bias = _weights(key)
        p = k // 2
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[k, k], strides=[s, s],
                                  pads=[p, p, p, p], group=g)]
        out = "c"
        if act:
            nodes += [helper.make_node("Sigmoid", ["c"], ["sig"]), helper.make_node("Mul", ["c", "sig"], ["y"])]
            out = "y"
        graph = helper.make_graph(
            nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, h, w])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
            initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias.reshape(-1), "b")])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        proto.ir_version = min(proto.ir_version, 9)
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return _timed(lambda: session.run(None, {"x": x}), runs)

    return timer


def make_timer(backend: str, threads: int) -> Timer:
    if backend == "openvino":
        return openvino_timer(threads)
    if backend == "onnxruntime":
        return onnxruntime_timer(threads)
    raise ValueError(f"unknown latency backend {backend!r}; choose one of {BACKENDS}")


# ---------------------------------------------------------------- the table


class LatencyTable:
    """Measured single-conv latencies (ms), cached in one JSON file; raw runs kept beside the median."""

    def __init__(self, path: Path | None, timer: Timer, runs: int = 5, meta: dict[str, Any] | None = None) -> None:
        self.path, self.timer, self.runs = path, timer, int(runs)
        self.meta = dict(meta or {})
        self.entries: dict[ConvKey, list[float]] = {}
        self.measured = 0  # entries timed by this instance (the rest came from the file)
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text())
                self.entries = {_text_key(k): list(v["raw_ms"]) for k, v in data.get("entries", {}).items()}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:  # a damaged cache is re-measured
                log.warning("latency table %s is unreadable (%s); measuring it again", path, exc)
                self.entries = {}

    def ms(self, key: ConvKey) -> float:
        """Median latency of one conv; timed now when the table lacks it."""
        if key not in self.entries:
            self.entries[key] = [float(v) for v in self.timer(key, self.runs)]
            self.measured += 1
        return float(statistics.median(self.entries[key]))

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entries = {_key_text(k): {"median_ms": statistics.median(v), "raw_ms": [round(x, 5) for x in v]}
                   for k, v in sorted(self.entries.items())}
        atomic_write_text(self.path, json.dumps({**self.meta, "entries": entries}, indent=1) + "\n")


def floor_channels(width: int, granularity: int, min_filters: int) -> int:
    """The fewest channels a group keeps: keep_count's floor, min(min_filters, width) rounded up, capped."""
    floor = min(min_filters, width)
    if floor % granularity:
        floor = min(floor + granularity - floor % granularity, width)
    return floor


def channel_levels(width: int, granularity: int, min_filters: int, levels: int = GRID_LEVELS) -> list[int]:
    """Up to `levels` channel counts a plan can give a side of `width` channels, lowest and full included."""
    floor = floor_channels(width, granularity, min_filters)
    choices = sorted({*range(floor, width + 1, granularity), width})
    if len(choices) <= levels:
        return choices
    picks = np.linspace(0, len(choices) - 1, levels).round().astype(int)
    return sorted({choices[i] for i in picks})


@dataclass
class ConvGrid:
    """One conv's latency over its measured (cin, cout) grid, made monotone; bilinear in between."""

    cin_levels: np.ndarray
    cout_levels: np.ndarray
    raw: np.ndarray  # medians as measured, cin x cout
    smooth: np.ndarray  # less the per-call overhead (>= 0), then running maximum along cin and cout
    depthwise: bool

    def predict(self, cin: int, cout: int) -> float:
        if self.depthwise:
            return float(np.interp(cout, self.cout_levels, self.smooth[0]))
        row = [np.interp(cout, self.cout_levels, self.smooth[i]) for i in range(len(self.cin_levels))]
        return float(np.interp(cin, self.cin_levels, row))


def monotone(grid: np.ndarray) -> np.ndarray:
    """Running maximum along both axes: latency never falls as channels are added (noise removed)."""
    return np.maximum.accumulate(np.maximum.accumulate(grid, axis=0), axis=1)


def build_grids(pruner: ChannelPruner, imgsz: int, table: LatencyTable, granularity: int,
                min_filters: int) -> tuple[dict[nn.Module, ConvGrid], float]:
    """A grid per conv, measured at the channel counts the prunable groups can give its inputs and
    outputs, and the per-call overhead (ms) taken off every entry."""
    sites = pruner.conv_sites(imgsz)
    overhead = table.ms(OVERHEAD_KEY)

    def smooth(raw: np.ndarray) -> np.ndarray:
        return monotone(np.maximum(raw - overhead, 0.0))

    cuts_out: set[nn.Module] = set()
    cuts_in: set[nn.Module] = set()
    for g in pruner.prunable:
        for module, is_out, _ in pruner.channel_cuts(g):
            (cuts_out if is_out else cuts_in).add(module)

    def levels(width: int, cut: bool) -> list[int]:
        return channel_levels(width, granularity, min_filters) if cut else [width]

    grids: dict[nn.Module, ConvGrid] = {}
    for module, site in sites.items():
        if site.depthwise:
            cout = levels(site.cout, module in cuts_out or module in cuts_in)
            raw = np.array([[table.ms(_key(site, c, c, c)) for c in cout]])
            grids[module] = ConvGrid(np.array(cout[-1:]), np.array(cout), raw, smooth(raw), True)
            continue
        cin = levels(site.cin, module in cuts_in)
        cout = levels(site.cout, module in cuts_out)
        raw = np.array([[table.ms(_key(site, ci, co, site.groups)) for co in cout] for ci in cin])
        grids[module] = ConvGrid(np.array(cin), np.array(cout), raw, smooth(raw), False)
    return grids, overhead


def _key(site: ConvSite, cin: int, cout: int, groups: int) -> ConvKey:
    return cin, cout, site.kernel[0], site.stride, groups, site.h_in, site.w_in, site.act


# ---------------------------------------------------------------- the greedy


@dataclass
class Selection:
    plan: dict[str, np.ndarray]
    predicted_before_ms: float
    predicted_after_ms: float
    budget_ms: float
    steps: int

    @property
    def predicted_ratio(self) -> float:
        return self.predicted_after_ms / self.predicted_before_ms if self.predicted_before_ms else 1.0


class _GroupState:
    """One prunable group during the greedy: kept count, the order channels leave in, what each cut reaches."""

    def __init__(self, group: GroupPlan, cuts: list[tuple[nn.Module, bool, np.ndarray]], granularity: int,
                 min_filters: int) -> None:
        self.group = group
        self.order = np.argsort(-group.scores, kind="stable")  # highest first: the tail leaves first
        self.kept = group.width
        self.granularity = granularity
        self.floor = floor_channels(group.width, granularity, min_filters)
        sorted_scores = group.scores[self.order]
        self.tail_importance = np.concatenate([np.cumsum(sorted_scores[::-1])[::-1], [0.0]])  # sum of scores[k:]
        # channels each conv loses when only the top k are kept, for every k
        self.cuts = [(m, is_out, np.concatenate([np.cumsum(counts[self.order][::-1])[::-1], [0]]))
                     for m, is_out, counts in cuts]

    def next_kept(self) -> int | None:
        k = self.kept - (self.kept % self.granularity or self.granularity)
        return k if k >= self.floor else None

    def removed(self, kept: int) -> np.ndarray:
        return np.sort(self.order[kept:])


def select(pruner: ChannelPruner, grids: dict[nn.Module, ConvGrid], imgsz: int, target_ratio: float,
           granularity: int = 8, min_filters: int = 16, overhead_ms: float = 0.0) -> Selection:
    """The greedy of the module docstring; the plan it returns is in `ChannelPruner.plan`'s format.
    Predicted latency = overhead_ms + the sum of the convs' predictions."""
    sites = pruner.conv_sites(imgsz)
    states = [_GroupState(g, pruner.channel_cuts(g), granularity, min_filters) for g in pruner.prunable]
    lost_out = {m: 0 for m in sites}
    lost_in = {m: 0 for m in sites}
    by_conv: dict[nn.Module, list[_GroupState]] = {}
    for st in states:
        for m, _, _ in st.cuts:
            by_conv.setdefault(m, []).append(st)

    def conv_ms(m: nn.Module, d_out: int = 0, d_in: int = 0) -> float:
        site = sites[m]
        ro, ri = lost_out[m] + d_out, lost_in[m] + d_in
        if site.depthwise:
            c = site.cout - max(ro, ri)
            return grids[m].predict(c, c)
        return grids[m].predict(site.cin - ri, site.cout - ro)

    def delta(st: _GroupState, kept: int) -> tuple[float, dict[nn.Module, tuple[int, int]]]:
        """Predicted ms saved by moving `st` from its kept count to `kept`, and the channel changes per conv."""
        change: dict[nn.Module, list[int]] = {}
        for m, is_out, tail in st.cuts:
            d = int(tail[kept] - tail[st.kept])
            change.setdefault(m, [0, 0])[0 if is_out else 1] += d
        saved = sum(conv_ms(m) - conv_ms(m, *d) for m, d in change.items())
        return saved, {m: (d[0], d[1]) for m, d in change.items()}

    def score(st: _GroupState) -> tuple[float, int | None, dict]:
        kept = st.next_kept()
        if kept is None:
            return np.inf, None, {}
        saved, change = delta(st, kept)
        lost = st.tail_importance[kept] - st.tail_importance[st.kept]
        return (lost / saved if saved > 0 else np.inf), kept, change

    before = overhead_ms + sum(conv_ms(m) for m in sites)
    budget = float(target_ratio) * before
    total = before
    cache = {id(st): score(st) for st in states}
    steps = 0
    while total > budget:
        best = min(states, key=lambda s: cache[id(s)][0], default=None)
        if best is None or cache[id(best)][1] is None:
            break  # every group is at its floor
        cost, kept, change = cache[id(best)]
        if not np.isfinite(cost):
            break  # no block left saves predicted latency
        total -= sum(conv_ms(m) - conv_ms(m, *d) for m, d in change.items())
        for m, (d_out, d_in) in change.items():
            lost_out[m] += d_out
            lost_in[m] += d_in
        best.kept = kept
        steps += 1
        touched = {id(s): s for m in change for s in by_conv.get(m, [])}
        touched[id(best)] = best
        for s in touched.values():
            cache[id(s)] = score(s)
    after = overhead_ms + sum(conv_ms(m) for m in sites)  # recomputed: the running total only saw the changed convs
    plan = {st.group.root: st.removed(st.kept) for st in states if st.kept < st.group.width}
    return Selection(plan=plan, predicted_before_ms=before, predicted_after_ms=after, budget_ms=budget, steps=steps)


def predict_ms(pruner: ChannelPruner, grids: dict[nn.Module, ConvGrid], plan: dict[str, np.ndarray],
               imgsz: int, overhead_ms: float = 0.0) -> float:
    """Predicted latency of the model after `plan`: the overhead plus its convs' table predictions."""
    return overhead_ms + sum(grids[m].predict(cin, cout) for m, (cin, cout, _) in pruner.conv_channels(plan, imgsz).items())


# ---------------------------------------------------------------- the whole model, measured


def measure_models(models: Sequence[nn.Module], imgsz: int, backend: str, threads: int, runs: int,
                   workdir: Path) -> list[float]:
    """Median latency (ms) of each float model exported to ONNX, on `backend`, timed interleaved so that
    load changes on a shared machine hit every model alike."""
    import copy

    import torch

    calls = []
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    for i, model in enumerate(models):
        path = workdir / f"model{i}.onnx"
        m = copy.deepcopy(model).float().eval()
        for p in m.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            torch.onnx.export(m, torch.from_numpy(x), str(path), opset_version=17, input_names=["images"],
                              dynamo=False)
        calls.append(_model_call(path, backend, threads, x))
    times: list[list[float]] = [[] for _ in models]
    for call in calls:
        for _ in range(WARMUP):
            call()
    for _ in range(runs):
        for call, out in zip(calls, times, strict=True):
            t0 = time.perf_counter()
            call()
            out.append((time.perf_counter() - t0) * 1e3)
    return [float(statistics.median(t)) for t in times]


def _model_call(path: Path, backend: str, threads: int, x: np.ndarray) -> Callable[[], Any]:
    if backend == "openvino":
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU", {
            "INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()
        return lambda: request.infer({0: x})
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: x})
