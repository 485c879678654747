"""The one image-size rule: the size a model was made for, and how a size reads as one side or (h, w).

Ultralytics writes a model's input size in several shapes: an int in training args, `[h, w]` in
export metadata (a string in ONNX metadata), `[s]` now and then. Every stage reads it through
`imgsz_of`, so a size means the same thing to train, evaluate, prune, export, engine and infer:
a square size is an int, a rectangular one `[h, w]`; `side` is the longest side (the number a
stage passes as `imgsz=` to a square letterbox), `hw` the (height, width) of the input tensor.
"""

from __future__ import annotations

import ast
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


def imgsz_of(args: Any) -> int | list[int] | None:
    """The `imgsz` of training args, a checkpoint's args or export metadata (dict or namespace); None if absent.

    A square size comes back as an int, a rectangular one as [h, w]; anything else is no size.
    """
    if args is None:
        return None
    value = args.get("imgsz") if isinstance(args, dict) else getattr(args, "imgsz", None)
    if isinstance(value, str):
        with contextlib.suppress(ValueError, SyntaxError):
            value = ast.literal_eval(value)
    if isinstance(value, (list, tuple)) and len(value) in (1, 2):
        sides = [int(v) for v in value]
        if min(sides) <= 0:
            return None
        return sides[0] if len(set(sides)) == 1 else sides
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def model_imgsz(model: str | Path | nn.Module) -> int | list[int] | None:
    """The input size a model was trained or exported at (checkpoint train_args, export metadata)."""
    if not isinstance(model, (str, Path)):  # a module in memory: its own args
        return imgsz_of(getattr(model, "args", None))
    p = Path(model)
    if p.suffix == ".pt":
        from pipeline.models import load_checkpoint

        ckpt = load_checkpoint(p)
        net = ckpt.get("ema") or ckpt.get("model")
        return imgsz_of(ckpt.get("train_args")) or imgsz_of(getattr(net, "args", None))
    from ultralytics.nn.backends.base import BaseBackend

    return imgsz_of(BaseBackend.read_metadata(p))


def side(size: int | Sequence[int]) -> int:
    """One number for a size: the longest side (a rectangular [h, w] is letterboxed into side x side)."""
    return int(size) if isinstance(size, (int, float)) else max(int(v) for v in size)


def hw(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of the input tensor for a size (an int is square)."""
    if isinstance(size, (int, float)):
        return int(size), int(size)
    sides = [int(v) for v in size]
    if len(sides) not in (1, 2):
        raise ValueError(f"an image size is one or two numbers, not {list(size)}")
    return sides[0], sides[-1]
