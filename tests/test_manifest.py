"""Manifest: atomic, locked writes; checksums; failed runs never used downstream."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import socket
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.manifest import FAILED, RUNNING, SUCCEEDED, Manifest, atomic_write_text


def _writer(root: str, worker: int, n: int) -> None:
    m = Manifest(root)
    for i in range(n):
        m.add({"run_id": f"w{worker}-{i}", "stage": "evaluate", "status": SUCCEEDED, "outputs": [], "metrics": {}})


def test_parallel_writers_lose_nothing(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 20)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    runs = Manifest(tmp_path).runs()
    assert len(runs) == 160
    assert len({r["run_id"] for r in runs}) == 160
    json.loads((tmp_path / "manifest.json").read_text())  # still valid JSON


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_artifact_checksum_and_tamper_refused(tmp_path):
    m = Manifest(tmp_path)
    f = tmp_path / "train" / "x" / "best.pt"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"model bytes")
    entry = m.artifact("model", f)
    assert entry["path"] == "train/x/best.pt" and entry["bytes"] == 11
    m.verify_artifact(entry)
    with open(f, "ab") as fh:
        fh.write(b"!")
    with pytest.raises(UserError, match="does not match its manifest checksum"):
        m.verify_artifact(entry)
    f.unlink()
    with pytest.raises(UserError, match="missing"):
        m.verify_artifact(entry)


def test_folder_artifact_hash_changes_with_content(tmp_path):
    m = Manifest(tmp_path)
    d = tmp_path / "ir"
    d.mkdir()
    (d / "model.xml").write_text("<xml/>")
    (d / "model.bin").write_bytes(b"\0\1")
    first = m.artifact("model", d)
    (d / "model.bin").write_bytes(b"\0\2")
    assert m.artifact("model", d)["sha256"] != first["sha256"]
    assert first["bytes"] == 8


def test_latest_output_skips_failed_and_dead_running(tmp_path):
    m = Manifest(tmp_path)
    out = lambda p: [{"role": "model", "path": p, "sha256": "0", "bytes": 1}]  # noqa: E731
    m.add({"run_id": "train-1", "stage": "train", "status": SUCCEEDED, "outputs": out("a.pt")})
    m.add({"run_id": "train-2", "stage": "train", "status": FAILED, "outputs": out("b.pt")})
    m.add({"run_id": "train-3", "stage": "train", "status": RUNNING, "host": os.uname().nodename,
           "pid": 2**22 + 12345, "outputs": out("c.pt")})
    record, entry = m.latest_output(("train",))
    assert record["run_id"] == "train-1" and entry["path"] == "a.pt"
    dead = m.get("train-3")
    assert dead["status"] == FAILED and "interrupted" in dead["error"]


def test_prefer_order(tmp_path):
    m = Manifest(tmp_path)
    out = lambda p: [{"role": "model", "path": p, "sha256": "0", "bytes": 1}]  # noqa: E731
    m.add({"run_id": "retrain-1", "stage": "retrain", "status": SUCCEEDED, "outputs": out("r.pt")})
    m.add({"run_id": "train-1", "stage": "train", "status": SUCCEEDED, "outputs": out("t.pt")})
    assert m.latest_output(("retrain", "train"), prefer_order=True)[0]["run_id"] == "retrain-1"
    assert m.latest_output(("retrain", "train"))[0]["run_id"] == "train-1"


def test_corrupt_manifest_is_a_user_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        Manifest(tmp_path).runs()


def test_unwritable_results_dir(tmp_path):
    if os.geteuid() == 0:
        target = Path("/proc/version/results")  # not a directory even for root
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = ro / "results"
    with pytest.raises(UserError, match="results_dir"):
        Manifest(target)


def _runs_with_folders(root: Path, n: int = 3) -> Manifest:
    """n succeeded records with run folders, each updated once after it was added (as the runner does)."""
    m = Manifest(root)
    for i in range(n):
        run_dir = root / "train" / f"train-{i}"
        run_dir.mkdir(parents=True)
        m.add({"run_id": f"train-{i}", "stage": "train", "status": RUNNING, "started": f"2026-12-01T10:0{i}:00+00:00",
               "host": socket.gethostname(), "pid": os.getpid(), "run_dir": f"train/train-{i}", "inputs": [],
               "outputs": [], "metrics": {}})
        m.update(f"train-{i}", status=SUCCEEDED, metrics={"mAP50_95": i / 10})
    return m


def test_truncated_manifest_is_rebuilt_with_every_record(tmp_path, caplog):
    m = _runs_with_folders(tmp_path)
    before = m.runs()
    text = (tmp_path / "manifest.json").read_text()
    (tmp_path / "manifest.json").write_text(text[: len(text) // 2])
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert Manifest(tmp_path).runs() == before
    assert "not valid JSON" in caplog.text and "rebuilt it with 3 records" in caplog.text
    damaged = list(tmp_path.glob("manifest.json.damaged-*"))
    assert len(damaged) == 1 and damaged[0].read_text() == text[: len(text) // 2]  # kept aside, untouched
    json.loads((tmp_path / "manifest.json").read_text())  # a valid manifest again
    assert Manifest(tmp_path).runs() == before


def test_missing_manifest_is_rebuilt_from_run_folders(tmp_path, caplog):
    before = _runs_with_folders(tmp_path).runs()
    (tmp_path / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert Manifest(tmp_path).runs() == before
    assert "is missing" in caplog.text


def test_backup_is_the_last_good_manifest_and_fills_in_lost_run_folders(tmp_path):
    _runs_with_folders(tmp_path)
    backup = json.loads((tmp_path / "manifest.json.bak").read_text())["runs"]
    assert [r["run_id"] for r in backup] == ["train-0", "train-1", "train-2"]
    assert backup[-1]["status"] == RUNNING  # the manifest before the last update
    for folder in ("train-0", "train-2"):  # run folders deleted, with their record.json
        shutil.rmtree(tmp_path / "train" / folder)
    (tmp_path / "manifest.json").write_text("{\"version\": 1, \"ru")
    runs = {r["run_id"]: r for r in Manifest(tmp_path).runs()}
    assert sorted(runs) == ["train-0", "train-1", "train-2"]
    assert runs["train-1"]["metrics"] == {"mAP50_95": 0.1}  # its record.json: the newest copy
    assert runs["train-0"]["status"] == SUCCEEDED  # from the backup


def test_fresh_results_dir_is_not_a_lost_manifest(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert Manifest(tmp_path).runs() == []
    assert caplog.text == "" and not (tmp_path / "manifest.json").exists()


def test_stale_heartbeat_is_interrupted_on_any_host(tmp_path):
    from datetime import datetime, timedelta, timezone

    from pipeline.manifest import STALE_AFTER_S

    def ago(seconds: float) -> str:
        return (datetime.now(timezone.utc) - timedelta(seconds=seconds)).isoformat(timespec="seconds")

    m = Manifest(tmp_path)
    common = {"stage": "train", "status": RUNNING, "host": "another-host", "pid": os.getpid(), "outputs": []}
    m.add({"run_id": "old", **common, "started": ago(3600), "heartbeat": ago(STALE_AFTER_S + 60)})
    m.add({"run_id": "fresh", **common, "started": ago(3600), "heartbeat": ago(5)})
    m.add({"run_id": "no-beat", **common, "started": ago(STALE_AFTER_S + 60)})  # written before heartbeats
    old, fresh, no_beat = (m.get(r) for r in ("old", "fresh", "no-beat"))
    assert old["status"] == FAILED and "no heartbeat" in old["error"] and "another-host" in old["error"]
    assert fresh["status"] == RUNNING  # the pid means nothing on another host: the heartbeat decides
    assert no_beat["status"] == FAILED


def test_malformed_records_are_skipped_with_a_warning(tmp_path, caplog):
    good = {"run_id": "train-1", "stage": "train", "status": SUCCEEDED, "outputs": [], "metrics": {}}
    odd_pid = {"run_id": "train-2", "stage": "train", "status": RUNNING, "host": socket.gethostname(), "pid": "abc",
               "heartbeat": "2020-01-01T00:00:00+00:00", "outputs": []}
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "runs": [{}, good, odd_pid, "x"]}))
    m = Manifest(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        runs = m.runs()
        m.runs()
    assert [r["run_id"] for r in runs] == ["train-1", "train-2"]
    assert runs[1]["status"] == FAILED  # a pid that is no number: the old heartbeat decides
    assert caplog.text.count("skipped") == 2 and "entry 0 has no run_id" in caplog.text
    m.add({**good, "run_id": "train-3"})  # writing keeps what it could not read, for the user to repair
    assert len(json.loads((tmp_path / "manifest.json").read_text())["runs"]) == 5


def test_lineage_parent_and_output_of(tmp_path):
    m = Manifest(tmp_path)

    def model(path: str, produced_by: str | None = None) -> dict:
        entry = {"role": "model", "path": path, "sha256": "0", "bytes": 1}
        return {**entry, "produced_by": produced_by} if produced_by else entry

    m.add({"run_id": "train-1", "stage": "train", "status": SUCCEEDED, "inputs": [], "outputs": [model("t.pt")]})
    m.add({"run_id": "prune-1", "stage": "prune", "status": SUCCEEDED, "inputs": [model("t.pt", "train-1")],
           "outputs": [model("p.pt"), {"role": "layers", "path": "l.csv", "sha256": "0", "bytes": 1}]})
    m.add({"run_id": "export-1", "stage": "export", "status": SUCCEEDED, "inputs": [model("p.pt", "prune-1")],
           "outputs": [model("e.onnx")]})
    export = m.get("export-1")
    assert [r["run_id"] for r in m.lineage(export)] == ["export-1", "prune-1", "train-1"]
    assert m.parent(export)["run_id"] == "prune-1" and m.parent(m.get("train-1")) is None
    assert Manifest.parent_id(export) == "prune-1"
    assert m.output_of(m.get("prune-1"), "layers") == tmp_path / "l.csv"
    assert m.output_of(export, "layers") is None
    outside = {"run_id": "evaluate-1", "stage": "evaluate", "inputs": [model("/elsewhere.pt")]}
    assert m.lineage(outside) == [outside]  # a model from elsewhere has no known parent
