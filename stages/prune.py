"""stage=prune: structured channel pruning at a threshold, with NVIDIA TAO's semantics.

The input model (newest train output, or `prune.input`) is cut with `pipeline.pruning`: L2 filter
norms, `prune.normalizer`, `prune.equalization` over coupled layers, keep score > `prune.pth`,
at least `prune.min_filters`, rounded up to `prune.granularity`; `prune.excluded_layers` groups
untouched. `prune.mode=target` finds the pth that keeps `prune.target_params_ratio` of the
parameters instead (or `prune.target_flops_ratio` of the conv FLOPs at the model's image size, when
set). `prune.mode=latency` times every conv alone on `prune.latency_backend` at that size (or `prune.latency_imgsz`, the deploy size) and at the
deploy precision (`prune.latency_precision`: INT8 when the engine deploys INT8; a table cached in
`<results_dir>/.latency/`) and removes the least important channel blocks per predicted
millisecond until the prediction is <= `prune.target_latency_ratio` of the unpruned one
(`pipeline.latency`); the record then holds the predicted and the measured latency of the model
before and after, both exported to ONNX, built as the engine stage builds them (INT8 by the
backend's PTQ on a few training images) and timed interleaved on that backend.

`prune.drop_blocks` then removes that many whole residual bottlenecks of C2f / C3k2 blocks, those
whose branch is smallest on real training images (`pipeline.depth`): each one is two convolutions
and an Add fewer, which channel pruning cannot give (a CPU runtime pays a fixed time per node).

Outputs: `model` model.pt (the pruned module pickled in an Ultralytics checkpoint: loads with
`YOLO(path)` and `pipeline.models.load_model`), `layers` layers.csv (every conv: channels before
and after). Metrics: params, gflops, size_mb, kept_params_ratio (pruned / original),
kept_flops_ratio, pth, mode, blocks_dropped / residual_blocks / block_branch_ratios, the latency_* figures (mode=latency) and, with `prune.evaluate`, mAP50 / mAP50_95 right after pruning
(expect a drop until retrain).
"""

from __future__ import annotations

import copy
import csv
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from pipeline import depth, latency
from pipeline.context import StageContext, StageResult
from pipeline.devices import cpu_threads
from pipeline.engines.common import CalibrationSet, pick, split_images
from pipeline.imgsz import model_imgsz, side
from pipeline.manifest import atomic_write_text
from pipeline.models import load_checkpoint, load_model, model_figures, save_checkpoint
from pipeline.pruning import ChannelPruner, layer_channels

TARGET_TOLERANCE = 0.05  # |kept_params_ratio - target| the target mode promises


def run(cfg: DictConfig, ctx: StageContext) -> StageResult:
    pc = cfg.prune
    src = ctx.input_path("model")
    ckpt = load_checkpoint(src)
    model = load_model(src)
    imgsz = side(model_imgsz(src) or 640)
    before = model_figures(model, imgsz)
    unpruned = copy.deepcopy(model) if pc.mode == "latency" else None
    lat_size = side(pc.latency_imgsz) if pc.latency_imgsz else imgsz  # the deploy size, when it is not the trained one

    t0 = time.perf_counter()
    pruner = ChannelPruner(model, normalizer=str(pc.normalizer), equalization=str(pc.equalization),
                           excluded_layers=list(pc.excluded_layers))
    channels_before = layer_channels(model)
    rule = {"granularity": int(pc.granularity), "min_filters": int(pc.min_filters)}
    flops_before = pruner.count_flops({}, imgsz)
    lat: dict[str, Any] = {}
    if pc.mode == "latency":
        pth = float("nan")  # the greedy chooses channel counts, not a threshold
        plan, lat = _latency_plan(cfg, ctx, pruner, lat_size, rule)
    elif pc.mode == "target":
        by = "params" if pc.target_flops_ratio is None else "flops"
        target = float(pc.target_params_ratio if by == "params" else pc.target_flops_ratio)
        pth, predicted = pruner.find_pth(target, **rule, by=by, imgsz=imgsz)
        ctx.log.info("target kept_%s_ratio %.3f -> pth %.4f (predicted ratio %.4f)", by, target, pth, predicted)
        plan = pruner.plan(pth, **rule)
    else:
        pth = float(pc.pth)
        plan = pruner.plan(pth, **rule)
    conv_flops_ratio = pruner.count_flops(plan, imgsz) / flops_before if flops_before else None
    pruner.apply(plan)
    dropped = _drop_blocks(ctx, model, int(pc.drop_blocks), imgsz)
    seconds = time.perf_counter() - t0
    q_min, q10, q50 = pruner.score_quantiles((0.0, 0.1, 0.5))
    ctx.log.info("normalised channel scores: min %.3f, 10%% %.3f, median %.3f (pth below the min removes nothing)",
                 q_min, q10, q50)
    skipped = [g for g in pruner.groups if g.excluded_by]
    ctx.log.info("pruned %d of %d channel groups in %.1f s (%d never pruned: %s)", len(plan), len(pruner.groups),
                 seconds, len(skipped), "; ".join(g.excluded_by for g in skipped[:5]) or "-")

    _check_forward(model, imgsz)
    out = ctx.run_dir / "model.pt"
    save_checkpoint(model, out, extra={
        "train_args": dict(ckpt.get("train_args") or {}),
        "pruning": {"mode": str(pc.mode), "pth": None if pc.mode == "latency" else pth, "normalizer": str(pc.normalizer),
                    "equalization": str(pc.equalization), "granularity": int(pc.granularity),
                    "min_filters": int(pc.min_filters), "excluded_layers": list(pc.excluded_layers),
                    "blocks_dropped": dropped["blocks_dropped"], "source": str(src)},
    }, half=True)  # FP16 like the trained best.pt it came from: size_mb drops with params
    layers_csv = ctx.run_dir / "layers.csv"
    atomic_write_text(layers_csv, _layers_table(channels_before, layer_channels(model)))

    after = model_figures(model, imgsz, out)
    kept_params = after["params"] / before["params"]
    metrics: dict[str, Any] = {
        **after,
        "kept_params_ratio": round(kept_params, 4),
        "kept_flops_ratio": round(after["gflops"] / before["gflops"], 4) if before["gflops"] else None,
        "kept_conv_flops_ratio": None if conv_flops_ratio is None else round(conv_flops_ratio, 4),
        "pth": None if pc.mode == "latency" else round(pth, 6),
        "mode": str(pc.mode),
        "params_before": before["params"],
        "gflops_before": before["gflops"],
        "groups_pruned": len(plan),
        "groups_total": len(pruner.groups),
        "imgsz": imgsz,
        "score_min": round(q_min, 4),
        "score_p10": round(q10, 4),
        "score_median": round(q50, 4),
        "prune_seconds": round(seconds, 3),
        **dropped,
        "mAP50": None,
        "mAP50_95": None,
    }
    if pc.mode == "target" and pc.target_flops_ratio is not None:
        metrics["target_flops_ratio"] = float(pc.target_flops_ratio)
        if conv_flops_ratio is not None and abs(conv_flops_ratio - pc.target_flops_ratio) > TARGET_TOLERANCE:
            ctx.warn(f"prune.target_flops_ratio={pc.target_flops_ratio}: the closest reachable conv FLOPs ratio "
                     f"is {conv_flops_ratio:.3f} (pth {pth:.4f}); granularity={pc.granularity} and "
                     f"min_filters={pc.min_filters} set the steps and the floor")
    elif pc.mode == "target":
        metrics["target_params_ratio"] = float(pc.target_params_ratio)
        if abs(kept_params - pc.target_params_ratio) > TARGET_TOLERANCE:
            ctx.warn(f"prune.target_params_ratio={pc.target_params_ratio}: the closest reachable kept_params_ratio "
                     f"is {kept_params:.3f} (pth {pth:.4f}); granularity={pc.granularity} and "
                     f"min_filters={pc.min_filters} set the steps and the floor")
    if unpruned is not None:  # latency mode
        calib = _calibration(ctx, lat_size) if lat["latency_precision"] == "int8" else None
        lat.update(_measured_latency(unpruned, model, lat_size, lat["latency_backend"], lat["latency_threads"],
                                     int(pc.latency_runs), calib))
        metrics.update(lat)
        ctx.log.info("latency (%s %s, %d threads, %d px): predicted %.3f -> %.3f ms (ratio %.3f), measured %.3f -> "
                     "%.3f ms (ratio %.3f)", lat["latency_backend"], lat["latency_precision"], lat["latency_threads"],
                     lat_size,
                     lat["latency_predicted_before_ms"], lat["latency_predicted_after_ms"],
                     lat["latency_predicted_ratio"], lat["latency_measured_before_ms"],
                     lat["latency_measured_after_ms"], lat["latency_measured_ratio"])
    if kept_params == 1.0 and pc.mode != "latency":
        ctx.warn(f"prune.pth={pth:g} removed no channel: the lowest normalised filter score is {q_min:.3f} (10% are "
                 f"below {q10:.3f}). Filter norms stay near-uniform in a model trained briefly or without a sparsity regulariser; "
                 "raise prune.pth, use prune.mode=target, or train with train.sparsity=l1 (TAO's recipe)")
    if pc.evaluate:
        from pipeline.evaluation import evaluate

        ec = cfg.evaluate
        result = evaluate(out, ctx.dataset().data_yaml, imgsz=imgsz, batch=int(ec.batch), conf=float(ec.conf),
                          iou=float(ec.iou), device=ctx.device)
        metrics.update({k: result[k] for k in ("mAP50", "mAP50_95", "precision", "recall") if k in result})
    _print_table(ctx, before, metrics, _upstream_map(ctx))
    return StageResult(outputs=[("model", out), ("layers", layers_csv)], metrics=metrics)


def _latency_plan(cfg: DictConfig, ctx: StageContext, pruner: ChannelPruner, imgsz: int,
                  rule: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The greedy's plan against the (cached, else measured now) latency table, and its figures."""
    pc = cfg.prune
    backend = latency.resolve_backend(str(pc.latency_backend))
    precision = latency.resolve_precision(str(pc.latency_precision), str(cfg.engine.precision))
    threads = cpu_threads(int(cfg.engine.threads))
    key = latency.machine_key(backend, imgsz, threads, precision)
    table = latency.LatencyTable(ctx.results_dir / ".latency" / f"{key}.json",
                                 latency.make_timer(backend, threads, precision), runs=int(pc.latency_runs),
                                 meta={"key": key, "backend": backend, "precision": precision,
                                       "threads": threads, "imgsz": imgsz})
    t0 = time.perf_counter()
    grids, overhead = latency.build_grids(pruner, imgsz, table, **rule)
    table.save()
    ctx.log.info("latency table %s: %d entries (%d measured now, %.1f s), per-call overhead %.3f ms", table.path,
                 len(table.entries), table.measured, time.perf_counter() - t0, overhead)
    sel = latency.select(pruner, grids, imgsz, float(pc.target_latency_ratio), **rule, overhead_ms=overhead)
    if sel.predicted_after_ms > sel.budget_ms:
        ctx.warn(f"prune.target_latency_ratio={pc.target_latency_ratio} is out of reach: the predicted ratio stops at "
                 f"{sel.predicted_ratio:.3f}, where every group is at its floor (prune.min_filters={pc.min_filters}) "
                 "or no channel block left lowers the predicted latency (small convs cost the backend's fixed "
                 "per-call time, whatever their width)")
    return sel.plan, {
        "target_latency_ratio": float(pc.target_latency_ratio),
        "latency_imgsz": imgsz,
        "latency_backend": backend,
        "latency_precision": precision,
        "latency_threads": threads,
        "latency_table": str(table.path.relative_to(ctx.results_dir)) if table.path else None,
        "latency_table_entries": len(table.entries),
        "latency_overhead_ms": round(overhead, 4),
        "latency_predicted_before_ms": round(sel.predicted_before_ms, 4),
        "latency_predicted_after_ms": round(sel.predicted_after_ms, 4),
        "latency_predicted_ratio": round(sel.predicted_ratio, 4),
        "latency_greedy_steps": sel.steps,
    }


def _drop_blocks(ctx: StageContext, model: torch.nn.Module, count: int, imgsz: int,
                 images: int = 16) -> dict[str, Any]:
    """Depth pruning (`prune.drop_blocks`): the residual bottlenecks with the smallest branch on real
    training images removed (pipeline.depth); their names and every block's branch ratio."""
    blocks = depth.residual_blocks(model)
    if count == 0:
        return {"blocks_dropped": [], "residual_blocks": len(blocks)}
    if count > len(blocks):
        ctx.warn(f"prune.drop_blocks={count}: this model has {len(blocks)} residual bottlenecks; removing all of them")
    batch = np.stack(list(_calibration(ctx, imgsz, images).images()))
    ratios = depth.branch_ratios(model, torch.from_numpy(batch))
    chosen = depth.drop(model, depth.choose(ratios, count))
    ctx.log.info("depth pruning: removed %d of %d residual bottlenecks (branch / input norm on %d training images): %s",
                 len(chosen), len(blocks), len(batch), ", ".join(f"{n} {ratios[n]:.3f}" for n in chosen))
    return {"blocks_dropped": chosen, "residual_blocks": len(blocks),
            "block_branch_ratios": {n: round(r, 4) for n, r in ratios.items()}}


def _calibration(ctx: StageContext, imgsz: int, images: int = 8) -> CalibrationSet:
    """A few training images: for the INT8 builds of the measured models (their latency, not their
    mAP) and for depth pruning's branch ratios."""
    data_yaml = ctx.dataset().data_yaml
    return CalibrationSet(pick(split_images(data_yaml, "train"), images), (imgsz, imgsz), 1,
                          f"train split of {data_yaml}")


def _measured_latency(before: torch.nn.Module, after: torch.nn.Module, imgsz: int, backend: str, threads: int,
                      runs: int, calib: CalibrationSet | None) -> dict[str, Any]:
    """Both models exported to ONNX, built as the engine stage builds them (INT8 with `calib`) on the
    backend the table was measured on, and timed interleaved."""
    with tempfile.TemporaryDirectory() as tmp:
        ms_before, ms_after = latency.measure_models([before, after], imgsz, backend, threads,
                                                     max(runs, 10), Path(tmp), calib)
    return {"latency_measured_before_ms": round(ms_before, 4), "latency_measured_after_ms": round(ms_after, 4),
            "latency_measured_ratio": round(ms_after / ms_before, 4) if ms_before else None}


def _check_forward(model: torch.nn.Module, imgsz: int) -> None:
    """A pruned model that cannot run is a bug here, not a file for the next stage to trip on."""
    with torch.no_grad():
        y = model.eval()(torch.zeros(1, 3, imgsz, imgsz))
    y = y[0] if isinstance(y, (list, tuple)) else y
    if not torch.isfinite(y).all():
        raise RuntimeError("the pruned model produces non-finite outputs")


def _layers_table(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer", "channels_before", "channels_after", "in_channels_before", "in_channels_after"])
    for name, (cin, cout) in before.items():
        ain, aout = after.get(name, (cin, cout))
        w.writerow([name, cout, aout, cin, ain])
    return buf.getvalue()


def _upstream_map(ctx: StageContext) -> float | None:
    """mAP50-95 the input model had: from the record that produced it, else from the newest evaluation of
    the same file (same sha256) in this results dir; None when neither exists."""
    entry = ctx.input_entry("model")
    record = ctx.input_record()
    found = (record or {}).get("metrics", {}).get("mAP50_95")
    if found is not None:
        return found
    for rec in reversed(ctx.manifest.succeeded("evaluate")):
        if any(i.get("role") == "model" and i.get("sha256") == entry.get("sha256") for i in rec.get("inputs", [])):
            return rec.get("metrics", {}).get("mAP50_95")
    return None


def _print_table(ctx: StageContext, before: dict[str, Any], m: dict[str, Any], map_before: float | None) -> None:
    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    rows = [
        ("", "before", "after", "kept"),
        ("params", f"{before['params']:,}", f"{m['params']:,}", f"{m['kept_params_ratio']:.3f}"),
        ("GFLOPs", f"{before['gflops']:.3f}", f"{m['gflops']:.3f}", fmt(m["kept_flops_ratio"], ".3f")),
        ("mAP50-95", fmt(map_before, ".4f"), fmt(m["mAP50_95"], ".4f"), ""),
    ]
    if "latency_measured_ratio" in m:
        rows += [("pred. ms", f"{m['latency_predicted_before_ms']:.3f}", f"{m['latency_predicted_after_ms']:.3f}",
                  f"{m['latency_predicted_ratio']:.3f}"),
                 ("meas. ms", f"{m['latency_measured_before_ms']:.3f}", f"{m['latency_measured_after_ms']:.3f}",
                  fmt(m["latency_measured_ratio"], ".3f"))]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    rule = f"pth={m['pth']:.4g}" if m["pth"] is not None else f"latency budget {m['target_latency_ratio']:g}"
    title = f"prune ({m['mode']}, {rule}, imgsz={m['imgsz']})"
    lines = [title] + ["  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    ctx.log.info("\n".join(lines))

