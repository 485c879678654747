"""Training: the sparsity term, modules trained as is, freeze, resume, divergence, stage=train via the CLI."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
import yaml
from torch import nn

from pipeline.errors import UserError
from pipeline.models import build_model, load_model
from pipeline.training import (
    FitResult,
    PipelineTrainer,
    SparsityLoss,
    fit,
    move_up,
    sparsity_params,
    training_device,
)

TINY = {"epochs": 2, "imgsz": 64, "batch": 8, "workers": 0, "device": "cpu", "seed": 0, "plots": False,
        "mosaic": 0.0, "close_mosaic": 0}


def _csv(path):
    with open(path, newline="") as f:
        return [{k.strip(): v for k, v in row.items()} for row in csv.DictReader(f)]


# -- the sparsity term on a toy model ----------------------------------------------------------------

class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        nn.init.uniform_(self.bn.weight, 0.5, 1.5)

    def forward(self, x):
        return self.bn(self.conv(x)).mean((2, 3))


def _fit_toy(kind: str | None, steps: int = 30) -> _Toy:
    """Regress a fixed target; with `kind`, through SparsityLoss. Returns the trained toy."""
    toy = _Toy()
    torch.manual_seed(1)
    x, target = torch.randn(8, 3, 6, 6), torch.randn(8, 8)

    def criterion(pred, batch):
        loss = ((pred - batch["target"]) ** 2).mean()
        return loss.reshape(1) * batch["img"].shape[0], {"mse": loss.detach()}

    loss_fn = SparsityLoss(criterion, [p for _, p in sparsity_params(toy, kind)], 0.05) if kind else criterion
    opt = torch.optim.SGD(toy.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        loss, _ = loss_fn(toy(x), {"img": x, "target": target})
        loss.sum().backward()
        opt.step()
    return toy


def test_sparsity_term_adds_weight_times_l1_per_image():
    toy = _Toy()
    x = torch.randn(4, 3, 6, 6)
    base = lambda pred, batch: (pred.sum().reshape(1) * 0 + torch.tensor([1.0, 2.0]), {"a": torch.tensor(1.0)})  # noqa: E731
    wrapped = SparsityLoss(base, [toy.conv.weight], 0.01)
    loss, items = wrapped(toy(x), {"img": x})
    l1 = toy.conv.weight.abs().sum().item()
    assert loss.shape == (3,)
    assert loss[-1].item() == pytest.approx(4 * 0.01 * l1, rel=1e-5)  # per image: x batch size
    assert items["sparsity"].item() == pytest.approx(0.01 * l1, rel=1e-5)
    assert set(items) == {"a", "sparsity"}


@pytest.mark.parametrize("kind,module", [("l1", "conv"), ("bn", "bn")])
def test_sparsity_drives_the_chosen_weights_down(kind, module):
    plain, sparse = _fit_toy(None), _fit_toy(kind)
    w_plain = getattr(plain, module).weight.abs().sum().item()
    w_sparse = getattr(sparse, module).weight.abs().sum().item()
    assert w_sparse < 0.9 * w_plain
    other = "bn" if module == "conv" else "conv"  # the other kind is left to the data term
    assert getattr(sparse, other).weight.abs().sum().item() == pytest.approx(
        getattr(plain, other).weight.abs().sum().item(), rel=0.1)


def test_sparsity_params_choose_conv_kernels_or_bn_gammas():
    model = build_model("yolov8n", nc=2)
    convs, bns = sparsity_params(model, "l1"), sparsity_params(model, "bn")
    assert convs and all(p.ndim == 4 for _, p in convs)
    assert bns and all(p.ndim == 1 for _, p in bns)
    assert not any(".dfl." in n for n, _ in convs)  # DFL's fixed conv is frozen, not regularised


# -- fit() through Ultralytics' trainer on tiny data ---------------------------------------------------

def test_fit_trains_the_given_module_with_freeze_and_sparsity(tiny_data_yaml, tmp_path):
    torch.manual_seed(0)
    model = build_model("yolov8n", nc=2)
    model.names = {0: "red", 1: "blue"}
    model.pruned_marker = "kept"  # a rebuilt-from-YAML model would not carry this
    before = copy.deepcopy(model.state_dict())
    l1 = sum(p.abs().sum().item() for _, p in sparsity_params(model, "l1", trainable_only=False)
             if not _frozen(_name(model, p), 2))

    result = fit(model, tiny_data_yaml, tmp_path / "run", {**TINY, "freeze": 2}, sparsity="l1",
                 sparsity_weight=1e-4)

    assert isinstance(result, FitResult) and result.epochs == 2
    assert result.best.is_file() and result.last.is_file()
    assert result.best.parent == tmp_path / "run" / "weights"  # written exactly there, not ./runs
    assert {"mAP50", "mAP50_95", "precision", "recall", "per_class"} <= set(result.metrics)
    rows = _csv(tmp_path / "run" / "results.csv")
    assert len(rows) == 2 and "train/sparsity" in rows[0]
    assert float(rows[0]["train/sparsity"]) == pytest.approx(1e-4 * l1, rel=0.05)

    after = model.state_dict()  # the given module was trained in place
    for k, v in before.items():
        if not v.is_floating_point() or "dfl" in k:
            continue
        if _frozen(k, 2):
            assert torch.equal(after[k], v), f"frozen {k} changed"
    changed = [k for k, v in before.items() if k.startswith("model.5.") and v.is_floating_point()
               and not torch.equal(after[k], v)]
    assert changed, "unfrozen layers did not train"
    assert getattr(model, "criterion", None) is None or not isinstance(model.criterion, SparsityLoss)

    saved = load_model(result.last)
    assert getattr(saved, "pruned_marker", None) == "kept"  # the module itself, not a YAML rebuild
    frozen_w = saved.model[0].conv.weight
    assert torch.allclose(frozen_w, before["model.0.conv.weight"], rtol=1e-3, atol=1e-4)  # fp16 checkpoint


def _frozen(key: str, n: int) -> bool:
    return any(key.startswith(f"model.{i}.") for i in range(n))


def _name(model: nn.Module, param: nn.Parameter) -> str:
    return next(n for n, p in model.named_parameters() if p is param)


def test_cpu_training_computes_on_every_core_then_restores(tiny_data_yaml, tmp_path, monkeypatch):
    """Ultralytics leaves torch one thread short of the cores (and loads CPU batches in the main thread);
    fit's CPU training loop uses them all, or `threads`, and the caller's count comes back afterwards."""
    from pipeline import devices, training

    seen: list[int] = []
    original = training._stop_on_nonfinite

    def recorded(trainer):
        seen.append(torch.get_num_threads())
        original(trainer)

    monkeypatch.setattr(training, "_stop_on_nonfinite", recorded)
    monkeypatch.setattr(devices, "cpu_count", lambda: 3)
    monkeypatch.setattr(devices, "TAKEN_CORE", 1e9)  # no other load counts: every (faked) core is free
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(5)  # neither Ultralytics' count (cores - 1) nor ours
        fit(build_model("yolov8n", nc=2), tiny_data_yaml, tmp_path / "all", {**TINY, "epochs": 1})
        assert seen and set(seen) == {3}
        assert torch.get_num_threads() == 5
        seen.clear()
        fit(build_model("yolov8n", nc=2), tiny_data_yaml, tmp_path / "two", {**TINY, "epochs": 1}, threads=2)
        assert seen and set(seen) == {2}
    finally:
        torch.set_num_threads(before)


def test_nonfinite_loss_stops_with_a_message(tiny_data_yaml, tmp_path):
    with pytest.raises(UserError, match="diverged"):
        fit(build_model("yolov8n", nc=2), tiny_data_yaml, tmp_path / "nan", TINY, sparsity="l1",
            sparsity_weight=float("inf"))


def test_fit_refuses_a_head_for_other_classes(tiny_data_yaml, tmp_path):
    with pytest.raises(UserError, match="3 classes"):
        fit(build_model("yolov8n", nc=3), tiny_data_yaml, tmp_path / "x", TINY)


# -- stage=train / stage=evaluate: resume through the manifest, the CLI ------------------------------

def _smoke_cfg(results_dir, *overrides):
    from conftest import REPO
    from hydra import compose, initialize_config_dir

    from pipeline.config import register

    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=["stage=train", "experiment=smoke", f"results_dir={results_dir}",
                                            "train.imgsz=64", *overrides])


def test_resume_continues_the_interrupted_run_in_a_new_folder(results_dir, monkeypatch):
    from pipeline.manifest import Manifest
    from pipeline.runner import run_stage

    original = PipelineTrainer.save_model

    def save_then_interrupt(self):
        saved = original(self)
        if self.epoch == 0:
            raise KeyboardInterrupt  # as Ctrl-C after the first epoch's checkpoint
        return saved

    monkeypatch.setattr(PipelineTrainer, "save_model", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_stage(_smoke_cfg(results_dir, "train.nbs=8"), "train")
    monkeypatch.setattr(PipelineTrainer, "save_model", original)
    failed = Manifest(results_dir).runs()[-1]
    assert failed["status"] == "failed"
    interrupted_last = results_dir / failed["run_dir"] / "ultralytics" / "weights" / "last.pt"
    assert torch.load(interrupted_last, weights_only=False)["epoch"] == 0

    args = yaml.safe_load((results_dir / failed["run_dir"] / "ultralytics" / "args.yaml").read_text())
    assert args["nbs"] == 8 and args["seed"] == 0  # train.* reach Ultralytics unchanged

    record = run_stage(_smoke_cfg(results_dir, "train.resume=true"), "train")
    assert record["status"] == "succeeded" and record["resumed_from"] == failed["run_id"]
    resume_input = next(e for e in record["inputs"] if e["role"] == "resume")
    assert resume_input["produced_by"] == failed["run_id"]
    assert record["run_dir"] != failed["run_dir"]
    rows = _csv(results_dir / record["run_dir"] / "results.csv")
    assert [int(float(r["epoch"])) for r in rows] == [1, 2]  # epoch 1 from the interrupted run, 2 resumed
    assert record["metrics"]["epochs"] == 2

    with pytest.raises(UserError, match="train.resume=true: no interrupted train run"):
        run_stage(_smoke_cfg(results_dir, "train.resume=true"), "train")
    with pytest.raises(UserError, match="nothing to resume"):
        data = next(e for e in record["inputs"] if e["role"] == "dataset")["path"]
        fit(results_dir / record["run_dir"] / "last.pt", results_dir / data, results_dir / "again",
            {**TINY, "resume": True})


def test_missing_weights_file_exits_2(results_dir):
    from conftest import run_cli

    out = run_cli("stage=train", "experiment=smoke", f"results_dir={results_dir}", "model.weights=/nowhere/yolov8n.pt")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "model.weights=/nowhere/yolov8n.pt does not exist" in out.stderr
    assert "pretrained weights need the internet or a local file" in out.stderr
    assert "Traceback" not in out.stderr


def test_smoke_train_then_evaluate_cli(results_dir):
    from conftest import run_cli

    common = ("experiment=smoke", f"results_dir={results_dir}")
    train = run_cli("stage=train", *common)
    assert train.returncode == 0, train.stderr[-3000:]
    evaluate = run_cli("stage=evaluate", *common, "evaluate.ap_mode=voc11")
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    runs = json.loads((results_dir / "manifest.json").read_text())["runs"]
    assert [r["stage"] for r in runs] == ["train", "evaluate"]
    assert all(r["status"] == "succeeded" for r in runs)
    for r in runs:
        assert {"mAP50", "mAP50_95", "params", "gflops", "size_mb", "per_class"} <= set(r["metrics"])
    roles = {o["role"] for o in runs[0]["outputs"]}
    assert roles == {"model", "last", "log", "curves"}
    assert runs[0]["metrics"]["epochs"] == 2
    assert "ap50_voc" in runs[1]["metrics"]
    assert runs[1]["inputs"][0]["produced_by"] == runs[0]["run_id"]
    missing = run_cli("stage=evaluate", *common, "evaluate.split=test")
    assert missing.returncode == 2 and "evaluate.split=test" in missing.stderr


def test_training_device_resolution_names_the_callers_key():
    assert training_device("auto", "cpu") == "cpu"
    assert training_device("cpu", "0") == "cpu"
    if torch.cuda.device_count() < 2:
        with pytest.raises(UserError, match="^train.device=0,1: "):
            training_device("0,1", "cpu")  # DDP needs the GPUs to be there
        with pytest.raises(UserError) as err:
            training_device("0,1", "cpu", key="retrain.device")
        assert "train.device" not in str(err.value).replace("retrain.device", "")


def test_move_up_moves_into_the_run_folder_and_optionally_drops_the_rest(tmp_path):
    weights = tmp_path / "phase" / "weights"
    weights.mkdir(parents=True)
    (weights / "best.pt").write_bytes(b"best")
    (weights / "last.pt").write_bytes(b"last")
    assert move_up(weights / "last.pt", tmp_path / "last.pt") == tmp_path / "last.pt"  # stage=train keeps both
    assert (tmp_path / "last.pt").read_bytes() == b"last" and (weights / "best.pt").exists()
    assert move_up(tmp_path / "last.pt", tmp_path / "last.pt").read_bytes() == b"last"  # already there: kept
    moved = move_up(weights / "best.pt", tmp_path / "model.pt", drop_folder=True)  # stage=retrain: a phase's
    assert moved.read_bytes() == b"best" and not weights.exists()  # weights/ (and its last.pt) goes


def test_fit_splits_into_steps_that_refuse_bad_arguments_early(tmp_path):
    with pytest.raises(UserError, match="sparsity='l3'"):
        fit("yolov8n.yaml", tmp_path / "data.yaml", tmp_path / "x", TINY, sparsity="l3")
    with pytest.raises(UserError, match="sparsity=l1 needs sparsity_weight > 0"):
        fit("yolov8n.yaml", tmp_path / "data.yaml", tmp_path / "x", TINY, sparsity="l1")
    with pytest.raises(UserError, match="epochs=0: train at least one epoch"):
        fit("yolov8n.yaml", tmp_path / "data.yaml", tmp_path / "x", {**TINY, "epochs": 0})
    with pytest.raises(UserError, match="resume: .*missing.pt does not exist"):
        fit(tmp_path / "missing.pt", tmp_path / "data.yaml", tmp_path / "x", {**TINY, "resume": True})
    with pytest.raises(UserError, match="not .*yolov8n.pt; load it with pipeline.models"):
        fit("yolov8n.pt", tmp_path / "data.yaml", tmp_path / "x", TINY)
    assert not (tmp_path / "x").exists()
