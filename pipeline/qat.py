"""Quantisation-aware training (QAT) with NVIDIA ModelOpt, in the form TensorRT consumes.

The model gets INT8 fake-quantisers (8-bit, per-channel weights, per-tensor activations) through
Ultralytics' own `prepare_qat`, so the result is what `yolo train quantize=8` builds: checkpoints
carry the float module plus a `modelopt` state, and `YOLO(path).export(format="onnx")` writes
QuantizeLinear/DequantizeLinear pairs. Two things differ. `head_outputs=True` (retrain.qat_head, the
default) quantises the Detect head's output convolutions too, the bare 1x1 `cv2.i.2`/`cv3.i.2` that
Ultralytics leaves in float: NNCF's PTQ quantises exactly these (`engines.common.keep_float`), and
left float they are float islands with reorders around them at the highest resolution, which made
the QAT engine slower than PTQ of the same model (docs/retrain-qat.md). DFL and the decode stay
float either way. And the calibration: ours runs on `calib_batches` un-augmented training images
of the model *as it is now* (after float recovery), chosen with a seed, instead of on 8 mosaic
batches the trainer draws itself. ModelOpt holds the ranges fixed after calibration, so they must
come from a model that already detects (docs/retrain-qat.md, "Two phases, and why").
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.yolo_env import library_prints

# What the manifest records about the quantisation (the keys are the metric names).
QUANT_SETTINGS: dict[str, Any] = {
    "quant_bits": 8,
    "quant_weights": "per_channel",
    "quant_activations": "per_tensor",
}

log = logging.getLogger("pipeline.qat")


def require_modelopt() -> None:
    """Refuse early, with the fix, when ModelOpt cannot be imported."""
    try:
        import modelopt.torch.quantization  # noqa: F401
    except ImportError as exc:
        raise UserError(
            f"retrain.qat=true needs NVIDIA ModelOpt ({exc}); install it with "
            "`pip install nvidia-modelopt huggingface_hub`, or set retrain.qat=false for float retraining"
        ) from None


class CalibrationImages:
    """Batches of training images for range calibration, read lazily (uint8, NCHW, letterboxed)."""

    def __init__(self, dataset: Any, order: list[int], batch: int):
        self.dataset, self.order, self.batch = dataset, order, batch

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.order), self.batch):
            yield torch.stack([self.dataset[i]["img"] for i in self.order[start:start + self.batch]])


def calibration_batches(data_yaml: str | Path, imgsz: int, batch: int, batches: int, seed: int = 0,
                        stride: int = 32) -> CalibrationImages:
    """`batches` batches of training images letterboxed to imgsz, chosen with `seed`.

    No augmentation: the ranges are for the images the deployed model will see.
    """
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(data_yaml))
    cfg = get_cfg(overrides={"imgsz": imgsz, "task": "detect", "cache": False, "fraction": 1.0})
    dataset = build_yolo_dataset(cfg, data["train"], batch, data, mode="val", rect=False, stride=stride)
    if len(dataset) == 0:
        raise UserError(f"the training split of {data_yaml} has no images to calibrate the quantisers on")
    n = min(len(dataset), batches * batch)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return CalibrationImages(dataset, order, batch)


def head_output_quantiser(name: str, head: int) -> bool:
    """Whether a quantiser belongs to an output convolution of the Detect head's box/class branches
    (`model.<head>.cv2.<level>.<last>`, a bare nn.Conv2d; the `Conv` blocks before it hold `.conv.`)."""
    return re.fullmatch(rf"model\.{head}\.cv[23]\.\d+\.\d+\.(input|weight)_quantizer", name) is not None


def prepare(model: nn.Module, calib: CalibrationImages, device: str | torch.device = "cpu",
            head_outputs: bool = True, method: str = "max", seven_bit_weights: bool = False) -> nn.Module:
    """Insert calibrated INT8 fake-quantisers into `model` (in place); DFL and the decode stay float,
    the head's output convolutions too unless `head_outputs` (module docstring).

    `method` sets the activation ranges: "max" keeps ModelOpt's (the largest |x| over the batches),
    "percentile" measures them again on the same batches with `recalibrate_activations`.
    `seven_bit_weights` doubles every weight range, so the weights train on the -64..64 codes that
    OpenVINO's engine runs on CPUs (engine.overflow_fix; widening an 8-bit model there instead costs it
    the precision it was trained at).
    """
    if method not in ("max", "percentile"):
        raise ValueError(f"calibration method {method!r} is not max or percentile")
    require_modelopt()
    from ultralytics.utils.torch_utils import prepare_qat

    dev = _torch_device(device)
    model = model.to(dev).float()
    with library_prints():
        quantised = prepare_qat(model, calib, lambda x: x.to(dev).float() / 255, batches=len(calib))
        if head_outputs:  # calibrated with the rest (prepare_qat disables them after calibration)
            import modelopt.torch.quantization as mtq

            head = len(quantised.model) - 1
            mtq.enable_quantizer(quantised, lambda n: head_output_quantiser(n, head))
    if method == "percentile":
        recalibrate_activations(quantised, (b.to(dev).float() / 255 for b in calib))
    if seven_bit_weights:
        for q in weight_quantisers(quantised):
            q.amax = q.amax * 2
    counts = quantiser_counts(quantised)
    if counts["enabled"] == 0:
        raise RuntimeError("ModelOpt inserted no enabled quantiser; the model would train in float")
    log.info("QAT: %d quantisers enabled, %d kept in float (DFL%s), %s-calibrated on %d batches",
             counts["enabled"], counts["disabled"], "" if head_outputs else ", head outputs", method, len(calib))
    return quantised


def _torch_device(device: str | torch.device) -> torch.device:
    """torch device of an Ultralytics device string ('cpu', '0', '0,1' -> the first GPU)."""
    if isinstance(device, torch.device):
        return device
    value = str(device)
    return torch.device("cpu" if value in ("cpu", "") else f"cuda:{value.split(',')[0]}" if value[0].isdigit() else value)


def save(model: nn.Module, path: str | Path) -> Path:
    """Write a quantised model as an Ultralytics QAT checkpoint (float module + `modelopt` state)."""
    from ultralytics.utils.torch_utils import qat_state, strip_qat

    from pipeline.models import save_checkpoint

    state = qat_state(model)
    if state is None:
        raise ValueError("model holds no quantisers; save it with pipeline.models.save_checkpoint")
    plain = copy.deepcopy(model).cpu()
    strip_qat(plain)  # ModelOpt's runtime classes do not pickle; the state above re-applies them at load
    return save_checkpoint(plain, path, extra={"modelopt": state})


def load(path: str | Path) -> nn.Module:
    """A QAT checkpoint's model with its fake-quantisers restored (a float checkpoint loads as is).

    `pipeline.models.load_model` returns the float module alone, which is right for size figures
    (thop does not count ModelOpt's layers) but drops the trained quantiser ranges.
    """
    from pipeline.models import load_checkpoint, load_model

    model = load_model(path)
    state = load_checkpoint(path).get("modelopt")
    if state:
        require_modelopt()
        from ultralytics.utils.torch_utils import restore_qat

        with library_prints():
            restore_qat(model, state)
    return model


def quantiser_counts(model: nn.Module) -> dict[str, int]:
    """Enabled and disabled ModelOpt TensorQuantizers in `model` (both 0 for a float model)."""
    enabled = disabled = 0
    for m in model.modules():
        if type(m).__name__ == "TensorQuantizer":
            if getattr(m, "is_enabled", True):
                enabled += 1
            else:
                disabled += 1
    return {"enabled": enabled, "disabled": disabled}


def is_quantised(model: nn.Module) -> bool:
    """True when `model` holds at least one enabled fake-quantiser."""
    return quantiser_counts(model)["enabled"] > 0


def checkpoint_is_qat(path: str | Path) -> bool:
    """True when a `.pt` carries a ModelOpt state (an Ultralytics QAT checkpoint)."""
    from pipeline.models import load_checkpoint

    return bool(load_checkpoint(path).get("modelopt"))


def settings(calib_batches: int, head_outputs: bool = True, method: str = "max",
             seven_bit_weights: bool = False) -> dict[str, Any]:
    """The quantisation settings for the manifest."""
    return {**QUANT_SETTINGS, "quant_calib_batches": int(calib_batches), "quant_head_outputs": bool(head_outputs),
            "quant_calib_method": method, "quant_weight_codes": 64 if seven_bit_weights else 127}


def _enabled_quantisers(model: nn.Module, kind: str) -> list[nn.Module]:
    return [m for n, m in model.named_modules()
            if type(m).__name__ == "TensorQuantizer" and n.endswith(kind) and getattr(m, "is_enabled", True)]


def activation_quantisers(model: nn.Module) -> list[nn.Module]:
    """The enabled activation (input) quantisers of `model`; weight quantisers are left out."""
    return _enabled_quantisers(model, "input_quantizer")


def weight_quantisers(model: nn.Module) -> list[nn.Module]:
    """The enabled weight quantisers of `model` (per-channel ranges)."""
    return _enabled_quantisers(model, "weight_quantizer")


# Recalibration at another size: the range of an activation is the mean over calibration batches of
# this percentile of |x| (TensorRT's "percentile 99.99" calibration). On the converged pth 0.8 model
# exported at 640 px it scored 0.362 mAP50-95 where the max (ModelOpt's QAT calibration) scored 0.338
# and the 99.9th percentile 0.351 (docs/deploy.md); the QAT weights in float score 0.364 there.
RECALIBRATION_PERCENTILE = 99.99


def recalibrate_activations(model: nn.Module, batches: Iterable[np.ndarray | torch.Tensor],
                            percentile: float = RECALIBRATION_PERCENTILE) -> int:
    """Measure again the ranges of `model`'s activation quantisers on `batches`, in place.

    Each range is the mean over the batches of the `percentile` of |input| (float32 NCHW in 0..1,
    the images the deployed model will see, at the deploy size): a range calibrated on 160 px
    inputs does not fit the activations of a 640 px input, whose rare large values a max would
    follow. The weights and their quantiser ranges, what QAT trained, are kept; during the pass
    the weights stay fake-quantised, as they run when deployed, and the activations pass in float.
    Returns how many quantisers were recalibrated.
    """
    quantisers = activation_quantisers(model)
    if not quantisers:
        raise ValueError("the model holds no enabled activation quantiser to recalibrate")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile={percentile} is not in (0, 100]")
    readings: list[list[float]] = [[] for _ in quantisers]

    def reader(i: int) -> Any:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            a = args[0].detach().abs().flatten().float()
            readings[i].append(float(a.kthvalue(max(1, round(a.numel() * percentile / 100.0))).values))
        return hook

    hooks = [q.register_forward_pre_hook(reader(i)) for i, q in enumerate(quantisers)]
    for q in quantisers:
        q.disable_quant()
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
                model(x)
    finally:
        for h in hooks:
            h.remove()
        for q in quantisers:
            q.enable_quant()
        model.train(training)
    if not readings[0]:
        raise ValueError("no calibration batch to recalibrate the activation ranges on")
    for q, values in zip(quantisers, readings, strict=True):
        amax = float(np.mean(values))
        q.amax = torch.tensor(amax if amax > 0 else 1e-8)  # an all-zero input: any positive range is exact
    return len(quantisers)
