"""Runner: records, input resolution, failures, reuse -- with small fake stages."""

from __future__ import annotations

import sys
import types
from datetime import datetime, timedelta, timezone
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


def test_explicit_input_path(tmp_path, fake_stages, tiny_model_pt):
    model = tmp_path / "elsewhere.pt"
    model.write_bytes(tiny_model_pt.read_bytes())  # a real checkpoint: a file from elsewhere is checked as a model
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


def _raising_stage(monkeypatch, name, exc):
    def run(cfg, ctx):
        (ctx.run_dir / "partial.pt").write_bytes(b"half")
        raise exc

    mod = types.ModuleType(f"stages.{name}")
    mod.run = run
    monkeypatch.setitem(sys.modules, f"stages.{name}", mod)


def test_disk_full_is_a_clear_user_error(tmp_path, fake_stages, monkeypatch):
    import errno

    cfg = make_cfg(tmp_path)
    run_stage(cfg, "train")
    # What torch.save / Ultralytics raise when the disk fills up mid-write, wrapped as they do.
    inner = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "prune" / "model.pt"))
    try:
        raise inner
    except OSError as e:
        wrapped = RuntimeError("PytorchStreamWriter failed writing file data/0")
        wrapped.__cause__ = e
    _raising_stage(monkeypatch, "prune", wrapped)
    with pytest.raises(UserError, match=r"disk full writing .*model\.pt during stage=prune.*results_dir") as info:
        run_stage(cfg, "prune")
    assert info.value.exit_code == 2
    rec = [r for r in Manifest(tmp_path).runs() if r["stage"] == "prune"][0]
    assert rec["status"] == FAILED and rec["error"].startswith("disk full") and rec["outputs"] == []


def test_out_of_memory_names_the_batch_to_lower(tmp_path, fake_stages, monkeypatch):
    cfg = make_cfg(tmp_path, "train.batch=4096")
    oom = RuntimeError("[enforce fail at alloc_cpu.cpp:116] data. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 107374182400 bytes. Error code 12 (Cannot allocate memory)")
    _raising_stage(monkeypatch, "train", oom)
    with pytest.raises(UserError, match=r"out of memory during stage=train .*lower train\.batch=4096 and train\.imgsz="):
        run_stage(cfg, "train")
    assert Manifest(tmp_path).runs()[-1]["status"] == FAILED


def test_other_errors_keep_their_type(tmp_path, fake_stages, monkeypatch):
    _raising_stage(monkeypatch, "train", RuntimeError("shape mismatch in conv"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_stage(make_cfg(tmp_path), "train")


def test_real_cpu_allocation_failure_is_recognised():
    import torch

    from pipeline.errors import resource_error

    with pytest.raises(RuntimeError) as info:
        torch.empty(1 << 46, dtype=torch.uint8)  # 64 TiB: the CPU allocator refuses at once
    clear = resource_error(info.value, "evaluate", "/r", 64, 640)
    assert clear is not None and "lower evaluate.batch=64 and evaluate.imgsz=640" in str(clear)


def test_reuse_hash_covers_the_evaluate_section_for_prune(tmp_path, fake_stages):
    cfg = make_cfg(tmp_path)
    train = run_stage(cfg, "train", reuse=True)
    prune = run_stage(cfg, "prune", reuse=True)
    changed = make_cfg(tmp_path, "evaluate.iou=0.5")
    assert run_stage(changed, "train", reuse=True)["run_id"] == train["run_id"]  # train never reads evaluate.*
    assert run_stage(changed, "prune", reuse=True)["run_id"] != prune["run_id"]  # prune measures with it
    # evaluate.input names what stage=evaluate measures: not a setting of prune's
    assert run_stage(make_cfg(tmp_path, "evaluate.input=x.pt"), "prune", reuse=True)["run_id"] == prune["run_id"]


def test_train_input_path_enters_the_reuse_hash(tmp_path):
    from pipeline.runner import config_hash

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    plain = config_hash(make_cfg(tmp_path), "train", [])
    assert config_hash(make_cfg(tmp_path, "train.input=null"), "train", []) == plain
    assert config_hash(make_cfg(tmp_path, f"train.input={a}"), "train", []) != \
        config_hash(make_cfg(tmp_path, f"train.input={b}"), "train", [])


def test_run_folder_holds_the_final_record(tmp_path, fake_stages):
    import json

    rec = run_stage(make_cfg(tmp_path), "train")
    copy = json.loads((tmp_path / rec["run_dir"] / "record.json").read_text())
    assert copy == rec and copy["status"] == SUCCEEDED and copy["heartbeat"] == copy["started"]


def test_heartbeat_refreshes_while_the_stage_runs(tmp_path, fake_stages, monkeypatch):
    import threading
    import time

    import pipeline.runner

    monkeypatch.setattr(pipeline.runner, "HEARTBEAT_S", 0.05)

    def waits_for_a_beat(cfg, ctx):
        first = ctx.manifest.get(ctx.run_id)["heartbeat"]
        deadline = time.monotonic() + 60  # beats carry whole seconds: wait for the next one
        while ctx.manifest.get(ctx.run_id)["heartbeat"] == first and time.monotonic() < deadline:
            time.sleep(0.1)
        return StageResult(metrics={"beat": ctx.manifest.get(ctx.run_id)["heartbeat"] != first})

    mod = types.ModuleType("stages.kmeans")
    mod.run = waits_for_a_beat
    monkeypatch.setitem(sys.modules, "stages.kmeans", mod)
    rec = run_stage(make_cfg(tmp_path), "kmeans")
    assert rec["metrics"]["beat"] is True
    assert not [t for t in threading.enumerate() if t.name.startswith("heartbeat-")]  # stopped with the stage


def test_resume_finds_a_run_killed_on_another_host(tmp_path):
    """A container's run kill -9'd: another hostname, a pid that means nothing here, a stopped heartbeat."""
    import logging

    from pipeline.context import StageContext
    from pipeline.manifest import RUNNING, STALE_AFTER_S
    from stages.train import _interrupted_last

    m = Manifest(tmp_path)
    run_dir = tmp_path / "train" / "train-1"
    run_dir.mkdir(parents=True)
    (run_dir / "last.pt").write_bytes(b"checkpoint")
    beat = (datetime.now(timezone.utc) - timedelta(seconds=STALE_AFTER_S + 1)).isoformat(timespec="seconds")
    m.add({"run_id": "train-1", "stage": "train", "status": RUNNING, "host": "container-4f2a", "pid": 1,
           "started": beat, "heartbeat": beat, "run_dir": "train/train-1", "inputs": [], "outputs": []})
    ctx = StageContext(cfg=None, stage="train", run_id="train-2", run_dir=tmp_path / "train" / "train-2",
                       manifest=m, log=logging.getLogger("test"))
    assert _interrupted_last(ctx) == run_dir / "last.pt"
    assert ctx.extra["resumed_from"] == "train-1"
