"""stage=export: a PyTorch checkpoint -> ONNX that proves itself.

Ultralytics' exporter writes the graph (opset 17, dynamic batch by default, names/imgsz/stride in
the ONNX metadata that AutoBackend reads; QAT checkpoints come out with their QuantizeLinear /
DequantizeLinear pairs). Around it this stage checks the result: `onnx.checker`, the largest
output difference between ONNX Runtime and PyTorch on real validation images, mAP of the ONNX on
the validation split, CPU latency (median, batch 1), and the number of QDQ nodes.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import graph_merge, qat, qdq_rules
from pipeline.context import StageContext, StageResult
from pipeline.devices import cpu_threads
from pipeline.engines import onnxruntime as ortb
from pipeline.engines.common import fill_batch, median_ms, qdq_nodes
from pipeline.errors import UserError
from pipeline.imgsz import imgsz_of, side
from pipeline.manifest import RUNNING, SUCCEEDED, atomic_write_bytes
from pipeline.models import load_checkpoint, load_model, model_figures, size_mb
from stages import spec
from stages._shared import calibration_record, calibration_set, evaluate_artifact, real_batch

PARITY_IMAGES = 8  # validation images in the parity batch
FP32_TOLERANCE = 1e-3  # largest ORT-vs-PyTorch difference an FP32 export should show
# A QAT graph rounds at every quantiser: a value on a rounding boundary can flip one step and move
# a box by pixels, so it is judged by the mean relative difference.
QAT_TOLERANCE = 0.01


def run(cfg: Any, ctx: StageContext) -> StageResult:
    e = cfg.export
    threads = cpu_threads(e.threads)
    src = ctx.input_path("model")
    if src.suffix != ".pt":
        raise UserError(f"export.input={src} is not a PyTorch checkpoint (.pt); export takes the output of "
                        "train, prune or retrain")
    note = _fallback_note(cfg, ctx)
    if note is not None:
        ctx.warn(note)
    ckpt = load_checkpoint(src)
    qat = bool(ckpt.get("modelopt"))
    if qat and e.half:
        raise UserError("export.half=true does not apply to a QAT model: its ONNX is INT8 (QuantizeLinear/"
                        "DequantizeLinear); export it with export.half=false")
    trained = imgsz_of(ckpt.get("train_args"))
    imgsz = int(e.imgsz or side(trained or 640))
    del ckpt
    figures = model_figures(load_model(src), imgsz)

    out = ctx.run_dir / "model.onnx"
    with tempfile.TemporaryDirectory(dir=ctx.run_dir, prefix=".export-") as tmp:
        recalibrated = _recalibrate(cfg, ctx, src, Path(tmp), imgsz, trained) if qat else None
        if recalibrated is not None:
            src = recalibrated[0]
        proto = _export(src, Path(tmp) / "main", e, imgsz, nms=bool(e.nms))
        plain = copy.deepcopy(proto) if qat and e.qdq_rules else proto
        # One INT8 scale per Concat/Split/MaxPool/residual-Add group, so runtimes fuse (pipeline.qdq_rules).
        rules = qdq_rules.apply(proto) if plain is not proto else None
        # One conv + Split per pruned C2f instead of two convs on one input (exact; pipeline.graph_merge).
        merged = graph_merge.merge_split_convs(proto) if e.merge_convs else 0
        atomic_write_bytes(out, proto.SerializeToString())
        # With NMS inside, outputs are post-NMS detections; parity is checked on the same network
        # exported without it (the NMS part is proven by the mAP of the real artifact below). It
        # is also checked before the placement rules, which re-scale on purpose (mAP covers them).
        parity_path = out
        if plain is not proto and not e.nms:
            parity_path = Path(tmp) / "plain.onnx"
            atomic_write_bytes(parity_path, plain.SerializeToString())
        if e.nms:
            parity_path = Path(tmp) / "raw.onnx"
            atomic_write_bytes(parity_path, _export(src, Path(tmp) / "raw", e, imgsz, nms=False).SerializeToString())
        batch = real_batch(ctx, (imgsz, imgsz), n=PARITY_IMAGES)
        diff, rel = _parity(parity_path, src, batch, threads)

    metrics: dict[str, Any] = {
        **figures, "size_mb": size_mb(out), "max_abs_diff": diff, "mean_rel_diff": rel, "parity_images": len(batch),
        "parity_scope": "network outputs before NMS" if e.nms else "network outputs",
        "qdq_nodes": qdq_nodes(proto), "qat": qat, "opset": int(e.opset), "imgsz": imgsz,
        "dynamic": bool(e.dynamic), "half": bool(e.half), "nms": bool(e.nms), "merged_convs": merged,
    }
    if recalibrated is not None:
        metrics.update(recalibrated[1])
    if rules is not None:
        metrics.update(qdq_rules=rules, parity_scope=f"{metrics['parity_scope']}, before the QDQ placement rules")
    if not (e.half or qat) and diff > FP32_TOLERANCE:
        ctx.warn(f"ONNX Runtime and PyTorch outputs differ by up to {diff:.3g} (> {FP32_TOLERANCE}) on real images")
    if qat and rel > QAT_TOLERANCE:
        ctx.warn(f"ONNX Runtime runs the QAT model {rel:.1%} off its PyTorch fake-quantisation on real images")
    if qat and not metrics["qdq_nodes"]:
        ctx.warn("the checkpoint is a QAT model but its ONNX holds no QuantizeLinear/DequantizeLinear nodes")

    sess = ortb.session(out, threads)
    x = fill_batch(batch[:1], ortb.fixed_batch_of(sess))
    name = sess.get_inputs()[0].name
    metrics["latency_ms"] = median_ms(lambda: sess.run(None, {name: x}), int(e.latency_runs))
    metrics["latency_threads"] = threads
    metrics["latency_batch"] = len(x)
    if e.evaluate:
        metrics.update(evaluate_artifact(cfg, ctx, out, (imgsz, imgsz)))
    ctx.log.info("export: %s (%.2f MB, %d QDQ nodes, max |ORT - PyTorch| = %.3g, %.2f ms batch %d on %d threads)",
                 out.name, metrics["size_mb"], metrics["qdq_nodes"], diff, metrics["latency_ms"], len(x), threads)
    return StageResult(outputs=[("model", out)], metrics=metrics)


def _recalibrate(cfg: Any, ctx: StageContext, src: Path, tmp: Path, imgsz: int,
                 trained: Any) -> tuple[Path, dict[str, Any]] | None:
    """A QAT checkpoint with its activation ranges measured again at `imgsz` (export.recalibrate), in `tmp`.

    auto: only when `imgsz` is not the size the model was trained (and its ranges calibrated) at.
    The images are the engine's calibration set (engine.calib_dir, else the training split), the
    same ones NNCF PTQ calibrates on. Returns the new checkpoint and the record's part, or None
    when the trained ranges are kept.
    """
    mode = str(cfg.export.recalibrate)
    if mode == "never" or (mode == "auto" and (trained is None or side(trained) == imgsz)):
        return None
    calib = calibration_set(cfg, ctx, (imgsz, imgsz))
    model = qat.load(src)
    n = qat.recalibrate_activations(model, calib.batches())
    path = qat.save(model, tmp / "recalibrated.pt")
    why = "always" if mode == "always" else f"exported at {imgsz} px, trained at {side(trained)} px"
    ctx.log.info("export: %d activation ranges of the QAT model recalibrated at %d px on %d images (%s)",
                 n, imgsz, calib.used, why)
    return path, {"recalibrated": True, "recalibrated_quantisers": n, "recalibrated_imgsz": imgsz,
            **calibration_record(ctx, calib)}


def _fallback_note(cfg: Any, ctx: StageContext) -> str | None:
    """A note when export fell back past a stage it prefers: the newest such run on this model failed or runs.

    Export takes the newest retrain, else prune, else train output; after an interrupted retrain
    that is the prune model, which the user most likely did not mean to ship without knowing.
    """
    record = ctx.input_record()
    upstream = spec("export").upstream
    if cfg.export.input or record is None or record["stage"] not in upstream:
        return None
    preferred = upstream[: upstream.index(record["stage"])]
    runs = ctx.manifest.runs()
    newest = next((r for r in reversed(runs) if r["stage"] in preferred
                   and any(a["run_id"] == record["run_id"] for a in ctx.manifest.lineage(r, runs)[1:])), None)
    if newest is None or newest["status"] == SUCCEEDED:
        return None
    how = "is still running" if newest["status"] == RUNNING else f"failed ({newest.get('error') or 'no error'})"
    return (f"the newest {newest['stage']} run of this model, {newest['run_id']}, {how}: exporting the "
            f"{record['stage']} output of {record['run_id']} instead (set export.input to choose the model)")


def _export(src: Path, workdir: Path, e: Any, imgsz: int, nms: bool) -> Any:
    """Ultralytics' ONNX export of `src` (on a copy, so nothing is written beside the input); checked."""
    import onnx
    from ultralytics import YOLO

    workdir.mkdir(parents=True)
    pt = workdir / "model.pt"
    shutil.copyfile(src, pt)
    extra = {"conf": float(e.nms_conf), "iou": float(e.nms_iou)} if nms else {}
    ul_log = logging.getLogger("ultralytics")
    level = ul_log.level
    ul_log.setLevel(logging.WARNING)  # its closing hints name the temporary folder, which is gone afterwards
    try:
        f = YOLO(str(pt), task="detect").export(
            format="onnx", imgsz=imgsz, opset=int(e.opset), dynamic=bool(e.dynamic), batch=int(e.batch),
            simplify=bool(e.simplify), nms=nms, quantize=16 if e.half else None, device="cpu", verbose=False, **extra,
        )
    finally:
        ul_log.setLevel(level)
    proto = onnx.load(str(f))
    if e.half:
        # onnxruntime's float16 converter inserts its input casts after their consumers.
        _toposort(proto.graph)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _toposort(graph: Any) -> None:
    """Reorder graph nodes so that every node follows the producers of its inputs (Kahn's algorithm)."""
    nodes = list(graph.node)
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, order = list(range(len(nodes))), []
    while pending:
        ready = [i for i in pending if all(x in known for x in nodes[i].input)]
        if not ready:
            raise RuntimeError("the ONNX graph has a cycle or an input that nothing produces")
        for i in ready:
            known.update(nodes[i].output)
        order += ready
        done = set(ready)
        pending = [i for i in pending if i not in done]
    ordered = [copy.deepcopy(nodes[i]) for i in order]
    del graph.node[:]
    graph.node.extend(ordered)


def _parity(onnx_path: Path, src: Path, batch: np.ndarray, threads: int) -> tuple[float, float]:
    """Largest |ONNX Runtime - PyTorch| on `batch`, and the mean difference relative to the mean output
    (PyTorch: the model as Ultralytics loads it, fake-quantisers of a QAT model included)."""
    import torch
    from ultralytics import YOLO

    model = YOLO(str(src), task="detect").model.float().eval()
    if hasattr(model, "end2end"):  # an NMS-free head (YOLO26): the branch the exporter chose (its metadata)
        model.end2end = _onnx_end2end(onnx_path)
    with torch.no_grad():
        ref = model(torch.from_numpy(batch))
    ref = (ref[0] if isinstance(ref, (list, tuple)) else ref).numpy()
    sess = ortb.session(onnx_path, threads)
    got = ortb.run(sess, batch, ortb.fixed_batch_of(sess)).astype(np.float32)
    if got.shape != ref.shape:
        raise RuntimeError(f"ONNX output shape {got.shape} != PyTorch output shape {ref.shape}")
    diff = np.abs(got - ref)
    return float(diff.max()), round(float(diff.mean() / max(float(np.abs(ref).mean()), 1e-12)), 6)


def _onnx_end2end(path: Path) -> bool:
    """Whether Ultralytics exported the NMS-free (one2one, top-k) outputs: its `end2end` metadata."""
    import ast

    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    try:
        return bool(ast.literal_eval(meta.get("end2end", "False")))
    except (ValueError, SyntaxError):
        return False
