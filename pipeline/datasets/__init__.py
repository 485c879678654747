"""Datasets: the embedded synthetic generator, importers, validation, one internal layout.

Every source is converted once into Ultralytics' YOLO layout under
`<results_dir>/datasets/<name>-<hash>/` (images/{train,val}, labels/{train,val}, data.yaml,
validation report), reused while the source is unchanged.

INTERFACE (other modules rely on it; keep it):
    prepare(cfg_dataset, results_dir, seed, log) -> DatasetInfo
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock

from pipeline.datasets.build import REPORT_JSON, convert, write_report
from pipeline.datasets.fs import RESULTS_MARKER, listing_hash
from pipeline.manifest import atomic_write_text
from pipeline.yolo_env import DETAIL

# Bump when the converter's output or the synthetic generator changes: old copies are rebuilt.
LAYOUT_VERSION = 1
SYNTHETIC_KEYS = ("synthetic_train", "synthetic_val", "synthetic_unlabeled", "synthetic_imgsz", "synthetic_classes")


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


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "dataset"


def _source_name(path: Path) -> str:
    """The folder a user would call the dataset: the folder given, or the one holding the file."""
    if path.is_dir():
        return path.name
    parent = path.parent
    return parent.parent.name if parent.name in ("annotations", "labels") else parent.name


def _count_files(folder: Path) -> int:
    try:
        return sum(1 for e in os.scandir(folder) if e.is_file() and not e.name.startswith("."))
    except OSError:
        return -1


def _intact(root: Path, log: logging.Logger) -> dict[str, Any] | None:
    """The report of a finished copy whose image folders still hold what the report says; else None."""
    try:
        report = json.loads((root / REPORT_JSON).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not (root / "data.yaml").is_file():
        return None
    for split, n in report.get("images", {}).items():
        if _count_files(root / "images" / split) != n:
            log.warning("dataset: %s/images/%s no longer holds %d images; rebuilding it", root, split, n)
            return None
    return report


def _refresh_yaml(root: Path) -> None:
    """Rewrite data.yaml's absolute `path` when the results folder was moved, and its `content_sha256`
    when the copy's labels or images changed."""
    data_yaml = root / "data.yaml"
    data = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    content = content_hash(root)
    if data.get("path") != str(root) or data.get("content_sha256") != content:
        data["path"] = str(root)
        data["content_sha256"] = content
        atomic_write_text(data_yaml, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def content_hash(root: Path) -> str:
    """sha256 of a converted copy's label files (names and bytes) and image list (names and sizes).

    data.yaml carries it (`content_sha256`), and data.yaml is the dataset artifact whose sha256
    enters every stage's config_hash: a label edited in the copy is a new dataset, not a reuse.
    """
    digest = hashlib.sha256()
    for kind in ("labels", "images"):
        for path in sorted((root / kind).rglob("*")):
            if not path.is_file() or (kind == "labels" and path.suffix != ".txt"):
                continue  # Ultralytics' labels/*.cache files come and go with its own runs
            rel = path.relative_to(root).as_posix()
            body = path.read_bytes() if kind == "labels" else str(path.stat().st_size).encode()
            digest.update(f"{rel}\0{len(body)}\0".encode("utf-8", "surrogateescape") + body)
    return digest.hexdigest()


def _build_synthetic(tmp: Path, final: Path, name: str, seed: int, config: dict[str, Any],
                     log: logging.Logger) -> dict[str, Any]:
    from pipeline.datasets.synthetic import generate
    from pipeline.datasets.yolo import YoloImporter

    src = tmp / ".generated"
    t0 = time.perf_counter()
    generate(src, n_train=config["synthetic_train"], n_val=config["synthetic_val"],
             n_unlabeled=config["synthetic_unlabeled"], imgsz=config["synthetic_imgsz"],
             n_classes=config["synthetic_classes"], seed=seed)
    log.info("dataset: generated %d+%d+%d synthetic images in %.1f s", config["synthetic_train"],
             config["synthetic_val"], config["synthetic_unlabeled"], time.perf_counter() - t0)
    source = YoloImporter(src / "data.yaml").scan()
    source.format = "synthetic"
    report = convert(source, tmp, final=final, name=name, val_fraction=0.0, seed=seed, config=config, log=log,
                     described_as=f"embedded synthetic generator (seed={seed})")
    if config["synthetic_unlabeled"]:
        os.rename(src / "unlabeled", tmp / "unlabeled")
        report["unlabeled_dir"] = "unlabeled"
        write_report(tmp, report)
    shutil.rmtree(src)
    return report


def prepare(cfg_dataset: Any, results_dir: Path, seed: int, log: logging.Logger) -> DatasetInfo:
    """Import (or generate) and validate the dataset once; reuse the converted copy after that."""
    from pipeline.datasets.formats import open_source

    datasets_dir = Path(results_dir).resolve() / "datasets"
    datasets_dir.mkdir(parents=True, exist_ok=True)
    (datasets_dir.parent / RESULTS_MARKER).touch()
    path = _get(cfg_dataset, "path")
    name = str(_get(cfg_dataset, "name", "synthetic") or "synthetic")
    val_fraction = float(_get(cfg_dataset, "val_fraction", 0.2))
    if path is None:
        config = {"kind": "synthetic", "seed": seed, "version": LAYOUT_VERSION,
                  **{k: int(_get(cfg_dataset, k)) for k in SYNTHETIC_KEYS}}
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
        importer = None
    else:
        importer = open_source(str(path), str(_get(cfg_dataset, "format", "auto")))
        source_path = Path(os.path.abspath(Path(str(path)).expanduser()))
        if name == "synthetic":
            name = _source_name(source_path)
        config = {"kind": "import", "path": str(source_path), "format": importer.format,
                  "val_fraction": val_fraction, "seed": seed, "version": LAYOUT_VERSION}
        digest = listing_hash(importer.roots(), json.dumps(config, sort_keys=True))
    name = _safe_name(name)
    final = datasets_dir / f"{name}-{digest[:12]}"

    with FileLock(str(datasets_dir / f".{final.name}.lock")):
        report = _intact(final, log)
        reused = report is not None
        if reused:
            log.info("dataset: reusing %s (source unchanged)", final, extra=DETAIL)
        else:
            for stale in [final, *datasets_dir.glob(f".build-{final.name}-*")]:
                shutil.rmtree(stale, ignore_errors=True)  # a half-built or damaged copy; we hold the lock
            tmp = datasets_dir / f".build-{final.name}-{os.getpid()}"
            tmp.mkdir()
            try:
                if importer is None:
                    report = _build_synthetic(tmp, final, name, seed, config, log)
                else:
                    log.info("dataset: importing %s (format %s) into %s", path, importer.format, final)
                    report = convert(importer.scan(), tmp, final=final, name=name, val_fraction=val_fraction,
                                     seed=seed, config=config, log=log)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        _refresh_yaml(final)
    return _info(final, report, log, reused=reused)


def _info(root: Path, report: dict[str, Any], log: logging.Logger, reused: bool = False) -> DatasetInfo:
    counts = dict(report["images"])
    unlabeled = report.get("unlabeled_dir")
    unlabeled_dir = (root / unlabeled if not Path(unlabeled).is_absolute() else Path(unlabeled)) if unlabeled else None
    if unlabeled_dir is not None and unlabeled_dir.is_dir():
        from pipeline.datasets.sources import is_image

        counts["unlabeled"] = sum(1 for f in unlabeled_dir.iterdir() if is_image(f))
    log.info("dataset: %s: %s images, %d classes, %d boxes, %d defects fixed or dropped (report: %s)",
             report["name"], " / ".join(f"{k} {v}" for k, v in counts.items()), len(report["names"]),
             report["boxes"]["total"], sum(report["defects"].values()), root / "validation_report.txt",
             extra=DETAIL if reused else None)  # every stage reuses it: the console says it once, when built
    return DatasetInfo(name=report["name"], root=root, data_yaml=root / "data.yaml", names=list(report["names"]),
                       counts=counts, defects=dict(report["defects"]), report_path=root / REPORT_JSON,
                       unlabeled_dir=unlabeled_dir if unlabeled_dir is not None and unlabeled_dir.is_dir() else None)
