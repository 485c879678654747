"""End to end through the CLI: the smoke sweep, the report, and what must survive it.

One module-scoped sweep (`stage=all experiment=smoke -m prune.pth=0.2,0.6`) feeds the tests:
it must train the baseline once and give one prune/retrain/export/engine lineage per pth, and the
higher threshold must cut more (issue #5's smoke acceptance).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, run_cli

CHAIN = ("kmeans", "train", "evaluate", "prune", "retrain", "export", "engine")


def runs(results: Path) -> list[dict]:
    return json.loads((results / "manifest.json").read_text())["runs"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("e2e") / "results"
    proc = run_cli("stage=all", "experiment=smoke", f"results_dir={results}", "-m", "prune.pth=0.2,0.6",
                   timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return results


def test_sweep_trains_once_and_branches_per_pth(sweep):
    records = runs(sweep)
    assert all(r["status"] == "succeeded" for r in records), [r.get("error") for r in records]
    count = Counter(r["stage"] for r in records)
    assert count["train"] == 1 and count["kmeans"] == 1 and count["evaluate"] == 1
    # two pruned lineages, plus one control (retrain -> export -> engine of the unpruned model) and the
    # unpruned FP32 export, which both sweep jobs share (nothing in them reads prune.*)
    assert count["prune"] == 2, count
    assert count["retrain"] == 3 and count["export"] == 4 and count["engine"] == 3, count
    prunes = [r for r in records if r["stage"] == "prune"]
    assert sorted(r["metrics"]["pth"] for r in prunes) == [0.2, 0.6]
    train_id = next(r["run_id"] for r in records if r["stage"] == "train")
    assert all(r["inputs"][0]["produced_by"] == train_id for r in prunes)
    # each retrain consumes its own prune run (lineage kept per sweep point), the control the train run
    retrains = [r for r in records if r["stage"] == "retrain"]
    assert {r["inputs"][0]["produced_by"] for r in retrains} == {r["run_id"] for r in prunes} | {train_id}


def test_the_control_lineage_is_in_the_report_and_pruned_rows_compare_with_it(sweep):
    proc = run_cli("stage=report", f"results_dir={sweep}", timeout=300)
    assert proc.returncode == 0, proc.stderr
    import csv

    rows = list(csv.DictReader((sweep / "report" / "report.csv").open()))
    control = [r for r in rows if r["kind"] == "control"]
    assert {r["stage"] for r in control} == {"retrain", "export", "engine"}
    assert any(r["kind"] == "unpruned" and r["stage"] == "export" for r in rows)
    pruned_engines = [r for r in rows if r["kind"] == "pruned" and r["stage"] == "engine"]
    assert len(pruned_engines) == 2
    for r in pruned_engines:
        assert r["mAP50_95_vs_control"] != "" and float(r["speedup_vs_control"]) > 0
        assert float(r["speedup_vs_fp32_onnx"]) > 0


def test_higher_pth_keeps_fewer_params(sweep):
    """After the smoke train, pth 0.6 removes channels that pth 0.2 keeps; neither grows the model."""
    records = runs(sweep)
    trained = next(r for r in records if r["stage"] == "train")["metrics"]["params"]
    by_pth = {r["metrics"]["pth"]: r["metrics"] for r in records if r["stage"] == "prune"}
    assert by_pth[0.6]["params"] < by_pth[0.2]["params"] <= trained, {k: v["params"] for k, v in by_pth.items()}
    assert by_pth[0.6]["kept_params_ratio"] < 1.0
    # the smaller model is the one retrained, exported and deployed on its branch
    retrained = {r["inputs"][0]["produced_by"]: r["metrics"]["params"] for r in records if r["stage"] == "retrain"}
    prune_ids = {r["metrics"]["pth"]: r["run_id"] for r in records if r["stage"] == "prune"}
    assert retrained[prune_ids[0.6]] == by_pth[0.6]["params"]


def test_every_model_record_has_map_and_size(sweep):
    for r in runs(sweep):
        if r["stage"] in ("train", "evaluate", "prune", "retrain", "export", "engine"):
            for key in ("mAP50", "mAP50_95", "size_mb"):
                assert isinstance(r["metrics"].get(key), (int, float)), (r["stage"], key, r["metrics"])


def test_report_prints_table(sweep):
    proc = run_cli("stage=report", f"results_dir={sweep}", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "mAP50" in proc.stdout
    assert (sweep / "report" / "report.md").exists() and (sweep / "report" / "report.csv").exists()


def test_four_parallel_evaluate_runs_leave_four_records(sweep):
    before = sum(r["stage"] == "evaluate" for r in runs(sweep))
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline", "stage=evaluate", "experiment=smoke",
                               f"results_dir={sweep}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-2000:]
    after = [r for r in runs(sweep) if r["stage"] == "evaluate"]
    assert len(after) == before + 4 and all(r["status"] == "succeeded" for r in after)


def test_kill_9_during_prune_leaves_readable_manifest(sweep):
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "stage=prune", "experiment=smoke", "prune.pth=0.4",
                             f"results_dir={sweep}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the run is registered, then kill it mid-flight
        if any(r["stage"] == "prune" and r["status"] == "running" for r in runs(sweep)):
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    records = runs(sweep)  # still valid JSON
    killed = [r for r in records if r["stage"] == "prune" and r.get("pid") == proc.pid]
    assert len(killed) <= 1
    rerun = run_cli("stage=prune", "experiment=smoke", "prune.pth=0.4", f"results_dir={sweep}", timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    report = run_cli("stage=report", f"results_dir={sweep}", timeout=300)
    if killed:
        assert "interrupted" in report.stdout + report.stderr


def test_tampered_model_refused(sweep, tmp_path):
    train = next(r for r in runs(sweep) if r["stage"] == "train")
    model = sweep / train["outputs"][0]["path"]
    original = model.read_bytes()
    try:
        model.write_bytes(original + b"\0")
        proc = run_cli("stage=prune", "experiment=smoke", f"results_dir={sweep}", timeout=300)
        assert proc.returncode == 2
        assert "checksum" in proc.stderr and "Traceback" not in proc.stderr
        assert str(model.name) in proc.stderr
        verify = run_cli("stage=report", "report.verify=true", f"results_dir={sweep}", timeout=300)
        assert verify.returncode == 2
    finally:
        model.write_bytes(original)


def test_submitit_local_launcher(tmp_path):
    results = tmp_path / "results"
    proc = run_cli("stage=kmeans", "experiment=smoke", f"results_dir={results}", "hydra/launcher=local", "-m",
                   "kmeans.num_clusters=6,9", timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ks = sorted(len(r["metrics"]["anchors"]) for r in runs(results) if r["stage"] == "kmeans")
    assert ks == [6, 9]
