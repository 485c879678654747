"""Depth pruning (pipeline.depth, prune.drop_blocks): which bottlenecks go, and the cut model's function."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline import depth
from pipeline.models import build_model, load_model, save_checkpoint
from pipeline.modules import swap_split_blocks
from pipeline.pruning import ChannelPruner
from tests.conftest import run_cli


@pytest.fixture(params=["yolov8n", "yolo11n"])
def model(request) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(request.param, nc=2).eval()
    m.names = {0: "red", 1: "blue"}
    return m


def _zero_branch(block: torch.nn.Module, i: int) -> None:
    """Make bottleneck m[i] an exact identity (its branch's last conv outputs 0 after SiLU(0) = 0)."""
    last = block.m[i].cv2
    with torch.no_grad():
        last.conv.weight.zero_()
        last.bn.bias.zero_()
        last.bn.running_mean.zero_()


def test_residual_blocks_found_in_both_block_forms(model):
    plain = depth.residual_blocks(model)
    swapped = copy.deepcopy(model)
    swap_split_blocks(swapped)
    assert plain and sorted(plain) == sorted(depth.residual_blocks(swapped))
    for block, i in plain.values():
        assert block.m[i].add  # only residual bottlenecks (the neck's plain ones cannot be bypassed)


@pytest.mark.parametrize("swap", [False, True])
def test_dropping_an_identity_bottleneck_keeps_the_function(model, swap):
    if swap:
        swap_split_blocks(model)
    blocks = depth.residual_blocks(model)
    # a block with two bottlenecks, dropping the first: the second then reads t_0 instead of t_1
    name = next((n for n, (b, i) in blocks.items() if len(b.m) > 1 and i == 0), next(iter(blocks)))
    block, i = blocks[name]
    _zero_branch(block, i)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)[0]
    n_before, cin_before = len(block.m), block.cv2.conv.in_channels
    assert depth.drop(model, [name]) == [name]
    assert len(block.m) == n_before - 1 and block.cv2.conv.in_channels < cin_before
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], ref, rtol=1e-4, atol=1e-4)


def test_choose_takes_the_smallest_branches_and_ratios_see_it(model):
    blocks = depth.residual_blocks(model)
    target = sorted(blocks)[-1]
    _zero_branch(*blocks[target])
    ratios = depth.branch_ratios(model, torch.rand(4, 3, 64, 64))
    assert set(ratios) == set(blocks) and ratios[target] == pytest.approx(0.0, abs=1e-6)
    assert all(r > 0 for n, r in ratios.items() if n != target)
    assert depth.choose(ratios, 1) == [target]
    assert len(depth.choose(ratios, 100)) == len(blocks)
    with pytest.raises(KeyError):
        depth.drop(model, ["model.0"])


def test_channel_pruned_then_depth_pruned_model_runs_and_trains(model):
    pruner = ChannelPruner(model)
    pruner.apply(pruner.plan(0.9, granularity=1, min_filters=4))
    names = list(depth.residual_blocks(model))
    depth.drop(model, names)
    assert depth.residual_blocks(model) == {}
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)[0]).all()
    model.train()
    out = model(x)
    loss = sum(v.float().abs().mean() for v in (out.values() if isinstance(out, dict) else out)
               if isinstance(v, torch.Tensor))
    loss.backward()  # every kept parameter still gets a gradient path


def test_prune_stage_drops_blocks_and_records_them(results_dir, tiny_data_yaml, tmp_path):
    m = build_model("yolov8n", nc=2)
    m.names = {0: "red", 1: "blue"}
    pt = save_checkpoint(m, tmp_path / "m.pt")
    total = len(depth.residual_blocks(m))
    r = run_cli("stage=prune", f"prune.input={pt}", "prune.pth=0.0", "prune.drop_blocks=2", "prune.evaluate=false",
                f"dataset.path={tiny_data_yaml.parent}", "dataset.name=tiny", f"results_dir={results_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    from pipeline.manifest import Manifest

    man = Manifest(results_dir)
    rec = man.succeeded("prune")[-1]
    dropped = rec["metrics"]["blocks_dropped"]
    ratios = rec["metrics"]["block_branch_ratios"]
    assert len(dropped) == 2 and rec["metrics"]["residual_blocks"] == total
    assert sorted(ratios.values())[:2] == sorted(ratios[n] for n in dropped)
    assert rec["metrics"]["params"] < rec["metrics"]["params_before"]
    assert len(depth.residual_blocks(load_model(man.output_of(rec)))) == total - 2
    r = run_cli("stage=prune", f"prune.input={pt}", "prune.drop_blocks=-1", f"results_dir={results_dir}",
                f"dataset.path={tiny_data_yaml.parent}", "dataset.name=tiny")
    assert r.returncode == 2 and "prune.drop_blocks" in (r.stdout + r.stderr)
