"""stage=retrain: fine-tune a pruned model as pruned, then (retrain.qat) quantisation-aware training.

Two phases, because QAT started straight from a freshly pruned model stays at mAP 0 (ModelOpt
calibrates the quantiser ranges once, and on a broken model they are wrong; docs/retrain-qat.md):

1. float recovery: `retrain.epochs` of ordinary fine-tuning with the `retrain.*` options, the
   sparsity regulariser off by default (TAO's NO_REG);
2. QAT: INT8 fake-quantisers calibrated on `retrain.calib_batches` training batches of the
   *recovered* model, then `retrain.qat_epochs` at `retrain.qat_lr0` with SGD and no warmup.

Both phases, calibration and the mAP figures use one input size: `retrain.imgsz`, else the size the
input model was trained at (kept in its checkpoint through prune), else `train.imgsz`.

mAP is measured right after loading the pruned model, after each phase, and compared with the
unpruned model's (found through the manifest lineage); a collapse below half is a loud warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline import qat
from pipeline.context import StageContext, StageResult
from pipeline.errors import UserError
from pipeline.models import count_params, load_model, model_figures

COLLAPSE_RATIO = 0.5  # retrained mAP50-95 below this fraction of the unpruned one is a collapse


@dataclass
class _Phase:
    """Where a phase left the model: its checkpoint, mAP, epochs trained, and the logs it wrote."""

    path: Path
    metrics: dict[str, Any]
    epochs: int = 0
    outputs: list[tuple[str, Path]] = field(default_factory=list)


def run(cfg: DictConfig, ctx: StageContext) -> StageResult:
    from pipeline.training import TRAINER_KEYS, training_device

    rc = cfg.retrain
    _check_phases(rc, ctx)
    src = ctx.input_path("model")
    if qat.checkpoint_is_qat(src):
        raise UserError(f"retrain.input={src} is already a QAT model; retrain the pruned float model "
                        "(the prune stage's output)")
    data = ctx.dataset()
    device = training_device(rc.device, ctx.device, key="retrain.device")
    model = load_model(src)
    imgsz = _imgsz(cfg, src)
    args = {k: rc[k] for k in TRAINER_KEYS} | {"imgsz": imgsz, "device": device, "seed": int(cfg.seed),
                                               "freeze": int(rc.freeze) or None} | _distillation(rc, ctx)

    loaded = _loaded(src, count_params(model), data.data_yaml, args, ctx)
    recovered = _float_recovery(model, data.data_yaml, args, rc, ctx) if rc.epochs > 0 else loaded
    final = _qat(recovered, data.data_yaml, args, cfg, ctx) if rc.qat else recovered
    return _result(ctx, rc, loaded, recovered, final, imgsz)


def _check_phases(rc: DictConfig, ctx: StageContext) -> None:
    """Refuse a retrain that trains nothing; with QAT, ModelOpt must be there."""
    if rc.epochs == 0 and not rc.qat:
        raise UserError("retrain.epochs=0 with retrain.qat=false trains nothing; set retrain.epochs > 0")
    if rc.qat:
        qat.require_modelopt()
        if rc.epochs == 0 and rc.qat_epochs > 0:
            ctx.warn("retrain.epochs=0: QAT starts from the freshly pruned model, so the quantiser ranges are "
                     "calibrated on a model that does not detect yet; this is known to collapse to mAP 0 "
                     "(docs/retrain-qat.md). Set retrain.epochs > 0 for float recovery first.")


def _distillation(rc: DictConfig, ctx: StageContext) -> dict[str, Any]:
    """Ultralytics' feature distillation from the unpruned parent (a 1x1 projector per Detect input
    bridges the pruned widths), or nothing: retrain.distill=false, or no train run in the lineage."""
    if not rc.distill:
        return {}
    train = next((r for r in ctx.input_lineage() if r["stage"] == "train"), None)
    teacher = ctx.manifest.output_of(train) if train is not None else None
    if teacher is None:
        ctx.warn("retrain.distill: the input model has no train run in its lineage to distil from; "
                 "retraining without distillation")
        return {}
    from pipeline import safe_load

    safe_load.check(teacher)  # Ultralytics' distillation loads the teacher by path, unpickling in full
    ctx.extra["distilled_from"] = train["run_id"]
    ctx.log.info("distilling from the unpruned model %s (dis=%g)", train["run_id"], rc.distill_weight)
    return {"distill_model": str(teacher), "dis": float(rc.distill_weight)}


def _imgsz(cfg: DictConfig, src: Path) -> int:
    """retrain.imgsz, else the size the input model was trained at, else train.imgsz."""
    from pipeline.imgsz import model_imgsz, side

    return side(cfg.retrain.imgsz or model_imgsz(src) or cfg.train.imgsz)


def _loaded(src: Path, params: int, data_yaml: Path, args: dict[str, Any], ctx: StageContext) -> _Phase:
    """The pruned model as loaded: its mAP before any training (the starting point of both phases)."""
    from pipeline.evaluation import evaluate

    metrics = evaluate(src, data_yaml, imgsz=args["imgsz"], batch=int(args["batch"]), device=_first(args["device"]))
    ctx.log.info("pruned model right after loading: mAP50-95 %.4f, %d params", metrics["mAP50_95"], params)
    return _Phase(src, {**metrics, "params": params})


def _float_recovery(model: Any, data_yaml: Path, args: dict[str, Any], rc: DictConfig, ctx: StageContext) -> _Phase:
    """Phase 1: fine-tune the pruned module itself (fit never rebuilds it from a YAML)."""
    from pipeline.training import fit, move_up

    result = fit(model, data_yaml, ctx.run_dir / "float", args, sparsity=str(rc.sparsity),
                 sparsity_weight=float(rc.sparsity_weight), log=ctx.log, threads=int(rc.threads))
    path = move_up(result.best, ctx.run_dir / "float.pt", drop_folder=True)
    return _Phase(path, result.metrics, result.epochs, _logs(ctx.run_dir / "float", "float"))


def _qat(recovered: _Phase, data_yaml: Path, args: dict[str, Any], cfg: DictConfig, ctx: StageContext) -> _Phase:
    """Phase 2: quantisers calibrated on the recovered model, then (qat_epochs > 0) QAT fine-tuning."""
    from pipeline.evaluation import evaluate
    from pipeline.training import fit, move_up

    rc, device = cfg.retrain, _first(args["device"])
    model = load_model(recovered.path)
    calib = qat.calibration_batches(data_yaml, args["imgsz"], int(args["batch"]), int(rc.calib_batches),
                                    seed=int(cfg.seed), stride=_stride(model))
    quantised = qat.prepare(model, calib, device, head_outputs=bool(rc.qat_head), method=str(rc.qat_calib),
                            seven_bit_weights=bool(rc.qat_7bit_weights))
    if rc.qat_epochs == 0:  # calibration only: post-training fake-quantisation without fine-tuning
        path = qat.save(quantised, ctx.run_dir / "model.pt")
        phase = _Phase(path, evaluate(path, data_yaml, imgsz=args["imgsz"], batch=int(args["batch"]), device=device))
    else:
        # One device: DDP workers receive the model pickled, and ModelOpt's layer classes do not pickle.
        qat_args = {**args, "epochs": int(rc.qat_epochs), "lr0": float(rc.qat_lr0), "optimizer": "SGD",
                    "warmup_epochs": 0.0, "device": device}
        if "," in args["device"]:
            ctx.log.info("QAT phase runs on GPU %s only (quantised models cannot be sent to DDP workers)", device)
        result = fit(quantised, data_yaml, ctx.run_dir / "qat", qat_args, log=ctx.log, threads=int(rc.threads))
        path = move_up(result.best, ctx.run_dir / "model.pt", drop_folder=True)
        phase = _Phase(path, result.metrics, result.epochs, _logs(ctx.run_dir / "qat", "qat"))
    if not qat.checkpoint_is_qat(phase.path):
        raise RuntimeError(f"{phase.path} holds no quantisation state after QAT")
    return phase


def _result(ctx: StageContext, rc: DictConfig, loaded: _Phase, recovered: _Phase, final: _Phase,
            imgsz: int) -> StageResult:
    """Metrics of every phase and the outputs, the final model first; the architecture must be the pruned one."""
    metrics: dict[str, Any] = {
        "mAP50_after_load": loaded.metrics["mAP50"], "mAP50_95_after_load": loaded.metrics["mAP50_95"],
        "mAP50_float": recovered.metrics["mAP50"], "mAP50_95_float": recovered.metrics["mAP50_95"],
        "epochs": recovered.epochs,
    }
    did_qat = bool(rc.qat)
    if did_qat:
        metrics |= {"qat_epochs": final.epochs, **qat.settings(int(rc.calib_batches), bool(rc.qat_head),
                                                                   str(rc.qat_calib), bool(rc.qat_7bit_weights))}
    metrics["qat"] = did_qat
    # Size figures from the float view: thop does not count ModelOpt's quantised layers.
    figures = model_figures(load_model(final.path), imgsz, final.path)
    if figures["params"] != loaded.metrics["params"]:
        raise RuntimeError(f"retraining changed the architecture: {loaded.metrics['params']} params after prune, "
                           f"{figures['params']} after retrain")
    metrics |= {"mAP50": final.metrics["mAP50"], "mAP50_95": final.metrics["mAP50_95"], **figures, "imgsz": imgsz}
    _collapse_guard(ctx, float(final.metrics["mAP50_95"]))
    outputs = [("model", final.path)]
    if did_qat and recovered is not loaded:
        outputs.append(("float_model", recovered.path))
    outputs += recovered.outputs + (final.outputs if final is not recovered else [])
    return StageResult(outputs=outputs, metrics=metrics)


def _first(device: str) -> str:
    """The first of several GPUs: evaluation, calibration and QAT run on one device."""
    return device.split(",")[0]


def _stride(model: Any) -> int:
    return max(int(model.stride.max()), 32) if hasattr(model, "stride") else 32


def _logs(save_dir: Path, phase: str) -> list[tuple[str, Path]]:
    """A phase's results.csv and its loss/mAP curves (drawn from the CSV, so plots=false has them too)."""
    from pipeline.training import plot_curves

    csv = save_dir / "results.csv"
    if not csv.exists():
        return []
    return [(f"{phase}_log", csv), (f"{phase}_curves", plot_curves(csv, save_dir / "curves.png"))]


def unpruned_map(ctx: StageContext) -> tuple[float, str] | None:
    """mAP50-95 of the unpruned model this one descends from: the train run in its lineage."""
    train = next((r for r in ctx.input_lineage() if r["stage"] == "train"), None)
    value = train.get("metrics", {}).get("mAP50_95") if train is not None else None
    return (float(value), train["run_id"]) if value is not None else None


def _collapse_guard(ctx: StageContext, retrained: float) -> None:
    found = unpruned_map(ctx)
    if found is None:
        ctx.log.info("no unpruned train run in this model's lineage; mAP collapse check skipped")
        return
    unpruned, run_id = found
    if retrained < COLLAPSE_RATIO * unpruned:
        ctx.warn(f"mAP COLLAPSE: retrained mAP50-95 {retrained:.4f} is below half of the unpruned model's "
                 f"{unpruned:.4f} ({run_id}); prune less (lower prune.pth), retrain longer (retrain.epochs), "
                 "or compare with retrain.qat=false to see whether QAT is the cause")
    else:
        ctx.log.info("retrained mAP50-95 %.4f vs unpruned %.4f (%s)", retrained, unpruned, run_id)

