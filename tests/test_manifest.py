"""Manifest: atomic, locked writes; checksums; failed runs never used downstream."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
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
