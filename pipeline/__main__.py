"""Hydra entry point: `python -m pipeline ...` and the `yolo-pipeline` console script.

Shell completion comes from Hydra: `yolo-pipeline -sc install=bash`.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import pipeline.yolo_env  # noqa: F401  (offline-safe Ultralytics before anything imports it)
from pipeline.config import register, validate
from pipeline.errors import UserError, resource_error

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
_task_started = False


def _overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def _task(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    try:
        validate(cfg)  # before importing the stages: a bad value costs no import work
        from pipeline import app, yolo_env

        yolo_env.set_verbose(bool(cfg.get("verbose", False)))
        app.run(cfg, _overrides())
    except UserError as exc:
        logging.getLogger("pipeline").debug("user error", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted; the run is recorded as failed", file=sys.stderr)
        sys.exit(130)
    except (OSError, MemoryError, RuntimeError) as exc:
        # Out of disk or memory outside a stage's own run (e.g. writing the manifest): still the
        # user's to fix. Anything else is a bug and keeps its traceback.
        stage = cfg.get("stage", "?")  # the name as typed (`kmeans`), not the enum's repr
        clear = resource_error(exc, str(getattr(stage, "value", stage)), str(cfg.get("results_dir", "?")), None, None)
        if clear is None:
            raise
        print(f"error: {clear}", file=sys.stderr)
        sys.exit(clear.exit_code)


def _interrupt(signum, frame):  # SIGTERM (Slurm preemption, docker stop) -> recorded as interrupted
    raise KeyboardInterrupt


def _flags_first(argv: list[str]) -> list[str]:
    """Let `-m` stand anywhere (`stage=all -m prune.pth=0.3,0.5`); Hydra's argparse wants it first."""
    flags = [a for a in argv if a in ("-m", "--multirun")]
    return flags[:1] + [a for a in argv if a not in ("-m", "--multirun")]


def _unquoted_non_ascii(argv: list[str]) -> str | None:
    """A message for an override Hydra's lexer cannot read because of unquoted non-ASCII characters.

    Hydra's own error only points at the character; the fix (quote the value) is not in it.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for arg in argv:
        if "=" not in arg or arg.isascii():
            continue
        try:
            parser.parse_overrides([arg])
        except OverrideParseException:
            key, value = arg.split("=", 1)
            return (f"cannot read {arg!r}: Hydra's parser reads these non-ASCII characters only in a quoted value; "
                    f"write '{key}=\"{value}\"' (the single quotes are for the shell)")
    return None


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    sys.argv[1:] = _flags_first(sys.argv[1:])
    unreadable = _unquoted_non_ascii(sys.argv[1:])
    if unreadable:
        print(f"error: {unreadable}", file=sys.stderr)
        sys.exit(2)
    if not CONF_DIR.is_dir():
        print(f"error: config folder {CONF_DIR} not found; install the package in editable mode (pip install -e .)",
              file=sys.stderr)
        sys.exit(2)
    register()
    entry = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(_task)
    try:
        entry()
    except SystemExit as exc:
        # Hydra exits 1 on config errors (unknown key, wrong type); those are the user's to fix.
        if exc.code == 1 and not _task_started:
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
