"""ONNX Runtime on CPUs: sessions with fixed threads, static INT8 (QDQ) quantisation, precision read-back.

The portable fallback (ARM, other vendors) and the runtime of export parity checks. On x86 CPUs
OpenVINO is faster on the same graph (docs/deploy.md).
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.engines.backend import Backend, BuildSettings, Built
from pipeline.engines.common import (
    CalibrationSet,
    cpu_model,
    decode_layer,
    fixed_batches,
    keep_float,
    median_ms,
)
from pipeline.errors import UserError, require
from pipeline.manifest import atomic_write_bytes

# Op types that compute in integer arithmetic once ONNX Runtime has fused a QDQ graph.
INT8_OPS = ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QGemm", "DynamicQuantizeMatMul")
FLOAT_COMPUTE_OPS = ("Conv", "FusedConv", "NchwcConv", "MatMul", "Gemm", "FusedMatMul")


INSTALL_HINT = ('install one ONNX Runtime build: `pip install -e ".[cpu]"` (CPU hosts) or '
                '`pip install -e ".[gpu]"` (NVIDIA GPU hosts)')


def require_onnxruntime() -> Any:
    """The onnxruntime module, or a UserError that says which extra installs it."""
    return require("onnxruntime", INSTALL_HINT)


def session(path: str | Path | bytes, threads: int = 2) -> Any:
    """A CPU inference session using `threads` intra-op threads (one inter-op thread), from a file or
    a serialised model."""
    ort = require_onnxruntime()

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def run(sess: Any, batch: np.ndarray, fixed_batch: int | None = None) -> np.ndarray:
    """The first output on `batch`; a fixed-batch graph is fed in chunks (common.fixed_batches)."""
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: chunk})[0][:n] for chunk, n in fixed_batches(batch, fixed_batch)])


def fixed_batch_of(sess: Any) -> int | None:
    """The graph's batch size when it is fixed, None when dynamic."""
    dim = sess.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) and dim > 0 else None


class _Reader:
    """ONNX Runtime CalibrationDataReader over real images, one batch at a time."""

    def __init__(self, calib: CalibrationSet, input_name: str):
        self.calib, self.input_name = calib, input_name
        self._it = iter(calib.batches())

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._it = iter(self.calib.batches())


def quantize_int8(src: Path, dst: Path, calib: CalibrationSet, log: Any) -> dict[str, Any]:
    """Static INT8 QDQ quantisation (per-channel weights) calibrated on real images; Detect decode kept float.

    The source's metadata (names, imgsz, stride) is copied over, so the result loads like the source.
    """
    import onnx
    require_onnxruntime()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = onnx.load(str(src))
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared)).graph
        names = [n.name for n in graph.node]
        head = decode_layer(names)
        excluded = [n for n in names if keep_float(n, head)]
        log.info("ONNX Runtime INT8: %d of %d nodes kept in float (Detect decode, layer %s)", len(excluded), len(names), head)
        out = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepared), str(out), _Reader(calib, graph.input[0].name),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,  # u8s8: the VNNI fast path on x86
            nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax,
        )
        quantized = onnx.load(str(out))
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(source.metadata_props)
    atomic_write_bytes(dst, quantized.SerializeToString())
    return {"float_nodes": len(excluded), "nodes": len(names)}


def passthrough(src: Path, dst: Path) -> None:
    """Copy the ONNX unchanged (fp32 engines, and QAT QDQ graphs that carry their own scales)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


def executed_precision(path: str | Path, threads: int = 1) -> dict[str, Any]:
    """Read back what ONNX Runtime runs: integer vs float compute kernels in its optimised graph."""
    import onnx

    ort = require_onnxruntime()
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
        fp16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in onnx.load(str(path)).graph.initializer)
    int8 = sum(ops[o] for o in INT8_OPS)
    total = int8 + sum(ops[o] for o in FLOAT_COMPUTE_OPS)
    precision = "int8" if int8 else "fp16" if fp16 else "fp32"
    return {"executed_precision": precision, "int8_layers": int8, "compute_layers": total}


class _SessionRunner:
    """An ONNX Runtime session as a backend Runner: the whole batch in one call, as the graph takes it."""

    def __init__(self, path: Path, threads: int) -> None:
        self.sess = session(path, threads)
        self.name = self.sess.get_inputs()[0].name
        self.fixed_batch = fixed_batch_of(self.sess)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run(None, {self.name: x})[0]

    def latency_ms(self, x: np.ndarray, runs: int) -> float | None:
        return median_ms(lambda: self.sess.run(None, {self.name: x}), runs)


class OnnxRuntimeBackend(Backend):
    """engine.backend=onnxruntime: the ONNX itself (fp32, QAT QDQ) or its static INT8 QDQ quantisation."""

    name = "onnxruntime"
    label = "ONNX Runtime"

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return False, f"onnxruntime does not import ({exc})"
        return True, "ONNX Runtime imports"

    def require(self, int8_ptq: bool) -> None:
        require_onnxruntime()

    def check(self, precision: str, qdq: bool) -> None:
        if precision == "fp16" and not qdq:
            raise UserError("engine.precision=fp16 is not offered with engine.backend=onnxruntime (its CPU kernels run "
                            "FP16 graphs slower than FP32); choose fp32 or int8, or engine.backend=openvino/tensorrt")

    def build(self, src: Path, out_dir: Path, precision: str, qdq: bool, calib: CalibrationSet | None,
              settings: BuildSettings, log: Any) -> Built:
        out = out_dir / "model.onnx"
        record: dict[str, Any] = {}
        if precision == "int8" and not qdq:
            if calib is None:
                raise ValueError("int8 needs a calibration set")
            record.update(quantize_int8(src, out, calib, log))
        else:
            passthrough(src, out)
        return Built(artifact=out, outputs=[("model", out)], record=record)

    def runner(self, built: Built, shape: tuple[int, ...], threads: int) -> _SessionRunner:
        return _SessionRunner(built.artifact, threads)

    def executed_precision(self, built: Built, runner: Any) -> dict[str, Any]:
        return executed_precision(built.artifact)

    def facts(self, threads: int) -> dict[str, Any]:
        return {"latency_threads": threads, "cpu_model": cpu_model(),
                "onnxruntime_version": str(require_onnxruntime().__version__)}

    def mismatch_hint(self, qdq: bool) -> str:
        return (" (it runs a QAT model's QDQ pairs as float fake-quantisation, no faster than FP32; "
                "engine.backend=openvino executes them as INT8)") if qdq else ""
