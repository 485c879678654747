"""No unpickling without consent: our checkpoints load weights-only; a pickle that runs code never runs
unless its path is in trust_pickle."""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from pipeline import safe_load
from pipeline.errors import UserError
from pipeline.models import build_model, load_checkpoint, load_model, save_checkpoint
from pipeline.modules import swap_split_blocks


class WritesMarker:
    """Unpickled in full, creates `path` (builtins.open): the red-team's code-execution probe."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class CallsConstructor:
    """Pickles as a call of DetectionModel(cfg): allowlisted as a class, but its constructor evals the
    YAML's activation (here: creates the marker, then returns SiLU so that the model builds)."""

    def __init__(self, marker: Path, through_tensor_rebuild: bool = False):
        self.cfg = {"activation": f"open({str(marker)!r}, 'w') and None or __import__('torch').nn.SiLU()",
                    "backbone": [[-1, 1, "Conv", [16, 3, 2]]], "head": [[[0], 1, "Detect", ["nc"]]], "nc": 1}
        self.through_tensor_rebuild = through_tensor_rebuild

    def __reduce__(self):
        from ultralytics.nn.tasks import DetectionModel

        if self.through_tensor_rebuild:  # torch's allowed _rebuild_from_type_v2 calls its first argument
            return (torch._tensor._rebuild_from_type_v2, (DetectionModel, torch.Tensor, (self.cfg,), {}))
        return (DetectionModel, (self.cfg,))


def evil_pt(tmp_path: Path, payload: object | None = None) -> tuple[Path, Path]:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"model": payload if payload is not None else WritesMarker(marker)}, path)
    return path, marker


def loaded_weights_only(monkeypatch) -> list[bool]:
    """Record the weights_only flag of every torch.load call."""
    calls: list[bool] = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


@pytest.mark.parametrize("name", ["yolov8n", "yolo11n"])
@pytest.mark.parametrize("pruned", [False, True], ids=["plain", "split_free"])
def test_our_checkpoints_load_weights_only(tmp_path, monkeypatch, name, pruned):
    model = build_model(name, nc=2)
    if pruned:
        assert swap_split_blocks(model) > 0  # pipeline.modules.SplitFreeC2f in the pickle, as prune writes it
    path = save_checkpoint(model, tmp_path / "model.pt", half=True)
    calls = loaded_weights_only(monkeypatch)
    loaded = load_model(path)
    assert calls == [True]
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.allclose(loaded(torch.zeros(1, 3, 64, 64))[0], model.half().float().eval()(torch.zeros(1, 3, 64, 64))[0],
                              atol=1e-3)


def test_checkpoint_extras_are_data(tmp_path):
    """train_args, numpy figures and paths, as Ultralytics' trainer stores them, need no trust."""
    import numpy as np
    from ultralytics.utils import IterableSimpleNamespace

    model = build_model("yolov8n", nc=2)
    model.args = IterableSimpleNamespace(imgsz=64, data=Path("/data/x.yaml"))
    path = save_checkpoint(model, tmp_path / "m.pt", extra={"best_fitness": np.float64(0.5),
                                                           "train_metrics": {"mAP50": np.float32(0.25)}})
    ckpt = load_checkpoint(path)
    assert ckpt["best_fitness"] == 0.5 and ckpt["train_metrics"]["mAP50"] == np.float32(0.25)
    assert ckpt["model"].args.data == Path("/data/x.yaml")


def test_marker_pickle_never_runs(tmp_path):
    path, marker = evil_pt(tmp_path)
    for load in (load_model, safe_load.load, safe_load.check):
        with pytest.raises(UserError, match=r"needs full unpickling to load \(it references \S*open\)"):
            load(path)
    assert not marker.exists()


@pytest.mark.parametrize("indirect", [False, True], ids=["reduce", "tensor_rebuild"])
def test_allowlisted_class_is_never_called(tmp_path, indirect):
    """A model class may be rebuilt from its state, not constructed: DetectionModel(cfg) would eval cfg."""
    path, marker = evil_pt(tmp_path, CallsConstructor(tmp_path / "marker", through_tensor_rebuild=indirect))
    with pytest.raises(UserError, match=r"it (calls|passes) (the class )?ultralytics\.nn\.tasks\.DetectionModel"):
        load_model(path)
    assert not marker.exists()


def test_evaluate_checks_before_ultralytics_loads(tmp_path, tiny_data_yaml):
    """With imgsz given, evaluate() hands the path straight to Ultralytics' validator, which unpickles in full."""
    from pipeline.evaluation import evaluate

    path, marker = evil_pt(tmp_path)
    with pytest.raises(UserError, match="trust_pickle"):
        evaluate(path, tiny_data_yaml, imgsz=64)
    assert not marker.exists()


def test_trusted_path_is_unpickled_in_full(tmp_path):
    path, marker = evil_pt(tmp_path)
    with safe_load.trusting([str(path)]):
        with pytest.raises(UserError, match="holds no model"):
            load_model(path)
    assert marker.exists()  # consent given: the file's code ran
    marker.unlink()
    with pytest.raises(UserError):
        load_model(path)  # the trust ended with the block
    assert not marker.exists()


def test_scan_of_plain_pickles(tmp_path):
    data = pickle.dumps({"n": 3, "s": {1, 2}, "t": (1, 2.0, "x"), "l": [None, True]}, protocol=2)
    assert safe_load.needs_full_unpickling(data) is None
    assert re.match(r"it references \S*open$", safe_load.needs_full_unpickling(pickle.dumps(WritesMarker(tmp_path / "m"), protocol=2)))
    assert not (tmp_path / "m").exists()
    as_value = pickle.dumps({"factory": torch.nn.Linear}, protocol=2)  # code could call it later
    assert safe_load.needs_full_unpickling(as_value) == "it passes the class torch.nn.modules.linear.Linear as a value"


def test_opcodes_torch_does_not_unpickle_are_refused():
    assert "opcode" in (safe_load.needs_full_unpickling(pickle.dumps([1], protocol=4)) or "")


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a model\n")
    with pytest.raises(UserError, match=r"is not a PyTorch checkpoint \(a text file"):
        load_model(text)
    script = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(script))
    with pytest.raises(UserError, match="TorchScript archive"):
        load_model(script)
    buf = io.BytesIO()
    torch.save({"model": torch.nn.Linear(2, 3)}, buf)
    linear = tmp_path / "linear.pt"
    linear.write_bytes(buf.getvalue())
    with pytest.raises(UserError, match=r"holds a torch\.nn\.modules\.linear\.Linear, not a YOLO detection model"):
        load_model(linear)


@pytest.mark.parametrize("cfg,cls", [("yolov8n-cls.yaml", "ClassificationModel"), ("yolov8n-seg.yaml", "SegmentationModel")])
def test_models_of_other_tasks_are_not_detectors(tmp_path, cfg, cls):
    import ultralytics.nn.tasks as tasks

    path = tmp_path / "other.pt"
    torch.save({"model": getattr(tasks, cls)(cfg, nc=2, verbose=False)}, path)
    with pytest.raises(UserError, match=rf"holds a ultralytics\.nn\.tasks\.{cls}, not a YOLO detection model"):
        load_model(path)


@pytest.mark.parametrize("key", ["evaluate.input", "model.weights"])
def test_cli_refuses_the_marker_pickle(tmp_path, key):
    path, marker = evil_pt(tmp_path)
    stage = "evaluate" if key == "evaluate.input" else "train"
    proc = run_cli(f"stage={stage}", "experiment=smoke", f"results_dir={tmp_path / 'r'}", f"{key}={path}", timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"trust_pickle=[{path}]" in errors[0], proc.stderr
    assert f"{key}={path}" in errors[0]
    assert not marker.exists()


def test_cli_trust_pickle_allows_full_unpickling(tmp_path):
    path, marker = evil_pt(tmp_path)
    proc = run_cli("stage=evaluate", "experiment=smoke", f"results_dir={tmp_path / 'r'}", f"evaluate.input={path}",
                   f"trust_pickle=[{path}]", timeout=600)
    assert marker.exists()  # the user vouched for the file
    assert proc.returncode == 2 and "holds no model" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_scans_the_checkpoint_first(tmp_path, tiny_data_yaml):
    from pipeline.training import fit

    path, marker = evil_pt(tmp_path)
    with pytest.raises(UserError, match="trust_pickle"):
        fit(path, tiny_data_yaml, tmp_path / "run", {"resume": True, "epochs": 1, "device": "cpu"})
    assert not marker.exists()
    assert not os.path.exists(tmp_path / "run" / "weights")
