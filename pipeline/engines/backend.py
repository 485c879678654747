"""The one interface the engine stage drives every deployment backend through.

A backend says whether it can run here (`available`, `require`), turns an exported ONNX into its
artifact (`build`), runs that artifact on a batch (`runner`) and reads back the precision it
executes (`executed_precision`). The engine stage does the rest the same way for all of them:
parity against ONNX Runtime on the source ONNX, latency, evaluation and the record. The hooks with
a default (`check`, `facts`, `review`, `mismatch_hint`, `evaluation_batch`) are where a backend adds
what only it knows. The registry is `pipeline.engines.BACKENDS` (docs/deploy.md: adding a backend).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.engines.common import CalibrationSet


@dataclass(frozen=True)
class BuildSettings:
    """What a build needs besides the graph and its precision."""

    engine: Any  # the engine config section (engine.workspace_gb, engine.overflow_fix, ...)
    imgsz: tuple[int, int]  # (h, w) the ONNX was exported at
    meta: dict[str, Any]  # the ONNX's Ultralytics metadata, carried into the artifact
    sample: np.ndarray  # real validation images (the parity batch), for builds that check ranges on data


@dataclass
class Built:
    """A built artifact and what the build has to say about it."""

    artifact: Path  # what the runner and the evaluator load
    outputs: list[tuple[str, Path]]  # manifest (role, path) pairs, ("model", artifact) first
    record: dict[str, Any]  # build facts for the stage's record
    # The ONNX the parity check compares with when the backend did not read the source as it is
    # (OpenVINO's overflow fix); a scratch file the stage deletes once the comparison is made.
    reference: Path | None = None


class Runner(Protocol):
    """A loaded artifact: `runner(x)` -> the first output on batch x, and its latency."""

    fixed_batch: int | None  # the batch the artifact only takes, None when any batch goes

    def __call__(self, x: np.ndarray) -> np.ndarray: ...

    def latency_ms(self, x: np.ndarray, runs: int) -> float | None:
        """Median time of one inference on `x`; None when it cannot be timed (data-dependent output shapes)."""
        ...


class Backend(ABC):
    """One deployment runtime, as the engine stage drives it."""

    name: str  # the engine.backend value
    label: str  # how logs and reasons name it
    device: str = "cpu"  # where its artifacts run: "cpu", or "cuda" (evaluated on the run's GPU)

    @abstractmethod
    def available(self) -> tuple[bool, str]:
        """(usable here, why): what engine.backend=auto goes by."""

    @abstractmethod
    def require(self, int8_ptq: bool) -> None:
        """Raise a UserError (how to install it) when the runtime, or for PTQ its quantiser, is missing."""

    def check(self, precision: str, qdq: bool) -> None:
        """Raise a UserError for an engine.precision this backend does not offer (default: all are)."""
        return None

    @abstractmethod
    def build(self, src: Path, out_dir: Path, precision: str, qdq: bool, calib: CalibrationSet | None,
              settings: BuildSettings, log: Any) -> Built:
        """Write the artifact for `src` under `out_dir`; `calib` is given for a float ONNX at int8."""

    @abstractmethod
    def runner(self, built: Built, shape: tuple[int, ...], threads: int) -> Runner:
        """The artifact loaded to run, prepared for input `shape` (the latency batch; others may follow)."""

    @abstractmethod
    def executed_precision(self, built: Built, runner: Runner) -> dict[str, Any]:
        """What the runtime executes, read back from it: `executed_precision` and layer counts at least."""

    def facts(self, threads: int) -> dict[str, Any]:
        """Runtime and machine facts that belong next to the latency (versions, CPU model)."""
        return {}

    def review(self, record: dict[str, Any], qdq: bool, engine: Any) -> list[str]:
        """Warnings the measured record calls for (default: none)."""
        return []

    def mismatch_hint(self, qdq: bool) -> str:
        """Appended to the warning that the executed precision is not the one asked for."""
        return ""

    def evaluation_batch(self, built: Built, requested: int) -> int | None:
        """The batch the artifact is evaluated at, recorded as `eval_batch`; None: evaluate.batch as is."""
        return None
