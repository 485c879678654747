"""Ultralytics detector families beyond v8/11: the pruner sees through each family's blocks and heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.models import build_model
from pipeline.pruning import ChannelPruner


def _spread_filter_norms(model: torch.nn.Module) -> None:
    """Untrained kernels have near-equal norms; scale each filter so a threshold removes some."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.data *= torch.rand(m.out_channels, 1, 1, 1, generator=g)


@pytest.mark.parametrize("name", ["yolo26n", "yolov5nu"])
def test_threshold_pruning_cuts_the_family_and_the_model_still_runs(name):
    model = build_model(name, nc=3)
    _spread_filter_norms(model)
    before = sum(p.numel() for p in model.parameters())
    pruner = ChannelPruner(model)
    pruner.apply(pruner.plan(0.5))
    after = sum(p.numel() for p in model.parameters())
    assert after < before
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 96, 96))
    assert isinstance(out, (tuple, list)) and out[0].shape[0] == 1


def test_an_nms_free_heads_one2one_copy_is_cut_with_its_inputs():
    """YOLO26's one2one branch reads the same features as the one2many head: both lose the same inputs."""
    from ultralytics.nn.modules.head import Detect

    model = build_model("yolo26n", nc=3)
    _spread_filter_norms(model)
    pruner = ChannelPruner(model)
    pruner.apply(pruner.plan(0.5))
    head = next(m for m in model.modules() if isinstance(m, Detect))
    for many, one in zip(head.cv2, head.one2one_cv2, strict=True):
        assert many[0].conv.in_channels == one[0].conv.in_channels
    for many, one in zip(head.cv3, head.one2one_cv3, strict=True):
        first_many = next(m for m in many.modules() if isinstance(m, torch.nn.Conv2d))
        first_one = next(m for m in one.modules() if isinstance(m, torch.nn.Conv2d))
        assert first_many.in_channels == first_one.in_channels


@pytest.mark.parametrize("name", ["yolo26x", "yolov5lu"])
def test_the_large_sizes_compose_and_build(name):
    from hydra import compose, initialize_config_dir

    from pipeline.config import register, validate
    from pipeline.models import count_params

    register()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent.parent / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[f"model.name={name}"])
    validate(cfg)
    assert count_params(build_model(cfg.model.name, nc=3)) > 20_000_000


def _smoke_chain(name: str, results: Path) -> list[dict]:
    import json

    from conftest import run_cli

    proc = run_cli("stage=all", "experiment=smoke", f"model.name={name}", "prune.pth=0.6", "control=false",
                   f"results_dir={results}", timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((results / "manifest.json").read_text())["runs"]


# YOLO26 (what users start with) runs in the fast suite; yolov5nu shares v8's Detect head and its C3 blocks are
# cut in the pruning test above, so its whole chain (40 s) joins the slow ones.
FAMILIES = [pytest.param("yolo26n"), pytest.param("yolov5nu", marks=pytest.mark.slow),
            pytest.param("yolo12n", marks=pytest.mark.slow), pytest.param("yolo11n", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_goes_through_the_whole_chain(name, tmp_path):
    """Smoke stage=all per family: every stage succeeds, pth 0.6 cuts the model, the engine keeps its mAP."""
    records = _smoke_chain(name, tmp_path / "results")
    by = {r["stage"]: r for r in records}
    assert set(by) == {"kmeans", "train", "evaluate", "prune", "retrain", "export", "engine"}
    assert all(r["status"] == "succeeded" for r in records), [r.get("error") for r in records]
    assert by["prune"]["metrics"]["params"] < by["train"]["metrics"]["params"]
    assert by["retrain"]["metrics"]["params"] == by["prune"]["metrics"]["params"]
    assert abs(by["engine"]["metrics"]["mAP50_95"] - by["retrain"]["metrics"]["mAP50_95"]) <= 0.01
