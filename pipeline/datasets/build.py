"""Convert a scanned `Source` into the internal layout, validating every image and label on the way.

Layout written under `out/`: images/{train,val[,test]}/, labels/{...}/ (YOLO text, one file per
image with boxes), data.yaml (absolute `path`), validation_report.{json,txt}. Images are checked
and written in a thread pool (header reads and links are I/O-bound).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from pipeline.datasets.boxes import clean_box, yolo_line
from pipeline.datasets.defects import DEFECTS, DROPPED_BY_DESIGN, REJECTED_LABELS, Defects
from pipeline.datasets.fs import printable, safe_stem
from pipeline.datasets.images import inspect, write_image
from pipeline.datasets.sources import SPLITS, Item, Source
from pipeline.errors import UserError
from pipeline.manifest import atomic_write_text

REPORT_JSON = "validation_report.json"
REPORT_TXT = "validation_report.txt"
WORKERS = min(16, 4 * (os.cpu_count() or 2))


def seeded_split(keys: list[str], val_fraction: float, seed: int) -> set[str]:
    """The keys that go to validation: a fixed share, ordered by a hash of (seed, key).

    Hashing each key (rather than shuffling the list) keeps an image's split when other images
    are added or removed, as long as the share allows it.
    """
    if val_fraction <= 0 or len(keys) < 2:
        return set()
    order = sorted(keys, key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode("utf-8", "surrogateescape")).digest())
    n_val = min(max(round(len(keys) * val_fraction), 1), len(keys) - 1)
    return set(order[:n_val])


@dataclass
class _Job:
    item: Item
    split: str
    stem: str


@dataclass
class _Outcome:
    split: str
    written: bool = False
    boxes: Counter[int] = field(default_factory=Counter)
    defects: Defects = field(default_factory=Defects)


def _plan(source: Source, val_fraction: float, seed: int, defects: Defects) -> tuple[list[_Job], bool]:
    """Deduplicate, split and name the items; returns the jobs and whether a val split exists."""
    seen: set[tuple[str | None, str]] = set()
    items: list[Item] = []
    for item in source.items:
        real = os.path.realpath(item.image)
        if (item.split, real) in seen:
            defects.add("duplicate_image", f"{item.split or ''} {printable(item.key)}".strip())
            continue
        seen.add((item.split, real))
        items.append(item)

    has_val = any(i.split == "val" for i in items)
    pool = [i for i in items if i.split is None or (not has_val and i.split == "train")]
    val_keys = seeded_split(sorted({i.key for i in pool}), val_fraction, seed) if not has_val else set()
    splits = {id(i): (i.split or "train") for i in items}
    for i in pool:
        splits[id(i)] = "val" if i.key in val_keys else "train"

    where: dict[str, set[str]] = {}
    for i in items:
        where.setdefault(os.path.realpath(i.image), set()).add(splits[id(i)])
    for i in items:
        if len(where.get(os.path.realpath(i.image), ())) > 1 and splits[id(i)] == "val":
            defects.add("split_overlap", printable(i.key))

    jobs = []
    taken: dict[str, set[str]] = {s: set() for s in SPLITS}
    for i in items:
        split = splits[id(i)]
        stem, renamed = safe_stem(i.key)
        if renamed:
            defects.add("renamed_file", f"{printable(i.key)} -> {stem}")
        base, n = stem, 1
        while stem.casefold() in taken[split]:
            n += 1
            stem = f"{base}_{n}"
        taken[split].add(stem.casefold())
        jobs.append(_Job(i, split, stem))
    return jobs, has_val or bool(val_keys)


def _process(job: _Job, source: Source, out: Path) -> _Outcome:
    result = _Outcome(job.split)
    d = result.defects
    item = job.item
    check = inspect(item.image)
    if check.action == "skip":
        d.add(check.defect or "unreadable_image", f"{printable(item.key)}: {check.detail}")
        return result
    if check.defect:
        d.add(check.defect, f"{printable(item.key)}: {check.detail}")
    raw = source.read_labels(item, check, d)
    if raw is None:
        return result
    lines: list[str] = []
    for cls, box in raw:
        clean = clean_box(box, check.width, check.height, d, printable(item.key))
        if clean is None:
            continue
        line = yolo_line(cls, clean)
        if line in lines:
            d.add("duplicate_box", printable(item.key))
            continue
        lines.append(line)
        result.boxes[cls] += 1
    rejected = sum(d.counts[k] for k in REJECTED_LABELS)
    if not lines and rejected:
        d.add("all_labels_rejected", f"{printable(item.key)}: {rejected} label(s) rejected")
        result.boxes.clear()
        return result
    try:
        write_image(item.image, out / "images" / job.split / f"{job.stem}{check.suffix(item.image)}", check)
    except (OSError, SyntaxError, ValueError) as exc:  # header was fine, the pixels are not
        d.add("unreadable_image", f"{printable(item.key)}: {type(exc).__name__}: {exc}")
        result.boxes.clear()
        return result
    if lines:
        (out / "labels" / job.split / f"{job.stem}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result.written = True
    return result


def _refuse(source: Source, what: str, defects: Defects, fmt_key: str) -> UserError:
    top = ", ".join(f"{k}={n}" for k, n in defects.counts.most_common(4))
    return UserError(f"dataset.path={source.root} ({fmt_key}): {what}" + (f" (defects: {top})" if top else "")
                     + "; see the dataset docs for the layouts each format expects")


def convert(source: Source, out: Path, *, final: Path, name: str, val_fraction: float, seed: int,
            config: dict[str, Any], log: logging.Logger, described_as: str | None = None) -> dict[str, Any]:
    """Validate and write `source` into `out`; returns the report (also written beside the data).

    `final` is where `out` will be renamed to: data.yaml names it as its `path`.
    """
    t0 = time.perf_counter()
    fmt_key = f"dataset.format={source.format}"
    defects = Defects()
    defects.merge(source.defects)
    if not source.items:
        raise _refuse(source, "no images found", defects, fmt_key)
    jobs, has_val = _plan(source, val_fraction, seed, defects)
    for split in {j.split for j in jobs}:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        outcomes = list(pool.map(lambda j: _process(j, source, out), jobs))

    counts: Counter[str] = Counter()
    backgrounds: Counter[str] = Counter()
    boxes: Counter[int] = Counter()
    for o in outcomes:
        defects.merge(o.defects)
        if o.written:
            counts[o.split] += 1
            backgrounds[o.split] += not o.boxes
            boxes.update(o.boxes)
    if not counts:
        raise _refuse(source, f"none of the {len(jobs)} images is usable", defects, fmt_key)
    if not boxes:
        raise _refuse(source, f"no image has a usable label ({sum(counts.values())} images, all background)",
                      defects, fmt_key)
    if not counts["train"]:
        raise _refuse(source, "the training split has no usable image", defects, fmt_key)
    notes = list(source.notes)
    if has_val and not counts["val"]:
        raise _refuse(source, "the validation split has no usable image", defects, fmt_key)
    if not has_val:
        notes.append("no validation split (dataset.val_fraction=0 or a single image): validating on the training images")

    splits = [s for s in SPLITS if counts[s]]
    data = {"path": str(final), "train": "images/train", "val": "images/val" if counts["val"] else "images/train"}
    if counts["test"]:
        data["test"] = "images/test"
    data.update({"nc": len(source.names), "names": dict(enumerate(source.names))})
    atomic_write_text(out / "data.yaml", yaml.safe_dump(data, sort_keys=False, allow_unicode=True))

    report = {
        "version": 1,
        "name": name,
        "format": source.format,
        "source": described_as or printable(source.root),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 3),
        "config": config,
        "names": list(source.names),
        "images": {s: counts[s] for s in splits},
        "backgrounds": {s: backgrounds[s] for s in splits},
        "boxes": {"total": sum(boxes.values()), "per_class": {n: boxes[i] for i, n in enumerate(source.names)}},
        "defects": defects.as_dict(),
        "defect_examples": {k: defects.examples.get(k, []) for k in defects.as_dict()},
        "dropped_by_design": {k: n for k, n in defects.dropped.items() if n},
        "unlabeled_dir": str(source.unlabeled_dir) if source.unlabeled_dir else None,
        "notes": notes,
    }
    write_report(out, report)
    for kind, n in report["defects"].items():
        found, action = DEFECTS[kind]
        first = report["defect_examples"][kind][:1]
        log.warning("dataset: %d x %s: %s%s", n, found, action, f" (e.g. {first[0]})" if first else "")
    return report


def write_report(out: Path, report: dict[str, Any]) -> None:
    """validation_report.json (machine) and validation_report.txt (people)."""
    import json

    atomic_write_text(out / REPORT_JSON, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    lines = [
        f"Dataset {report['name']} ({report['format']}) from {report['source']}",
        f"classes ({len(report['names'])}): {', '.join(report['names'])}",
        "images: " + ", ".join(f"{s} {n} ({report['backgrounds'].get(s, 0)} background)"
                               for s, n in report["images"].items()),
        f"boxes: {report['boxes']['total']} (" + ", ".join(f"{k} {v}" for k, v in report["boxes"]["per_class"].items()) + ")",
        "",
    ]
    if report["defects"]:
        lines.append("Defects found and what was done:")
        for kind, n in report["defects"].items():
            found, action = DEFECTS[kind]
            lines.append(f"  {n:6d}  {kind}: {found} -> {action}")
            lines += [f"            e.g. {ex}" for ex in report["defect_examples"].get(kind, [])[:5]]
    else:
        lines.append("No defects found.")
    for kind, n in report["dropped_by_design"].items():
        lines.append(f"  {n:6d}  dropped on purpose: {DROPPED_BY_DESIGN[kind]}")
    lines += [f"note: {n}" for n in report["notes"]]
    atomic_write_text(out / REPORT_TXT, "\n".join(lines) + "\n")
