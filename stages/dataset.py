"""stage=dataset: import (or generate) and validate the dataset, nothing else.

Outputs: role "dataset" (the converted data.yaml) and role "report" (the validation report).
Every defect kind found becomes a warning in the manifest record, with its count.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.context import StageContext, StageResult
from pipeline.datasets.defects import DEFECTS


def run(cfg: Any, ctx: StageContext) -> StageResult:
    info = ctx.dataset()
    for kind, n in info.defects.items():
        found, action = DEFECTS[kind]
        ctx.warn(f"dataset: {n} x {found} [{kind}]: {action}")
    metrics: dict[str, Any] = {f"images_{split}": n for split, n in info.counts.items()}
    report = json.loads(info.report_path.read_text(encoding="utf-8"))
    metrics.update({
        "classes": len(info.names),
        "boxes": report["boxes"]["total"],
        "background_images": sum(report["backgrounds"].values()),
        "defects_total": sum(info.defects.values()),
        **{f"defect_{kind}": n for kind, n in info.defects.items()},
    })
    return StageResult(outputs=[("dataset", info.data_yaml), ("report", info.report_path)], metrics=metrics)
