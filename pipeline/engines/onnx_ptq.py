"""ONNX graph rewrites for TensorRT with NVIDIA ModelOpt: INT8 post-training quantisation to QDQ, FP16 AutoCast.

TensorRT 11 builds strongly typed networks only (no INT8 calibrator, no FP16/INT8 builder flags),
so every precision below FP32 must be written into the ONNX graph before TensorRT parses it. Both
rewrites run on the CPU (ONNX Runtime) and keep the Detect decode in FP32, by the same rule as the
CPU backends (`keep_float` in pipeline/engines/common.py): boxes in pixels and scores in 0..1
share the head's output tensor, which one INT8 scale (or FP16 rounding at large pixel values)
would spoil.

- `quantize_qdq`: a float ONNX -> a QDQ ONNX (symmetric INT8, as TensorRT requires), calibrated
  on real images (a CalibrationSet: engine.calib_dir or the training split). The result is built
  exactly as a QAT model's QDQ export is.
- `autocast_fp16`: the float parts of a graph (a float ONNX, or a QDQ ONNX's layers between its
  Q/DQ pairs) -> FP16, inputs and outputs kept FP32, checked on a real image batch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.engines.common import CalibrationSet, decode_layer, keep_float, qdq_nodes
from pipeline.errors import UserError

MODELOPT_HINT = ("install ModelOpt's ONNX extra (pip install 'nvidia-modelopt[onnx]', which brings onnx-graphsurgeon), "
                 "or run the project's Docker image")


def _modelopt_onnx() -> None:
    """Import check with a UserError naming what to install (modelopt.onnx needs its [onnx] extra)."""
    try:
        import modelopt.onnx  # noqa: F401
    except ImportError as exc:
        raise UserError(f"engine.backend=tensorrt below FP32 needs modelopt.onnx ({exc}); {MODELOPT_HINT}") from None


def decode_nodes(model: Any) -> list[str]:
    """Names of the nodes that stay FP32 (the Detect decode and anything after it), in graph order."""
    names = [n.name for n in model.graph.node]
    head = decode_layer(names)
    return [n for n in names if n and keep_float(n, head)]


def _patterns(names: list[str]) -> list[str]:
    # ModelOpt matches node names with re.match: escaped and anchored, each pattern names one node.
    return [re.escape(n) + "$" for n in names]


def _input(model: Any) -> tuple[str, list[int | None]]:
    inp = model.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    return inp.name, dims


def quantize_qdq(src: Path, out: Path, calib: CalibrationSet, log: Any) -> dict[str, Any]:
    """INT8 QDQ ONNX `out` from the float ONNX `src`, calibrated on `calib`'s real images.

    Entropy calibration (TensorRT's own default for PTQ) over every image in `calib`, in batches of
    calib.batch on ONNX Runtime's CPU provider: scales do not depend on the provider, and the CUDA
    one can clash with the installed torch's cuDNN. Float parts stay FP32 here; TensorRT's build
    decides their precision (FP16 AutoCast on 11.x, the FP16 flag on 10.x).
    """
    import onnx

    _modelopt_onnx()
    from modelopt.onnx.quantization import quantize

    model = onnx.load(str(src), load_external_data=False)
    if qdq_nodes(model):
        raise ValueError(f"{src} is already quantised (QDQ); it builds as it is")
    name, dims = _input(model)
    data = np.concatenate(list(calib.batches()))
    batch = dims[0] or min(int(calib.batch), len(data))
    if len(data) < batch:
        raise UserError(f"INT8 calibration needs at least {batch} readable images (the model's fixed batch); "
                        "raise engine.calib_images or set engine.calib_dir")
    data = data[: len(data) - len(data) % batch]  # whole calibration steps only
    excluded = decode_nodes(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("ModelOpt ONNX PTQ: INT8 QDQ from %d images of %s, %d decode nodes kept float", len(data), calib.source,
             len(excluded))
    quantize(str(src), quantize_mode="int8", calibration_data={name: data}, calibration_method="entropy",
             calibration_shapes=f"{name}:{batch}x{'x'.join(str(d) for d in data.shape[1:])}",
             calibration_eps=["cpu"], nodes_to_exclude=_patterns(excluded), high_precision_dtype="fp32",
             output_path=str(out), log_level="WARNING")
    quantised = onnx.load(str(out), load_external_data=False)
    return {"ptq": "modelopt_onnx", "ptq_qdq_nodes": qdq_nodes(quantised), "ptq_float_nodes": len(excluded),
            "calib_method": "entropy"}


def autocast_fp16(src: Path, out: Path, sample: np.ndarray, log: Any) -> dict[str, Any]:
    """`src` with its float layers in FP16 (ModelOpt AutoCast) as `out`; IO and the Detect decode stay FP32.

    `sample` is a real image batch: AutoCast keeps a node FP32 where the activations it observes
    exceed FP16's safe range, and random inputs would misplace those nodes.
    """
    import onnx

    _modelopt_onnx()
    from modelopt.onnx import autocast

    model = onnx.load(str(src), load_external_data=False)
    name, _ = _input(model)
    excluded = decode_nodes(model)
    log.info("ModelOpt AutoCast: FP16 float layers, %d decode nodes and the IO kept FP32", len(excluded))
    converted = autocast.convert_to_mixed_precision(
        str(src), low_precision_type="fp16", keep_io_types=True, nodes_to_exclude=_patterns(excluded),
        calibration_data={name: np.ascontiguousarray(sample, dtype=np.float32)})
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(converted, str(out))
    return {"autocast_fp32_nodes": len(excluded)}
