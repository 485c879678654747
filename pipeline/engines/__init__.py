"""Deployment backends for the engine stage: TensorRT (GPUs), OpenVINO (x86 CPUs), ONNX Runtime (anywhere).

Each backend module imports its runtime lazily, so the package imports without any of them.
"""

from __future__ import annotations


def select_backend(requested: str) -> tuple[str, str]:
    """(backend, why) for engine.backend: `auto` takes TensorRT when it imports and a GPU is present,
    else OpenVINO when it imports, else ONNX Runtime."""
    if requested != "auto":
        return requested, f"engine.backend={requested}"
    from pipeline.engines import openvino, tensorrt

    ok, why = tensorrt.available()
    if ok:
        return "tensorrt", f"auto: {why}"
    if openvino.available():
        return "openvino", f"auto: not TensorRT ({why}); OpenVINO imports (the fast CPU runtime)"
    return "onnxruntime", f"auto: not TensorRT ({why}); OpenVINO does not import; ONNX Runtime is the portable fallback"


def require_backend(backend: str, int8_ptq: bool) -> None:
    """Fail before any work (UserError, exit 2) when the chosen backend's runtime is missing."""
    if backend == "tensorrt":
        from pipeline.engines.tensorrt import require as require_tensorrt

        require_tensorrt()
    elif backend == "openvino":
        from pipeline.engines.openvino import require_openvino

        require_openvino(int8=int8_ptq)
    else:
        from pipeline.engines.onnxruntime import require_onnxruntime

        require_onnxruntime()
