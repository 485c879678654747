"""The results directory's manifest: every stage run, one record each.

This module is the only code that reads or writes `manifest.json`. Writes are atomic (temp file
+ `os.replace`) under a file lock, so parallel sweep jobs and killed processes never leave a torn
or half-updated manifest. Paths inside records are relative to the results directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

from pipeline.errors import UserError

MANIFEST = "manifest.json"
SUCCEEDED, FAILED, RUNNING = "succeeded", "failed", "running"


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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

    # -- reading -----------------------------------------------------------------------------
    def _read_unlocked(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"version": 1, "runs": []}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{self.path} is not valid JSON ({exc}); restore it or choose another results_dir") from None
        if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
            raise UserError(f"{self.path} has no 'runs' list; it is not a pipeline manifest")
        return data

    def runs(self) -> list[dict[str, Any]]:
        """All records, oldest first; 'running' records of dead processes read as failed."""
        with self._lock:
            runs = self._read_unlocked()["runs"]
        host = socket.gethostname()
        for r in runs:
            if r.get("status") == RUNNING and r.get("host") == host and not _pid_alive(int(r.get("pid", -1))):
                r["status"] = FAILED
                r["error"] = "interrupted (process ended without recording a result)"
        return runs

    def get(self, run_id: str) -> dict[str, Any] | None:
        return next((r for r in self.runs() if r["run_id"] == run_id), None)

    def succeeded(self, stage: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.runs() if r["status"] == SUCCEEDED and (stage is None or r["stage"] == stage)]

    # -- writing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _update(self) -> Iterator[dict[str, Any]]:
        with self._lock:
            data = self._read_unlocked()
            yield data
            atomic_write_text(self.path, json.dumps(data, indent=1, sort_keys=False) + "\n")

    def add(self, record: dict[str, Any]) -> None:
        with self._update() as data:
            data["runs"].append(record)

    def update(self, run_id: str, **fields: Any) -> dict[str, Any]:
        with self._update() as data:
            for r in data["runs"]:
                if r["run_id"] == run_id:
                    r.update(fields)
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

    def output_path(self, record: dict[str, Any], role: str = "model") -> Path:
        """Absolute path of a record's output with this role (KeyError when it has none)."""
        for out in record["outputs"]:
            if out["role"] == role:
                return self.abs(out["path"])
        raise KeyError(f"{record['run_id']} has no output with role {role!r}")

    def artifact(self, role: str, path: str | Path, produced_by: str | None = None) -> dict[str, Any]:
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
        entry = {"role": role, "path": self.rel(p), "sha256": digest, "bytes": size}
        if produced_by is not None:
            entry["produced_by"] = produced_by
        return entry

    def producer_of(self, path: str | Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The succeeded record (and its output entry) that produced `path`, if any."""
        rel = self.rel(path)
        for r in reversed(self.succeeded()):
            for out in r.get("outputs", []):
                if out["path"] == rel:
                    return r, out
        return None

    def verify_artifact(self, entry: dict[str, Any]) -> None:
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

    def latest_output(self, stages: tuple[str, ...], role: str = "model", prefer_order: bool = False):
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
