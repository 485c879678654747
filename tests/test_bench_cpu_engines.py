"""bench/cpu_engines.py without timing anything: which rows a results dir gives, and the goals block."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pipeline.manifest import Manifest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cpu_engines", REPO / "bench" / "cpu_engines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(m: Manifest, stage: str, n: int, parent: str | None = None, config: dict | None = None,
            folder: bool = False, extra_inputs: list | None = None, float_model: bool = False) -> str:
    """A succeeded record whose model output is a file (or an IR folder) in its run folder."""
    run_id = f"{stage}-20261201T1000{n:02d}-ab{n:02d}"
    run_dir = m.root / stage / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(json.dumps(config or {}))  # JSON is valid YAML
    if folder:
        artifact = run_dir / "model_openvino_model"
        artifact.mkdir()
        (artifact / "model.xml").write_text(run_id)
    else:
        artifact = run_dir / "model.bin"
        artifact.write_bytes(run_id.encode())
    outputs = [m.artifact("model", artifact)]
    if float_model:
        (run_dir / "float.pt").write_bytes(b"float")
        outputs.append(m.artifact("float_model", run_dir / "float.pt"))
    inputs = list(extra_inputs or [])
    if parent:
        parent_out = next(r for r in m.runs() if r["run_id"] == parent)["outputs"][0]
        inputs.append({**parent_out, "produced_by": parent})
    m.add({"run_id": run_id, "stage": stage, "status": "succeeded", "started": f"2026-12-01T10:00:{n:02d}+00:00",
           "finished": f"2026-12-01T10:01:{n:02d}+00:00", "seconds": 1.0, "config_hash": f"{n:064x}",
           "overrides": [], "git_commit": None, "host": "test", "pid": 1, "run_dir": m.rel(run_dir),
           "inputs": inputs, "outputs": outputs, "metrics": {}, "warnings": []})
    return run_id


@pytest.fixture
def results(tmp_path) -> Path:
    """One trained model; its control; a threshold lineage with an engine, a latency one with only an export."""
    m = Manifest(tmp_path / "results")
    (tmp_path / "data.yaml").write_text("names: [a]\n")
    data = {"role": "dataset", "path": str(tmp_path / "data.yaml"), "sha256": "0" * 64}
    train = _record(m, "train", 1, config={"train": {"imgsz": 96}}, extra_inputs=[data])
    _record(m, "export", 2, parent=train)  # the unpruned FP32 ONNX
    c_retrain = _record(m, "retrain", 3, parent=train, config={"retrain": {"epochs": 2, "qat_epochs": 1}},
                        float_model=True)
    c_export = _record(m, "export", 4, parent=c_retrain)
    _record(m, "engine", 5, parent=c_export, folder=True)
    p1 = _record(m, "prune", 6, parent=train, config={"prune": {"mode": "threshold", "pth": 0.5}})
    recipe = {"retrain": {"epochs": 2, "qat_epochs": 1}}
    r1 = _record(m, "retrain", 7, parent=p1, float_model=True, config=recipe)
    e1 = _record(m, "export", 8, parent=r1)
    _record(m, "engine", 9, parent=e1, folder=True)
    p2 = _record(m, "prune", 10, parent=train, config={"prune": {"mode": "latency", "target_latency_ratio": 0.4}})
    r2 = _record(m, "retrain", 11, parent=p2, float_model=True, config=recipe)
    _record(m, "export", 12, parent=r2)
    return m.root


def test_discover_tells_control_from_pruned_lineages(bench, results):
    found = bench.discover(results)
    assert found["train"]["stage"] == "train" and found["train_config"]["train"]["imgsz"] == 96
    assert found["data"].name == "data.yaml"
    control = found["control"]
    assert control["kind"] == "control" and control["label"] == "control"
    assert control["engine_path"].name == "model_openvino_model"
    labels = [lin["label"] for lin in found["pruned"]]
    assert labels == ["threshold pth=0.5", "latency ratio=0.4"]
    threshold, latency = found["pruned"]
    assert threshold["engine_path"].is_dir() and threshold["float"].name == "float.pt"
    assert latency["engine_path"] is None and latency["qdq"].name == "model.bin"  # compiled from its export


def test_each_retrain_recipe_has_its_control(bench, results):
    """A second recipe (retrain.distill=false) in the same results dir: its own control and labels."""
    m = Manifest(results)
    train = m.succeeded("train")[-1]["run_id"]
    prune = m.succeeded("prune")[0]["run_id"]
    off = {"retrain": {"epochs": 2, "qat_epochs": 1, "distill": False}}
    c = _record(m, "retrain", 13, parent=train, config=off, float_model=True)
    _record(m, "engine", 15, parent=_record(m, "export", 14, parent=c), folder=True)
    p = _record(m, "retrain", 16, parent=prune, config=off, float_model=True)
    _record(m, "engine", 18, parent=_record(m, "export", 17, parent=p), folder=True)
    found = bench.discover(results)
    assert [lin["label"] for lin in found["controls"]] == ["control (distill=None)", "control (distill=False)"]
    assert [lin["label"] for lin in found["pruned"]] == [
        "threshold pth=0.5 (distill=None)", "latency ratio=0.4 (distill=None)", "threshold pth=0.5 (distill=False)"]
    rows = [{"name": "c_on", "kind": "control", "recipe": found["controls"][0]["recipe"], "latency_ms": 10.0},
            {"name": "c_off", "kind": "control", "recipe": found["controls"][1]["recipe"], "latency_ms": 20.0},
            {"name": "p_off", "kind": "pruned", "recipe": found["pruned"][2]["recipe"], "latency_ms": 5.0}]
    assert bench.control_of(rows[2], rows)["name"] == "c_off"
    bench.speedups(rows)
    assert rows[2]["speedup_vs_control"] == 4.0
    # --only: the named lineage and the control of its recipe, nothing else
    only = bench.discover(results, (p,))
    assert [lin["label"] for lin in only["pruned"]] == ["threshold pth=0.5"]  # one recipe left: no suffix
    assert [lin["retrain"]["run_id"] for lin in only["controls"]] == [c]


def test_prune_labels_name_mode_and_setting(bench):
    assert bench.prune_label({"prune": {"mode": "target", "target_params_ratio": 0.5}}) == "target params=0.5"
    assert bench.prune_label({"prune": {"mode": "target", "target_flops_ratio": 0.3}}) == "target flops=0.3"
    assert bench.prune_label({}) == "threshold pth=None"
    assert bench.prune_label({"prune": {"pth": 0.5, "drop_blocks": 3}}) == "threshold pth=0.5 drop_blocks=3"
    assert (bench.prune_label({"prune": {"mode": "latency", "target_latency_ratio": 0.5, "latency_imgsz": 640}})
            == "latency ratio=0.5 at 640 px")


def test_discover_without_train_exits(bench, tmp_path):
    Manifest(tmp_path / "empty")
    with pytest.raises(SystemExit, match="no succeeded train run"):
        bench.discover(tmp_path / "empty")


def _rows(ours_ms: float, ours_map: float, ptq_ms: float = 10.0, ptq_map: float = 0.50) -> list[dict]:
    rows = [
        {"name": "base", "kind": "baseline", "latency_ms": 50.0, "mAP50_95": 0.52},
        {"name": "vendor", "kind": "vendor", "latency_ms": 20.0, "mAP50_95": 0.51},
        {"name": "uq", "kind": "ultralytics_qat", "absent": "why"},
        {"name": "control", "kind": "control", "latency_ms": 16.0, "mAP50_95": 0.50},
        {"name": "ours", "kind": "pruned", "retrain_run": "r1", "latency_ms": ours_ms, "mAP50_95": ours_map},
        {"name": "ptq", "kind": "ptq", "retrain_run": "r1", "latency_ms": ptq_ms, "mAP50_95": ptq_map},
    ]
    return rows


def test_goals_met(bench):
    rows = _rows(ours_ms=8.0, ours_map=0.495)
    bench.speedups(rows)
    assert rows[4]["speedup_vs_vendor"] == 2.5 and rows[4]["speedup_vs_control"] == 2.0
    assert "speedup_vs_vendor" not in rows[2]  # an absent row has no figures
    g = bench.goals(rows)["ours"]
    assert g["vs_vendor"] == 2.5 and g["vs_unpruned_fp32_onnx"] == 6.25
    assert g["mAP50_95_points_vs_control"] == -0.5 and g["accuracy_vs_control_met"]
    assert g["qat_vs_ptq_speed"] == 1.25 and g["mAP50_95_points_vs_ptq"] == -0.5
    assert not g["accuracy_vs_ptq_met"] and not g["all_met"]  # PTQ is more accurate here


def test_goals_not_met(bench):
    rows = _rows(ours_ms=12.5, ours_map=0.48, ptq_ms=10.0, ptq_map=0.47)
    bench.speedups(rows)
    g = bench.goals(rows)["ours"]
    assert not g["vs_vendor_met"] and not g["vs_unpruned_fp32_onnx_met"]  # 1.6x and 4x
    assert not g["accuracy_vs_control_met"]  # 2 points below the control
    assert not g["qat_vs_ptq_speed_met"] and g["accuracy_vs_ptq_met"]
    assert set(bench.goals(rows)) == {"ours"}  # goals only for pruned rows


def test_goals_all_met_and_table(bench):
    rows = _rows(ours_ms=8.0, ours_map=0.51)
    bench.speedups(rows)
    goal = bench.goals(rows)
    assert goal["ours"]["all_met"]
    for r in rows:
        r.setdefault("runtime", "openvino")
    table = bench.markdown(96, rows, goal)
    assert "| uq | absent: why |" in table and "| ours | 2.50x yes | 6.25x yes |" in table
