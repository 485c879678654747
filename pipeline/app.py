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

        return print_help(cfg)
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
    trained = next((r for r in records if r["stage"] == "train"), None)
    if cfg.control and trained is not None:
        records += run_control(cfg, overrides, manifest, trained, reuse)
    return records


# The equal-budget control: the unpruned trained model through the same retrain schedule (float
# recovery + QAT), export and engine, so a pruned lineage is compared with a model that had as many
# epochs (docs/report.md). Its first export is the unpruned FP32 ONNX that speedups are quoted against.
CONTROL_CHAIN = ("export", "retrain", "export", "engine")


def run_control(cfg: DictConfig, overrides: list[str], manifest: Manifest, trained: Record,
                reuse: bool) -> list[Record]:
    """The unpruned FP32 ONNX export of `trained`, then retrain -> export -> engine from `trained`.

    Reused across a pth sweep (none of these runs reads prune.*): the sweep trains and controls once.
    """
    records = []
    for i, stage in enumerate(CONTROL_CHAIN):
        source = trained if i < 2 else records[-1]
        record = run_stage(cfg, stage, overrides, explicit_input=manifest.output_of(source), reuse=reuse)
        print("control " + _summary(record))
        records.append(record)
    return records


def _print_summary(record: Record) -> None:
    print(_summary(record))


def _summary(record: Record) -> str:
    keys = ("mAP50", "mAP50_95", "params", "gflops", "size_mb", "kept_params_ratio", "latency_ms")
    m = record.get("metrics", {})
    shown = ", ".join(f"{k}={m[k]:.4g}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in keys if k in m)
    return f"[{record['stage']}] {record['status']}: {record['run_id']}" + (f" ({shown})" if shown else "")
