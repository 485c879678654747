"""The one model loader/saver, and model size figures (params, GFLOPs, file size).

Checkpoint format: Ultralytics' own (`{"model": <pickled nn.Module>, "train_args": ..., ...}`),
so every `.pt` the pipeline writes also loads with `ultralytics.YOLO(path)`. Pruned models are
stored as the pickled module itself (a state_dict would not fit the original YAML); the
split-free blocks they contain live in `pipeline.modules` so the pickle resolves anywhere the
package is installed.

Model files are pickles and can run code when loaded: the pipeline only loads them from its
results directory or from a path the user names explicitly.
"""

from __future__ import annotations

import copy
import io
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.manifest import atomic_write_bytes

PRETRAINED_HINT = (
    "pretrained weights need the internet or a local file: download e.g. yolov8n.pt on a connected "
    "machine and pass model.weights=/path/to/yolov8n.pt (offline, models are built from YAML and trained from scratch)"
)


def build_model(name: str, nc: int, weights: str | None = None) -> nn.Module:
    """A DetectionModel for `name` (e.g. yolov8n) with `nc` classes, optionally from a local .pt."""
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(f"{name}.yaml", nc=nc, verbose=False)
    if weights:
        p = Path(weights).expanduser()
        if not p.exists():
            raise UserError(f"model.weights={weights} does not exist; {PRETRAINED_HINT}")
        src = load_model(p)
        model.load(src)  # transfers matching layers (Ultralytics' intersect_dicts)
    return model


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict of a `.pt` written by Ultralytics or by this pipeline."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"model file {p} does not exist")
    import pipeline.modules  # noqa: F401  (pruned models pickle classes from here)

    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file is the user's to fix, not a bug
        raise UserError(f"{p} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(ckpt, nn.Module):
        ckpt = {"model": ckpt}
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("ema") or ckpt.get("model"), nn.Module):
        raise UserError(f"{p} holds no model (expected an Ultralytics/pipeline .pt checkpoint)")
    return ckpt


def load_model(path: str | Path) -> nn.Module:
    """The detection model of a checkpoint, float32, eval mode, gradients on."""
    ckpt = load_checkpoint(path)
    model = (ckpt.get("ema") or ckpt["model"]).float()
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


def save_checkpoint(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None,
                    half: bool = False) -> Path:
    """Write an Ultralytics-compatible checkpoint atomically (module pickled).

    `half=True` stores FP16 weights, as Ultralytics stores best.pt (so sizes compare along the
    chain; every loader here and in Ultralytics casts back to float). QAT checkpoints stay FP32.
    """
    import ultralytics

    m = copy.deepcopy(model).float().eval()
    if half:
        m = m.half()
    for p in m.parameters():
        p.requires_grad_(False)
    ckpt = {
        "date": datetime.now().isoformat(),
        "version": ultralytics.__version__,
        "epoch": -1,
        "best_fitness": None,
        "model": m,
        "ema": None,
        "updates": None,
        "optimizer": None,
        "train_args": dict(getattr(model, "args", {}) or {}),
        "train_metrics": {},
        **(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gflops(model: nn.Module, imgsz: int = 640) -> float:
    """GFLOPs of one forward pass at imgsz x imgsz (thop; MACs x 2, as Ultralytics reports)."""
    from ultralytics.utils.torch_utils import get_flops

    return float(get_flops(copy.deepcopy(model).float(), imgsz))


def size_mb(path: str | Path) -> float:
    p = Path(path)
    total = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return round(total / 1e6, 3)


def model_figures(model: nn.Module, imgsz: int, path: str | Path | None = None) -> dict[str, Any]:
    """params, gflops (and size_mb when a file is given): the size columns of every record."""
    figs: dict[str, Any] = {"params": count_params(model), "gflops": round(gflops(model, imgsz), 4)}
    if path is not None:
        figs["size_mb"] = size_mb(path)
    return figs


def names_of(model: nn.Module) -> dict[int, str]:
    names = getattr(model, "names", None) or {}
    return {int(k): str(v) for k, v in (names.items() if isinstance(names, dict) else enumerate(names))}
