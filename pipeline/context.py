"""What a stage receives (`StageContext`) and returns (`StageResult`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.manifest import Artifact, Manifest, Record

if TYPE_CHECKING:
    from pipeline.datasets import DatasetInfo


@dataclass
class StageResult:
    """A stage's outputs (role, path inside the run dir) and numeric metrics."""

    outputs: list[tuple[str, Path]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    """Everything a stage needs besides its config: where to write, what it reads, how to log."""

    cfg: Any  # the whole resolved config (DictConfig)
    stage: str
    run_id: str
    run_dir: Path
    manifest: Manifest
    log: logging.Logger
    inputs: list[Artifact] = field(default_factory=list)  # manifest entries of resolved inputs
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # extra top-level record fields (e.g. dataset summary)
    _dataset: DatasetInfo | None = None

    @property
    def results_dir(self) -> Path:
        return self.manifest.root

    @property
    def device(self) -> str:
        from pipeline.devices import resolve_device

        return resolve_device(self.cfg.device)

    def input_path(self, role: str = "model") -> Path:
        for entry in self.inputs:
            if entry["role"] == role:
                return self.manifest.abs(entry["path"])
        raise KeyError(f"stage {self.stage} has no input with role {role!r}")

    def input_entry(self, role: str = "model") -> Artifact:
        return next(e for e in self.inputs if e["role"] == role)

    def input_record(self, role: str = "model") -> Record | None:
        """The record that produced this stage's input (None for a file from elsewhere)."""
        entry = next((e for e in self.inputs if e["role"] == role), None)
        return self.manifest.producer(entry) if entry is not None else None

    def input_lineage(self, role: str = "model") -> list[Record]:
        """The record that produced this stage's input, its parent, grandparent ... (known records only)."""
        record = self.input_record(role)
        return self.manifest.lineage(record) if record is not None else []

    def dataset(self) -> DatasetInfo:
        """Import/validate (once, cached under results/datasets/) and register the dataset as an input."""
        if self._dataset is None:
            from pipeline.datasets import prepare

            info = prepare(self.cfg.dataset, self.results_dir, seed=int(self.cfg.seed), log=self.log)
            self._dataset = info
            self.inputs.append(self.manifest.artifact("dataset", info.data_yaml))
            self.extra["dataset"] = info.summary()
        return self._dataset

    def warn(self, message: str) -> None:
        """A warning the user must see: logged loudly and kept in the manifest record."""
        self.log.warning("WARNING: %s", message)
        self.warnings.append(message)
