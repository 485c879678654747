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

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline import qat
from pipeline.context import StageContext, StageResult
from pipeline.devices import resolve_device
from pipeline.errors import UserError
from pipeline.models import count_params, load_model, model_figures

# Ultralytics train arguments that retrain.* passes through unchanged.
_PASSTHROUGH = ("epochs", "imgsz", "batch", "optimizer", "lr0", "lrf", "momentum", "weight_decay",
                "warmup_epochs", "patience", "workers", "deterministic", "freeze", "mosaic", "close_mosaic",
                "cache", "plots")
COLLAPSE_RATIO = 0.5  # retrained mAP50-95 below this fraction of the unpruned one is a collapse


def run(cfg: DictConfig, ctx: StageContext) -> StageResult:
    from pipeline.evaluation import evaluate
    from pipeline.training import fit

    rc = cfg.retrain
    do_qat = bool(rc.qat)
    if rc.epochs == 0 and not do_qat:
        raise UserError("retrain.epochs=0 with retrain.qat=false trains nothing; set retrain.epochs > 0")
    if do_qat:
        qat.require_modelopt()
        if rc.epochs == 0 and rc.qat_epochs > 0:
            ctx.warn("retrain.epochs=0: QAT starts from the freshly pruned model, whose quantiser ranges are "
                     "calibrated on a model that does not detect yet; this is known to collapse to mAP 0 "
                     "(recipes.md). Give retrain.epochs > 0 for float recovery first.")

    data = ctx.dataset()
    device = resolve_device(rc.device) if str(rc.device) != "auto" else ctx.device
    src = ctx.input_path("model")
    model = load_model(src)
    if qat.is_quantised(model) or qat.checkpoint_is_qat(src):
        raise UserError(f"retrain.input={src} is already a QAT model; retrain a pruned float model "
                        "(the prune stage's output)")
    pruned_params = count_params(model)
    imgsz = int(rc.imgsz)

    def measure(path: Path) -> dict[str, Any]:
        return evaluate(path, data.data_yaml, imgsz=imgsz, batch=int(rc.batch), device=device)

    after_load = measure(src)
    ctx.log.info("mAP50-95 right after loading the pruned model: %.4f (%d params)",
                 after_load["mAP50_95"], pruned_params)
    args = {k: rc[k] for k in _PASSTHROUGH} | {"device": device, "seed": int(cfg.seed)}
    outputs: list[tuple[str, Path]] = []
    metrics: dict[str, Any] = {"mAP50_95_after_load": after_load["mAP50_95"], "mAP50_after_load": after_load["mAP50"]}

    # Phase 1: float recovery, on the pruned module itself.
    if rc.epochs > 0:
        result = fit(model, data.data_yaml, ctx.run_dir / "float", args, sparsity=str(rc.sparsity),
                     sparsity_weight=float(rc.sparsity_weight), log=ctx.log)
        float_path = result.best
        outputs += _curves(ctx.run_dir / "float", "float")
        float_metrics = measure(float_path)
    else:
        float_path, float_metrics = src, after_load
    metrics |= {"mAP50_95_float": float_metrics["mAP50_95"], "mAP50_float": float_metrics["mAP50"],
                "epochs": int(rc.epochs)}
    outputs.append(("float_model", float_path))
    final_path, final_metrics = float_path, float_metrics

    # Phase 2: QAT, calibrated on the recovered model.
    if do_qat:
        recovered = load_model(float_path)
        calib = qat.calibration_batches(data.data_yaml, imgsz, int(rc.batch), int(rc.calib_batches),
                                        seed=int(cfg.seed), stride=_stride(recovered))
        quantised = qat.prepare(recovered, calib, device)
        if rc.qat_epochs > 0:
            qat_args = {**args, "epochs": int(rc.qat_epochs), "lr0": float(rc.qat_lr0), "optimizer": "SGD",
                        "warmup_epochs": 0.0}
            result = fit(quantised, data.data_yaml, ctx.run_dir / "qat", qat_args, sparsity="none",
                         sparsity_weight=0.0, log=ctx.log)
            final_path = result.best
            outputs += _curves(ctx.run_dir / "qat", "qat")
        else:  # calibration only: post-training fake-quantisation, no fine-tuning
            final_path = qat.save(quantised, ctx.run_dir / "qat_calibrated.pt")
        if not qat.checkpoint_is_qat(final_path):
            raise RuntimeError(f"{final_path} holds no quantisation state after QAT")
        final_metrics = measure(final_path)
        metrics |= {"qat_epochs": int(rc.qat_epochs), **qat.settings(int(rc.calib_batches))}
    metrics["qat"] = do_qat

    # Size figures of the float structure: thop does not count ModelOpt's quantised layers.
    final_float = load_model(final_path)
    figures = model_figures(final_float, imgsz, final_path)
    if figures["params"] != pruned_params:
        raise RuntimeError(f"retraining changed the architecture: {pruned_params} params after prune, "
                           f"{figures['params']} after retrain")
    metrics |= {"mAP50": final_metrics["mAP50"], "mAP50_95": final_metrics["mAP50_95"], **figures}
    _collapse_guard(ctx, final_metrics["mAP50_95"])
    outputs.insert(0, ("model", final_path))
    return StageResult(outputs=outputs, metrics=metrics)


def _stride(model: Any) -> int:
    return max(int(model.stride.max()), 32) if hasattr(model, "stride") else 32


def _curves(save_dir: Path, phase: str) -> list[tuple[str, Path]]:
    """Training curves Ultralytics wrote for a phase (results.csv, results.png when plotted)."""
    return [(f"{phase}_{f.stem}", f) for f in (save_dir / "results.csv", save_dir / "results.png") if f.exists()]


def unpruned_map(ctx: StageContext) -> tuple[float, str] | None:
    """mAP50-95 of the unpruned model this one descends from: walk produced_by back to a train run."""
    try:
        run_id = ctx.input_entry("model").get("produced_by")
    except StopIteration:
        return None
    seen: set[str] = set()
    while run_id and run_id not in seen:
        seen.add(run_id)
        record = ctx.manifest.get(run_id)
        if record is None:
            return None
        if record["stage"] == "train":
            value = record.get("metrics", {}).get("mAP50_95")
            return (float(value), run_id) if value is not None else None
        run_id = next((e.get("produced_by") for e in record.get("inputs", []) if e["role"] == "model"), None)
    return None


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

