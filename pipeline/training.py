"""Training through Ultralytics' trainer: one `fit()` for stage=train and stage=retrain.

- A model given as an nn.Module is trained AS IS (a pruned architecture is never rebuilt from its
  YAML) and the checkpoints (best.pt / last.pt, Ultralytics' format) pickle that module.
- Sparsity regularisation for prune-friendly training lives here once, as a wrapper around the
  model's loss criterion installed by a trainer callback: `l1` adds `weight * sum|W|` over the conv
  kernels (TAO's L1 regulariser), `bn` adds `weight * sum|gamma|` over the BatchNorm scales (network
  slimming). The term is added per image, like TAO adds it to its per-image mean loss, so its
  gradient goes through the same AMP scaling, accumulation and clipping as the detection loss; it
  appears as the `sparsity` column of results.csv.
- A NaN/inf loss stops training at once with a one-line UserError (Ultralytics would otherwise try
  to recover from last.pt, or carry on in the first epoch).
- Ultralytics writes exactly into `save_dir` (never ./runs); its final re-validation of best.pt is
  replaced by `pipeline.evaluation.evaluate`, so the returned metrics are the pipeline's own numbers.

Also shared by stage=train and stage=retrain: `training_device` (the train.device / retrain.device
check), `move_up` (checkpoints and logs up into the run folder) and `plot_curves` (results.csv as a PNG).
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils.torch_utils import strip_optimizer, unwrap_model

from pipeline import safe_load
from pipeline.config import SPARSITY_KINDS
from pipeline.devices import CoreMeter, resolve_device, threads_kept, use_cores
from pipeline.errors import UserError
from pipeline.evaluation import evaluate

# train.* / retrain.* keys passed to Ultralytics' trainer unchanged (one list: bench/train_overhead.py
# hands exactly these to plain Ultralytics to measure our overhead).
TRAINER_KEYS = ("epochs", "imgsz", "batch", "optimizer", "lr0", "lrf", "momentum", "weight_decay",
                "warmup_epochs", "patience", "workers", "deterministic", "mosaic", "close_mosaic", "cache",
                "plots", "nbs")


@dataclass
class FitResult:
    """What a training run left: checkpoints, metrics of best.pt on the val split, epochs trained."""

    best: Path
    last: Path
    metrics: dict[str, Any]
    epochs: int


class PipelineTrainer(DetectionTrainer):
    """DetectionTrainer that trains a given module as is and leaves the final evaluation to `fit`."""

    def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
        """On resume, the checkpoint's own module (a pruned one would not fit its YAML)."""
        if self.resume and isinstance(weights, nn.Module):
            for p in weights.parameters():
                p.requires_grad_(True)
            return weights
        return super().get_model(cfg=cfg, weights=weights, verbose=verbose)

    def final_eval(self) -> None:
        """Strip the optimiser from the checkpoints; `fit` evaluates best.pt itself (once, not twice)."""
        if self.last.exists():
            ckpt = strip_optimizer(self.last)
            if self.best.exists():
                strip_optimizer(self.best, updates={"train_results": ckpt.get("train_results")})


class SparsityLoss:
    """A detection criterion plus `weight` x L1 norm of `params`, counted once per image in the batch."""

    def __init__(self, criterion: Any, params: list[nn.Parameter], weight: float):
        self.criterion = criterion
        self.params = params
        self.weight = weight

    def penalty(self) -> torch.Tensor:
        return self.weight * torch.stack([p.abs().sum() for p in self.params]).sum()

    def __call__(self, preds: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, items = self.criterion(preds, batch)
        penalty = self.penalty()
        extra = (penalty * batch["img"].shape[0]).reshape(1).to(loss.dtype)
        return torch.cat([loss.reshape(-1), extra]), {**items, "sparsity": penalty.detach()}

    def __getattr__(self, name: str) -> Any:
        # The trainer calls criterion.update() each epoch and reads its attributes; pass them through.
        if name == "criterion":  # not set yet (unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self.criterion, name)


def sparsity_params(model: nn.Module, kind: str, trainable_only: bool = True) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs the sparsity term acts on: conv kernels (l1) or BatchNorm gammas (bn)."""
    kinds = {"l1": nn.Conv2d, "bn": nn.BatchNorm2d}
    out = []
    for mname, m in model.named_modules():
        if isinstance(m, kinds[kind]) and m.weight is not None and (m.weight.requires_grad or not trainable_only):
            out.append((f"{mname}.weight", m.weight))
    return out


class _SparsityHook:
    """on_pretrain_routine_end: wrap the criterion of the trained model (and of its EMA, for val loss)."""

    def __init__(self, kind: str, weight: float):
        self.kind, self.weight = kind, weight

    def __call__(self, trainer: DetectionTrainer) -> None:
        model = unwrap_model(trainer.model)
        chosen = sparsity_params(model, self.kind)
        if not chosen:
            raise UserError(f"sparsity={self.kind}: the model has no trainable {'conv' if self.kind == 'l1' else 'BN'} weights")
        _wrap(model, [p for _, p in chosen], self.weight)
        if trainer.ema is not None:
            ema_params = dict(trainer.ema.ema.named_parameters())
            _wrap(trainer.ema.ema, [ema_params[n] for n, _ in chosen if n in ema_params], self.weight)


def _wrap(model: nn.Module, params: list[nn.Parameter], weight: float) -> None:
    criterion = getattr(model, "criterion", None) or model.init_criterion()
    if isinstance(criterion, SparsityLoss):
        criterion = criterion.criterion
    model.criterion = SparsityLoss(criterion, params, weight)


def _unwrap_criterion(model: nn.Module) -> None:
    criterion = getattr(model, "criterion", None)
    if isinstance(criterion, SparsityLoss):
        model.criterion = criterion.criterion


class _CpuThreads:
    """on_pretrain_routine_end (after the trainer's select_device) and every epoch start: train on `n`
    CPU threads; 0 = the cores other processes leave free, re-measured over each epoch that ran."""

    def __init__(self, n: int):
        self.n = n
        self.meter = CoreMeter()

    def __call__(self, trainer: DetectionTrainer) -> None:
        use_cores(self.n, self.meter)


def _stop_on_nonfinite(trainer: DetectionTrainer) -> None:
    """on_train_batch_end: a NaN/inf loss ends the run with a message instead of a silent recovery."""
    loss = trainer.loss
    if loss is not None and not bool(torch.isfinite(loss)):
        items = {k: round(float(v), 4) for k, v in (trainer.loss_items or {}).items()}
        raise UserError(
            f"training diverged: the loss became {float(loss.detach())} in epoch {trainer.epoch + 1} (loss terms {items}); "
            f"lower lr0 (now {trainer.args.lr0}) or sparsity_weight, or check the labels"
        )


@threads_kept()  # the caller's PyTorch thread count comes back (select_device and _CpuThreads change it)
def fit(
    model: str | nn.Module,
    data_yaml: str | Path,
    save_dir: str | Path,
    args: dict[str, Any],
    *,
    sparsity: str = "none",
    sparsity_weight: float = 0.0,
    log: logging.Logger | None = None,
    alongside: Callable[[Path], Any] | None = None,
    threads: int = 0,
) -> FitResult:
    """Train `model` on `data_yaml` with Ultralytics' trainer, writing into `save_dir`.

    `model`: a model name/YAML ("yolov8n.yaml", built with the dataset's classes), an nn.Module
    (trained as is), or, with `args["resume"]`, the last.pt of an interrupted run. `args` are
    Ultralytics train overrides (epochs, imgsz, batch, optimizer, lr0, device, freeze, quantize, ...).
    `threads`: PyTorch compute threads when training on the CPU (0 = every core; pipeline.devices says why).
    `alongside(save_dir)` runs once training has ended, while best.pt is evaluated (on a thread when
    the evaluation draws no plots; e.g. the curves PNG from results.csv); its errors propagate.
    """
    log = log or logging.getLogger("pipeline.training")
    _check_sparsity(sparsity, sparsity_weight)
    save_dir = Path(save_dir).resolve()
    overrides = _trainer_overrides(args, data_yaml, save_dir)
    source, module = _model_source(model, data_yaml, save_dir, resume=bool(overrides.get("resume")))
    trainer = _trainer(overrides | source, module, sparsity, float(sparsity_weight), threads, log)
    _train(trainer, model)
    best = _checkpoint(trainer)
    metrics = _measure(best, data_yaml, save_dir, trainer.args, alongside)
    return FitResult(best=best, last=trainer.last, metrics=metrics, epochs=epochs_in_log(save_dir / "results.csv"))


def _check_sparsity(kind: str, weight: float) -> None:
    if kind not in SPARSITY_KINDS:
        raise UserError(f"sparsity={kind!r} is not valid; choose one of: {', '.join(SPARSITY_KINDS)}")
    if kind != "none" and not weight > 0:
        raise UserError(f"sparsity={kind} needs sparsity_weight > 0 (got {weight})")


def _trainer_overrides(args: dict[str, Any], data_yaml: str | Path, save_dir: Path) -> dict[str, Any]:
    """Ultralytics' overrides for `args`: our data and save_dir, no plots unless asked, no AMP on a CPU."""
    overrides = {"plots": False, **args}
    if int(overrides.get("epochs", 100)) < 1:
        raise UserError(f"epochs={overrides.get('epochs')}: train at least one epoch")
    if str(overrides.get("device", "cpu")) == "cpu":
        overrides["amp"] = False  # Ultralytics' AMP check downloads a model; AMP does nothing on CPU anyway
    overrides.update(data=str(data_yaml), task="detect", mode="train", save_dir=str(save_dir))
    if not overrides.get("resume"):  # on resume these come from the checkpoint; save_dir still wins
        overrides.update(project=str(save_dir.parent), name=save_dir.name, exist_ok=True)
    return overrides


def _model_source(model: str | nn.Module, data_yaml: str | Path, save_dir: Path,
                  resume: bool) -> tuple[dict[str, str], nn.Module | None]:
    """The overrides naming what to train (`model` or `resume`), and the module to train as is, if any."""
    if resume:
        return {"resume": str(_resume_from(Path(model), save_dir))}, None
    if isinstance(model, nn.Module):
        _check_classes(model, data_yaml)
        for p in model.parameters():
            p.requires_grad_(True)
        return {"model": str(getattr(model, "yaml_file", "") or "module")}, model
    if str(model).endswith(".pt"):
        raise UserError(f"fit() takes a loaded module or a model YAML, not {model}; load it with pipeline.models")
    return {"model": str(model)}, None


def _resume_from(last: Path, save_dir: Path) -> Path:
    """The interrupted run's last.pt; its results.csv is copied over, so the log runs on unbroken."""
    if not last.is_file():
        raise UserError(f"resume: {last} does not exist")
    safe_load.check(last)  # Ultralytics' resume unpickles the checkpoint in full
    old_csv = last.parent.parent / "results.csv"
    if old_csv.exists() and old_csv.resolve() != (save_dir / "results.csv").resolve():
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(old_csv, save_dir / "results.csv")
    return last


def _trainer(overrides: dict[str, Any], module: nn.Module | None, sparsity: str, sparsity_weight: float,
             threads: int, log: logging.Logger) -> PipelineTrainer:
    """The trainer with our callbacks: sparsity term, stop on a NaN loss, CPU threads."""
    try:
        trainer = PipelineTrainer(overrides=overrides)
    except FileNotFoundError as exc:
        raise UserError(f"cannot resume from {overrides.get('resume') or overrides['model']}: {exc}") from None
    if module is not None:
        trainer.model = module  # setup_model keeps a ready module; DDP workers receive it pickled
    if sparsity != "none":
        trainer.add_callback("on_pretrain_routine_end", _SparsityHook(sparsity, sparsity_weight))
        log.info("sparsity regularisation: %s x %g", sparsity, sparsity_weight)
    trainer.add_callback("on_train_batch_end", _stop_on_nonfinite)
    if trainer.device.type == "cpu":
        cpu_threads = _CpuThreads(threads)
        trainer.add_callback("on_pretrain_routine_end", cpu_threads)
        trainer.add_callback("on_train_epoch_start", cpu_threads)
    return trainer


def _train(trainer: PipelineTrainer, model: str | nn.Module) -> None:
    """Run the training loop; the module given is left with its own criterion (no sparsity wrapper)."""
    try:
        trainer.train()
    except AssertionError as exc:  # Ultralytics asserts when a resumed run has nothing left to train
        if "nothing to resume" in str(exc):
            raise UserError(f"cannot resume from {model}: {str(exc).splitlines()[0]}") from None
        raise
    finally:
        if isinstance(trainer.model, nn.Module):
            _unwrap_criterion(unwrap_model(trainer.model))


def _checkpoint(trainer: PipelineTrainer) -> Path:
    """best.pt, or last.pt when no epoch improved on the first (Ultralytics then writes no best.pt)."""
    best = trainer.best if trainer.best.exists() else trainer.last
    if not best.exists():
        raise RuntimeError(f"training finished without writing a checkpoint in {trainer.wdir}")
    return best


def _measure(best: Path, data_yaml: str | Path, save_dir: Path, trained_with: Any,
             alongside: Callable[[Path], Any] | None) -> dict[str, Any]:
    """The pipeline's own mAP of `best` on the val split, with `alongside` run meanwhile."""
    eval_device = str(trained_with.device or "cpu").split(",")[0]
    plots = bool(trained_with.plots)
    with ThreadPoolExecutor(1, thread_name_prefix="alongside") as pool:
        # matplotlib is not thread-safe: with evaluation plots on, `alongside` waits its turn.
        side = pool.submit(alongside, save_dir) if alongside is not None and not plots else None
        metrics = evaluate(
            best, data_yaml, split="val", imgsz=trained_with.imgsz, batch=int(trained_with.batch),
            device=eval_device, save_dir=save_dir, plots=plots,
        )
        if side is not None:
            side.result()
        elif alongside is not None:
            alongside(save_dir)
    metrics.pop("plots", None)
    return metrics


def epochs_in_log(results_csv: Path) -> int:
    """Epochs completed according to Ultralytics' results.csv (its last `epoch` value)."""
    if not results_csv.exists():
        return 0
    with open(results_csv, newline="", encoding="utf-8") as f:
        rows = [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(f)]
    return int(float(rows[-1]["epoch"])) if rows else 0


def _check_classes(module: nn.Module, data_yaml: str | Path) -> None:
    data = yaml.safe_load(Path(data_yaml).read_text(encoding="utf-8")) or {}
    n_data = len(data.get("names") or [])
    head = module.model[-1] if hasattr(module, "model") else None
    n_model = getattr(head, "nc", None) or getattr(module, "nc", None)
    if n_model is not None and n_data and int(n_model) != n_data:
        raise UserError(
            f"the model predicts {n_model} classes but the dataset {data_yaml} has {n_data}; "
            "train a model built for this dataset (its head has one output per class)"
        )


def move_up(src: Path, dst: Path, *, drop_folder: bool = False) -> Path:
    """Move a file Ultralytics wrote to `dst` in the run folder, where the manifest points; returns `dst`.

    `drop_folder`: remove the rest of src's folder as well (a retrain phase's weights/ with its
    last.pt: nothing reads it, retrain has no resume, and an unrecorded second copy of every model
    would only grow the results dir).
    """
    if src.resolve() != dst.resolve():
        os.replace(src, dst)
    if drop_folder:
        shutil.rmtree(src.parent)
    return dst


def training_device(device: Any, default: str, key: str = "train.device") -> str:
    """The device `key` (train.device or retrain.device) asks for: auto -> `default` (the top-level
    device); GPUs that are not there are refused."""
    value = resolve_device(device) if str(device) not in ("auto", "") else default
    if value != "cpu":
        ids = [d for d in value.split(",") if d.strip()]
        visible = torch.cuda.device_count()
        if not all(d.strip().isdigit() and int(d) < visible for d in ids):
            raise UserError(f"{key}={device}: {visible} CUDA GPU(s) visible here; use {key}=cpu, "
                            f"auto, or GPU ids below {visible} (a quoted list such as {key}='0,1' trains with DDP)")
    return value


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
