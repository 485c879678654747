"""Latency-aware pruning: the FLOPs target, the latency table, the greedy under a budget, the stage."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import latency
from pipeline.models import build_model, load_model, save_checkpoint
from pipeline.pruning import ChannelPruner
from tests.conftest import run_cli
from tests.test_prune import _record


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One torch thread here and in CLI subprocesses (the shared 2-core machine; see test_prune)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fake_timer(calls: list | None = None, noise: float = 0.3, seed: int = 0) -> latency.Timer:
    """MACs-proportional latency plus a fixed call cost, with multiplicative noise that breaks monotonicity."""
    rng = np.random.default_rng(seed)

    def timer(key: latency.ConvKey, runs: int) -> list[float]:
        cin, cout, k, s, g, h, w, _ = key
        if calls is not None:
            calls.append(key)
        ms = 0.05 + 1e-6 * k * k * (cin // g) * cout * (h // s) * (w // s)
        return list(ms * (1 + noise * rng.standard_normal(runs)))

    return timer


@pytest.fixture(scope="module")
def v8n():
    return build_model("yolov8n", nc=2).eval()


IMGSZ = 64


def _pruner(model: nn.Module) -> ChannelPruner:
    return ChannelPruner(copy.deepcopy(model))


# ------------------------------------------------------------------ FLOPs


def test_analytic_flops_match_thop_on_the_unpruned_model(v8n):
    from pipeline.models import gflops

    pruner = _pruner(v8n)
    macs = pruner.count_flops({}, IMGSZ)
    # thop also counts BN, activations and the head's decode; convs are nearly all of it
    assert macs * 2 / 1e9 == pytest.approx(gflops(v8n, IMGSZ), rel=0.05)


def test_count_flops_matches_the_cut_model(v8n):
    pruner = _pruner(v8n)
    plan = pruner.plan(0.95)
    predicted, before = pruner.count_flops(plan, IMGSZ), pruner.count_flops({}, IMGSZ)
    pruner.apply(plan)
    assert predicted == ChannelPruner(pruner.model).count_flops({}, IMGSZ) < before


@pytest.mark.parametrize("target", [0.3, 0.6])
def test_target_flops_ratio_lands_within_a_granularity_step(v8n, target):
    pruner = _pruner(v8n)
    before = pruner.count_flops({}, IMGSZ)
    pth, ratio = pruner.find_pth(target, granularity=8, min_filters=16, by="flops", imgsz=IMGSZ)
    plan = pruner.plan(pth, 8, 16)
    assert pruner.count_flops(plan, IMGSZ) / before == pytest.approx(ratio)
    # one granularity step: the FLOPs of 8 more channels on the widest group the bisection stopped on
    step = max(_step_flops(pruner, g, plan, 8) for g in pruner.prunable) / before
    assert abs(ratio - target) <= step, (ratio, target, step)


def _step_flops(pruner: ChannelPruner, group, plan: dict, granularity: int) -> int:
    """FLOPs one more (or one fewer) block of `granularity` channels of `group` costs under `plan`."""
    removed = plan.get(group.root, np.zeros(0, dtype=int))
    if len(removed) == 0:
        fewer = dict(plan, **{group.root: np.argsort(group.scores, kind="stable")[:granularity]})
        return pruner.count_flops(plan, IMGSZ) - pruner.count_flops(fewer, IMGSZ)
    more = dict(plan, **{group.root: removed[np.argsort(-group.scores[removed], kind="stable")][granularity:]})
    return pruner.count_flops(more, IMGSZ) - pruner.count_flops(plan, IMGSZ)


# ------------------------------------------------------------------ the table


def test_channel_levels():
    assert latency.channel_levels(64, 8, 16, levels=10) == [16, 24, 32, 40, 48, 56, 64]
    assert latency.channel_levels(64, 8, 16, levels=4) == [16, 32, 48, 64]
    assert latency.channel_levels(20, 8, 16, levels=4) == [16, 20]  # the full width is always a choice
    assert latency.channel_levels(12, 8, 16, levels=4) == [12]  # narrower than min_filters: never cut


def test_an_inflated_overhead_reading_does_not_flatten_the_table(v8n):
    """The near-empty model read during a busy moment costs more than the convs: the overhead taken off
    is capped at the cheapest conv, so the grids keep their slopes and the selection still saves."""
    timer = fake_timer(noise=0.0)

    def busy_overhead(key: latency.ConvKey, runs: int) -> list[float]:
        return [10.0] * runs if key == latency.OVERHEAD_KEY else timer(key, runs)

    pruner = _pruner(v8n)
    grids, overhead = latency.build_grids(pruner, IMGSZ, latency.LatencyTable(None, busy_overhead), 8, 16)
    assert overhead == pytest.approx(min(float(g.raw.min()) for g in grids.values())) and overhead < 10.0
    assert any(float(g.smooth.max()) > 0 for g in grids.values())
    sel = latency.select(pruner, grids, IMGSZ, 0.7, granularity=8, min_filters=16, overhead_ms=overhead)
    assert sel.predicted_after_ms < sel.predicted_before_ms and sel.plan


def test_table_is_monotone_in_channels_and_records_raw_timings(v8n, tmp_path):
    calls: list = []
    path = tmp_path / ".latency" / "t.json"
    table = latency.LatencyTable(path, fake_timer(calls, noise=0.3), runs=3, meta={"backend": "fake"})
    pruner = _pruner(v8n)
    grids, overhead = latency.build_grids(pruner, IMGSZ, table, granularity=8, min_filters=16)
    assert overhead > 0
    noisy = 0
    for grid in grids.values():
        assert np.all(np.diff(grid.smooth, axis=1) >= 0) and np.all(np.diff(grid.smooth, axis=0) >= 0)
        noisy += int(np.any(np.diff(grid.raw, axis=1) < 0) or np.any(np.diff(grid.raw, axis=0) < 0))
        assert np.all(grid.cout_levels % 8 == 0) or grid.cout_levels[-1] % 8  # multiples of granularity (or full)
    assert noisy > 0  # the raw medians were not monotone: the smoothing did something
    # predictions are monotone between grid points too
    conv, grid = next((m, g) for m, g in grids.items() if len(g.cin_levels) > 1 and len(g.cout_levels) > 1)
    cins = np.arange(grid.cin_levels[0], grid.cin_levels[-1] + 1)
    assert np.all(np.diff([grid.predict(c, grid.cout_levels[-1]) for c in cins]) >= -1e-12)

    table.save()
    saved = json.loads(path.read_text())
    assert saved["backend"] == "fake" and len(saved["entries"]) == len(table.entries) == len(set(calls))
    entry = next(iter(saved["entries"].values()))
    assert len(entry["raw_ms"]) == 3 and entry["median_ms"] == pytest.approx(np.median(entry["raw_ms"]), abs=1e-4)

    again: list = []
    cached = latency.LatencyTable(path, fake_timer(again), runs=3)
    latency.build_grids(_pruner(v8n), IMGSZ, cached, granularity=8, min_filters=16)
    assert again == [] and cached.measured == 0  # every entry came from the file


def test_damaged_table_file_is_measured_again(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("{not json")
    calls: list = []
    table = latency.LatencyTable(path, fake_timer(calls), runs=2)
    assert table.entries == {} and table.ms((8, 8, 1, 1, 1, 4, 4, False)) > 0 and len(calls) == 1
    table.save()
    assert len(json.loads(path.read_text())["entries"]) == 1


def test_machine_key_names_backend_threads_size_and_precision():
    key = latency.machine_key("openvino", 160, 2)
    assert key.endswith("openvino-t2-160px") and "cores" in key and "/" not in key and " " not in key
    assert latency.machine_key("openvino", 160, 2, "int8") == f"{key}-int8"  # f32 caches keep their name
    assert latency.resolve_precision("auto", "int8") == "int8"
    assert latency.resolve_precision("auto", "fp16") == latency.resolve_precision("auto", "fp32") == "f32"
    assert latency.resolve_precision("f32", "int8") == "f32"


@pytest.mark.parametrize("precision", ["int8", "f32"])
@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_real_timer_measures_one_conv(backend, precision):
    pytest.importorskip(backend)
    timer = latency.make_timer(backend, threads=1, precision=precision)
    small = timer((8, 8, 3, 1, 1, 16, 16, True), 3)
    grouped = timer((16, 16, 3, 2, 16, 16, 16, True), 2)  # depthwise, stride 2
    linear = timer((16, 8, 1, 1, 1, 16, 16, False), 2)  # a head output conv: no activation, float out
    assert len(small) == 3 and len(grouped) == 2 and all(t > 0 for t in small + grouped + linear)


@pytest.mark.parametrize("groups", [1, 16])
def test_int8_table_entry_runs_an_int8_kernel_on_openvino(groups):
    ov = pytest.importorskip("openvino")
    key = (16, 16, 3, 1, groups, 16, 16, True)
    compiled = ov.Core().compile_model(latency.openvino_conv(key, "int8"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    convs = [op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ops()
             if op.get_rt_info()["layerType"].astype(str) == "Convolution"]
    assert convs and all(p in ("u8", "i8") for p in convs), convs
    f32 = ov.Core().compile_model(latency.openvino_conv(key, "f32"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert all(op.get_rt_info()["runtimePrecision"].astype(str) == "f32" for op in f32.get_runtime_model().get_ops()
               if op.get_rt_info()["layerType"].astype(str) == "Convolution")


def test_int8_table_entry_is_a_qdq_graph_like_our_exports():
    onnx = pytest.importorskip("onnx")
    proto = latency.onnx_conv((16, 16, 3, 1, 1, 16, 16, True), "int8")
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    # input, weights and the activation's output (the next layer's input) are quantised
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == 3 and "Conv" in ops
    assert "QuantizeLinear" not in [n.op_type for n in latency.onnx_conv((16, 16, 3, 1, 1, 16, 16, True), "f32").graph.node]


# ------------------------------------------------------------------ the greedy


@pytest.mark.parametrize("target", [0.5, 0.7, 0.9])
def test_greedy_respects_budget_and_min_filters(v8n, target):
    pruner = _pruner(v8n)
    table = latency.LatencyTable(None, fake_timer(noise=0.0), runs=1)
    grids, overhead = latency.build_grids(pruner, IMGSZ, table, granularity=8, min_filters=16)
    sel = latency.select(pruner, grids, IMGSZ, target, granularity=8, min_filters=16, overhead_ms=overhead)
    assert sel.predicted_after_ms <= sel.budget_ms == pytest.approx(target * sel.predicted_before_ms)
    # the running total and an independent prediction of the plan agree
    assert latency.predict_ms(pruner, grids, sel.plan, IMGSZ, overhead) == pytest.approx(sel.predicted_after_ms)
    by_root = {g.root: g for g in pruner.groups}
    for root, removed in sel.plan.items():
        g = by_root[root]
        assert g.excluded_by is None
        kept = g.width - len(removed)
        assert kept >= min(16, g.width) and (kept % 8 == 0 or kept == g.width)
        keep = np.setdiff1d(np.arange(g.width), removed)
        assert g.scores[keep].min() >= g.scores[removed].max()  # the most important channels stay
    pruner.apply(sel.plan)
    with torch.no_grad():
        assert torch.isfinite(pruner.model(torch.zeros(1, 3, IMGSZ, IMGSZ))[0]).all()


def test_greedy_stops_at_floors_when_budget_is_out_of_reach(v8n):
    pruner = _pruner(v8n)
    grids, overhead = latency.build_grids(pruner, IMGSZ, latency.LatencyTable(None, fake_timer(noise=0.0)), 8, 16)
    sel = latency.select(pruner, grids, IMGSZ, 0.01, granularity=8, min_filters=16, overhead_ms=overhead)
    assert sel.predicted_after_ms > sel.budget_ms and sel.steps > 0
    for g in pruner.prunable:  # every group at its floor
        assert g.width - len(sel.plan.get(g.root, [])) == latency.floor_channels(g.width, 8, 16)


def test_greedy_keeps_excluded_groups(v8n):
    pruner = ChannelPruner(copy.deepcopy(v8n), excluded_layers=["model.2"])
    grids, overhead = latency.build_grids(pruner, IMGSZ, latency.LatencyTable(None, fake_timer(noise=0.0)), 8, 16)
    sel = latency.select(pruner, grids, IMGSZ, 0.3, overhead_ms=overhead)
    excluded = {g.root for g in pruner.groups if g.excluded_by}
    assert excluded and not excluded & set(sel.plan) and sel.plan


def test_greedy_prefers_cheap_importance_per_ms():
    """Two parallel branches at the same width: the one on the expensive 3x3 conv goes first."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cheap, self.costly = nn.Conv2d(3, 32, 1), nn.Conv2d(3, 32, 3, padding=1)
            self.out = nn.Conv2d(64, 4, 1)

        def forward(self, x):
            return self.out(torch.cat([self.cheap(x), self.costly(x)], 1))

    pruner = ChannelPruner(Two())
    grids, overhead = latency.build_grids(pruner, 32, latency.LatencyTable(None, fake_timer(noise=0.0)), 8, 8)
    sel = latency.select(pruner, grids, 32, 0.8, granularity=8, min_filters=8, overhead_ms=overhead)
    roots = set(sel.plan)
    assert "costly" in roots and "cheap" not in roots, sel.plan


# ------------------------------------------------------------------ the stage


@pytest.fixture
def tiny64(tmp_path):
    model = build_model("yolov8n", nc=2)
    model.names = {0: "red", 1: "blue"}
    return save_checkpoint(model, tmp_path / "v8n64.pt", extra={"train_args": {"imgsz": 64}})


def _latency_stage_args(tiny64: Path, results_dir: Path) -> tuple[str, ...]:
    """The CLI of a latency-mode prune of the tiny model (INT8 table, one timed run per entry)."""
    return ("stage=prune", "experiment=smoke", f"results_dir={results_dir}", f"prune.input={tiny64}",
            "prune.evaluate=false", "prune.mode=latency", "prune.target_latency_ratio=0.7", "prune.latency_runs=1",
            "engine.threads=1")


def test_stage_latency_mode_records_predicted_and_measured_latency(tiny64, results_dir):
    args = _latency_stage_args(tiny64, results_dir)
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = _record(results_dir)
    m = rec["metrics"]
    assert rec["status"] == "succeeded" and m["mode"] == "latency" and m["pth"] is None
    assert m["latency_backend"] in latency.BACKENDS and m["latency_threads"] == 1 and m["imgsz"] == 64
    assert m["latency_precision"] == "int8"  # engine.precision=int8: the table and the measurement are INT8
    assert 0 < m["latency_predicted_after_ms"] < m["latency_predicted_before_ms"]
    assert m["latency_predicted_ratio"] <= 0.7 or any("out of reach" in w for w in rec["warnings"])
    assert m["latency_measured_before_ms"] > 0 and m["latency_measured_after_ms"] > 0 and m["latency_measured_ratio"]
    assert m["params"] < m["params_before"] and 0 < m["kept_conv_flops_ratio"] < 1
    table = results_dir / m["latency_table"]
    assert table.parent.name == ".latency" and len(json.loads(table.read_text())["entries"]) == m["latency_table_entries"]
    outputs = {o["role"]: results_dir / o["path"] for o in rec["outputs"]}
    assert sum(p.numel() for p in load_model(outputs["model"]).parameters()) == m["params"]
    assert "meas. ms" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_stage_latency_table_is_reused_and_measured_again_at_another_deploy_size(tiny64, results_dir):
    args = _latency_stage_args(tiny64, results_dir)
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    m = _record(results_dir)["metrics"]
    again = run_cli(*args)  # the table is reused: nothing measured the second time
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(0 measured now" in again.stdout + again.stderr
    assert _record(results_dir)["metrics"]["params"] == m["params"]  # same table, same greedy, same cut

    deploy = run_cli(*args, "prune.latency_imgsz=96")  # deployed at another size than trained: timed there
    assert deploy.returncode == 0, deploy.stderr[-3000:]
    m96 = _record(results_dir)["metrics"]
    assert m96["latency_imgsz"] == 96 and m96["imgsz"] == 64 and m["latency_imgsz"] == 64
    assert m96["latency_table"] != m["latency_table"] and "96" in Path(m96["latency_table"]).name


def test_stage_target_flops_ratio(tiny64, results_dir):
    proc = run_cli("stage=prune", "experiment=smoke", f"results_dir={results_dir}", f"prune.input={tiny64}",
                   "prune.evaluate=false", "prune.mode=target", "prune.target_flops_ratio=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = _record(results_dir)["metrics"]
    assert m["target_flops_ratio"] == 0.5 and "target_params_ratio" not in m
    assert abs(m["kept_conv_flops_ratio"] - 0.5) <= 0.05 and abs(m["kept_flops_ratio"] - 0.5) <= 0.08


def test_report_labels_latency_and_flops_runs(tmp_path):
    from stages.report import _prune_setting

    latency_run = {"metrics": {"mode": "latency", "pth": None, "target_latency_ratio": 0.5}}
    flops_run = {"metrics": {"mode": "target", "pth": 0.9, "target_flops_ratio": 0.4, "target_params_ratio": 0.5}}
    assert _prune_setting(latency_run, tmp_path) == "latency=0.5"
    assert _prune_setting(flops_run, tmp_path) == "target_flops=0.4"
    deployed = {"metrics": {"mode": "latency", "target_latency_ratio": 0.5, "imgsz": 160, "latency_imgsz": 640,
                            "blocks_dropped": ["model.4.m.1"]}}
    assert _prune_setting(deployed, tmp_path) == "latency=0.5@640 drop_blocks=1"
    threshold = {"metrics": {"mode": "threshold", "pth": 0.5, "blocks_dropped": ["a", "b"]}}
    assert _prune_setting(threshold, tmp_path) == "0.5 drop_blocks=2"


def test_bad_latency_backend_is_a_user_error(tiny64, results_dir):
    proc = run_cli("stage=prune", "experiment=smoke", f"results_dir={results_dir}", f"prune.input={tiny64}",
                   "prune.mode=latency", "prune.latency_backend=tensorrt")
    assert proc.returncode == 2 and "prune.latency_backend" in proc.stdout + proc.stderr
