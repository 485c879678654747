"""stage=report: table rows, Markdown/CSV contents, plots, verify, empty results dirs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import run_cli
from omegaconf import OmegaConf

from pipeline.errors import UserError
from pipeline.manifest import Manifest
from stages.report import run_report, text_table


def _cfg(results: Path, verify: bool = False, plots: bool = True):
    return OmegaConf.create({"results_dir": str(results), "report": {"verify": verify, "plots": plots}})


def _record(m: Manifest, stage: str, n: int, metrics: dict, parent: str | None = None,
            config: dict | None = None, status: str = "succeeded", error: str | None = None,
            warnings: list[str] | None = None) -> str:
    """A well-formed record with a real artifact file (and config.yaml) in its run folder."""
    run_id = f"{stage}-20261123T1000{n:02d}-ab{n:02d}"
    run_dir = m.root / stage / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(json.dumps(config or {}))  # JSON is valid YAML
    artifact = run_dir / "model.bin"
    artifact.write_bytes(f"{run_id} weights".encode())
    inputs = []
    if parent:
        parent_out = next(r for r in m.runs() if r["run_id"] == parent)["outputs"][0]
        inputs = [{**parent_out, "produced_by": parent}]
    m.add({
        "run_id": run_id, "stage": stage, "status": status, "started": f"2026-11-23T10:00:{n:02d}+00:00",
        "finished": f"2026-11-23T10:01:{n:02d}+00:00", "seconds": 60.0 + n, "config_hash": f"{n:064x}",
        "overrides": [], "git_commit": None, "host": "test", "pid": 1, "run_dir": m.rel(run_dir),
        "inputs": inputs, "outputs": [m.artifact("model", artifact)] if status == "succeeded" else [],
        "metrics": metrics, "warnings": warnings or [], **({"error": error} if error else {}),
    })
    return run_id


@pytest.fixture
def results(tmp_path) -> Path:
    m = Manifest(tmp_path / "results")
    _record(m, "kmeans", 1, {"k": 9, "mean_iou": 0.81, "bpr": 1.0, "anchors": [[1, 2]] * 9})
    train = _record(m, "train", 2, {"mAP50": 0.9, "mAP50_95": 0.7, "params": 3_000_000, "gflops": 8.1,
                                    "size_mb": 6.2})
    _record(m, "evaluate", 3, {"mAP50": 0.91, "mAP50_95": 0.71, "params": 3_000_000, "gflops": 8.1,
                               "size_mb": 6.2, "precision": 0.8}, parent=train)
    p5 = _record(m, "prune", 4, {"mAP50": 0.1, "mAP50_95": 0.05, "params": 900_000, "gflops": 2.5, "size_mb": 1.9,
                                 "pth": 0.5, "kept_params_ratio": 0.3}, parent=train,
                 warnings=["mAP50-95 fell to 0.05 after pruning; retrain recovers it"])
    # the pth of this prune run is only in its config.yaml
    p3 = _record(m, "prune", 5, {"mAP50": 0.5, "mAP50_95": 0.3, "params": 1_500_000, "gflops": 4.0, "size_mb": 3.0},
                 parent=train, config={"prune": {"mode": "threshold", "pth": 0.3}})
    r5 = _record(m, "retrain", 6, {"mAP50": 0.88, "mAP50_95": 0.68, "params": 900_000, "gflops": 2.5,
                                   "size_mb": 1.9, "qat": True}, parent=p5)
    e5 = _record(m, "export", 7, {"mAP50": 0.87, "mAP50_95": 0.67, "params": 900_000, "gflops": 2.5, "size_mb": 1.0,
                                  "latency_ms": 4.5, "qdq_nodes": 120, "half": False}, parent=r5)
    _record(m, "engine", 8, {"mAP50": 0.87, "mAP50_95": 0.665, "params": 900_000, "gflops": 2.5, "size_mb": 1.1,
                             "latency_ms": 2.25, "backend": "openvino", "precision": "int8"}, parent=e5)
    _record(m, "retrain", 9, {}, parent=p3, status="failed", error="ValueError: loss is NaN")
    return m.root


def _rows_by_id(result):
    return {r["run_id"]: r for r in result["rows"]}


def test_table_rows_lineage_and_inherited_figures(results, capsys):
    out = run_report(_cfg(results))
    rows = _rows_by_id(out)
    assert [r["stage"] for r in out["rows"]] == ["train", "evaluate", "prune", "prune", "retrain", "export", "engine"]
    assert out["others"] == ["kmeans-20261123T100001-ab01"]
    assert out["failed"] == ["retrain-20261123T100009-ab09"]
    train, p5, p3 = "train-20261123T100002-ab02", "prune-20261123T100004-ab04", "prune-20261123T100005-ab05"
    assert rows[p5]["from"] == train and rows[p5]["pth"] == 0.5 and rows[p5]["kept_params_ratio"] == 0.3
    assert rows[p3]["pth"] == 0.3  # read from the run's config.yaml
    assert rows[p3]["kept_params_ratio"] == pytest.approx(0.5)  # params / the train run's params
    engine = rows["engine-20261123T100008-ab08"]
    assert engine["pth"] == 0.5 and engine["kept_params_ratio"] == 0.3  # inherited along the lineage
    assert engine["lineage"] == [train, p5, "retrain-20261123T100006-ab06", "export-20261123T100007-ab07",
                                 engine["run_id"]]
    assert (engine["backend"], engine["precision"], engine["latency_ms"]) == ("openvino", "int8", 2.25)
    export = rows["export-20261123T100007-ab07"]
    assert (export["backend"], export["precision"]) == ("onnxruntime", "int8 (QDQ)")
    assert rows["evaluate-20261123T100003-ab03"]["precision"] is None  # detection precision is not a dtype
    assert rows[train]["pth"] is None and rows[train]["kept_params_ratio"] == 1.0

    console = capsys.readouterr().out
    assert "mAP50-95" in console and "3,000,000" in console and "0.6650" in console
    assert "failed runs:" in console and "loss is NaN" in console and "kmeans-20261123T100001-ab01" in console
    assert f"{p5}: mAP50-95 fell to 0.05 after pruning" in console


def test_markdown_csv_and_plots(results):
    out = run_report(_cfg(results))
    report = results / "report"
    md = (report / "report.md").read_text()
    assert "| run_id | stage | from | pth | imgsz | kept_params_ratio |" in md
    assert "| engine-20261123T100008-ab08 | engine | export-20261123T100007-ab07 | 0.5 | - | 0.300 | 900,000 |" in md
    assert "## Failed runs" in md and "ValueError: loss is NaN" in md
    assert "## Warnings" in md and "fell to 0.05 after pruning" in md
    assert "## Lineage" in md and "(pth=0.5, mAP50-95 0.0500)" in md
    assert "![map_vs_kept_params](map_vs_kept_params.png)" in md
    with open(report / "report.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 7
    engine = next(r for r in table if r["stage"] == "engine")
    assert float(engine["mAP50_95"]) == 0.665 and int(engine["params"]) == 900_000 and engine["backend"] == "openvino"
    assert next(r for r in table if r["stage"] == "train")["pth"] == ""
    for name in ("map_vs_kept_params.png", "map_vs_latency.png"):
        data = (report / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert report / name in out["files"]


def test_no_plots_when_disabled_or_nothing_to_plot(tmp_path):
    m = Manifest(tmp_path / "r")
    _record(m, "train", 1, {"mAP50": 0.5, "mAP50_95": 0.3, "params": 10, "gflops": 0.1, "size_mb": 0.1})
    out = run_report(_cfg(m.root))
    assert not (m.root / "report" / "map_vs_latency.png").exists()  # nothing was timed
    assert (m.root / "report" / "map_vs_kept_params.png").exists()
    run_report(_cfg(m.root, plots=False))
    assert out["rows"][0]["kept_params_ratio"] == 1.0


def test_verify_passes_then_catches_modified_and_missing(results, capsys):
    out = run_report(_cfg(results, verify=True))
    assert out["verified"] == 8 and out["problems"] == []
    assert "all match" in capsys.readouterr().out
    engine = results / "engine" / "engine-20261123T100008-ab08" / "model.bin"
    engine.write_bytes(b"tampered")
    (results / "prune" / "prune-20261123T100005-ab05" / "model.bin").unlink()
    with pytest.raises(UserError) as err:
        run_report(_cfg(results, verify=True))
    message = str(err.value)
    assert "engine/engine-20261123T100008-ab08/model.bin (modified)" in message
    assert "prune/prune-20261123T100005-ab05/model.bin (missing)" in message
    assert "2 of 8" in message
    md = (results / "report" / "report.md").read_text()  # the report is still written, with the findings
    assert "## Verify" in md and "model.bin`: modified" in md


def test_missing_or_empty_manifest(tmp_path):
    with pytest.raises(UserError, match="no runs in .*run a stage first"):
        run_report(_cfg(tmp_path / "nothing"))
    assert not (tmp_path / "nothing").exists()  # the report does not create a results dir
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "manifest.json").write_text('{"version": 1, "runs": []}')
    with pytest.raises(UserError, match="no runs in"):
        run_report(_cfg(tmp_path / "empty"))


def test_lost_manifest_is_rebuilt_before_the_report(results, capsys):
    (results / "manifest.json").unlink()
    (results / "manifest.json.bak").unlink()
    out = run_report(_cfg(results))
    assert len(out["rows"]) == 7 and out["failed"] == ["retrain-20261123T100009-ab09"]
    assert _rows_by_id(out)["engine-20261123T100008-ab08"]["pth"] == 0.5  # lineage intact


def test_malformed_record_does_not_stop_the_report(results):
    data = json.loads((results / "manifest.json").read_text())
    data["runs"].insert(0, {})
    (results / "manifest.json").write_text(json.dumps(data))
    proc = run_cli("stage=report", f"results_dir={results}", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "entry 0 has no run_id; skipped" in proc.stderr + proc.stdout
    assert "engine-20261123T100008-ab08" in proc.stdout


def test_text_table_aligns_numbers_right():
    table = text_table(["name", "mAP"], [["a", "0.5"], ["longer", "10.25"]]).splitlines()
    assert table[0] == "name      mAP"
    assert table[2] == "a         0.5"
    assert table[3] == "longer  10.25"


def test_cli_report_and_verify_exit_codes(results):
    proc = run_cli("stage=report", f"results_dir={results}", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "mAP50-95" in proc.stdout and "engine-20261123T100008-ab08" in proc.stdout
    (results / "train" / "train-20261123T100002-ab02" / "model.bin").write_bytes(b"x")
    proc = run_cli("stage=report", "report.verify=true", f"results_dir={results}", timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train/train-20261123T100002-ab02/model.bin (modified)" in proc.stderr
    empty = run_cli("stage=report", f"results_dir={results.parent / 'none'}", timeout=300)
    assert empty.returncode == 2 and "run a stage first" in empty.stderr


def test_pruned_rows_are_compared_with_the_equal_budget_control(tmp_path):
    m = Manifest(tmp_path / "results")
    fig = {"params": 3_000_000, "gflops": 8.0, "size_mb": 6.0}
    train = _record(m, "train", 1, {"mAP50": 0.5, "mAP50_95": 0.30, **fig})
    fp32 = _record(m, "export", 2, {"mAP50": 0.5, "mAP50_95": 0.30, "latency_ms": 40.0, "qdq_nodes": 0, **fig},
                   parent=train)
    c_re = _record(m, "retrain", 3, {"mAP50": 0.7, "mAP50_95": 0.45, **fig}, parent=train)
    c_ex = _record(m, "export", 4, {"mAP50": 0.7, "mAP50_95": 0.45, "latency_ms": 30.0, "qdq_nodes": 90, **fig},
                   parent=c_re)
    _record(m, "engine", 5, {"mAP50": 0.7, "mAP50_95": 0.44, "latency_ms": 8.0, "precision": "int8", **fig},
            parent=c_ex)
    small = {"params": 1_000_000, "gflops": 3.0, "size_mb": 2.0}
    pr = _record(m, "prune", 6, {"mAP50": 0.3, "mAP50_95": 0.2, "pth": 0.5, "kept_params_ratio": 0.33, **small},
                 parent=train)
    re_ = _record(m, "retrain", 7, {"mAP50": 0.68, "mAP50_95": 0.43, **small}, parent=pr)
    ex = _record(m, "export", 8, {"mAP50": 0.68, "mAP50_95": 0.43, "latency_ms": 12.0, "qdq_nodes": 80, **small},
                 parent=re_)
    _record(m, "engine", 9, {"mAP50": 0.67, "mAP50_95": 0.42, "latency_ms": 4.0, "precision": "int8", **small},
            parent=ex)
    rows = {r["run_id"]: r for r in run_report(_cfg(m.root, plots=False))["rows"]}
    by = {(r["kind"], r["stage"]): r for r in rows.values()}
    assert by[("unpruned", "export")]["run_id"] == fp32 and by[("control", "retrain")]["run_id"] == c_re
    engine = by[("pruned", "engine")]
    assert engine["mAP50_95_vs_control"] == pytest.approx(0.42 - 0.44)
    assert engine["speedup_vs_control"] == pytest.approx(8.0 / 4.0)
    assert engine["speedup_vs_fp32_onnx"] == pytest.approx(40.0 / 4.0)
    assert by[("pruned", "retrain")]["mAP50_95_vs_control"] == pytest.approx(0.43 - 0.45)
    assert by[("control", "engine")]["speedup_vs_control"] == pytest.approx(1.0)
    assert "mAP50-95 - control" in (m.root / "report" / "report.md").read_text()


def test_imgsz_column_shows_the_size_the_figures_are_at():
    from stages.report import _imgsz

    assert _imgsz(320) == "320" and _imgsz([320, 320]) == "320" and _imgsz([96, 128]) == "96x128"
    assert _imgsz(None) is None


def test_each_pruned_lineage_is_compared_with_the_control_of_its_own_retrain_recipe(tmp_path):
    """A sweep over retrain.distill leaves two controls; each pruned lineage meets its own, not the newest."""
    m = Manifest(tmp_path / "results")
    fig = {"params": 3_000_000, "gflops": 8.0, "size_mb": 6.0}
    small = {"params": 1_000_000, "gflops": 3.0, "size_mb": 2.0}
    train = _record(m, "train", 1, {"mAP50": 0.5, "mAP50_95": 0.30, **fig})
    pr = _record(m, "prune", 2, {"mAP50": 0.3, "mAP50_95": 0.2, "pth": 0.5, "kept_params_ratio": 0.33, **small},
                 parent=train)
    recipe = {"epochs": 8, "qat_epochs": 3, "device": "cpu"}
    engines = {}
    n = 3
    for distill, (c_map, p_map) in {True: (0.40, 0.39), False: (0.43, 0.425)}.items():
        cfg = {"retrain": {**recipe, "distill": distill, "input": f"x{n}.pt"}}
        c_re = _record(m, "retrain", n, {"mAP50": 0.6, "mAP50_95": c_map, **fig}, parent=train, config=cfg)
        _record(m, "engine", n + 1, {"mAP50": 0.6, "mAP50_95": c_map, "latency_ms": 8.0 if distill else 10.0,
                                     "precision": "int8", **fig}, parent=c_re)
        # the pruned lineage's retrain ran on another device and input: still the same recipe
        p_cfg = {"retrain": {**recipe, "distill": distill, "input": f"y{n}.pt", "device": "0"}}
        p_re = _record(m, "retrain", n + 2, {"mAP50": 0.6, "mAP50_95": p_map, **small}, parent=pr, config=p_cfg)
        engines[distill] = _record(m, "engine", n + 3, {"mAP50": 0.6, "mAP50_95": p_map, "latency_ms": 4.0,
                                                        "precision": "int8", **small}, parent=p_re)
        n += 4
    rows = {r["run_id"]: r for r in run_report(_cfg(m.root, plots=False))["rows"]}
    assert rows[engines[True]]["mAP50_95_vs_control"] == pytest.approx(0.39 - 0.40)  # not 0.39 - 0.43
    assert rows[engines[True]]["speedup_vs_control"] == pytest.approx(8.0 / 4.0)
    assert rows[engines[False]]["mAP50_95_vs_control"] == pytest.approx(0.425 - 0.43)
    assert rows[engines[False]]["speedup_vs_control"] == pytest.approx(10.0 / 4.0)
