"""stage=train: an Ultralytics YOLO detector trained on the pipeline's dataset.

The model is built from `model.name`'s YAML with the dataset's classes (optionally starting from a
local `model.weights` file), or loaded from `train.input`. Training runs through
`pipeline.training.fit` (Ultralytics' trainer, with the optional sparsity regulariser); the best
checkpoint is then measured on the val split with `pipeline.evaluation.evaluate`.

Outputs: `model` best.pt, `last` last.pt, `log` results.csv, `curves` curves.png (loss and mAP per
epoch, drawn here from results.csv so it exists with train.plots=false too).
`train.resume=true` continues the newest interrupted train run of this results dir from its last.pt.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from pipeline.context import StageContext, StageResult
from pipeline.devices import resolve_device
from pipeline.errors import UserError
from pipeline.evaluation import model_imgsz
from pipeline.manifest import FAILED, SUCCEEDED
from pipeline.models import PRETRAINED_HINT, build_model, load_model, model_figures, names_of

ULTRALYTICS_DIR = "ultralytics"  # Ultralytics' own run folder inside the stage's run dir


def run(cfg: DictConfig, ctx: StageContext) -> StageResult:
    from pipeline.training import TRAINER_KEYS, fit

    tc = cfg.train
    if not tc.resume:
        _check_sources(cfg)  # fail before the (possibly long) dataset import
    data = ctx.dataset()
    device = train_device(tc.device, ctx.device)
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
    best = _move(result.best, ctx.run_dir / "best.pt")
    last = _move(result.last, ctx.run_dir / "last.pt") if result.last != result.best else best
    log_csv = _move(save_dir / "results.csv", ctx.run_dir / "results.csv")

    trained = load_model(best)
    size = model_imgsz(trained) or int(tc.imgsz)  # a resumed run keeps its checkpoint's size
    imgsz = max(size) if isinstance(size, list) else int(size)
    metrics = {**result.metrics, **model_figures(trained, imgsz, best), "epochs": result.epochs,
               "seconds_training": round(seconds, 1)}
    if metrics.get("instances", 0) == 0:
        ctx.warn("the val split has no labelled boxes: mAP is 0 by definition, and best.pt is simply the last epoch")
    outputs = [("model", best), ("last", last), ("log", log_csv), ("curves", curves)]
    return StageResult(outputs=outputs, metrics=metrics)


def train_device(device: Any, default: str) -> str:
    """train.device (auto -> the top-level device); refuses GPUs that are not there."""
    value = resolve_device(device) if str(device) not in ("auto", "") else default
    if value != "cpu":
        ids = [d for d in value.split(",") if d.strip()]
        visible = torch.cuda.device_count()
        if not all(d.strip().isdigit() and int(d) < visible for d in ids):
            raise UserError(f"train.device={device}: {visible} CUDA GPU(s) visible here; use train.device=cpu, "
                            f"auto, or GPU ids below {visible} (a quoted list such as train.device='0,1' trains with DDP)")
    return value


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


def _move(src: Path, dst: Path) -> Path:
    if Path(src).resolve() != dst.resolve():
        os.replace(src, dst)
    return dst


def read_results(results_csv: Path) -> dict[str, list[float]]:
    """Ultralytics' results.csv as columns of floats."""
    with open(results_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            cols.setdefault(k.strip(), []).append(float(v) if v not in (None, "") else float("nan"))
    return cols


def plot_curves(results_csv: Path, png: Path) -> Path:
    """Loss (train and val) and mAP per epoch as one PNG; matplotlib's bundled font, no downloads."""
    # The object API, not pyplot: no global figure state, so it may draw on a background thread
    # (fit's `alongside`) while the main thread evaluates.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cols = read_results(results_csv)
    epochs = cols.get("epoch", [])
    # Fixed margins instead of tight_layout: the layout pass cost more than the drawing.
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_map = fig.subplots(1, 2, gridspec_kw={"wspace": 0.18})
    fig.subplots_adjust(left=0.05, right=0.98, top=0.92, bottom=0.12)
    terms = sorted({k.split("/", 1)[1] for k in cols if k.startswith(("train/", "val/"))})
    for i, term in enumerate(terms):
        for split, style in (("train", "-"), ("val", "--")):
            if f"{split}/{term}" in cols:
                ax_loss.plot(epochs, cols[f"{split}/{term}"], style, color=f"C{i}", marker=".", label=f"{split}/{term}")
    ax_loss.set(title="loss", xlabel="epoch")
    ax_loss.legend(fontsize=7, ncol=2)
    for key, label in (("metrics/mAP50(B)", "mAP50"), ("metrics/mAP50-95(B)", "mAP50-95")):
        if key in cols:
            ax_map.plot(epochs, cols[key], marker=".", label=label)
    ax_map.set(title="validation mAP (Ultralytics, per epoch)", xlabel="epoch", ylim=(0, 1))
    ax_map.legend(fontsize=8)
    for ax in (ax_loss, ax_map):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    tmp = png.with_name(f".{png.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, png)
    return png
