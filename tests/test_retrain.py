"""Retrain stage and QAT: the pruned architecture survives, QAT models hold quantisers and export QDQ."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import pytest
import torch

from pipeline import qat
from pipeline.context import StageContext
from pipeline.manifest import SUCCEEDED, Manifest
from pipeline.models import build_model, count_params, load_model, save_checkpoint
from stages.retrain import COLLAPSE_RATIO, _collapse_guard, unpruned_map


def _qdq_nodes(onnx_path) -> int:
    return sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(onnx_path)).graph.node)


def _export_onnx(pt_path, imgsz: int = 64):
    from ultralytics import YOLO

    return YOLO(str(pt_path)).export(format="onnx", imgsz=imgsz, simplify=False)


@pytest.fixture(scope="module")
def qat_checkpoint(tiny_data_yaml, tmp_path_factory):
    """An untrained yolov8n, fake-quantised with ranges calibrated on 2 real batches, saved."""
    model = build_model("yolov8n", nc=2)
    model.names = {0: "red", 1: "blue"}
    calib = qat.calibration_batches(tiny_data_yaml, imgsz=64, batch=4, batches=2)
    quantised = qat.prepare(model, calib, "cpu")
    return quantised, qat.save(quantised, tmp_path_factory.mktemp("qat") / "qat.pt")


def test_calibration_batches_are_real_seeded_images(tiny_data_yaml):
    calib = qat.calibration_batches(tiny_data_yaml, imgsz=64, batch=4, batches=3, seed=1)
    a = list(calib)
    b = list(qat.calibration_batches(tiny_data_yaml, imgsz=64, batch=4, batches=3, seed=1))
    c = list(qat.calibration_batches(tiny_data_yaml, imgsz=64, batch=4, batches=3, seed=2))
    assert len(calib) == 3 and [t.shape for t in a] == [(4, 3, 64, 64)] * 3
    assert all(t.dtype == torch.uint8 and float(t.float().std()) > 1 for t in a)  # real pixels, not blank
    assert len(qat.calibration_batches(tiny_data_yaml, imgsz=64, batch=4, batches=100)) == 6  # 24 images
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert any((x != y).any() for x, y in zip(a, c, strict=True))


def _check_quantisers(quantised, float_when) -> None:
    """Every conv's quantisers: disabled where `float_when(name)`, else enabled, 8-bit, calibrated."""
    seen_float = False
    for name, layer in quantised.named_modules():
        if not isinstance(layer, torch.nn.Conv2d):
            continue
        is_float = float_when(name)
        seen_float |= is_float
        for kind, axis in (("weight_quantizer", 0), ("input_quantizer", None)):  # per-channel / per-tensor
            q = getattr(layer, kind)
            assert q.is_enabled != is_float, f"{name}.{kind}"
            if q.is_enabled:
                assert q.num_bits == 8 and q.axis == axis, f"{name}.{kind}"
                assert q.amax is not None and float(q.amax.max()) > 0, f"{name}.{kind}"
    assert seen_float


def test_prepare_quantises_int8_per_channel_weights_head_outputs_included_dfl_float(qat_checkpoint):
    quantised, _ = qat_checkpoint
    counts = qat.quantiser_counts(quantised)
    assert counts["enabled"] > 50 and qat.is_quantised(quantised)
    head = f"model.{len(quantised.model) - 1}."
    outputs = [n for n, m in quantised.named_modules() if isinstance(m, torch.nn.Conv2d)
               and n.startswith(head) and not n.endswith(".conv") and ".dfl." not in n]
    assert len(outputs) == 6  # cv2/cv3 x 3 levels: quantised like the rest
    _check_quantisers(quantised, lambda n: ".dfl." in n)


def test_prepare_can_keep_head_outputs_float_as_ultralytics(tiny_data_yaml):
    model = build_model("yolov8n", nc=2)
    calib = qat.calibration_batches(tiny_data_yaml, imgsz=64, batch=4, batches=1)
    quantised = qat.prepare(model, calib, "cpu", head_outputs=False)
    head = f"model.{len(quantised.model) - 1}."
    _check_quantisers(quantised, lambda n: n.startswith(head) and (not n.endswith(".conv") or ".dfl." in n))


def test_prepare_percentile_calibration_sets_ranges_below_the_max_and_leaves_weights(tiny_data_yaml):
    calib = qat.calibration_batches(tiny_data_yaml, imgsz=64, batch=4, batches=2)
    torch.manual_seed(0)  # build_model draws the initial weights: the same model twice
    model = build_model("yolov8n", nc=2)
    torch.manual_seed(0)
    by_max = qat.prepare(build_model("yolov8n", nc=2), calib, "cpu")
    by_pct = qat.prepare(model, calib, "cpu", method="percentile")
    max_in = [float(q.amax) for q in qat.activation_quantisers(by_max)]
    pct_in = [float(q.amax) for q in qat.activation_quantisers(by_pct)]
    assert len(max_in) == len(pct_in) > 50
    # The percentile of |x| never exceeds its max, and on real images it cuts the tail of most layers.
    assert all(p <= m * (1 + 1e-5) for p, m in zip(pct_in, max_in, strict=True))
    assert sum(p < 0.999 * m for p, m in zip(pct_in, max_in, strict=True)) > len(max_in) // 2
    weights = lambda m: [q.amax.clone() for n, q in m.named_modules() if n.endswith("weight_quantizer") and q.is_enabled]
    assert all(torch.equal(a, b) for a, b in zip(weights(by_max), weights(by_pct), strict=True))
    assert qat.settings(8, method="percentile")["quant_calib_method"] == "percentile"
    assert qat.settings(8, seven_bit_weights=True)["quant_weight_codes"] == 64
    with pytest.raises(ValueError, match="calibration method"):
        qat.prepare(build_model("yolov8n", nc=2), calib, "cpu", method="entropy")


def test_seven_bit_weights_double_every_weight_range_and_leave_activations(tiny_data_yaml):
    calib = qat.calibration_batches(tiny_data_yaml, imgsz=64, batch=4, batches=1)
    torch.manual_seed(0)
    eight = qat.prepare(build_model("yolov8n", nc=2), calib, "cpu")
    torch.manual_seed(0)
    seven = qat.prepare(build_model("yolov8n", nc=2), calib, "cpu", seven_bit_weights=True)
    ranges = lambda m, kind: [q.amax.clone() for n, q in m.named_modules() if n.endswith(kind) and q.is_enabled]
    pairs = list(zip(ranges(eight, "weight_quantizer"), ranges(seven, "weight_quantizer"), strict=True))
    assert len(pairs) > 50 and all(torch.allclose(b, 2 * a) for a, b in pairs)
    assert all(torch.equal(a, b) for a, b in zip(ranges(eight, "input_quantizer"), ranges(seven, "input_quantizer"),
                                                  strict=True))
    conv = next(m for m in seven.modules() if isinstance(m, torch.nn.Conv2d) and m.weight_quantizer.is_enabled)
    codes = conv.weight_quantizer(conv.weight) / (conv.weight_quantizer.amax / 127)  # fake-quantised weights
    assert 32 < float(codes.abs().max()) <= 64.5  # the codes the engine runs on a CPU without VNNI


def test_qat_checkpoint_round_trip(qat_checkpoint):
    quantised, path = qat_checkpoint
    assert qat.checkpoint_is_qat(path)
    restored = qat.load(path)
    assert qat.quantiser_counts(restored) == qat.quantiser_counts(quantised)
    # The float view (size figures) has the same parameters and no quantisers.
    plain = load_model(path)
    assert not qat.is_quantised(plain) and count_params(plain) == count_params(restored)


def test_float_model_exports_no_qdq(tiny_model_pt, tmp_path):
    assert not qat.checkpoint_is_qat(tiny_model_pt)
    assert not qat.is_quantised(qat.load(tiny_model_pt))
    copy = save_checkpoint(load_model(tiny_model_pt), tmp_path / "float.pt")
    assert _qdq_nodes(_export_onnx(copy)) == 0


def test_settings_for_manifest():
    assert qat.settings(8) == {"quant_bits": 8, "quant_weights": "per_channel", "quant_activations": "per_tensor",
                               "quant_calib_batches": 8, "quant_head_outputs": True, "quant_calib_method": "max",
                               "quant_weight_codes": 127}
    assert qat.settings(4, head_outputs=False)["quant_head_outputs"] is False


# -- lineage and the mAP collapse guard ---------------------------------------------------------

def _record(run_id: str, stage: str, metrics: dict, produced_by: str | None = None) -> dict:
    inputs = [{"role": "model", "path": f"x/{run_id}.pt", "sha256": "0" * 64, "bytes": 1}]
    if produced_by:
        inputs[0]["produced_by"] = produced_by
    return {"run_id": run_id, "stage": stage, "status": SUCCEEDED, "inputs": inputs if produced_by else [],
            "outputs": [], "metrics": metrics}


def _ctx(tmp_path, input_produced_by: str | None) -> StageContext:
    manifest = Manifest(tmp_path)
    manifest.add(_record("train-1", "train", {"mAP50_95": 0.6}))
    manifest.add(_record("prune-1", "prune", {"mAP50_95": 0.01}, produced_by="train-1"))
    entry = {"role": "model", "path": "prune/m.pt", "sha256": "0" * 64, "bytes": 1}
    if input_produced_by:
        entry["produced_by"] = input_produced_by
    return StageContext(cfg=None, stage="retrain", run_id="retrain-1", run_dir=tmp_path, manifest=manifest,
                        log=logging.getLogger("test"), inputs=[entry])


def test_unpruned_map_walks_prune_to_train(tmp_path):
    assert unpruned_map(_ctx(tmp_path, "prune-1")) == (0.6, "train-1")
    assert unpruned_map(_ctx(tmp_path / "b", None)) is None  # an outside model has no lineage


def test_collapse_guard_warns_below_half_with_both_numbers(tmp_path):
    ctx = _ctx(tmp_path, "prune-1")
    _collapse_guard(ctx, 0.6 * COLLAPSE_RATIO + 0.01)
    assert ctx.warnings == []
    _collapse_guard(ctx, 0.05)
    assert len(ctx.warnings) == 1 and "0.0500" in ctx.warnings[0] and "0.6000" in ctx.warnings[0]


def test_retrain_size_is_the_key_else_the_models_else_trains(tmp_path):
    from hydra import compose, initialize_config_dir

    from pipeline.config import register
    from stages.retrain import _imgsz

    model = build_model("yolov8n", nc=2)
    trained_at = save_checkpoint(model, tmp_path / "a.pt", extra={"train_args": {"imgsz": [128, 96]}})
    unknown = save_checkpoint(model, tmp_path / "b.pt", extra={"train_args": {}})
    register()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent.parent / "conf"), version_base="1.3"):
        default = compose("config", overrides=["train.imgsz=320"])
        pinned = compose("config", overrides=["train.imgsz=320", "retrain.imgsz=224"])
    assert _imgsz(default, trained_at) == 128
    assert _imgsz(default, unknown) == 320
    assert _imgsz(pinned, trained_at) == 224


# -- the stage, through the CLI -----------------------------------------------------------------

def _hand_pruned(tiny_model_pt, path):
    """yolov8n with half of layer 0's filters removed: an architecture its YAML would not rebuild."""
    import torch_pruning as tp

    model = load_model(tiny_model_pt)
    model.names = {0: "circle", 1: "square"}  # the classes of the synthetic dataset _retrain uses
    first, second = model.model[0], model.model[1]
    drop = list(range(first.conv.out_channels // 2))
    tp.prune_conv_out_channels(first.conv, drop)
    tp.prune_batchnorm_out_channels(first.bn, drop)
    tp.prune_conv_in_channels(second.conv, drop)
    assert count_params(model) < count_params(load_model(tiny_model_pt))
    # As prune keeps them: the training size retrain.imgsz=null retrains at (smoke's train.imgsz is 96).
    return save_checkpoint(model, path, extra={"train_args": {"imgsz": 64}}), count_params(model)


def _retrain(results_dir, *overrides):
    from conftest import run_cli

    proc = run_cli("stage=retrain", "experiment=smoke", f"results_dir={results_dir}",
                   "dataset.synthetic_train=16", "dataset.synthetic_val=8", "dataset.synthetic_classes=2", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = Manifest(results_dir).succeeded("retrain")[-1]
    return record, {o["role"]: Path(results_dir) / o["path"] for o in record["outputs"]}


@pytest.fixture(scope="module")
def pruned(tiny_model_pt, tmp_path_factory):
    return _hand_pruned(tiny_model_pt, tmp_path_factory.mktemp("pruned") / "pruned.pt")


@pytest.fixture(scope="module")
def qat_run(pruned, tmp_path_factory):
    results = tmp_path_factory.mktemp("qat_run") / "results"
    return _retrain(results, f"retrain.input={pruned[0]}")


def test_retrain_qat_keeps_pruned_architecture_and_records_quantisation(pruned, qat_run):
    record, outputs = qat_run
    m = record["metrics"]
    assert m["params"] == pruned[1] == count_params(load_model(outputs["model"]))
    assert count_params(load_model(outputs["float_model"])) == pruned[1]
    assert m["qat"] is True and m["quant_bits"] == 8 and m["quant_weights"] == "per_channel"
    assert m["quant_activations"] == "per_tensor" and m["quant_calib_batches"] == 2
    for key in ("mAP50", "mAP50_95", "mAP50_95_after_load", "mAP50_95_float", "gflops", "size_mb"):
        assert isinstance(m[key], float) and m[key] >= 0, key
    assert m["epochs"] == 1 and m["qat_epochs"] == 1
    assert m["imgsz"] == 64  # retrain.imgsz=null: the size the pruned model was trained at
    assert qat.checkpoint_is_qat(outputs["model"]) and not qat.checkpoint_is_qat(outputs["float_model"])
    assert outputs["qat_log"].exists() and outputs["float_curves"].exists()


def test_retrain_qat_output_exports_qdq_onnx(qat_run):
    _, outputs = qat_run
    assert _qdq_nodes(_export_onnx(outputs["model"])) > 50


def test_retrain_float_only_has_no_quantisers(pruned, tmp_path):
    record, outputs = _retrain(tmp_path / "results", f"retrain.input={pruned[0]}", "retrain.qat=false")
    m = record["metrics"]
    assert m["qat"] is False and "quant_bits" not in m and m["params"] == pruned[1]
    assert set(outputs) == {"model", "float_log", "float_curves"}
    assert not qat.checkpoint_is_qat(outputs["model"]) and not qat.is_quantised(qat.load(outputs["model"]))


def test_retrain_refuses_nothing_to_train(pruned, tmp_path):
    from conftest import run_cli

    proc = run_cli("stage=retrain", "experiment=smoke", f"results_dir={tmp_path}", f"retrain.input={pruned[0]}",
                   "retrain.epochs=0", "retrain.qat=false")
    assert proc.returncode == 2 and "retrain.epochs=0" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_smoke_chain_train_prune_retrain(tmp_path):
    """train -> prune (half the parameters) -> retrain with QAT through the CLI: the pruned architecture survives."""
    from conftest import run_cli

    results = tmp_path / "results"
    for stage in ("stage=train", "stage=prune prune.mode=target prune.target_params_ratio=0.5", "stage=retrain"):
        proc = run_cli(*stage.split(), "experiment=smoke", f"results_dir={results}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = Manifest(results)
    train, prune, retrain = (manifest.succeeded(s)[-1] for s in ("train", "prune", "retrain"))
    assert retrain["inputs"][0]["produced_by"] == prune["run_id"]
    assert prune["metrics"]["params"] < 0.7 * train["metrics"]["params"]
    assert retrain["metrics"]["params"] == prune["metrics"]["params"]
    assert retrain["metrics"]["qat"] is True
    model = next(o for o in retrain["outputs"] if o["role"] == "model")
    assert qat.checkpoint_is_qat(results / model["path"])


@pytest.mark.parametrize("override", ["retrain.calib_batches=0", "retrain.qat_lr0=-1", "retrain.sparsity=l2"])
def test_bad_retrain_values_name_the_key(override):
    from hydra import compose, initialize_config_dir

    from pipeline.config import register, validate
    from pipeline.errors import UserError

    register()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent.parent / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", override])
    with pytest.raises(UserError, match=override.split("=")[0].replace(".", r"\.")):
        validate(cfg)


@pytest.mark.slow
def test_retrain_calibration_only_gives_a_qat_checkpoint(pruned, tmp_path):
    """qat_epochs=0: ModelOpt post-training fake-quantisation of the input, no fine-tuning."""
    record, outputs = _retrain(tmp_path / "results", f"retrain.input={pruned[0]}", "retrain.epochs=0",
                               "retrain.qat_epochs=0")
    m = record["metrics"]
    assert m["qat"] is True and m["epochs"] == 0 and m["qat_epochs"] == 0 and m["params"] == pruned[1]
    assert set(outputs) == {"model"} and qat.checkpoint_is_qat(outputs["model"])
    assert qat.is_quantised(qat.load(outputs["model"]))


@pytest.fixture(scope="module")
def trained_and_pruned(tmp_path_factory):
    """A smoke train -> prune lineage: the retrain input has an unpruned parent to distil from."""
    from conftest import run_cli

    results = tmp_path_factory.mktemp("distill") / "results"
    for stage in ("stage=train", "stage=prune"):
        proc = run_cli(stage, "experiment=smoke", "prune.pth=0.6", f"results_dir={results}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    return results


def _dis_loss(csv_path: Path) -> list[float]:
    import csv

    rows = list(csv.DictReader(csv_path.open()))
    return [float(r["train/dis_loss"]) for r in rows if r.get("train/dis_loss") not in (None, "")]


def test_distillation_from_the_unpruned_parent_changes_the_loss_and_can_be_switched_off(trained_and_pruned):
    from conftest import run_cli

    results = trained_and_pruned
    manifest = Manifest(results)
    train_id = manifest.succeeded("train")[-1]["run_id"]
    proc = run_cli("stage=retrain", "experiment=smoke", "retrain.distill=true", f"results_dir={results}")  # + QAT
    assert proc.returncode == 0, proc.stderr[-3000:]
    on = manifest.succeeded("retrain")[-1]
    assert on["distilled_from"] == train_id
    outputs = {o["role"]: results / o["path"] for o in on["outputs"]}
    assert any(v > 0 for v in _dis_loss(outputs["float_log"])) and any(v > 0 for v in _dis_loss(outputs["qat_log"]))
    assert qat.checkpoint_is_qat(outputs["model"])
    assert count_params(load_model(outputs["model"])) == on["metrics"]["params"]  # the student, not the teacher

    proc = run_cli("stage=retrain", "experiment=smoke", "retrain.qat=false", f"results_dir={results}")  # off by default
    assert proc.returncode == 0, proc.stderr[-3000:]
    off = manifest.succeeded("retrain")[-1]
    assert "distilled_from" not in off
    log = results / next(o["path"] for o in off["outputs"] if o["role"] == "float_log")
    assert not any(_dis_loss(log))
