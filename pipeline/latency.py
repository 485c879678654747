"""Latency-aware channel selection (prune.mode=latency): a measured per-conv latency table and a greedy.

The table: every conv of the model, rebuilt alone (conv + bias + activation: BN folds into the bias
on deploy) at its input resolution, stride, kernel and groups, and timed on the deploy backend
(OpenVINO on CPUs, ONNX Runtime as the fallback) at the deploy precision: median of `runs` timed
calls after a warm-up. `int8` (the engine's default) quantises the conv as the deployed graph does:
a per-tensor quantiser on its input, per-channel INT8 weights and, after an activation, the next
layer's input quantiser, so the backend runs its INT8 kernel and writes INT8 (INT8 saves more on
wide 3x3 convs than on 1x1 ones, so an f32 table ranks what to cut differently: figures in
docs/prune.md). `f32` times the float conv.
A conv is measured on a grid of the channel counts a plan can give it (multiples of granularity
from the min_filters floor up to the full width, `GRID_LEVELS` of them per side it can lose);
between grid points the prediction is bilinear. Every single-conv call pays the backend's fixed
cost per inference (measured on a 1-channel 1x1 conv): it is taken off each entry and counted
once for the whole model, or the sum of ~70 convs would count it ~70 times. Timings are noisy,
so each conv's grid is made monotone (running maximum along input, then output channels) before
it predicts anything; the raw timings stay in the table file.

The file is `<results_dir>/.latency/<key>.json`, the key naming the CPU model, its core count, the
backend, the thread count, the image size and (int8) the precision: a second prune on the same machine reuses it, and
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

from pipeline.engines.common import CalibrationSet
from pipeline.manifest import atomic_write_text
from pipeline.pruning import ChannelPruner, ConvSite, GroupPlan
from pipeline.yolo_env import library_prints

log = logging.getLogger("pipeline.prune")

BACKENDS = ("openvino", "onnxruntime")
PRECISIONS = ("int8", "f32")
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


def resolve_precision(name: str, engine_precision: str) -> str:
    """`auto` -> int8 when the engine deploys INT8, else f32 (fp16 on a CPU runs its float kernels)."""
    if name != "auto":
        return name
    return "int8" if engine_precision == "int8" else "f32"


def machine_key(backend: str, imgsz: int, threads: int, precision: str = "f32") -> str:
    """File-name-safe key of one table: CPU model, core count, backend, threads, image size, precision
    (f32 tables keep the key they had before int8 ones existed)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    raw = f"{cpu}-{os.cpu_count()}cores-{backend}-t{threads}-{imgsz}px" + ("" if precision == "f32" else f"-{precision}")
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


def timed_calls(call: Callable[[], Any], runs: int, warmup: int = WARMUP) -> list[float]:
    """Milliseconds of each of `runs` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


# Symmetric INT8 ranges of the timed conv's quantisers (ModelOpt's form: signed, zero point 0). The
# values only pick the kernels; they need not fit the random data.
_INPUT_AMAX = 1.0
_OUTPUT_AMAX = 4.0


def _weight_amax(weight: np.ndarray) -> np.ndarray:
    """Per-output-channel max |w| (never 0), shaped to broadcast against the kernel."""
    amax = np.abs(weight).reshape(weight.shape[0], -1).max(axis=1)
    return np.maximum(amax, 1e-6).reshape(-1, *([1] * (weight.ndim - 1))).astype(np.float32)


def openvino_conv(key: ConvKey, precision: str = "int8") -> Any:
    """One conv + bias + SiLU as an openvino.Model (opset13); `int8` wraps it in FakeQuantize ops
    (module docstring), which the CPU plugin runs as an INT8 kernel."""
    import openvino as ov
    import openvino.opset13 as ops

    def fq(node: Any, amax: float | np.ndarray, levels: int = 256) -> Any:
        lo = np.asarray(-amax, np.float32)
        hi = np.asarray(amax * (127 / 128 if levels == 256 else 1.0), np.float32)
        return ops.fake_quantize(node, ops.constant(lo), ops.constant(hi), ops.constant(lo), ops.constant(hi), levels)

    cin, cout, k, s, g, h, w, act = key
    _, weight, bias = _weights(key)
    p = k // 2  # Ultralytics' autopad
    inp = ops.parameter([1, cin, h, w], np.float32)
    src = fq(inp, _INPUT_AMAX) if precision == "int8" else inp
    conv_args = {"strides": [s, s], "pads_begin": [p, p], "pads_end": [p, p], "dilations": [1, 1]}
    kernel_np = weight if g == 1 else weight.reshape(g, cout // g, cin // g, k, k)
    kernel = ops.constant(kernel_np)
    if precision == "int8":
        amax = _weight_amax(weight)
        kernel = fq(kernel, amax if g == 1 else amax.reshape(g, cout // g, 1, 1, 1), levels=255)
    y = (ops.convolution if g == 1 else ops.group_convolution)(src, kernel, **conv_args)
    y = ops.add(y, ops.constant(bias))
    if act:
        y = ops.swish(y)
        if precision == "int8":  # the next conv's input quantiser: the kernel writes INT8
            y = fq(y, _OUTPUT_AMAX)
    return ov.Model([y], [inp])


def openvino_timer(threads: int, precision: str = "int8") -> Timer:
    """Times `openvino_conv`, compiled for latency with f32 float parts (the engine stage's settings)."""
    import openvino as ov

    from pipeline.engines import openvino as ovb

    core = ov.Core()
    config = ovb.compile_config("f32", {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY"})

    def timer(key: ConvKey, runs: int) -> list[float]:
        x = _weights(key)[0]
        request = core.compile_model(openvino_conv(key, precision), "CPU", config).create_infer_request()
        return timed_calls(lambda: request.infer({0: x}), runs)

    return timer


def onnx_conv(key: ConvKey, precision: str = "int8") -> Any:
    """The same conv as an ONNX ModelProto (Conv + Sigmoid * x); `int8` with QuantizeLinear /
    DequantizeLinear pairs around it (the form of our QDQ exports)."""
    from onnx import TensorProto, helper, numpy_helper

    def qdq(name: str, scale: str, zero: str, out: str, axis: int | None = None) -> list[Any]:
        extra = {} if axis is None else {"axis": axis}
        return [helper.make_node("QuantizeLinear", [name, scale, zero], [f"{out}_q"], **extra),
                helper.make_node("DequantizeLinear", [f"{out}_q", scale, zero], [out], **extra)]

    cin, cout, k, s, g, h, w, act = key
    _, weight, bias = _weights(key)
    p = k // 2
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias.reshape(-1), "b")]
    nodes: list[Any] = []
    src, kernel = "x", "w"
    if precision == "int8":
        inits += [numpy_helper.from_array(np.array(_INPUT_AMAX / 127, np.float32), "s_in"),
                  numpy_helper.from_array(np.array(_OUTPUT_AMAX / 127, np.float32), "s_out"),
                  numpy_helper.from_array(np.array(0, np.int8), "z"),
                  numpy_helper.from_array((_weight_amax(weight).reshape(-1) / 127).astype(np.float32), "s_w"),
                  numpy_helper.from_array(np.zeros(cout, np.int8), "z_w")]
        nodes += qdq("x", "s_in", "z", "xq") + qdq("w", "s_w", "z_w", "wq", axis=0)
        src, kernel = "xq", "wq"
    nodes.append(helper.make_node("Conv", [src, kernel, "b"], ["c"], kernel_shape=[k, k], strides=[s, s],
                                  pads=[p, p, p, p], group=g))
    out = "c"
    if act:
        nodes += [helper.make_node("Sigmoid", ["c"], ["sig"]), helper.make_node("Mul", ["c", "sig"], ["y"])]
        out = "y"
        if precision == "int8":
            nodes += qdq("y", "s_out", "z", "yq")
            out = "yq"
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, h, w])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, cout, (h + 2 * p - k) // s + 1,
                                                                (w + 2 * p - k) // s + 1])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = min(proto.ir_version, 9)
    return proto


def onnxruntime_timer(threads: int, precision: str = "int8") -> Timer:
    """Times `onnx_conv` on ONNX Runtime's CPU provider (the engine stage's session settings)."""
    from pipeline.engines import onnxruntime as ortb

    def timer(key: ConvKey, runs: int) -> list[float]:
        x = _weights(key)[0]
        session = ortb.session(onnx_conv(key, precision).SerializeToString(), threads)
        return timed_calls(lambda: session.run(None, {"x": x}), runs)

    return timer


def make_timer(backend: str, threads: int, precision: str = "int8") -> Timer:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown latency precision {precision!r}; choose one of {PRECISIONS}")
    if backend == "openvino":
        return openvino_timer(threads, precision)
    if backend == "onnxruntime":
        return onnxruntime_timer(threads, precision)
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
    outputs, and the per-call overhead (ms) taken off every entry.

    The overhead is the near-empty model's time, but never more than the cheapest conv measured: every
    one-conv model pays the call overhead, so a larger reading is noise (one busy moment during a
    one-run measurement), and taking it off every entry would clip the small convs' grids flat to 0.
    """
    sites = pruner.conv_sites(imgsz)
    empty = table.ms(OVERHEAD_KEY)
    cuts_out: set[nn.Module] = set()
    cuts_in: set[nn.Module] = set()
    for g in pruner.prunable:
        for module, is_out, _ in pruner.channel_cuts(g):
            (cuts_out if is_out else cuts_in).add(module)

    def levels(width: int, cut: bool) -> list[int]:
        return channel_levels(width, granularity, min_filters) if cut else [width]

    grids: dict[nn.Module, ConvGrid] = {}  # smooth set once the overhead is known
    for module, site in sites.items():
        if site.depthwise:
            cout = levels(site.cout, module in cuts_out or module in cuts_in)
            raw = np.array([[table.ms(_key(site, c, c, c)) for c in cout]])
            grids[module] = ConvGrid(np.array(cout[-1:]), np.array(cout), raw, raw, True)
            continue
        cin = levels(site.cin, module in cuts_in)
        cout = levels(site.cout, module in cuts_out)
        raw = np.array([[table.ms(_key(site, ci, co, site.groups)) for co in cout] for ci in cin])
        grids[module] = ConvGrid(np.array(cin), np.array(cout), raw, raw, False)
    overhead = min([empty] + [float(g.raw.min()) for g in grids.values()])
    for g in grids.values():
        g.smooth = monotone(np.maximum(g.raw - overhead, 0.0))
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


def _merge_as_exported(path: Path) -> None:
    """The export stage's conv merge (pipeline.graph_merge), so the measured model is the shipped graph."""
    import onnx

    from pipeline.graph_merge import merge_split_convs

    model = onnx.load(str(path))
    if merge_split_convs(model):
        onnx.save(model, str(path))


def measure_models(models: Sequence[nn.Module], imgsz: int, backend: str, threads: int, runs: int,
                   workdir: Path, calib: CalibrationSet | None = None) -> list[float]:
    """Median latency (ms) of each model exported to ONNX and built for `backend` as the engine stage
    builds it: float, or INT8 by that backend's post-training quantiser on `calib` (NNCF for OpenVINO,
    ONNX Runtime's static QDQ), timed interleaved so that load changes on a shared machine hit every
    model alike."""
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
        _merge_as_exported(path)
        calls.append(_model_call(path, backend, threads, x, calib))
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


def _model_call(path: Path, backend: str, threads: int, x: np.ndarray,
                calib: CalibrationSet | None = None) -> Callable[[], Any]:
    if backend == "openvino":
        from pipeline.engines import openvino as ovb

        out = path.with_name(f"{path.stem}_openvino_model")
        with library_prints():
            ovb.build(path, out, "int8" if calib is not None else "fp32", False, calib, {}, log)
        compiled = ovb.compile_static(out / "model.xml", x.shape, threads, "f32")
        return lambda: ovb.infer(compiled, x)
    from pipeline.engines import onnxruntime as ortb

    if calib is not None:
        quantised = path.with_name(f"{path.stem}_int8.onnx")
        with library_prints():
            ortb.quantize_int8(path, quantised, calib, log)
        path = quantised
    session = ortb.session(path, threads)
    return lambda: ortb.run(session, x)
