"""Dispatch `stage=...`: a recorded stage goes to the runner; `all`, `report` and `help` are commands.

The stages and the `stage=all` chain come from the registry in `stages/__init__.py`.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from pipeline.manifest import Manifest, Record
from pipeline.runner import run_stage
from stages import chain

log = logging.getLogger("pipeline")


def run(cfg: DictConfig, overrides: list[str]) -> Any:
    stage = cfg.stage.value if hasattr(cfg.stage, "value") else str(cfg.stage)
    if stage == "help":
        from pipeline.config import print_help

        return print_help()
    if stage == "report":
        from stages.report import run_report

        return run_report(cfg)
    if stage == "all":
        return run_all(cfg, overrides)
    record = run_stage(cfg, stage, overrides)
    _print_summary(record)
    return record


def run_all(cfg: DictConfig, overrides: list[str]) -> list[Record]:
    """Every stage of the registry's stage=all chain, in order (`stages.chain`).

    Each stage is its own manifest record; each takes the previous model output explicitly (not
    "the newest in the results dir"), so parallel sweep jobs keep separate lineages. Runs whose
    config_hash matches an earlier succeeded run are reused unless force=true.
    """
    reuse = not cfg.force
    manifest = Manifest(cfg.results_dir)
    records = []
    model_from: Record | None = None  # the run whose model output feeds the next model stage
    for spec in chain(cfg):
        explicit = manifest.output_of(model_from) if spec.upstream and model_from is not None else None
        record = run_stage(cfg, spec.name, overrides, explicit_input=explicit, reuse=reuse)
        _print_summary(record)
        records.append(record)
        if spec.produces_model:
            model_from = record
    return records


def _print_summary(record: Record) -> None:
    keys = ("mAP50", "mAP50_95", "params", "gflops", "size_mb", "kept_params_ratio", "latency_ms")
    m = record.get("metrics", {})
    shown = ", ".join(f"{k}={m[k]:.4g}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in keys if k in m)
    print(f"[{record['stage']}] {record['status']}: {record['run_id']}" + (f" ({shown})" if shown else ""))
