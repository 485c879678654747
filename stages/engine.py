"""stage=engine: the exported ONNX -> a deployable engine (TensorRT, OpenVINO or ONNX Runtime).

engine.backend=auto takes TensorRT when it imports and a GPU is present, else OpenVINO, else ONNX
Runtime, and logs which and why. A QAT (QDQ) ONNX always runs as INT8 with its trained scales; a
float ONNX is built at engine.precision, INT8 calibrated on real images (engine.calib_dir or the
training split, never random data) with the Detect decode kept in float. Every engine is measured
as itself: mAP through the pipeline's evaluator, median batch-1 latency, size, and the precision
the runtime actually executes, read back from it. Every backend is driven the same way, through
the interface in pipeline/engines/backend.py (`deploy`); the registry is pipeline.engines.BACKENDS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.context import StageContext, StageResult
from pipeline.devices import cpu_threads
from pipeline.engines import BACKENDS, require_backend, select_backend
from pipeline.engines.backend import Backend, BuildSettings
from pipeline.engines.common import CalibrationSet, fill_batch, onnx_metadata, qdq_nodes
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
    name, why = select_backend(str(e.backend))
    backend = BACKENDS[name]
    ctx.log.info("engine: backend %s (%s)", name, why)
    backend.check(str(e.precision), qdq)
    if qdq and e.precision != "int8":
        ctx.warn(f"the input is a QAT model (QDQ ONNX): it runs as INT8 with its trained scales; "
                 f"engine.precision={e.precision} does not apply")
    precision = "int8" if qdq else str(e.precision)
    # calibration_set checks engine.calib_dir when it calibrates; when nothing calibrates, a set
    # calib_dir is still checked (a wrong path is a mistake worth stopping for) and said to be unused.
    if (qdq or precision != "int8") and calib_dir_images(cfg) is not None:
        unused = "a QAT model (QDQ ONNX) runs with its trained scales" if qdq else f"engine.precision={precision}"
        ctx.warn(f"engine.calib_dir={e.calib_dir} is not used: {unused}, no calibration")
    require_backend(name, int8_ptq=precision == "int8" and not qdq)
    calib = calibration_set(cfg, ctx, imgsz) if precision == "int8" and not qdq else None

    outputs, metrics = deploy(cfg, ctx, backend, src, qdq, precision, calib, imgsz, meta)
    source = source_metrics(ctx)
    metrics = {
        "backend": name, "backend_reason": why, "precision": precision, "qdq_input": qdq, "imgsz": list(imgsz),
        **{k: source[k] for k in ("params", "gflops") if source.get(k) is not None},  # carried from the export
        "size_mb": size_mb(outputs[0][1]), **metrics,
    }
    if calib is not None:
        metrics.update(calibration_record(ctx, calib))
    executed = metrics.get("executed_precision")
    if executed and executed != precision:
        ctx.warn(f"engine.precision={precision} was asked for, but {name} executes {executed} on this machine"
                 f"{backend.mismatch_hint(qdq)}")
    if "params" not in metrics:
        ctx.warn(f"params/gflops unknown: {src} was not produced by stage=export in this results_dir")
    if source.get("mAP50_95") is not None:
        metrics["source_mAP50_95"] = source["mAP50_95"]  # the float/QDQ ONNX, for the INT8 drop
    return StageResult(outputs=outputs, metrics=metrics)


def deploy(cfg: Any, ctx: StageContext, backend: Backend, src: Path, qdq: bool, precision: str,
           calib: CalibrationSet | None, imgsz: tuple[int, int],
           meta: dict[str, Any]) -> tuple[list[tuple[str, Path]], dict[str, Any]]:
    """Build -> runner -> executed precision -> latency -> parity against ONNX Runtime -> evaluation, for any backend.

    Returns the artifact's (role, path) outputs and the backend's part of the record.
    """
    e = cfg.engine
    threads = cpu_threads(e.threads)
    batch, ref = _reference(ctx, src, imgsz, threads)
    built = backend.build(src, ctx.run_dir, precision, qdq, calib, BuildSettings(e, imgsz, meta, batch), ctx.log)
    if built.reference is not None:  # the backend read another graph than src: parity is against that one
        batch, ref = _reference(ctx, built.reference, imgsz, threads)
        built.reference.unlink()
    metrics: dict[str, Any] = dict(built.record)
    x = real_batch(ctx, imgsz, n=1)
    runner = backend.runner(built, tuple(x.shape), threads)
    metrics.update(backend.executed_precision(built, runner))
    metrics["latency_ms"] = runner.latency_ms(fill_batch(x, runner.fixed_batch), int(e.latency_runs))
    if metrics["latency_ms"] is None:
        ctx.warn(f"{backend.label} latency and parity not measured: the engine's outputs have data-dependent shapes")
    else:
        metrics.update(parity(ref, runner(batch)))
    metrics.update(backend.facts(threads))
    for warning in backend.review(metrics, qdq, e):
        ctx.warn(warning)
    if e.evaluate:
        requested = int(cfg.evaluate.batch)
        eval_batch = backend.evaluation_batch(built, requested)
        if eval_batch is not None and eval_batch < requested:
            ctx.log.info("evaluating the engine at batch %d (evaluate.batch=%s is above what the engine takes)",
                         eval_batch, requested)
        device = (ctx.device if ctx.device != "cpu" else "0") if backend.device == "cuda" else "cpu"
        metrics.update(evaluate_artifact(cfg, ctx, built.artifact, imgsz, device=device, batch=eval_batch))
        if eval_batch is not None:
            metrics["eval_batch"] = eval_batch
    return built.outputs, metrics


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
