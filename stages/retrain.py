"""stage=retrain: fine-tune a pruned model as pruned, then (retrain.qat) quantisation-aware training.

Two phases, because QAT started straight from a freshly pruned model stays at mAP 0 (ModelOpt
calibrates the quantiser ranges once, and on a broken model they are wrong; recipes.md "QAT"):

1. float recovery: `retrain.epochs` of ordinary fine-tuning with the `retrain.*` options, the
   sparsity regulariser off by default (TAO's NO_REG);
2. QAT: INT8 fake-quantisers calibrated on `retrain.calib_batches` training batches of the
   *recovered* model, then `retrain.qat_epochs` at `retrain.qat_lr0` with SGD and no warmup.

mAP is measured right after loading the pruned model, after each phase, and compared with the
unpruned model's (found through the manifest lineage); a collapse below half is a loud warning.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline import qat
from pipeline.context import StageContext, StageResult
from pipeline.errors import UserError
from pipeline.models import count_params, load_model, model_figures
from stages.train import plot_curves, train_device

COLLAPSE_RATIO = 0.5  # retrained mAP50-95 below this fraction of the unpruned one is a collapse


def run(cfg: DictConfig, ctx: StageContext) -> StageResult:
    from pipeline.evaluation import evaluate
    from pipeline.training import TRAINER_KEYS, fit

    rc = cfg.retrain
    do_qat = bool(rc.qat)
    if rc.epochs == 0 and not do_qat:
        raise UserError("retrain.epochs=0 with retrain.qat=false trains nothing; set retrain.epochs > 0")
    if do_qat:
        qat.require_modelopt()
        if rc.epochs == 0 and rc.qat_epochs > 0:
            ctx.warn("retrain.epochs=0: QAT starts from the freshly pruned model, so the quantiser ranges are "
                     "calibrated on a model that does not detect yet; this is known to collapse to mAP 0 "
                     "(recipes.md). Set retrain.epochs > 0 for float recovery first.")
    src = ctx.input_path("model")
    if qat.checkpoint_is_qat(src):
        raise UserError(f"retrain.input={src} is already a QAT model; retrain the pruned float model "
                        "(the prune stage's output)")
    data = ctx.dataset()
    try:
        device = train_device(rc.device, ctx.device)
    except UserError as exc:  # the check is train's; name this stage's key
        raise UserError(str(exc).replace("train.device", "retrain.device", 1)) from None
    imgsz, batch = int(rc.imgsz), int(rc.batch)
    model = load_model(src)
    pruned_params = count_params(model)

    after_load = evaluate(src, data.data_yaml, imgsz=imgsz, batch=batch, device=device.split(",")[0])
    ctx.log.info("pruned model right after loading: mAP50-95 %.4f, %d params", after_load["mAP50_95"], pruned_params)
    metrics: dict[str, Any] = {"mAP50_after_load": after_load["mAP50"], "mAP50_95_after_load": after_load["mAP50_95"]}
    args = {k: rc[k] for k in TRAINER_KEYS} | {"device": device, "seed": int(cfg.seed), "freeze": int(rc.freeze) or None}
    outputs: list[tuple[str, Path]] = []

    # Phase 1: float recovery of the pruned module itself (fit never rebuilds it from a YAML).
    if rc.epochs > 0:
        result = fit(model, data.data_yaml, ctx.run_dir / "float", args, sparsity=str(rc.sparsity),
                     sparsity_weight=float(rc.sparsity_weight), log=ctx.log, threads=int(rc.threads))
        float_path = _move(result.best, ctx.run_dir / "float.pt")
        outputs += _logs(ctx.run_dir / "float", "float")
        final_path, final, epochs = float_path, result.metrics, result.epochs
    else:
        float_path, final_path, final, epochs = src, src, after_load, 0
    metrics |= {"mAP50_float": final["mAP50"], "mAP50_95_float": final["mAP50_95"], "epochs": epochs}

    # Phase 2: QAT, with quantiser ranges calibrated on the recovered model.
    if do_qat:
        recovered = load_model(float_path)
        calib = qat.calibration_batches(data.data_yaml, imgsz, batch, int(rc.calib_batches), seed=int(cfg.seed),
                                        stride=_stride(recovered))
        quantised = qat.prepare(recovered, calib, device.split(",")[0])
        if rc.qat_epochs > 0:
            # One device: DDP workers receive the model pickled, and ModelOpt's layer classes do not pickle.
            qat_args = {**args, "epochs": int(rc.qat_epochs), "lr0": float(rc.qat_lr0), "optimizer": "SGD",
                        "warmup_epochs": 0.0, "device": device.split(",")[0]}
            if "," in device:
                ctx.log.info("QAT phase runs on GPU %s only (quantised models cannot be sent to DDP workers)",
                             qat_args["device"])
            result = fit(quantised, data.data_yaml, ctx.run_dir / "qat", qat_args, log=ctx.log, threads=int(rc.threads))
            final_path, final, qat_epochs = _move(result.best, ctx.run_dir / "model.pt"), result.metrics, result.epochs
            outputs += _logs(ctx.run_dir / "qat", "qat")
        else:  # calibration only: post-training fake-quantisation without fine-tuning
            final_path, qat_epochs = qat.save(quantised, ctx.run_dir / "model.pt"), 0
            final = evaluate(final_path, data.data_yaml, imgsz=imgsz, batch=batch, device=device.split(",")[0])
        if not qat.checkpoint_is_qat(final_path):
            raise RuntimeError(f"{final_path} holds no quantisation state after QAT")
        metrics |= {"qat_epochs": qat_epochs, **qat.settings(int(rc.calib_batches))}
        if float_path != src:
            outputs.insert(0, ("float_model", float_path))
    metrics["qat"] = do_qat

    # Size figures from the float view: thop does not count ModelOpt's quantised layers.
    figures = model_figures(load_model(final_path), imgsz, final_path)
    if figures["params"] != pruned_params:
        raise RuntimeError(f"retraining changed the architecture: {pruned_params} params after prune, "
                           f"{figures['params']} after retrain")
    metrics |= {"mAP50": final["mAP50"], "mAP50_95": final["mAP50_95"], **figures}
    _collapse_guard(ctx, float(final["mAP50_95"]))
    outputs.insert(0, ("model", final_path))
    return StageResult(outputs=outputs, metrics=metrics)


def _stride(model: Any) -> int:
    return max(int(model.stride.max()), 32) if hasattr(model, "stride") else 32


def _move(src: Path, dst: Path) -> Path:
    """A phase's best checkpoint moves up to the run dir, where the manifest points; last.pt goes.

    Nothing reads a phase's last.pt (retrain has no resume), and an unrecorded 2nd copy of every
    model in the results dir would only grow it.
    """
    os.replace(src, dst)
    shutil.rmtree(src.parent)
    return dst


def _logs(save_dir: Path, phase: str) -> list[tuple[str, Path]]:
    """A phase's results.csv and its loss/mAP curves (drawn from the CSV, so plots=false has them too)."""
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

