"""stage=train: an Ultralytics YOLO detector trained on the pipeline's dataset.

The model is built from `model.name`'s YAML with the dataset's classes (optionally starting from a
local `model.weights` file), or loaded from `train.input`. Training runs through
`pipeline.training.fit` (Ultralytics' trainer, with the optional sparsity regulariser); the best
checkpoint is then measured on the val split with `pipeline.evaluation.evaluate`.

Outputs: `model` best.pt, `last` last.pt, `log` results.csv, `curves` curves.png (loss and mAP per
epoch, drawn from results.csv by `pipeline.training.plot_curves`, so it exists with train.plots=false too).
`train.resume=true` continues the newest interrupted train run of this results dir from its last.pt.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from pipeline.context import StageContext, StageResult
from pipeline.errors import UserError
from pipeline.imgsz import model_imgsz, side
from pipeline.manifest import FAILED, SUCCEEDED
from pipeline.models import PRETRAINED_HINT, build_model, load_model, model_figures, names_of

ULTRALYTICS_DIR = "ultralytics"  # Ultralytics' own run folder inside the stage's run dir


def run(cfg: DictConfig, ctx: StageContext) -> StageResult:
    from pipeline.training import TRAINER_KEYS, fit, move_up, plot_curves, training_device

    tc = cfg.train
    if not tc.resume:
        _check_sources(cfg)  # fail before the (possibly long) dataset import
    data = ctx.dataset()
    device = training_device(tc.device, ctx.device)
    args: dict[str, Any] = {k: tc[k] for k in TRAINER_KEYS} | {
        "device": device, "seed": int(cfg.seed), "freeze": int(tc.freeze) or None,
    }
    if tc.resume:
        model: Any = _interrupted_last(ctx)
        args["resume"] = True
    else:
        model = _initial_model(cfg, ctx, len(data.names))
        model.names = dict(enumerate(data.names))

    save_dir = ctx.run_dir / ULTRALYTICS_DIR
    t0 = time.perf_counter()
    curves = ctx.run_dir / "curves.png"
    result = fit(model, data.data_yaml, save_dir, args, sparsity=str(tc.sparsity),
                 sparsity_weight=float(tc.sparsity_weight), log=ctx.log,
                 alongside=lambda d: plot_curves(d / "results.csv", curves), threads=int(tc.threads))
    seconds = time.perf_counter() - t0

    # Checkpoints and log move up to the run dir: that is where the manifest points.
    best = move_up(result.best, ctx.run_dir / "best.pt")
    last = move_up(result.last, ctx.run_dir / "last.pt") if result.last != result.best else best
    log_csv = move_up(save_dir / "results.csv", ctx.run_dir / "results.csv")

    trained = load_model(best)
    imgsz = side(model_imgsz(trained) or int(tc.imgsz))  # a resumed run keeps its checkpoint's size
    metrics = {**result.metrics, **model_figures(trained, imgsz, best), "epochs": result.epochs,
               "seconds_training": round(seconds, 1)}
    if metrics.get("instances", 0) == 0:
        ctx.warn("the val split has no labelled boxes: mAP is 0 by definition, and best.pt is simply the last epoch")
    outputs = [("model", best), ("last", last), ("log", log_csv), ("curves", curves)]
    return StageResult(outputs=outputs, metrics=metrics)


def _check_sources(cfg: DictConfig) -> None:
    if cfg.train.input and not Path(str(cfg.train.input)).expanduser().is_file():
        raise UserError(f"train.input={cfg.train.input} does not exist; give the path of a .pt checkpoint")
    if not cfg.train.input and cfg.model.weights and not Path(str(cfg.model.weights)).expanduser().is_file():
        raise UserError(f"model.weights={cfg.model.weights} does not exist; {PRETRAINED_HINT}")


def _initial_model(cfg: DictConfig, ctx: StageContext, nc: int) -> torch.nn.Module:
    """train.input, else model.name built from YAML for nc classes (from model.weights when given)."""
    if cfg.train.input:
        src = Path(str(cfg.train.input)).expanduser()
        _record_input(ctx, "model", src)
        model = load_model(src, key="train.input")
        model_nc = len(names_of(model)) or getattr(model, "nc", nc)
        if model_nc == nc:
            return model
        ctx.warn(f"train.input={src} predicts {model_nc} classes, the dataset has {nc}: building "
                 f"{cfg.model.name} for {nc} classes and transferring the layers that fit (the head is new)")
        fresh = build_model(str(cfg.model.name), nc)
        fresh.load(model)
        return fresh
    torch.manual_seed(int(cfg.seed))  # the initial weights follow `seed`
    model = build_model(str(cfg.model.name), nc, weights=cfg.model.weights)
    if cfg.model.weights:
        _record_input(ctx, "weights", Path(str(cfg.model.weights)).expanduser())
    return model


def _record_input(ctx: StageContext, role: str, path: Path) -> None:
    found = ctx.manifest.producer_of(path)
    if found is not None:
        ctx.manifest.verify_artifact(found[1])
        ctx.inputs.append({**found[1], "role": role, "produced_by": found[0]["run_id"]})
    else:
        ctx.inputs.append(ctx.manifest.artifact(role, path))


def _interrupted_last(ctx: StageContext) -> Path:
    """last.pt of the newest failed (interrupted) train run of this results dir not resumed yet."""
    runs = ctx.manifest.runs()
    resumed = {r.get("resumed_from") for r in runs if r["status"] == SUCCEEDED}
    for record in reversed(runs):
        if record["stage"] != "train" or record["status"] != FAILED or not record.get("run_dir"):
            continue
        if record["run_id"] in resumed:
            continue
        run_dir = ctx.manifest.abs(record["run_dir"])
        for last in (run_dir / ULTRALYTICS_DIR / "weights" / "last.pt", run_dir / "last.pt"):
            if last.is_file():
                ctx.log.info("train.resume: continuing %s (%s) from %s", record["run_id"],
                             record.get("error", "failed"), last)
                ctx.inputs.append(ctx.manifest.artifact("resume", last, produced_by=record["run_id"]))
                ctx.extra["resumed_from"] = record["run_id"]
                return last
    raise UserError(f"train.resume=true: no interrupted train run with a last.pt in {ctx.results_dir}; "
                    "start a new run with train.resume=false")
