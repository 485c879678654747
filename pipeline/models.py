"""The one model loader/saver, model-file checks, and model size figures (params, GFLOPs, file size).

Checkpoint format: Ultralytics' own (`{"model": <pickled nn.Module>, "train_args": ..., ...}`),
so every `.pt` the pipeline writes also loads with `ultralytics.YOLO(path)`. Pruned models are
stored as the pickled module itself (a state_dict would not fit the original YAML); the
split-free blocks they contain live in `pipeline.modules` so the pickle resolves anywhere the
package is installed.

Model files are pickles, which can run code when loaded: every `.pt` is read weights-only against
an allowlist of model classes (`pipeline.safe_load`); one that needs more loads only when the
user lists it in `trust_pickle`.
"""

from __future__ import annotations

import copy
import io
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import safe_load
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
        src = load_model(p, key="model.weights")
        model.load(src)  # transfers matching layers (Ultralytics' intersect_dicts)
    return model


def load_checkpoint(path: str | Path, key: str | None = None) -> dict[str, Any]:
    """The raw checkpoint dict of a detection `.pt` written by Ultralytics or by this pipeline.

    `key` (the config key that named the file, e.g. "model.weights") is named in the messages.
    """
    p = Path(path)
    what = f"{key}={p}" if key else str(p)
    if not p.is_file():
        raise UserError(f"{what} does not exist" if not p.exists() else f"{what} is a folder, not a model file")
    ckpt = safe_load.load(p, key=key)
    if isinstance(ckpt, nn.Module):
        ckpt = {"model": ckpt}
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("ema") or ckpt.get("model"), nn.Module):
        held = type(ckpt).__name__ if not isinstance(ckpt, dict) else f"a dict of {', '.join(map(str, ckpt)) or 'nothing'}"
        raise UserError(f"{what} holds no model ({held[:120]}); expected an Ultralytics/pipeline .pt checkpoint")
    net = ckpt.get("ema") or ckpt["model"]
    if not _is_detector(net):
        kind = f"{type(net).__module__}.{type(net).__qualname__}"
        raise UserError(f"{what} holds a {kind}, not a YOLO detection model; expected a detection checkpoint "
                        "(the .pt of stage=train, prune or retrain, or an Ultralytics detect model)")
    return ckpt


def _is_detector(model: nn.Module) -> bool:
    """A model the predictor and evaluator can run as a detector: Ultralytics' `stride` and `names`, and no
    classify, segment, pose or OBB head (an nn.Linear, a classifier or a segmenter is refused)."""
    from ultralytics.nn.modules.head import OBB, Classify, Pose, Segment

    if not isinstance(getattr(model, "stride", None), torch.Tensor) or not getattr(model, "names", None):
        return False
    return not any(isinstance(m, (Classify, Segment, Pose, OBB)) for m in model.modules())


def load_model(path: str | Path, key: str | None = None) -> nn.Module:
    """The detection model of a checkpoint, float32, eval mode, gradients on."""
    ckpt = load_checkpoint(path, key=key)
    model = (ckpt.get("ema") or ckpt["model"]).float()
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


MODEL_FILES = "a .pt checkpoint, an .onnx or .engine file, or an *_openvino_model/ folder"


def check_model_file(path: str | Path, key: str) -> None:
    """Refuse, naming `key`, a file given as a model that no stage can run; say what it is and what is expected.

    A .pt is loaded (weights-only, so a pickle that needs more is refused here), an .onnx must take one
    image batch (N x 3 x H x W); .engine files and OpenVINO folders are checked where they are opened.
    """
    p = Path(path)
    if p.is_dir():
        if not any(p.glob("*.xml")):
            what = "an empty folder" if not any(p.iterdir()) else "a folder without an OpenVINO model (*.xml)"
            raise UserError(f"{key}={p} is {what}; expected {MODEL_FILES}")
        return
    suffix = p.suffix.lower()
    if suffix == ".pt":
        load_checkpoint(p, key=key)
    elif suffix == ".onnx":
        _check_onnx(p, key)
    elif suffix not in (".engine", ".xml"):
        raise UserError(f"{key}={p} is {_describe(p)}; expected {MODEL_FILES}")


def _describe(p: Path) -> str:
    """What a file that is not a model looks like, in a few words ("a text file (.txt)", "an empty file (.bin)")."""
    with open(p, "rb") as f:
        head = f.read(4096)
    suffix = p.suffix or "no suffix"
    if not head:
        return f"an empty file ({suffix})"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return f"a {p.suffix} file" if p.suffix else "a file without a suffix"
    return f"a text file ({suffix})"


def _check_onnx(p: Path, key: str) -> None:
    import onnx

    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: the bytes are not an ONNX model
        raise UserError(f"{key}={p} is not a readable ONNX model ({type(exc).__name__}); expected {MODEL_FILES}"
                        ) from None
    graph = proto.graph
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if not inputs or not graph.output:
        raise UserError(f"{key}={p} is not an ONNX model (its graph has no {'inputs' if not inputs else 'outputs'}); "
                        f"expected {MODEL_FILES}")
    shape_in, shape_out = _onnx_shape(inputs[0]), _onnx_shape(graph.output[0])
    if len(inputs) != 1 or len(shape_in) != 4 or shape_in[1] not in (3, "?") or len(shape_out) != 3:
        given = ", ".join("x".join(map(str, _onnx_shape(i))) or "scalar" for i in inputs)
        raise UserError(f"{key}={p} is an ONNX model with input {given} and output "
                        f"{'x'.join(map(str, shape_out)) or 'scalar'}; expected a YOLO detector: one image input "
                        "N x 3 x H x W and one output N x (4 + classes) x boxes (the model.onnx of stage=export)")


def _onnx_shape(value_info: Any) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else "?" for d in value_info.type.tensor_type.shape.dim]


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
