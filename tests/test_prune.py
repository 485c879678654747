"""Pruning: TAO's keep rules, equalisation on coupled layers, exclusions, split-free blocks, the stage."""

from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.errors import UserError
from pipeline.models import build_model, count_params, load_model, save_checkpoint
from pipeline.modules import SplitFreeC2f, swap_split_blocks
from pipeline.pruning import (
    ChannelPruner,
    equalize,
    head_output_layers,
    keep_count,
    kept_indices,
    layer_channels,
    normalize,
)
from tests.conftest import run_cli


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One torch thread here and in CLI subprocesses: on the shared 2-core machine, two threads that
    spin-wait for each other made these small forwards 10-50x slower (measured)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# ------------------------------------------------------------------ keep-count rule (property tests)

scores_st = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=300).map(np.array)


@settings(max_examples=300, deadline=None)
@given(scores=scores_st, pth=st.floats(0.0, 1.0), g=st.integers(1, 32), nf=st.integers(1, 64))
def test_keep_count_follows_tao_rules(scores, pth, g, nf):
    width = len(scores)
    k = keep_count(scores, pth, g, nf)
    assert k <= width
    assert k == width or k % g == 0
    assert k >= min(nf, width)
    assert k >= min(int((scores > pth).sum()), width)  # every filter above pth fits
    keep = kept_indices(scores, pth, g, nf)
    assert len(keep) == k and np.all(np.diff(keep) > 0)
    removed = np.setdiff1d(np.arange(width), keep)
    if len(removed):  # the highest-scored are the ones kept
        assert scores[keep].min() >= scores[removed].max()
        assert np.all(scores[removed] <= pth) or k == width


@settings(max_examples=200, deadline=None)
@given(scores=scores_st, p1=st.floats(0.0, 1.0), p2=st.floats(0.0, 1.0), g=st.integers(1, 32),
       nf=st.integers(1, 64))
def test_keep_count_is_monotone_in_pth(scores, p1, p2, g, nf):
    lo, hi = min(p1, p2), max(p1, p2)
    assert keep_count(scores, hi, g, nf) <= keep_count(scores, lo, g, nf)


def test_keep_count_examples():
    s = np.array([0.05, 0.3, 0.9, 1.0] + [0.5] * 20)  # 24 filters, 22 above 0.2
    assert keep_count(s, 0.2, granularity=8, min_filters=16) == 24  # 22 -> 24
    assert keep_count(s, 0.6, granularity=8, min_filters=16) == 16  # 2 -> min 16
    assert keep_count(s, 0.6, granularity=8, min_filters=1) == 8  # 2 -> 8
    assert keep_count(s[:4], 0.95, granularity=8, min_filters=16) == 4  # capped at width
    assert keep_count(np.zeros(32), 0.0, granularity=8, min_filters=8) == 8  # zero filters go first


def test_normalizers():
    x = np.array([1.0, 2.0, 4.0])
    np.testing.assert_allclose(normalize(x, "max"), [0.25, 0.5, 1.0])
    np.testing.assert_allclose(normalize(x, "L2"), x / np.sqrt(21.0) * 3)  # TAO: / ||x||_2 * count
    assert not normalize(np.zeros(4), "max").any() and not normalize(np.zeros(4), "L2").any()


def test_equalize_modes():
    rows = np.array([[1.0, 0.2, 0.0], [0.5, 0.8, 0.4]])
    np.testing.assert_allclose(equalize(rows, "union"), [1.0, 0.8, 0.4])
    np.testing.assert_allclose(equalize(rows, "intersection"), [0.5, 0.2, 0.0])
    np.testing.assert_allclose(equalize(rows, "arithmetic_mean"), [0.75, 0.5, 0.2])
    np.testing.assert_allclose(equalize(rows, "geometric_mean"), [np.sqrt(0.5), 0.4, 0.0])
    with_gap = np.array([[1.0, np.nan], [0.5, 0.3]])  # a layer that lacks a channel does not vote on it
    np.testing.assert_allclose(equalize(with_gap, "intersection"), [0.5, 0.3])


# ------------------------------------------------------------------ equalisation on a coupled pair


class CoupledPair(nn.Module):
    """a(x) + b(x) -> c: a and b are TAO's coupled layers (one torch-pruning group)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1, bias=False)
        self.b = nn.Conv2d(3, 8, 1, bias=False)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(self.a(x) + self.b(x))


A_NORMS = np.array([1.0, 0.9, 0.2, 0.2, 0.6, 0.05, 0.4, 0.3])
B_NORMS = np.array([2.0, 0.2, 1.8, 0.4, 1.2, 0.1, 0.2, 1.6])  # max 2.0: normalised differently from a


def _pair() -> CoupledPair:
    torch.manual_seed(0)
    m = CoupledPair()
    with torch.no_grad():
        for conv, norms in ((m.a, A_NORMS), (m.b, B_NORMS)):
            w = torch.randn_like(conv.weight)
            conv.weight.copy_(w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * torch.tensor(norms).view(-1, 1, 1, 1))
    return m


@pytest.mark.parametrize("criterion", ["union", "intersection", "arithmetic_mean", "geometric_mean"])
def test_equalization_on_coupled_pair(criterion):
    model = _pair()
    a_before, b_before = model.a.weight.detach().clone(), model.b.weight.detach().clone()
    pruner = ChannelPruner(model, equalization=criterion)
    group = next(g for g in pruner.groups if "a" in g.layers)
    assert set(group.layers) == {"a", "b"} and group.width == 8
    expected = equalize(np.stack([A_NORMS / A_NORMS.max(), B_NORMS / B_NORMS.max()]), criterion)
    np.testing.assert_allclose(group.scores, expected, rtol=1e-5)

    pth = 0.35
    keep = kept_indices(expected, pth, granularity=1, min_filters=1)
    assert 0 < len(keep) < 8  # the example must actually cut
    pruner.apply(pruner.plan(pth, granularity=1, min_filters=1))
    assert model.a.out_channels == model.b.out_channels == model.c.in_channels == len(keep)
    torch.testing.assert_close(model.a.weight, a_before[keep])  # the same filters survive in both layers
    torch.testing.assert_close(model.b.weight, b_before[keep])
    assert model(torch.zeros(1, 3, 8, 8)).shape == (1, 4, 8, 8)


def test_equalization_modes_keep_different_channels():
    kept = {}
    for criterion in ("union", "intersection"):
        model = _pair()
        pruner = ChannelPruner(model, equalization=criterion)
        pruner.apply(pruner.plan(0.35, granularity=1, min_filters=1))
        kept[criterion] = model.a.out_channels
    assert kept["union"] > kept["intersection"]  # union keeps a channel either layer needs


# ------------------------------------------------------------------ YOLO models


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics, so an equivalence check cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)


@pytest.fixture(scope="module", params=["yolov8n", "yolo11n"])
def yolo(request):
    model = build_model(request.param, nc=2)
    model.names = {0: "red", 1: "blue"}
    _randomise_bn(model)
    return request.param, model.eval()


def test_split_free_swap_is_equivalent(yolo):
    name, model = yolo
    ref = copy.deepcopy(model)
    swapped = copy.deepcopy(model)
    swapped.model[2].cv1.bn.momentum = 0.123  # hyper-parameters must be carried over, not reset
    n = swap_split_blocks(swapped)
    assert n == 8 and sum(isinstance(m, SplitFreeC2f) for m in swapped.modules()) == 8
    block = swapped.model[2]
    assert block.cv1a.bn.momentum == block.cv1b.bn.momentum == 0.123 and block.cv1a.bn.eps == ref.model[2].cv1.bn.eps
    assert block.i == 2 and block.f == -1 and not block.training
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        diff = (ref(x)[0] - swapped(x)[0]).abs().max().item()
    assert diff <= 1e-5, f"{name}: split-free blocks differ by {diff}"
    assert count_params(swapped) == count_params(ref)
    train_copy = copy.deepcopy(model).train()
    swap_split_blocks(train_copy)
    assert all(m.training for m in train_copy.modules())


def test_prune_cuts_channels_and_keeps_detect_outputs(yolo):
    name, model = yolo
    model = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    head = {id(m): m.weight.shape for m in head_output_layers(model) if isinstance(m, nn.Conv2d)}
    pruner = ChannelPruner(model)
    plan = pruner.plan(0.95)  # untrained norms are near-uniform: ~0.9-1.0 after the max normaliser
    predicted = pruner.count_params(plan)
    pruner.apply(plan)
    params = count_params(model)
    assert params == predicted < 0.7 * count_params(ref), name
    # head outputs (box, class) and DFL keep their filters
    assert {id(m): m.weight.shape for m in head_output_layers(model) if isinstance(m, nn.Conv2d)}.keys() == head.keys()
    for m in head_output_layers(model):
        if isinstance(m, nn.Conv2d):
            assert m.out_channels == head[id(m)][0]
    for size in ((64, 64), (64, 96), (128, 64)):
        x = torch.rand(1, 3, *size)
        with torch.no_grad():
            y, y_ref = model(x), ref(x)
        assert y[0].shape == y_ref[0].shape == (1, 4 + 2, sum(size[0] * size[1] // s**2 for s in (8, 16, 32)))
        assert torch.isfinite(y[0]).all()
    model.train()
    ref.train()
    raw, raw_ref = model(x), ref(x)  # training output: raw box / class maps per anchor
    assert raw["boxes"].shape == raw_ref["boxes"].shape and raw["scores"].shape == raw_ref["scores"].shape


def test_target_mode_reaches_ratio(yolo):
    name, model = yolo
    model = copy.deepcopy(model)
    pruner = ChannelPruner(model)
    pth, predicted = pruner.find_pth(0.4)
    assert 0.0 < pth < 1.0 and abs(predicted - 0.4) <= 0.05, (name, pth, predicted)
    before = pruner.params_before
    pruner.apply(pruner.plan(pth))
    assert count_params(model) / before == pytest.approx(predicted, abs=1e-9)


def test_pth_zero_keeps_every_nonzero_filter():
    model = build_model("yolov8n", nc=2).eval()
    target = model.model[9].cv2.conv  # SPPF's output conv: its channels feed only convs' inputs
    with torch.no_grad():
        target.weight[:40] = 0.0  # 40 dead filters of 256
    before = _swapped(model)
    pruner = ChannelPruner(model)
    pruner.apply(pruner.plan(0.0))
    after = layer_channels(model)
    changed = {k: (before[k][1], after[k][1]) for k in before if before[k][1] != after[k][1]}
    assert changed == {"model.9.cv2.conv": (256, 216)}  # only the dead filters went (216 = 27 x 8)
    assert not target.weight.flatten(1).norm(dim=1).eq(0).any()


def _swapped(model: nn.Module) -> dict[str, tuple[int, int]]:
    m = copy.deepcopy(model)
    swap_split_blocks(m)
    return layer_channels(m)


def test_excluded_layers_untouched():
    model = build_model("yolov8n", nc=2).eval()
    before = _swapped(model)
    pruner = ChannelPruner(model, excluded_layers=["model.2", "model.1?.cv2.conv"])
    skipped = [g.excluded_by for g in pruner.groups if g.excluded_by]
    assert any("'model.2'" in s for s in skipped) and any("model.1?.cv2.conv" in s for s in skipped)
    pruner.apply(pruner.plan(0.95))
    after = layer_channels(model)
    for name, (_, out) in before.items():
        if name.startswith("model.2.") or (name.startswith("model.1") and name.endswith(".cv2.conv")
                                           and name.count(".") == 3):
            assert after[name][1] == out, name
    assert sum(after[n][1] for n in after) < 0.8 * sum(before[n][1] for n in before)  # the rest was cut


def test_excluded_pattern_that_matches_nothing_is_a_user_error():
    with pytest.raises(UserError, match="prune.excluded_layers"):
        ChannelPruner(build_model("yolov8n", nc=2), excluded_layers=["model.2.cv1.conv"])  # split into cv1a/cv1b


def test_pruned_checkpoint_reloads(tmp_path):
    from ultralytics import YOLO

    model = build_model("yolo11n", nc=2)
    model.names = {0: "red", 1: "blue"}
    pruner = ChannelPruner(model)
    pruner.apply(pruner.plan(0.95))
    path = save_checkpoint(model, tmp_path / "pruned.pt", extra={"train_args": {"imgsz": 96}})
    loaded = load_model(path)
    assert count_params(loaded) == count_params(model) < pruner.params_before
    yolo = YOLO(str(path))
    assert count_params(yolo.model) == count_params(model) and yolo.names == {0: "red", 1: "blue"}
    with torch.no_grad():
        assert loaded(torch.rand(1, 3, 96, 96))[0].shape == (1, 6, 189)


# ------------------------------------------------------------------ the stage, through the CLI


def _record(results_dir):
    runs = json.loads((results_dir / "manifest.json").read_text())
    runs = runs["runs"] if isinstance(runs, dict) else runs
    return [r for r in runs if r["stage"] == "prune"][-1]


def test_stage_target_mode_writes_model_layers_and_metrics(tiny_model_pt, results_dir):
    proc = run_cli("stage=prune", "experiment=smoke", f"results_dir={results_dir}", f"prune.input={tiny_model_pt}",
                   "prune.evaluate=false", "prune.mode=target", "prune.target_params_ratio=0.4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = _record(results_dir)
    m = rec["metrics"]
    assert rec["status"] == "succeeded" and m["mode"] == "target"
    assert abs(m["kept_params_ratio"] - 0.4) <= 0.05 and 0 < m["pth"] < 1
    assert m["params"] < m["params_before"] and m["gflops"] < m["gflops_before"] and 0 < m["kept_flops_ratio"] < 1
    assert m["size_mb"] > 0 and "mAP50_95" in m
    outputs = {o["role"]: results_dir / o["path"] for o in rec["outputs"]}
    assert count_params(load_model(outputs["model"])) == m["params"]
    rows = list(csv.DictReader(outputs["layers"].open()))
    assert any(int(r["channels_after"]) < int(r["channels_before"]) for r in rows)
    assert "kept" in proc.stdout + proc.stderr  # the before/after table


def test_stage_bad_pattern_exits_2(tiny_model_pt, results_dir):
    proc = run_cli("stage=prune", "experiment=smoke", f"results_dir={results_dir}", f"prune.input={tiny_model_pt}",
                   "prune.evaluate=false", "prune.excluded_layers=[nothing.here]")
    assert proc.returncode == 2 and "prune.excluded_layers" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_stage_warns_when_pth_removes_nothing(tiny_model_pt, results_dir):
    # an untrained model's normalised filter norms all lie near 1: TAO's pth=0.2 keeps every filter
    proc = run_cli("stage=prune", "experiment=smoke", f"results_dir={results_dir}", f"prune.input={tiny_model_pt}",
                   "prune.evaluate=false", "prune.pth=0.2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = _record(results_dir)
    m = rec["metrics"]
    assert m["kept_params_ratio"] == 1.0 and m["params"] == m["params_before"] and m["pth"] == 0.2
    assert 0.2 < m["score_min"] <= m["score_p10"] <= m["score_median"] <= 1.0
    assert any("removed no channel" in w and "train.sparsity=l1" in w for w in rec["warnings"])
