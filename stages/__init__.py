"""The stages: one module per stage, each exposing `run(cfg, ctx) -> StageResult`, and their table.

`STAGES` is the one place that knows the stages. The `stage=` choices (`pipeline.config.Stage`),
the `stage=all` chain (`pipeline.app`), input resolution and the reuse hash (`pipeline.runner`)
and the report's stage order (`stages.report`) are all read from it, so adding a stage is one row
here plus its module (docs/pipeline.md shows an example). Nothing heavy is imported here: a
stage's module is imported by name when the stage runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Top-level config keys whose values change every stage's result (the reuse hash covers them).
SHARED_SECTIONS = ("seed", "dataset", "model")
# `stage=` values that are commands, not recorded stages; pipeline.app dispatches them.
COMMANDS = ("all", "report", "help")
# Every stage whose output can be a model, newest-first preference for "the model to use".
MODEL_SOURCES = ("engine", "export", "retrain", "prune", "train")


@dataclass(frozen=True)
class StageSpec:
    """One stage: where its code is, what feeds it, and which config it reads."""

    name: str
    module: str  # importable module exposing run(cfg, ctx) -> StageResult
    # Stages whose succeeded model output is this stage's default input (none: it takes no model).
    upstream: tuple[str, ...] = ()
    # True: try `upstream` in order, the first with a succeeded output wins; False: the newest across them.
    prefer_order: bool = True
    produces_model: bool = False  # its "model" output feeds the next stage of stage=all
    # Config sections it reads besides its own and SHARED_SECTIONS (they enter its reuse hash).
    reads: tuple[str, ...] = ()
    in_all: bool = True  # part of the stage=all chain
    all_when: str | None = None  # in stage=all only when this config key is set (e.g. "infer.source")

    @property
    def sections(self) -> tuple[str, ...]:
        """Every config section whose values change this stage's result."""
        return (self.name, *self.reads, *SHARED_SECTIONS)

    def first_to_run(self) -> str:
        """The upstream stage to name when no input is found: the one earliest in the chain."""
        order = list(STAGES)
        return min(self.upstream, key=lambda s: order.index(s) if s in order else len(order))


# In stage=all order.
STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec("dataset", "stages.dataset", in_all=False),
    StageSpec("kmeans", "stages.kmeans"),
    StageSpec("train", "stages.train", produces_model=True),
    StageSpec("evaluate", "stages.evaluate", upstream=MODEL_SOURCES, prefer_order=False),
    StageSpec("prune", "stages.prune", upstream=("train",), produces_model=True, reads=("evaluate",)),
    StageSpec("retrain", "stages.retrain", upstream=("prune",), produces_model=True),
    StageSpec("export", "stages.export", upstream=("retrain", "prune", "train"), produces_model=True,
              reads=("evaluate",)),
    StageSpec("engine", "stages.engine", upstream=("export",), produces_model=True, reads=("evaluate",)),
    StageSpec("infer", "stages.infer", upstream=MODEL_SOURCES, all_when="infer.source"),
)}


def spec(name: str) -> StageSpec:
    """The registry row of stage `name` (KeyError names the known stages)."""
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"no stage {name!r}; stages: {', '.join(STAGES)}") from None


def chain(cfg: Any) -> list[StageSpec]:
    """The stages `stage=all` runs for this config, in order."""
    from omegaconf import OmegaConf

    return [s for s in STAGES.values() if s.in_all and (s.all_when is None or OmegaConf.select(cfg, s.all_when))]
