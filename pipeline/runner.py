"""Running one stage: inputs, run folder, manifest record, timing, errors. Written once, here.

Stages stay free of bookkeeping: they get `(cfg, ctx)` and return a `StageResult`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from pipeline.context import StageContext, StageResult
from pipeline.errors import UserError, resource_error
from pipeline.manifest import (
    FAILED,
    HEARTBEAT_S,
    RUNNING,
    SUCCEEDED,
    Artifact,
    Manifest,
    Record,
    atomic_write_text,
    now_iso,
)
from pipeline.safe_load import trust_from_config
from pipeline.yolo_env import DETAIL
from stages import spec

log = logging.getLogger("pipeline")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _plain(cfg: DictConfig, key: str) -> Any:
    node = cfg[key]
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True) if OmegaConf.is_config(node) else node


def stage_config(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """The config sections that determine a stage's result: its registry row's `sections`.

    `input` paths are left out where the file enters the hash by its sha256 (a stage with upstream
    stages) or is not read (another stage's section); train's own `train.input` stays in.
    """
    row = spec(stage)
    config = {}
    for key in row.sections:
        value = _plain(cfg, key) if key in cfg else {}
        if isinstance(value, dict) and (key != stage or row.upstream or value.get("input") is None):
            value = {k: v for k, v in value.items() if k != "input"}
        config[key] = value
    return config


def config_hash(cfg: DictConfig, stage: str, inputs: list[Artifact]) -> str:
    payload = {"config": stage_config(cfg, stage), "inputs": sorted(e["sha256"] for e in inputs)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def resolve_inputs(cfg: DictConfig, stage: str, manifest: Manifest, explicit: Path | None = None,
                   warnings: list[str] | None = None) -> list[Artifact]:
    """The stage's model input: `explicit`, else `<stage>.input`, else the newest upstream output.

    What the user should know about the input (it comes from a run that did not succeed) is
    appended to `warnings`, for the run's record.
    """
    row = spec(stage)
    if not row.upstream:
        return []
    user_path = explicit or (cfg[stage].get("input") if stage in cfg else None)
    if user_path:
        p = Path(str(user_path)).expanduser()
        if not p.is_absolute() and not p.exists() and (manifest.root / p).exists():
            p = manifest.root / p
        if not p.exists():
            raise UserError(f"{stage}.input={user_path} does not exist; give the path of a model file")
        found = manifest.producer_of(p)
        if found is not None:
            record, entry = found
            manifest.verify_artifact(entry)
            return [{**entry, "role": "model", "produced_by": record["run_id"]}]
        from pipeline.models import check_model_file

        check_model_file(p, f"{stage}.input")  # a file from elsewhere: refused here, before a loader tracebacks
        note = _unfinished_run_note(manifest, p, f"{stage}.input={user_path}")
        if note is not None and warnings is not None:
            warnings.append(note)
        return [manifest.artifact("model", p)]
    found = manifest.latest_output(row.upstream, prefer_order=row.prefer_order)
    if found is None:
        raise UserError(
            f"stage={stage} found no model in {manifest.root} (looked for a succeeded "
            f"{' / '.join(row.upstream)} run); run stage={row.first_to_run()} first, or set {stage}.input=PATH"
        )
    record, entry = found
    manifest.verify_artifact(entry)
    return [{**entry, "produced_by": record["run_id"]}]


def _unfinished_run_note(manifest: Manifest, path: Path, named: str) -> str | None:
    """A warning when `path` lies in the run folder of a run that failed or is still running.

    Such a file (a killed train's best.pt) is used, as Ultralytics uses any checkpoint it is given:
    stopping a run early and keeping its best epoch is a common choice. But it is not a finished
    result, so the record says where it came from.
    """
    target = path.resolve()
    for record in reversed(manifest.runs()):
        run_dir = record.get("run_dir")
        if record["status"] == SUCCEEDED or not (isinstance(run_dir, str) and run_dir):
            continue
        if target.is_relative_to(manifest.abs(run_dir).resolve()):
            how = "is still running" if record["status"] == RUNNING else f"failed ({record.get('error') or 'no error'})"
            return (f"{named} comes from run {record['run_id']}, which {how}: it holds what that run last saved, "
                    "not a finished result")
    return None


def _reusable(manifest: Manifest, stage: str, chash: str) -> Record | None:
    for record in reversed(manifest.succeeded(stage)):
        if record.get("config_hash") == chash:
            try:
                for out in record.get("outputs", []):
                    manifest.verify_artifact(out)
            except UserError as exc:
                log.warning("not reusing %s: %s", record["run_id"], exc)
                continue
            return record
    return None


def _jsonable_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    def fix(v: Any) -> Any:
        if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
            v = v.item()
        if isinstance(v, float) and v != v:
            return None
        if isinstance(v, dict):
            return {str(k): fix(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        if hasattr(v, "tolist"):
            return v.tolist()
        return v

    return {k: fix(v) for k, v in metrics.items()}


@trust_from_config  # trust_pickle holds for the inputs resolved here and every load the stage makes
def run_stage(
    cfg: DictConfig,
    stage: str,
    overrides: list[str] | None = None,
    explicit_input: Path | None = None,
    reuse: bool = False,
) -> Record:
    """Run `stage` and record it; return its manifest record (an existing one when reused)."""
    manifest = Manifest(cfg.results_dir)
    module = importlib.import_module(spec(stage).module)
    notes: list[str] = []
    inputs = resolve_inputs(cfg, stage, manifest, explicit_input, notes)
    chash = config_hash(cfg, stage, inputs)

    lock = None
    if reuse:
        # One lock per config_hash: parallel sweep jobs wait for, then reuse, one baseline run.
        lock_dir = manifest.root / ".locks"
        lock_dir.mkdir(exist_ok=True)
        lock = FileLock(str(lock_dir / f"{stage}-{chash[:16]}.lock"))
        lock.acquire()
    try:
        if reuse:
            existing = _reusable(manifest, stage, chash)
            if existing is not None:
                log.info("[%s] reusing %s (same config_hash; force=true redoes it)", stage, existing["run_id"])
                return existing
        return _execute(cfg, stage, module, manifest, inputs, chash, overrides or [], notes)
    finally:
        if lock is not None:
            lock.release()


def _resource_error(exc: BaseException, cfg: DictConfig, stage: str, recorded: bool) -> UserError | None:
    section = cfg.get(stage) if stage in cfg else None
    batch = section.get("batch") if isinstance(section, DictConfig) else None
    imgsz = section.get("imgsz") if isinstance(section, DictConfig) else None
    return resource_error(exc, stage, str(cfg.results_dir), batch, imgsz, recorded=recorded)


@contextmanager
def _heartbeat(manifest: Manifest, run_id: str) -> Iterator[None]:
    """Refresh the record's `heartbeat` every HEARTBEAT_S while the stage runs: liveness any host can read."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                manifest.update(run_id, heartbeat=now_iso())
            except (OSError, UserError, KeyError) as exc:  # a missed beat is not worth failing the stage
                log.warning("[%s] heartbeat not written: %s", run_id, exc)

    thread = threading.Thread(target=beat, name=f"heartbeat-{run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _execute(cfg, stage, module, manifest: Manifest, inputs, chash, overrides, notes: list[str]) -> Record:
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    run_id = f"{stage}-{stamp}-{secrets.token_hex(2)}"
    run_dir = manifest.root / stage / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger("pipeline"), logging.getLogger("ultralytics")]
    for lg in loggers:
        lg.addHandler(handler)

    started = now_iso()
    record: Record = {
        "run_id": run_id, "stage": stage, "status": RUNNING, "started": started, "heartbeat": started, "finished": None,
        "seconds": None, "config_hash": chash, "overrides": list(overrides), "git_commit": _git_commit(),
        "host": socket.gethostname(), "pid": os.getpid(), "run_dir": manifest.rel(run_dir),
        "inputs": inputs, "outputs": [], "metrics": {},
    }
    manifest.add(record)
    ctx = StageContext(cfg=cfg, stage=stage, run_id=run_id, run_dir=run_dir, manifest=manifest,
                       log=logging.getLogger(f"pipeline.{stage}"), inputs=inputs)
    for note in notes:
        ctx.warn(note)
    t0 = time.perf_counter()
    log.info("[%s] run %s -> %s", stage, run_id, run_dir)
    try:
        with _heartbeat(manifest, run_id):
            result: StageResult = module.run(cfg, ctx)
            outputs = [manifest.artifact(role, path) for role, path in result.outputs]
        fields = {
            "status": SUCCEEDED, "finished": now_iso(), "seconds": round(time.perf_counter() - t0, 3),
            "inputs": ctx.inputs, "outputs": outputs, "metrics": _jsonable_metrics(result.metrics),
            "warnings": ctx.warnings, **ctx.extra,
        }
        done = manifest.update(run_id, **fields)
        log.info("[%s] succeeded in %.1f s", stage, fields["seconds"], extra=DETAIL)  # the summary line follows
        return done
    except BaseException as exc:
        # The message stored in the failure record may say it is recorded; if that write fails, the
        # message raised says nothing of a record.
        clear = None if isinstance(exc, UserError) else _resource_error(exc, cfg, stage, recorded=True)
        if isinstance(exc, KeyboardInterrupt):
            message = "interrupted (KeyboardInterrupt)"
        elif isinstance(exc, UserError) or clear is not None:
            message = str(clear or exc)
        else:
            message = f"{type(exc).__name__}: {exc}"
        try:
            manifest.update(run_id, status=FAILED, finished=now_iso(), seconds=round(time.perf_counter() - t0, 3),
                            error=message, inputs=ctx.inputs, warnings=ctx.warnings, **ctx.extra)
        except OSError as write_exc:
            # A full disk can refuse the failure record too: the manifest keeps its previous, valid
            # content (atomic writes) and the record stays "running" with our pid, which the next
            # reader marks failed ("interrupted") once this process is gone.
            log.error("[%s] could not record the failure: %s", stage, write_exc)
            if clear is not None:
                clear = _resource_error(exc, cfg, stage, recorded=False)
        if clear is not None:
            raise clear from exc
        raise
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        handler.close()
