"""Runner: records, input resolution, failures, reuse -- with small fake stages."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline.config import register
from pipeline.context import StageResult
from pipeline.errors import UserError
from pipeline.manifest import FAILED, SUCCEEDED, Manifest
from pipeline.runner import run_stage

CONF = str(Path(__file__).resolve().parent.parent / "conf")


def make_cfg(results_dir: Path, *overrides: str):
    register()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[f"results_dir={results_dir}", "experiment=smoke", *overrides])


@pytest.fixture
def fake_stages(monkeypatch):
    """`stages.train` writes a file; `stages.prune` reads its input model; `stages.export` fails."""

    def train_run(cfg, ctx):
        p = ctx.run_dir / "best.pt"
        p.write_bytes(b"weights" + str(cfg.train.epochs).encode())
        return StageResult(outputs=[("model", p)], metrics={"mAP50_95": 0.5, "params": 10})

    def prune_run(cfg, ctx):
        src = ctx.input_path("model").read_bytes()
        p = ctx.run_dir / "model.pt"
        p.write_bytes(src + b"-pruned")
        return StageResult(outputs=[("model", p)], metrics={"pth": cfg.prune.pth})

    def export_run(cfg, ctx):
        raise RuntimeError("boom")

    for name, fn in (("train", train_run), ("prune", prune_run), ("export", export_run)):
        mod = types.ModuleType(f"stages.{name}")
        mod.run = fn
        monkeypatch.setitem(sys.modules, f"stages.{name}", mod)


def test_record_fields_and_relative_paths(tmp_path, fake_stages):
    cfg = make_cfg(tmp_path)
    rec = run_stage(cfg, "train", ["train.epochs=2"])
    assert rec["status"] == SUCCEEDED
    for key in ("run_id", "stage", "started", "finished", "seconds", "config_hash", "overrides", "git_commit",
                "inputs", "outputs", "metrics"):
        assert key in rec
    out = rec["outputs"][0]
    assert out["path"].startswith("train/") and len(out["sha256"]) == 64 and out["bytes"] > 0
    assert (tmp_path / rec["run_dir"] / "config.yaml").exists()
    assert (tmp_path / rec["run_dir"] / "log.txt").exists()


def test_upstream_resolution_and_lineage(tmp_path, fake_stages):
    cfg = make_cfg(tmp_path)
    train = run_stage(cfg, "train")
    prune = run_stage(cfg, "prune")
    assert prune["inputs"][0]["produced_by"] == train["run_id"]
    assert prune["inputs"][0]["sha256"] == train["outputs"][0]["sha256"]


def test_missing_upstream_names_stage_to_run(tmp_path, fake_stages):
    cfg = make_cfg(tmp_path)
    with pytest.raises(UserError, match="run stage=train first"):
        run_stage(cfg, "prune")


def test_failed_run_recorded_and_never_used(tmp_path, fake_stages):
    cfg = make_cfg(tmp_path)
    run_stage(cfg, "train")
    with pytest.raises(RuntimeError):
        run_stage(cfg, "export")
    failed = [r for r in Manifest(tmp_path).runs() if r["stage"] == "export"]
    assert failed[0]["status"] == FAILED and "boom" in failed[0]["error"]


def test_tampered_input_refused(tmp_path, fake_stages):
    cfg = make_cfg(tmp_path)
    train = run_stage(cfg, "train")
    with open(tmp_path / train["outputs"][0]["path"], "ab") as f:
        f.write(b"x")
    with pytest.raises(UserError, match="checksum"):
        run_stage(cfg, "prune")


def test_explicit_input_path(tmp_path, fake_stages):
    model = tmp_path / "elsewhere.pt"
    model.write_bytes(b"external")
    cfg = make_cfg(tmp_path / "r", f"prune.input={model}")
    rec = run_stage(cfg, "prune")
    assert rec["inputs"][0]["path"] == str(model.resolve())
    cfg = make_cfg(tmp_path / "r", "prune.input=/nonexistent.pt")
    with pytest.raises(UserError, match="prune.input"):
        run_stage(cfg, "prune")


def test_reuse_by_config_hash(tmp_path, fake_stages):
    cfg = make_cfg(tmp_path)
    first = run_stage(cfg, "train", reuse=True)
    again = run_stage(cfg, "train", reuse=True)
    assert again["run_id"] == first["run_id"]
    other = run_stage(make_cfg(tmp_path, "train.epochs=3"), "train", reuse=True)
    assert other["run_id"] != first["run_id"]
    assert run_stage(cfg, "train", reuse=False)["run_id"] != first["run_id"]
