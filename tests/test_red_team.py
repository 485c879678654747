"""The red-team list of issue 21 as a corpus: each input or fault is generated here and its outcome asserted.

An outcome is one of: refused (a UserError, exit code 2, one line naming the key to change), a
warning kept in the run's manifest record, or records rebuilt / read correctly. `RED_TEAM` names
every kind of the list; `test_every_kind_has_a_case` keeps the corpus and the list in step.
Stages run in this process (faster than a CLI subprocess) except where the exit code of the
command line itself is what is checked.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import sys
import types
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli
from hydra import compose, initialize_config_dir
from PIL import Image
from test_bad_inputs import NOT_MODELS
from test_export import IMGSZ, float_export, tiny_dataset  # noqa: F401  (float_export: a fixture used here)
from test_safe_load import evil_pt

from pipeline.config import register, validate
from pipeline.context import StageResult
from pipeline.errors import UserError
from pipeline.manifest import FAILED, RUNNING, STALE_AFTER_S, SUCCEEDED, Manifest
from pipeline.runner import run_stage

# The list as issue 21 gives it: (group, kind). Each has a case below.
RED_TEAM = [
    ("code execution", "pickle as evaluate.input"),
    ("code execution", "pickle as model.weights"),
    ("records lost", "manifest.json cut in half"),
    ("stale labels", "infer.resume after an image was replaced"),
    ("runs that never end", "run killed on another host"),
    ("stale reuse", "evaluate.iou changed, stage=all reuses prune"),
    ("quiet acceptance", "killed run's best.pt as prune.input"),
    ("quiet acceptance", "+train.epoch=5"),
    ("quiet acceptance", "engine.calib_dir=/nonexistent for a QDQ input"),
    ("quiet acceptance", "unreadable calibration files"),
    ("quiet acceptance", "evaluate.imgsz=-32"),
    ("quiet acceptance", "export after an interrupted retrain"),
    *[("tracebacks", f"{case} as {key}") for key in ("evaluate.input", "export.input", "infer.input")
      for case, _, _ in NOT_MODELS],
    ("tracebacks", "evaluate.batch=0"),
    ("tracebacks", "manifest record {}"),
    ("tracebacks", "manifest record with pid 'abc'"),
    ("unclear", "unquoted non-ASCII path"),
    ("unclear", "train.epochs=0"),
    ("unclear", "disk full"),
]

CASES: dict[str, Callable[..., None]] = {}


def case(*kinds: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a function as the case of `kinds` (several kinds may share one function, told apart by `kind`)."""

    def register_case(fn: Callable[..., None]) -> Callable[..., None]:
        for kind in kinds:
            CASES[kind] = fn
        return fn

    return register_case


# -- helpers ---------------------------------------------------------------------------------------

def make_cfg(results: Path, *overrides: str, name: str | None = None):
    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        stage_arg = [f"stage={name}"] if name else []
        return compose("config", overrides=[*stage_arg, "experiment=smoke", f"results_dir={results}", *overrides])


def stage(results: Path, name: str, *overrides: str) -> dict:
    """Run one stage in this process as the CLI would (config validated first); its manifest record."""
    cfg = make_cfg(results, *overrides, name=name)
    validate(cfg)
    return run_stage(cfg, name, list(overrides))


def refused(call: Callable[[], object], *says: str) -> str:
    """`call` raises a UserError (exit code 2) whose message is one line holding every text in `says`."""
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert info.value.exit_code == 2 and "\n" not in message, message
    for text in says:
        assert text in message, message
    return message


def cli_refused(*args: str, says: str, results: Path) -> None:
    """The command line exits 2 with one `error:` line holding `says`, and no traceback."""
    proc = run_cli(*args, f"results_dir={results}", timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], proc.stderr


def warned(record: dict, *says: str) -> str:
    """The record holds a warning with every text in `says`; that warning."""
    hits = [w for w in record.get("warnings", []) if all(s in w for s in says)]
    assert hits, record.get("warnings")
    return hits[0]


def fake_stage(monkeypatch, name: str, run: Callable) -> None:
    mod = types.ModuleType(f"stages.{name}")
    mod.run = run
    monkeypatch.setitem(sys.modules, f"stages.{name}", mod)


def writes_model(cfg, ctx) -> StageResult:
    p = ctx.run_dir / "model.pt"
    p.write_bytes(b"weights of " + ctx.stage.encode() + str(cfg.train.epochs).encode())
    return StageResult(outputs=[("model", p)], metrics={"mAP50_95": 0.5})


def ago(seconds: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds)).isoformat(timespec="seconds")


def add_record(m: Manifest, run_id: str, stage_name: str, status: str, outputs: tuple[Path, ...] = (),
               parent: dict | None = None, **fields) -> dict:
    """A record as the runner writes it, with its run folder; `parent`'s model output is its input."""
    run_dir = m.root / stage_name / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    inputs = []
    if parent is not None:
        out = next(o for o in parent["outputs"] if o["role"] == "model")
        inputs = [{**out, "produced_by": parent["run_id"]}]
    record = {"run_id": run_id, "stage": stage_name, "status": status, "started": ago(60), "heartbeat": ago(1),
              "host": socket.gethostname(), "pid": os.getpid(), "run_dir": m.rel(run_dir), "inputs": inputs,
              "outputs": [m.artifact("model", p) for p in outputs], "metrics": {}, **fields}
    m.add(record)
    return record


def qdq_onnx(float_onnx: Path, out: Path) -> Path:
    """`float_onnx` with a QuantizeLinear/DequantizeLinear pair on its input: a QDQ model as a QAT export is one."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(float_onnx))
    name = model.graph.input[0].name
    for node in model.graph.node:
        node.input[:] = [f"{name}_dq" if x == name else x for x in node.input]
    model.graph.initializer.extend([numpy_helper.from_array(np.array(1 / 255, np.float32), "rt_scale"),
                                    numpy_helper.from_array(np.array(0, np.uint8), "rt_zero")])
    pair = [helper.make_node("QuantizeLinear", [name, "rt_scale", "rt_zero"], [f"{name}_q"]),
            helper.make_node("DequantizeLinear", [f"{name}_q", "rt_scale", "rt_zero"], [f"{name}_dq"])]
    nodes = pair + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(out))
    return out


def image_folder(root: Path, good: int, bad: int = 0) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(good)
    for i in range(good):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / f"good{i}.jpg")
    for i in range(bad):
        (root / f"bad{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg" if i % 2 else b"")
    return root


# -- code execution --------------------------------------------------------------------------------

@case("pickle as evaluate.input", "pickle as model.weights")
def code_execution(kind, tmp_path, tiny_data_yaml):
    path, marker = evil_pt(tmp_path)
    key = kind.split()[-1]
    name = "evaluate" if key == "evaluate.input" else "train"
    refused(lambda: stage(tmp_path / "r", name, f"{key}={path}", *tiny_dataset(tiny_data_yaml)),
            f"{key}={path}", f"trust_pickle=[{path}]")
    assert not marker.exists()


# -- records lost, runs that never end, stale reuse, bad records -----------------------------------

@case("manifest.json cut in half")
def truncated_manifest(kind, tmp_path, monkeypatch):
    fake_stage(monkeypatch, "train", writes_model)
    results = tmp_path / "r"
    for epochs in (1, 2, 3):
        stage(results, "train", f"train.epochs={epochs}")
    before = Manifest(results).runs()
    text = (results / "manifest.json").read_text()
    (results / "manifest.json").write_text(text[: len(text) // 2])
    assert Manifest(results).runs() == before  # every record back, checksums included
    assert [p.read_text() for p in results.glob("manifest.json.damaged-*")] == [text[: len(text) // 2]]


@case("run killed on another host")
def cross_host(kind, tmp_path):
    from pipeline.context import StageContext
    from stages.train import _interrupted_last

    m = Manifest(tmp_path)
    beat = ago(STALE_AFTER_S + 1)
    killed = add_record(m, "train-1", "train", RUNNING, host="container-4f2a", pid=1, started=beat, heartbeat=beat)
    (m.abs(killed["run_dir"]) / "last.pt").write_bytes(b"checkpoint")
    record = m.get("train-1")
    assert record["status"] == FAILED and "no heartbeat" in record["error"] and "container-4f2a" in record["error"]
    ctx = StageContext(cfg=None, stage="train", run_id="train-2", run_dir=tmp_path / "train" / "train-2",
                       manifest=m, log=logging.getLogger("test"))
    assert _interrupted_last(ctx) == m.abs(killed["run_dir"]) / "last.pt"  # resume finds it


@case("evaluate.iou changed, stage=all reuses prune")
def stale_reuse(kind, tmp_path, monkeypatch):
    def prune_run(cfg, ctx):
        p = ctx.run_dir / "model.pt"
        p.write_bytes(ctx.input_path("model").read_bytes() + b"-pruned")
        return StageResult(outputs=[("model", p)])

    fake_stage(monkeypatch, "train", writes_model)
    fake_stage(monkeypatch, "prune", prune_run)
    cfg, changed = make_cfg(tmp_path), make_cfg(tmp_path, "evaluate.iou=0.5")
    train, prune = run_stage(cfg, "train", reuse=True), run_stage(cfg, "prune", reuse=True)
    assert run_stage(changed, "train", reuse=True)["run_id"] == train["run_id"]  # train never reads evaluate.*
    assert run_stage(changed, "prune", reuse=True)["run_id"] != prune["run_id"]  # prune measures with it


@case("manifest record {}", "manifest record with pid 'abc'")
def bad_record(kind, tmp_path, monkeypatch, caplog):
    fake_stage(monkeypatch, "train", writes_model)
    entry = {} if kind.endswith("{}") else {
        "run_id": "train-0", "stage": "train", "status": RUNNING, "host": socket.gethostname(), "pid": "abc",
        "heartbeat": ago(STALE_AFTER_S + 60), "outputs": []}
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "runs": [entry]}))
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        record = run_stage(make_cfg(tmp_path), "train")  # a stage still runs and records: no traceback
    runs = Manifest(tmp_path).runs()
    assert record["status"] == SUCCEEDED and runs[-1]["run_id"] == record["run_id"]
    if entry:
        assert runs[0]["status"] == FAILED  # a pid that is no number: its stopped heartbeat decides
    else:
        assert "entry 0 has no run_id; skipped" in caplog.text and len(runs) == 1


# -- stale labels ------------------------------------------------------------------------------------

@case("infer.resume after an image was replaced")
def stale_labels(kind, tmp_path, monkeypatch, float_export, tiny_data_yaml):  # noqa: F811
    import stages.infer as infer_stage

    export_results, export_record = float_export
    model = Manifest(export_results).output_path(export_record)
    source = tmp_path / "src"
    source.mkdir()
    for p in sorted((tiny_data_yaml.parent / "images" / "val").glob("*.jpg"))[:6]:
        shutil.copy(p, source / p.name)
    results = tmp_path / "r"
    args = (f"infer.input={model}", f"infer.source={source}", f"infer.imgsz={IMGSZ}", "infer.batch=2")
    real_write, calls = infer_stage.Writer.write, {"n": 0}

    def dying_write(self, *a, **kw):
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        calls["n"] += 1
        return real_write(self, *a, **kw)

    monkeypatch.setattr(infer_stage.Writer, "write", dying_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        stage(results, "infer", *args)
    monkeypatch.setattr(infer_stage.Writer, "write", real_write)
    failed = Manifest(results).runs()[-1]
    journalled = [json.loads(ln)["path"] for ln in
                  (Manifest(results).abs(failed["run_dir"]) / "detections.jsonl").read_text().splitlines()]
    replaced = journalled[0]
    Image.new("RGB", (200, 300), (10, 200, 10)).save(source / replaced)  # same name, another picture

    resumed = stage(results, "infer", *args, "infer.resume=true")
    assert resumed["metrics"]["resumed"] == len(journalled) - 1  # the replaced image is labelled again
    warned(resumed, "1 image(s) changed", replaced)


# -- quiet acceptance ----------------------------------------------------------------------------------

@case("killed run's best.pt as prune.input")
def killed_best_pt(kind, tmp_path, monkeypatch, tiny_model_pt):
    fake_stage(monkeypatch, "prune", writes_model)
    m = Manifest(tmp_path)
    for run_id, status, fields in (("train-killed", RUNNING, {"pid": 1, "host": "gone-host", "heartbeat": ago(1e5)}),
                                   ("train-live", RUNNING, {})):
        add_record(m, run_id, "train", status, **fields)
        best = tmp_path / "train" / run_id / "weights" / "best.pt"
        best.parent.mkdir()
        shutil.copy(tiny_model_pt, best)
        record = stage(tmp_path, "prune", f"prune.input={best}")
        assert record["status"] == SUCCEEDED  # used, as Ultralytics uses any checkpoint: with a word
        how = "failed (interrupted (no heartbeat" if run_id == "train-killed" else "is still running"
        warned(record, f"prune.input={best} comes from run {run_id}, which {how}", "not a finished result")
        assert record["warnings"] == Manifest(tmp_path).get(record["run_id"])["warnings"]  # recorded


@case("+train.epoch=5")
def plus_key(kind, tmp_path):
    cli_refused("stage=train", "+train.epoch=5", says="train.epoch is not a configuration key; did you mean "
                "train.epochs?", results=tmp_path)


@case("evaluate.imgsz=-32", "evaluate.batch=0")
def bad_evaluate_value(kind, tmp_path):
    cli_refused("stage=evaluate", kind, says=f"{kind} is out of range", results=tmp_path)


@case("engine.calib_dir=/nonexistent for a QDQ input")
def calib_dir_for_qdq(kind, tmp_path, float_export, tiny_data_yaml):  # noqa: F811
    export_results, export_record = float_export
    qdq = qdq_onnx(Manifest(export_results).output_path(export_record), tmp_path / "qdq.onnx")
    args = (f"engine.input={qdq}", "engine.backend=onnxruntime", "engine.evaluate=false", "engine.latency_runs=1",
            *tiny_dataset(tiny_data_yaml))
    missing = tmp_path / "nonexistent"
    refused(lambda: stage(tmp_path / "r", "engine", *args, f"engine.calib_dir={missing}"),
            f"engine.calib_dir={missing} is not a folder")
    folder = image_folder(tmp_path / "calib", good=2)
    record = stage(tmp_path / "r", "engine", *args, f"engine.calib_dir={folder}")
    assert record["metrics"]["qdq_input"] is True and "calib_images" not in record["metrics"]
    warned(record, f"engine.calib_dir={folder} is not used", "trained scales")


@case("unreadable calibration files")
def unreadable_calibration(kind, tmp_path, float_export, tiny_data_yaml):  # noqa: F811
    export_results, export_record = float_export
    folder = image_folder(tmp_path / "calib", good=3, bad=2)
    record = stage(tmp_path / "r", "engine", f"engine.input={Manifest(export_results).output_path(export_record)}",
                   "engine.backend=onnxruntime", "engine.precision=int8", f"engine.calib_dir={folder}",
                   "engine.evaluate=false", "engine.latency_runs=1", "engine.calib_batch=2",
                   *tiny_dataset(tiny_data_yaml))
    assert record["metrics"]["calib_images"] == 3  # what calibration read, not the 5 files it was given
    note = warned(record, "INT8 calibration skipped 2 of 5 images that could not be read", "it used 3")
    assert "bad0.jpg" in note and "bad1.jpg" in note
    from pipeline.engines.common import CalibrationSet

    none_readable = CalibrationSet(sorted(folder.glob("bad*.jpg")), (IMGSZ, IMGSZ), 2, str(folder))
    refused(lambda: list(none_readable.batches()), "none of the 2 calibration images", "engine.calib_dir")


@case("export after an interrupted retrain")
def export_after_failed_retrain(kind, tmp_path, tiny_model_pt, tiny_data_yaml):
    m = Manifest(tmp_path)
    pruned = tmp_path / "prune" / "prune-1" / "model.pt"
    pruned.parent.mkdir(parents=True)
    shutil.copy(tiny_model_pt, pruned)
    prune = add_record(m, "prune-1", "prune", SUCCEEDED, outputs=(pruned,))
    add_record(m, "retrain-1", "retrain", FAILED, parent=prune, error="interrupted (KeyboardInterrupt)")
    record = stage(tmp_path, "export", "export.evaluate=false", f"export.imgsz={IMGSZ}", "export.latency_runs=1",
                   *tiny_dataset(tiny_data_yaml))
    assert record["inputs"][0]["produced_by"] == "prune-1"
    warned(record, "the newest retrain run of this model, retrain-1, failed (interrupted (KeyboardInterrupt))",
           "exporting the prune output of prune-1 instead")


# -- tracebacks: files that are not models -------------------------------------------------------------

NOT_MODEL_KINDS = {f"{c} as {key}": (key, build, pattern) for key in ("evaluate.input", "export.input", "infer.input")
                   for c, build, pattern in NOT_MODELS}


@case(*NOT_MODEL_KINDS)
def not_a_model(kind, tmp_path):
    key, build, pattern = NOT_MODEL_KINDS[kind]
    path = build(tmp_path / "src")
    message = refused(lambda: stage(tmp_path / "r", key.split(".")[0], f"{key}={path}"), f"{key}={path} ")
    assert re.search(pattern, message), message


# -- unclear ---------------------------------------------------------------------------------------------

@case("unquoted non-ASCII path")
def non_ascii(kind, tmp_path):
    folder = tmp_path / "données"
    cli_refused("stage=train", f"dataset.path={folder}", says=f"write 'dataset.path=\"{folder}\"'", results=tmp_path)


@case("train.epochs=0")
def zero_epochs(kind, tmp_path):
    cli_refused("stage=train", "train.epochs=0", says="train.epochs=0 is out of range", results=tmp_path)


@case("disk full")
def disk_full(kind, tmp_path, monkeypatch, capsys):
    import pipeline.__main__ as cli
    from pipeline import app

    def fills_the_disk(cfg, ctx):
        raise OSError(errno.ENOSPC, "No space left on device", str(ctx.run_dir / "model.pt"))

    fake_stage(monkeypatch, "kmeans", fills_the_disk)
    said = refused(lambda: stage(tmp_path, "kmeans"), "disk full writing", "during stage=kmeans:",
                   "the run is recorded as failed")
    assert Manifest(tmp_path).runs()[-1]["error"] == said  # recorded, as the message says

    real_update = Manifest.update

    def full_disk_update(self, run_id, **fields):
        if fields.get("status") == FAILED:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_update(self, run_id, **fields)

    monkeypatch.setattr(Manifest, "update", full_disk_update)
    said = refused(lambda: stage(tmp_path, "kmeans"), "during stage=kmeans:")
    assert "recorded" not in said  # the failure record could not be written: no claim that it was

    def outside_a_stage(cfg, overrides):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "manifest.json"))

    monkeypatch.setattr(app, "run", outside_a_stage)
    with pytest.raises(SystemExit) as exited:
        cli._task(make_cfg(tmp_path, name="kmeans"))
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "during stage=kmeans:" in err and "Stage." not in err, err
    assert "recorded" not in err


# -- the corpus ------------------------------------------------------------------------------------------

def test_every_kind_has_a_case():
    assert sorted(CASES) == sorted(kind for _, kind in RED_TEAM)


@pytest.mark.parametrize("kind", [kind for _, kind in RED_TEAM], ids=[f"{g}: {k}" for g, k in RED_TEAM])
def test_red_team(kind, request):
    fn = CASES[kind]
    names = fn.__code__.co_varnames[1 : fn.__code__.co_argcount]
    fn(kind, **{name: request.getfixturevalue(name) for name in names})
