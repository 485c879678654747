"""Deployment backends for the engine stage: TensorRT (GPUs), OpenVINO (x86 CPUs), ONNX Runtime (anywhere).

Each backend implements `pipeline.engines.backend.Backend` and is registered in BACKENDS under its
engine.backend value. Each backend module imports its runtime lazily, so the package imports
without any of them.
"""

from __future__ import annotations

from pipeline.engines.backend import Backend
from pipeline.engines.onnxruntime import OnnxRuntimeBackend
from pipeline.engines.openvino import OpenVINOBackend
from pipeline.engines.tensorrt import TensorRTBackend

BACKENDS: dict[str, Backend] = {b.name: b for b in (TensorRTBackend(), OpenVINOBackend(), OnnxRuntimeBackend())}
# engine.backend=auto takes the first that is available; the last is the fallback, taken regardless
# (its `require` then says how to install it).
AUTO_ORDER = ("tensorrt", "openvino", "onnxruntime")


def select_backend(requested: str) -> tuple[str, str]:
    """(backend, why) for engine.backend: `auto` takes TensorRT when it imports and a GPU is present,
    else OpenVINO when it imports, else ONNX Runtime."""
    if requested != "auto":
        return requested, f"engine.backend={requested}"
    skipped = []
    for name in AUTO_ORDER[:-1]:
        ok, why = BACKENDS[name].available()
        if ok:
            return name, f"auto: {'; '.join([*skipped, why])}"
        skipped.append(f"not {BACKENDS[name].label} ({why})")
    return AUTO_ORDER[-1], f"auto: {'; '.join(skipped)}; {BACKENDS[AUTO_ORDER[-1]].label} is the portable fallback"


def require_backend(backend: str, int8_ptq: bool) -> None:
    """Fail before any work (UserError, exit 2) when the chosen backend's runtime is missing."""
    BACKENDS[backend].require(int8_ptq)
