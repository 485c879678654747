"""The results directory's manifest: every stage run, one record each.

This module is the only code that reads or writes `manifest.json`. Writes are atomic (temp file
+ `os.replace`) under a file lock, so parallel sweep jobs and killed processes never leave a torn
or half-updated manifest. Paths inside records are relative to the results directory.

Nothing is lost when the manifest is: every record is also written into its run folder
(`<stage>/<run_id>/record.json`) and the manifest before each write is kept as `manifest.json.bak`.
A damaged or missing manifest is rebuilt from those (the damaged file kept aside) with a warning.

A `running` record counts as failed ("interrupted") once its process is gone (same host) or its
heartbeat, refreshed every HEARTBEAT_S while the stage runs, is older than STALE_AFTER_S (any host).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypedDict

from filelock import FileLock

from pipeline.errors import UserError

MANIFEST = "manifest.json"
BACKUP = MANIFEST + ".bak"
RECORD = "record.json"  # each run folder's copy of its record
SUCCEEDED, FAILED, RUNNING = "succeeded", "failed", "running"
HEARTBEAT_S = 30  # a running stage refreshes its record's `heartbeat` this often
# A running record whose heartbeat is older than this counts as interrupted, on any host: 20 missed
# beats, far beyond clock skew between hosts or a stall of the heartbeat thread.
STALE_AFTER_S = 600

# What a record's outputs are, by role (inputs use "model", "dataset", "weights" and "resume").
OUTPUT_ROLES: dict[str, str] = {
    "model": "the stage's model artifact (.pt, .onnx, .engine, OpenVINO IR folder): the next stage's input",
    "last": "train: the last epoch's checkpoint (best.pt is the model)",
    "float_model": "retrain: the float-recovered model QAT started from",
    "log": "train: Ultralytics' per-epoch results.csv",
    "curves": "train: loss/mAP curves drawn from the log",
    "float_log": "retrain: the float phase's results.csv",
    "float_curves": "retrain: the float phase's curves",
    "qat_log": "retrain: the QAT phase's results.csv",
    "qat_curves": "retrain: the QAT phase's curves",
    "dataset": "dataset/infer: a data.yaml in the internal layout",
    "report": "dataset: the validation report (JSON)",
    "anchors": "kmeans: anchors.json",
    "darknet": "kmeans: anchors in Darknet's cfg syntax",
    "tao_spec": "kmeans: the anchor lines of a TAO yolo_v4 spec",
    "plot": "kmeans: boxes and clusters",
    "pr_curve": "evaluate: precision-recall curve",
    "confusion_matrix": "evaluate: confusion matrix (counts)",
    "confusion_matrix_normalized": "evaluate: confusion matrix (normalised)",
    "layers": "prune: channels before/after per layer (CSV)",
    "ir_xml": "engine: the OpenVINO IR's graph",
    "ir_bin": "engine: the OpenVINO IR's weights",
    "sidecar": "engine: the TensorRT engine's metadata (names, shapes, precision)",
    "calib_cache": "engine: the TensorRT INT8 calibration cache",
    "labels": "infer: YOLO label files",
    "labels_kitti": "infer: KITTI label files",
    "summary": "infer: summary.json",
    "review": "infer: images whose scores fall in infer.review_band",
    "detections": "infer: the per-image journal resume reads",
}

log = logging.getLogger("pipeline")


class Artifact(TypedDict, total=False):
    """An inputs/outputs entry of a record."""

    role: str  # see OUTPUT_ROLES
    path: str  # relative to the results dir when inside it, else absolute
    sha256: str
    bytes: int
    produced_by: str  # inputs only: run_id of the record that output this file


class Record(TypedDict, total=False):
    """One stage run in manifest.json (and in its run folder's record.json)."""

    run_id: str  # "<stage>-<YYYYmmddTHHMMSS>-<4 hex>"
    stage: str
    status: str  # SUCCEEDED | FAILED | RUNNING
    started: str  # ISO 8601, UTC
    finished: str | None
    heartbeat: str  # ISO 8601, UTC; refreshed while running
    seconds: float | None
    config_hash: str
    overrides: list[str]
    git_commit: str | None
    host: str
    pid: int
    run_dir: str
    inputs: list[Artifact]
    outputs: list[Artifact]
    metrics: dict[str, Any]
    warnings: list[str]
    error: str  # failed runs
    dataset: dict[str, Any]  # the dataset summary, for stages that read one


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def recorded_config(record: Record, root: str | Path) -> dict[str, Any] | None:
    """The resolved config a run was recorded with (`<run_dir>/config.yaml`, written by the runner);
    None when the record has no run folder, the file is missing, or it does not parse."""
    import yaml

    if not record.get("run_dir"):
        return None
    path = Path(record["run_dir"])
    path = (path if path.is_absolute() else Path(root) / path) / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else {}


def now_iso() -> str:
    """The current time as records store it (ISO 8601, UTC, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: Any) -> bool | None:
    """Whether process `pid` exists on this host (None when the record's pid is not a usable number)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return None  # 0 and negative pids would signal process groups, not a process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return None
    return True


def _age_s(stamp: Any) -> float | None:
    """Seconds since an ISO time (None when missing or unreadable)."""
    if not isinstance(stamp, str):
        return None
    try:
        t = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - t).total_seconds()


def interrupted(record: Record, host: str | None = None) -> str | None:
    """Why a `running` record is in fact dead (None while it may still run)."""
    if record.get("status") != RUNNING:
        return None
    if record.get("host") == (host or socket.gethostname()) and _pid_alive(record.get("pid")) is False:
        return "interrupted (process ended without recording a result)"
    # Records written before heartbeats existed have only their start time as a sign of life.
    age = _age_s(record.get("heartbeat", record.get("started")))
    if age is not None and age > STALE_AFTER_S:
        return (f"interrupted (no heartbeat for {age / 60:.0f} min from host {record.get('host')}; "
                f"a running stage beats every {HEARTBEAT_S} s)")
    return None


def _problem(record: Any) -> str | None:
    """What makes a manifest entry unusable as a record (None when it is one)."""
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, not an object"
    for key in ("run_id", "stage", "status"):
        if not isinstance(record.get(key), str):
            return f"has no {key}"
    for key in ("inputs", "outputs"):
        entries = record.get(key, [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("role"), str)
                                                    and isinstance(e.get("path"), str) for e in entries):
            return f"has a malformed {key} list"
    if not isinstance(record.get("metrics", {}), dict):
        return "has metrics that are not an object"
    return None


class Manifest:
    """Records of stage runs in `<results_dir>/manifest.json`."""

    def __init__(self, results_dir: str | Path):
        self.root = Path(results_dir).resolve()
        self.path = self.root / MANIFEST
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"results_dir={results_dir} is not writable ({exc.strerror}); choose another results_dir") from None
        self._lock = FileLock(str(self.root / ".manifest.lock"))
        self._skipped: set[str] = set()  # malformed entries already warned about

    @staticmethod
    def found_in(results_dir: str | Path) -> bool:
        """Whether a results dir holds a manifest, or the run folders and backup one is rebuilt from."""
        root = Path(results_dir)
        return (root / MANIFEST).is_file() or (root / BACKUP).is_file() or any(root.glob(f"*/*/{RECORD}"))

    # -- reading -----------------------------------------------------------------------------
    def _read_unlocked(self) -> tuple[dict[str, Any], bool]:
        """The manifest's data, and whether it is the file as found (False: rebuilt or new)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return self._rebuild(f"{self.path} is missing", damaged=False) or {"version": 1, "runs": []}, False
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            rebuilt = self._rebuild(f"{self.path} is not valid JSON ({exc})", damaged=True)
            if rebuilt is None:
                raise UserError(f"{self.path} is not valid JSON ({exc}) and there are no run folders or "
                                f"{BACKUP} to rebuild it from; restore it or choose another results_dir") from None
            return rebuilt, False
        if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
            raise UserError(f"{self.path} has no 'runs' list; it is not a pipeline manifest")
        return data, True

    def _rebuild(self, problem: str, damaged: bool) -> dict[str, Any] | None:
        """A manifest made from the run folders' record.json files and the backup (None: nothing to use)."""
        backup = self._backup_runs()
        folders = self._run_folder_records()
        if not backup and not folders:
            return None
        if damaged:
            aside = self.path.with_name(f"{MANIFEST}.damaged-{datetime.now().strftime('%Y%m%dT%H%M%S')}")
            os.replace(self.path, aside)
            problem += f"; kept as {aside.name}"
        known = {r["run_id"] for r in backup}
        runs = [folders.get(r["run_id"], r) for r in backup]  # a run folder's copy is the newer one
        runs += sorted((r for rid, r in folders.items() if rid not in known), key=lambda r: str(r.get("started", "")))
        data = {"version": 1, "runs": runs}
        atomic_write_text(self.path, json.dumps(data, indent=1) + "\n")
        log.warning("WARNING: %s: rebuilt it with %d records (%d from run folders' %s, %d only in %s)",
                    problem, len(runs), len(folders), RECORD, len(runs) - len(folders), BACKUP)
        return data

    def _backup_runs(self) -> list[Record]:
        try:
            data = json.loads((self.root / BACKUP).read_bytes())
        except (OSError, ValueError):
            return []
        runs = data.get("runs") if isinstance(data, dict) else None
        return [r for r in runs if _problem(r) is None] if isinstance(runs, list) else []

    def _run_folder_records(self) -> dict[str, Record]:
        found: dict[str, Record] = {}
        for path in sorted(self.root.glob(f"*/*/{RECORD}")):
            try:
                record = json.loads(path.read_bytes())
            except (OSError, ValueError):
                log.warning("WARNING: %s is unreadable; that run is not in the rebuilt manifest", path)
                continue
            if _problem(record) is None:
                found[record["run_id"]] = record
        return found

    def runs(self) -> list[Record]:
        """All records, oldest first; 'running' records of dead runs read as failed, malformed ones are skipped."""
        with self._lock:
            entries = self._read_unlocked()[0]["runs"]
        host = socket.gethostname()
        runs = []
        for i, r in enumerate(entries):
            problem = _problem(r)
            if problem is not None:
                key = f"{i}:{problem}"
                if key not in self._skipped:
                    self._skipped.add(key)
                    log.warning("WARNING: %s: entry %d %s; skipped (fix or remove that entry)", self.path, i, problem)
                continue
            reason = interrupted(r, host)
            if reason is not None:
                r["status"] = FAILED
                r["error"] = reason
            runs.append(r)
        return runs

    def get(self, run_id: str) -> Record | None:
        return next((r for r in self.runs() if r["run_id"] == run_id), None)

    def succeeded(self, stage: str | None = None) -> list[Record]:
        return [r for r in self.runs() if r["status"] == SUCCEEDED and (stage is None or r["stage"] == stage)]

    # -- lineage -----------------------------------------------------------------------------
    @staticmethod
    def parent_id(record: Record) -> str | None:
        """run_id of the run that produced this record's input model (None for a model from elsewhere)."""
        return next((e.get("produced_by") for e in record.get("inputs", []) if e.get("role") == "model"), None)

    def producer(self, entry: Artifact, runs: list[Record] | None = None) -> Record | None:
        """The known record that produced an inputs entry (None for a file from elsewhere)."""
        run_id = entry.get("produced_by")
        if not run_id:
            return None
        return next((r for r in (self.runs() if runs is None else runs) if r["run_id"] == run_id), None)

    def parent(self, record: Record, runs: list[Record] | None = None) -> Record | None:
        """The known record that produced this record's input model."""
        entry = next((e for e in record.get("inputs", []) if e.get("role") == "model"), None)
        return self.producer(entry, runs) if entry is not None else None

    def lineage(self, record: Record, runs: list[Record] | None = None) -> list[Record]:
        """The record itself, then its parent, grandparent ... (known records only).

        `runs` (this manifest's records) saves re-reading the file when walking many records.
        """
        by_id = {r["run_id"]: r for r in (self.runs() if runs is None else runs)}
        chain: list[Record] = []
        seen: set[str] = set()
        current: Record | None = record
        while current is not None and current["run_id"] not in seen:
            seen.add(current["run_id"])
            chain.append(current)
            parent = self.parent_id(current)
            current = by_id.get(parent) if parent else None
        return chain

    # -- writing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _update(self) -> Iterator[dict[str, Any]]:
        with self._lock:
            data, as_found = self._read_unlocked()
            yield data
            if as_found:
                self._keep_backup()
            atomic_write_text(self.path, json.dumps(data, indent=1, sort_keys=False) + "\n")

    def _keep_backup(self) -> None:
        """The manifest as it is now (it parsed: a good one) becomes manifest.json.bak."""
        backup = self.root / BACKUP
        tmp = backup.with_name(f".{BACKUP}.{os.getpid()}.tmp")
        try:
            os.link(self.path, tmp)  # the new manifest replaces the name, this link keeps the old file
            os.replace(tmp, backup)
        except OSError:  # no hard links on this filesystem: copy
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            atomic_write_bytes(backup, self.path.read_bytes())

    def _write_record(self, record: Record) -> None:
        """The record's copy in its run folder, what a lost manifest is rebuilt from."""
        if record.get("run_dir"):
            atomic_write_text(self.abs(record["run_dir"]) / RECORD, json.dumps(record, indent=1) + "\n")

    def add(self, record: Record) -> None:
        with self._update() as data:
            self._write_record(record)
            data["runs"].append(record)

    def update(self, run_id: str, **fields: Any) -> Record:
        with self._update() as data:
            for r in data["runs"]:
                if isinstance(r, dict) and r.get("run_id") == run_id:
                    r.update(fields)
                    self._write_record(r)
                    return dict(r)
        raise KeyError(run_id)

    # -- artifacts ---------------------------------------------------------------------------
    def rel(self, path: str | Path) -> str:
        """Path relative to the results dir when inside it, else absolute."""
        p = Path(path).resolve()
        try:
            return p.relative_to(self.root).as_posix()
        except ValueError:
            return str(p)

    def abs(self, rel_path: str) -> Path:
        p = Path(rel_path)
        return p if p.is_absolute() else self.root / p

    def config_of(self, record: Record) -> dict[str, Any] | None:
        """`recorded_config` of a record of this manifest."""
        return recorded_config(record, self.root)

    def output_of(self, record: Record, role: str = "model") -> Path | None:
        """Absolute path of a record's output with this role (None when it has none)."""
        entry = next((out for out in record.get("outputs", []) if out["role"] == role), None)
        return self.abs(entry["path"]) if entry is not None else None

    def output_path(self, record: Record, role: str = "model") -> Path:
        """Absolute path of a record's output with this role (KeyError when it has none)."""
        path = self.output_of(record, role)
        if path is None:
            raise KeyError(f"{record['run_id']} has no output with role {role!r}")
        return path

    def artifact(self, role: str, path: str | Path, produced_by: str | None = None) -> Artifact:
        """An inputs/outputs entry: relative path, sha256, bytes (a folder hashes its files)."""
        p = Path(path)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            h = hashlib.sha256()
            size = 0
            for f in files:
                h.update(f.relative_to(p).as_posix().encode() + b"\0" + sha256_file(f).encode())
                size += f.stat().st_size
            digest = h.hexdigest()
        else:
            digest, size = sha256_file(p), p.stat().st_size
        entry: Artifact = {"role": role, "path": self.rel(p), "sha256": digest, "bytes": size}
        if produced_by is not None:
            entry["produced_by"] = produced_by
        return entry

    def producer_of(self, path: str | Path) -> tuple[Record, Artifact] | None:
        """The succeeded record (and its output entry) that produced `path`, if any."""
        rel = self.rel(path)
        for r in reversed(self.succeeded()):
            for out in r.get("outputs", []):
                if out["path"] == rel:
                    return r, out
        return None

    def verify_artifact(self, entry: Artifact) -> None:
        """Refuse an artifact whose content no longer matches its record."""
        p = self.abs(entry["path"])
        if not p.exists():
            raise UserError(f"{p} is recorded in the manifest but missing; rerun the stage that made it")
        now = self.artifact(entry["role"], p)["sha256"]
        if now != entry["sha256"]:
            raise UserError(
                f"{p} does not match its manifest checksum (sha256 {now[:12]} != recorded {entry['sha256'][:12]}); "
                "it was modified after it was written - rerun the stage that made it"
            )

    def latest_output(self, stages: tuple[str, ...], role: str = "model",
                      prefer_order: bool = False) -> tuple[Record, Artifact] | None:
        """Newest succeeded output with `role` from one of `stages`.

        With prefer_order the stages are tried in the order given (first with any output wins);
        otherwise the newest record across all of them wins. Returns (record, entry) or None.
        """
        done = self.succeeded()
        groups = [(s,) for s in stages] if prefer_order else [stages]
        for group in groups:
            for r in reversed(done):
                if r["stage"] in group:
                    for out in r.get("outputs", []):
                        if out["role"] == role:
                            return r, out
        return None
