"""Datasets: the embedded synthetic generator, importers, validation, one internal layout.

Every source is converted once into Ultralytics' YOLO layout under
`<results_dir>/datasets/<name>-<hash>/` (images/{train,val}, labels/{train,val}, data.yaml,
validation report), reused while the source is unchanged.

INTERFACE (other modules rely on it; keep it):
    prepare(cfg_dataset, results_dir, seed, log) -> DatasetInfo
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class DatasetInfo:
    name: str
    root: Path  # results/datasets/<name>-<hash>/
    data_yaml: Path  # Ultralytics data.yaml (absolute paths inside)
    names: list[str]  # class names, id order
    counts: dict[str, int] = field(default_factory=dict)  # images per split: train, val (, test, unlabeled)
    defects: dict[str, int] = field(default_factory=dict)  # validation counts per defect kind
    report_path: Path | None = None  # validation report written beside the dataset
    unlabeled_dir: Path | None = None  # folder of unlabeled images, when the source has one

    def summary(self) -> dict[str, Any]:
        """What the manifest records about the dataset a run used."""
        return {
            "name": self.name, "path": str(self.root), "classes": len(self.names), "names": list(self.names),
            "images": dict(self.counts), "defects": dict(self.defects),
        }


def prepare(cfg_dataset: Any, results_dir: Path, seed: int, log: logging.Logger) -> DatasetInfo:
    """Import (or generate) and validate the dataset once; reuse the converted copy after that."""
    raise NotImplementedError("pipeline.datasets.prepare is being written")
