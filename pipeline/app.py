"""Dispatch `stage=...` to the runner; `stage=all` chains the stages with reuse."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from pipeline.runner import run_stage

log = logging.getLogger("pipeline")

CHAIN = ("kmeans", "train", "evaluate", "prune", "retrain", "export", "engine")


def run(cfg: DictConfig, overrides: list[str]) -> Any:
    stage = cfg.stage.value if hasattr(cfg.stage, "value") else str(cfg.stage)
    if stage == "report":
        from stages.report import run_report

        return run_report(cfg)
    if stage == "all":
        return run_all(cfg, overrides)
    record = run_stage(cfg, stage, overrides)
    _print_summary(record)
    return record


def run_all(cfg: DictConfig, overrides: list[str]) -> list[dict[str, Any]]:
    """kmeans -> train -> evaluate -> prune -> retrain -> export -> engine (-> infer).

    Each stage is its own manifest record; each takes the previous model output explicitly (not
    "the newest in the results dir"), so parallel sweep jobs keep separate lineages. Runs whose
    config_hash matches an earlier succeeded run are reused unless force=true.
    """
    reuse = not cfg.force
    records = []
    model_from = None  # run whose model output feeds the next model stage
    chain = list(CHAIN) + (["infer"] if cfg.infer.source else [])
    for stage in chain:
        explicit = None if stage in ("kmeans", "train") else _model_output(cfg, model_from)
        record = run_stage(cfg, stage, overrides, explicit_input=explicit, reuse=reuse)
        _print_summary(record)
        records.append(record)
        if stage in ("train", "prune", "retrain", "export", "engine"):
            model_from = record
    return records


def _model_output(cfg: DictConfig, record: dict[str, Any] | None):
    if record is None:
        return None
    from pipeline.manifest import Manifest

    manifest = Manifest(cfg.results_dir)
    for out in record.get("outputs", []):
        if out["role"] == "model":
            return manifest.abs(out["path"])
    return None


def _print_summary(record: dict[str, Any]) -> None:
    keys = ("mAP50", "mAP50_95", "params", "gflops", "size_mb", "kept_params_ratio", "latency_ms")
    m = record.get("metrics", {})
    shown = ", ".join(f"{k}={m[k]:.4g}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in keys if k in m)
    print(f"[{record['stage']}] {record['status']}: {record['run_id']}" + (f" ({shown})" if shown else ""))
