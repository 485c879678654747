"""stage=engine: the exported ONNX -> a deployable engine (TensorRT, OpenVINO or ONNX Runtime).

engine.backend=auto takes TensorRT when it imports and a GPU is present, else OpenVINO, else ONNX
Runtime, and logs which and why. A QAT (QDQ) ONNX always runs as INT8 with its trained scales; a
float ONNX is built at engine.precision, INT8 calibrated on real images (engine.calib_dir or the
training split, never random data) with the Detect decode kept in float. Every engine is measured
as itself: mAP through the pipeline's evaluator, median batch-1 latency, size, and the precision
the runtime actually executes, read back from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.context import StageContext, StageResult
from pipeline.devices import cpu_threads
from pipeline.engines import require_backend, select_backend
from pipeline.engines.common import (
    CalibrationSet,
    cpu_has_vnni,
    cpu_model,
    fill_batch,
    median_ms,
    onnx_metadata,
    qdq_nodes,
)
from pipeline.errors import UserError
from pipeline.imgsz import hw, imgsz_of
from pipeline.models import size_mb
from stages._shared import (
    calib_dir_images,
    calibration_record,
    calibration_set,
    evaluate_artifact,
    real_batch,
    source_metrics,
)

PARITY_IMAGES = 8  # validation images the engine is compared with its source ONNX on
QDQ_TOLERANCE = 0.01  # mean relative difference a QDQ model may show between two INT8 runtimes


def run(cfg: Any, ctx: StageContext) -> StageResult:
    import onnx

    e = cfg.engine
    src = ctx.input_path("model")
    if src.suffix != ".onnx":
        raise UserError(f"engine.input={src} is not an ONNX file; run stage=export first, or set engine.input=PATH.onnx")
    qdq = qdq_nodes(onnx.load(str(src), load_external_data=False)) > 0
    meta = onnx_metadata(src)
    size = imgsz_of(meta)
    if size is None:
        raise UserError(f"{src} carries no input size in its metadata; export it with stage=export")
    imgsz = hw(size)
    backend, why = select_backend(str(e.backend))
    ctx.log.info("engine: backend %s (%s)", backend, why)
    if backend == "onnxruntime" and e.precision == "fp16" and not qdq:
        raise UserError("engine.precision=fp16 is not offered with engine.backend=onnxruntime (its CPU kernels run "
                        "FP16 graphs slower than FP32); choose fp32 or int8, or engine.backend=openvino/tensorrt")
    if qdq and e.precision != "int8":
        ctx.warn(f"the input is a QAT model (QDQ ONNX): it runs as INT8 with its trained scales; "
                 f"engine.precision={e.precision} does not apply")
    precision = "int8" if qdq else str(e.precision)
    # calibration_set checks engine.calib_dir when it calibrates; when nothing calibrates, a set
    # calib_dir is still checked (a wrong path is a mistake worth stopping for) and said to be unused.
    if (qdq or precision != "int8") and calib_dir_images(cfg) is not None:
        unused = "a QAT model (QDQ ONNX) runs with its trained scales" if qdq else f"engine.precision={precision}"
        ctx.warn(f"engine.calib_dir={e.calib_dir} is not used: {unused}, no calibration")
    require_backend(backend, int8_ptq=precision == "int8" and not qdq)
    calib = calibration_set(cfg, ctx, imgsz) if precision == "int8" and not qdq else None

    build = {"onnxruntime": _onnxruntime, "openvino": _openvino, "tensorrt": _tensorrt}[backend]
    outputs, metrics = build(cfg, ctx, src, qdq, precision, calib, imgsz, meta)
    source = source_metrics(ctx)
    metrics = {
        "backend": backend, "backend_reason": why, "precision": precision, "qdq_input": qdq, "imgsz": list(imgsz),
        **{k: source[k] for k in ("params", "gflops") if source.get(k) is not None},  # carried from the export
        "size_mb": size_mb(outputs[0][1]), **metrics,
    }
    if calib is not None:
        metrics.update(calibration_record(ctx, calib))
    executed = metrics.get("executed_precision")
    if executed and executed != precision:
        hint = (" (it runs a QAT model's QDQ pairs as float fake-quantisation, no faster than FP32; "
                "engine.backend=openvino executes them as INT8)" if qdq and backend == "onnxruntime" else "")
        ctx.warn(f"engine.precision={precision} was asked for, but {backend} executes {executed} on this machine{hint}")
    if "params" not in metrics:
        ctx.warn(f"params/gflops unknown: {src} was not produced by stage=export in this results_dir")
    if source.get("mAP50_95") is not None:
        metrics["source_mAP50_95"] = source["mAP50_95"]  # the float/QDQ ONNX, for the INT8 drop
    return StageResult(outputs=outputs, metrics=metrics)


def _onnxruntime(cfg: Any, ctx: StageContext, src: Path, qdq: bool, precision: str, calib: CalibrationSet | None,
                 imgsz: tuple[int, int], meta: dict[str, Any]) -> tuple[list[tuple[str, Path]], dict[str, Any]]:
    from pipeline.engines import onnxruntime as ortb

    e = cfg.engine
    threads = cpu_threads(e.threads)
    out = ctx.run_dir / "model.onnx"
    metrics: dict[str, Any] = {}
    if precision == "int8" and not qdq:
        metrics.update(ortb.quantize_int8(src, out, calib, ctx.log))
    else:
        ortb.passthrough(src, out)
    metrics.update(ortb.executed_precision(out))
    sess = ortb.session(out, threads)
    batch, ref = _reference(ctx, src, imgsz, threads)
    metrics.update(parity(ref, sess.run(None, {sess.get_inputs()[0].name: batch})[0]))
    x = fill_batch(real_batch(ctx, imgsz, n=1), ortb.fixed_batch_of(sess))
    name = sess.get_inputs()[0].name
    metrics.update(latency_ms=median_ms(lambda: sess.run(None, {name: x}), int(e.latency_runs)),
                   latency_threads=threads, cpu_model=cpu_model(), onnxruntime_version=_version("onnxruntime"))
    if e.evaluate:
        metrics.update(evaluate_artifact(cfg, ctx, out, imgsz))
    return [("model", out)], metrics


def _openvino(cfg: Any, ctx: StageContext, src: Path, qdq: bool, precision: str, calib: CalibrationSet | None,
              imgsz: tuple[int, int], meta: dict[str, Any]) -> tuple[list[tuple[str, Path]], dict[str, Any]]:
    from pipeline.engines import openvino as ovb

    e = cfg.engine
    threads = cpu_threads(e.threads)
    folder = ctx.run_dir / "model_openvino_model"  # the *_openvino_model/ name is how AutoBackend recognises it
    # The parity check compares OpenVINO with ONNX Runtime on the graph OpenVINO read (with the
    # overflow fix: the 7-bit-weight one); the fix's own effect shows in mAP50_95 vs source_mAP50_95.
    fixed = ctx.run_dir / "qdq_7bit_weights.onnx" if qdq and e.overflow_fix else None
    metrics: dict[str, Any] = ovb.build(src, folder, precision, qdq, calib, meta, ctx.log, overflow_fix=fixed,
                                        float_precision=str(e.float_precision))
    x = real_batch(ctx, imgsz, n=1)
    compiled = ovb.compile_static(folder / "model.xml", x.shape, threads)
    metrics.update(ovb.executed_precision(compiled))
    batch, ref = _reference(ctx, fixed or src, imgsz, threads)
    if fixed is not None:
        fixed.unlink()
    metrics.update(parity(ref, ovb.infer(ovb.compile_static(folder / "model.xml", batch.shape, threads), batch)))
    metrics["cpu_int8_vnni"] = cpu_has_vnni()
    if qdq and metrics["mean_rel_diff_vs_onnx"] > QDQ_TOLERANCE:
        why = ("; this CPU has no VNNI and its INT8 kernels saturate: leave engine.overflow_fix=true"
               if metrics["cpu_int8_vnni"] is False and not e.overflow_fix else "")
        ctx.warn(f"OpenVINO's INT8 output is {metrics['mean_rel_diff_vs_onnx']:.1%} off the QAT model's own "
                 f"(ONNX Runtime, same images){why}: compare mAP50_95 with source_mAP50_95")
    metrics.update(latency_ms=median_ms(lambda: ovb.infer(compiled, x), int(e.latency_runs)),
                   latency_threads=threads, cpu_model=cpu_model(), openvino_version=ovb.version())
    if e.evaluate:
        metrics.update(evaluate_artifact(cfg, ctx, folder, imgsz))
    outputs = [("model", folder), ("ir_xml", folder / "model.xml"), ("ir_bin", folder / "model.bin")]
    return outputs, metrics


def _tensorrt(cfg: Any, ctx: StageContext, src: Path, qdq: bool, precision: str, calib: CalibrationSet | None,
              imgsz: tuple[int, int], meta: dict[str, Any]) -> tuple[list[tuple[str, Path]], dict[str, Any]]:
    from pipeline.engines import tensorrt as trtb

    e = cfg.engine
    threads = cpu_threads(e.threads)
    out = ctx.run_dir / "model.engine"
    batch, ref = _reference(ctx, src, imgsz, threads)
    info = trtb.build(src, out, precision, qdq, calib, e, imgsz, meta, ctx.log, sample=batch)
    trtb.check_compatible(out)
    outputs: list[tuple[str, Path]] = [("model", out), ("sidecar", info.pop("sidecar")),
                                       ("timing_cache", info.pop("timing_cache"))]
    qdq_onnx = info.pop("qdq_onnx")
    if qdq_onnx is not None:  # the PTQ result: the QDQ ONNX TensorRT was given, kept for other targets
        outputs.append(("qdq_onnx", qdq_onnx))
    info["built_onnx"] = info.pop("built_onnx").name
    metrics: dict[str, Any] = dict(info)
    runner = trtb.Runner(out)
    x = fill_batch(real_batch(ctx, imgsz, n=1), runner.fixed_batch)
    metrics["latency_ms"] = trtb.latency_ms(runner, x, int(e.latency_runs))
    if metrics["latency_ms"] is None:
        ctx.warn("GPU latency and parity not measured: the engine's outputs have data-dependent shapes")
    else:
        metrics.update(parity(ref, runner(batch)))
    device = ctx.device if ctx.device != "cpu" else "0"
    if e.evaluate:
        eval_batch = trtb.evaluation_batch(int(cfg.evaluate.batch), info["profile"])
        if eval_batch < int(cfg.evaluate.batch):
            ctx.log.info("evaluating the engine at batch %d (evaluate.batch=%s is above engine.max_batch)",
                         eval_batch, cfg.evaluate.batch)
        metrics.update(evaluate_artifact(cfg, ctx, out, imgsz, device=device, batch=eval_batch), eval_batch=eval_batch)
    return outputs, metrics


def _reference(ctx: StageContext, src: Path, imgsz: tuple[int, int], threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Real validation images (as many as a fixed-batch graph takes) and the source ONNX's output on them."""
    from pipeline.engines import onnxruntime as ortb

    sess = ortb.session(src, threads)
    batch = fill_batch(real_batch(ctx, imgsz, n=PARITY_IMAGES), ortb.fixed_batch_of(sess))
    return batch, sess.run(None, {sess.get_inputs()[0].name: batch})[0]


def parity(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """How far an engine's output is from its source ONNX (ONNX Runtime) on the same real images."""
    diff = np.abs(got.astype(np.float32) - ref.astype(np.float32))
    return {"max_abs_diff_vs_onnx": float(diff.max()),
            "mean_rel_diff_vs_onnx": round(float(diff.mean() / max(float(np.abs(ref).mean()), 1e-12)), 6)}


def _version(module: str) -> str:
    import importlib

    return str(importlib.import_module(module).__version__)
