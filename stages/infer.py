"""stage=infer: pseudo-labels for a folder of unlabeled images, ready to review and train on.

The run folder is itself a dataset: `labels/` (YOLO text, the source's folder structure kept),
`images/` (hard links to the source images), `train.txt`/`val.txt` (a seeded split), `data.yaml`
and `classes.txt`; beside them `labels_kitti/` (TAO's KITTI format, confidence last, pixels),
`vis/` (annotated images, with infer.save_vis), `detections.jsonl` (every image's boxes, written as
it goes: the journal infer.resume reads), `summary.json` and `review.txt` (images whose best
detection is uncertain, for a human to check first).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from pipeline.context import StageContext, StageResult
from pipeline.datasets.boxes import kitti_line, normalize, yolo_line
from pipeline.datasets.build import seeded_split
from pipeline.errors import UserError
from pipeline.manifest import FAILED, atomic_write_text, sha256_file
from pipeline.predict import FolderScan, ImageItem, Prediction, Predictor, Skipped, draw_boxes, scan_folder

JOURNAL = "detections.jsonl"
# Settings that change the labels: a failed run is resumed only when they match.
RESUME_KEYS = ("conf", "iou", "imgsz", "max_det", "fast_decode")
# NMS keeps boxes down to this score (Ultralytics' validation conf), so every image's best score is
# known even below infer.conf: the review list and the "most images got no box" hint need it.
BEST_FLOOR = 0.001
REVIEW_NEAREST = 20  # images listed when none falls in infer.review_band: the nearest to infer.conf
EMPTY_WARN = 0.5  # share of images without a box above which the run warns


def run(cfg: Any, ctx: StageContext) -> StageResult:
    icfg = cfg.infer
    source = _source_dir(icfg.source)
    scan = scan_folder(source, bool(icfg.recursive), int(icfg.workers))
    _refuse_empty(scan, source, bool(icfg.recursive))
    if icfg.imgsz is not None and int(icfg.imgsz) < 32:
        raise UserError(f"infer.imgsz={icfg.imgsz} is too small; use at least 32 (or leave it unset)")

    predictor = Predictor(ctx.input_path("model"), device=ctx.device, imgsz=icfg.imgsz, batch=int(icfg.batch),
                          conf=float(icfg.conf), iou=float(icfg.iou), max_det=int(icfg.max_det),
                          workers=int(icfg.workers), fast_decode=bool(icfg.fast_decode),
                          threads=int(icfg.threads))
    ctx.log.info("infer: %d images in %s (%d skipped, %d other files); model %s (%s, %dx%d%s)",
                 len(scan.images), source, len(scan.skipped), len(scan.ignored), predictor.path.name,
                 predictor.format, *predictor.imgsz, ", rectangular batches" if predictor.rect else "")

    writer = Writer(ctx.run_dir, list(icfg.formats), bool(icfg.save_vis), float(icfg.conf))
    done = _resume(cfg, ctx, source, scan, writer, predictor.names) if icfg.resume else set()
    todo = [it for it in scan.images if it.rel not in done]

    band_lo = float(icfg.review_band[0])
    t0 = time.perf_counter()
    inferred = 0
    with writer, tqdm(total=len(todo), unit="img", desc="infer", disable=None, dynamic_ncols=True) as bar:
        for result in predictor.predict(todo, keep_images=writer.save_vis, nms_conf=min(float(icfg.conf), band_lo, BEST_FLOOR)):
            if isinstance(result, Skipped):
                scan.skipped.append(result)
            else:
                writer.write(result, predictor.names)
                inferred += 1
            bar.update(1)
    seconds = time.perf_counter() - t0
    images_per_s = inferred / seconds if seconds > 0 and inferred else 0.0

    if not writer.entries:
        first = scan.skipped[0]
        raise UserError(f"infer.source={icfg.source}: none of the {len(scan.skipped)} image files could be read "
                        f"(e.g. {first.rel}: {first.reason})")
    if scan.skipped:
        shown = "; ".join(f"{s.rel} ({s.reason})" for s in scan.skipped[:3])
        ctx.warn(f"infer: skipped {len(scan.skipped)} unreadable image file(s): {shown}"
                 f"{' ...' if len(scan.skipped) > 3 else ''} (all listed in summary.json)")
    return _finish(cfg, ctx, source, scan, predictor, writer, done, images_per_s)


# -- inputs ---------------------------------------------------------------------------------------


def _source_dir(value: Any) -> Path:
    if value is None or str(value).strip() == "":
        raise UserError("infer.source is not set; give the folder of images to label, e.g. infer.source=path/to/unlabeled")
    p = Path(str(value)).expanduser()
    if not p.exists():
        raise UserError(f"infer.source={value} does not exist; give a folder of images")
    if not p.is_dir():
        raise UserError(f"infer.source={value} is a file; give the folder that holds the images")
    return Path(os.path.abspath(p))


def _refuse_empty(scan: FolderScan, source: Path, recursive: bool) -> None:
    if scan.images or scan.skipped:
        return
    hint = "" if recursive else " (sub-folders are not searched: set infer.recursive=true)"
    others = f"; it holds {len(scan.ignored)} other files, e.g. {scan.ignored[0]}" if scan.ignored else ""
    raise UserError(f"infer.source={source} holds no image files{hint}{others}; "
                    "give a folder of .jpg/.png/... images")


# -- writing ---------------------------------------------------------------------------------------


def _write_small(path: Path, text: str) -> None:
    """Temp name + rename: a killed run leaves whole label files or none (no fsync: speed over power loss)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def yolo_lines(entry: dict[str, Any]) -> str:
    """YOLO label file text of a journal entry (pixel boxes -> normalised centre/size)."""
    w, h = entry["width"], entry["height"]
    return "".join(f"{yolo_line(c, normalize((x1, y1, x2, y2), w, h))}\n" for c, _, x1, y1, x2, y2 in entry["boxes"])


def kitti_lines(entry: dict[str, Any], names: dict[int, str]) -> str:
    """TAO's inference output: type, 3 unused fields, pixel box, 7 unused 3-D fields, confidence."""
    return "".join(f"{kitti_line(names.get(c, f'class{c}'), (x1, y1, x2, y2), conf)}\n"
                   for c, conf, x1, y1, x2, y2 in entry["boxes"])


def identity(path: Path) -> dict[str, Any]:
    """What says an image file is still the one labelled: its byte size and the sha256 of its content.

    A full hash, not size + mtime: a replaced file can keep both (cp -p, rsync -a), and hashing costs
    about 0.6 ms per MB here, a few percent of decoding the same image.
    """
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


class Writer:
    """Label files, image links, annotated images and the journal of one infer run."""

    def __init__(self, run_dir: Path, formats: list[str], save_vis: bool, conf: float):
        self.run_dir, self.formats, self.save_vis, self.conf = run_dir, formats, save_vis, conf
        self.entries: list[dict[str, Any]] = []
        self._dirs: set[Path] = set()
        self._journal = open(run_dir / JOURNAL, "a", encoding="utf-8")  # closed in __exit__
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="vis") if save_vis else None
        self._vis_jobs: list[Any] = []

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            for job in self._vis_jobs:
                job.result()  # surfaces a failed image write
            self._pool.shutdown()
        self._journal.close()

    def _path(self, folder: str, key: str, suffix: str) -> Path:
        p = self.run_dir / folder / f"{key}{suffix}"
        if p.parent not in self._dirs:
            p.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(p.parent)
        return p

    def _files(self, entry: dict[str, Any], item: ImageItem, names: dict[int, str]) -> None:
        if "yolo" in self.formats:
            _write_small(self._path("labels", item.key, ".txt"), yolo_lines(entry))
            dst = self._path("images", item.key, item.path.suffix)
            try:
                os.link(item.path, dst)
            except FileExistsError:
                pass
            except OSError:  # another filesystem, or a file the user may read but not link
                shutil.copyfile(item.path, dst)
        if "kitti" in self.formats:
            _write_small(self._path("labels_kitti", item.key, ".txt"), kitti_lines(entry, names))

    def _log(self, entry: dict[str, Any]) -> None:
        # Written after the label files: a journal line means that image is complete (resume trusts it).
        self._journal.write(json.dumps(entry) + "\n")
        self._journal.flush()
        self.entries.append(entry)

    def write(self, pred: Prediction, names: dict[int, str]) -> None:
        keep = pred.conf >= self.conf
        entry = {
            "path": pred.item.rel, "key": pred.item.key, "width": pred.width, "height": pred.height,
            "boxes": [[int(c), round(float(s), 5), *(round(float(v), 2) for v in b)]
                      for b, s, c in zip(pred.boxes[keep], pred.conf[keep], pred.cls[keep], strict=True)],
            "best": round(float(pred.conf[0]), 5) if len(pred.conf) else None,
            **identity(pred.item.path),
        }
        self._files(entry, pred.item, names)
        if self._pool is not None and pred.image is not None:
            shown = Prediction(pred.item, pred.width, pred.height, pred.boxes[keep], pred.conf[keep], pred.cls[keep])
            self._vis_jobs.append(self._pool.submit(self._draw, pred.image, shown, names,
                                                    self._path("vis", pred.item.key, ".jpg")))
        self._log(entry)

    @staticmethod
    def _draw(image: Any, pred: Prediction, names: dict[int, str], dst: Path) -> None:
        import cv2

        tmp = dst.with_name(f".{dst.stem}.tmp.jpg")
        if not cv2.imwrite(str(tmp), draw_boxes(image, pred, names), [cv2.IMWRITE_JPEG_QUALITY, 90]):
            raise OSError(f"could not write {dst}")
        os.replace(tmp, dst)

    def adopt(self, old: dict[str, Any], old_dir: Path, item: ImageItem, names: dict[int, str]) -> bool:
        """Take one image's results from a failed run's journal; False when they cannot be (no annotated image)."""
        old_vis = old_dir / "vis" / f"{old['key']}.jpg"
        if self.save_vis and not old_vis.is_file():
            return False
        entry = {**old, "key": item.key}
        self._files(entry, item, names)  # label files are rebuilt from the journal: it holds every box
        if self.save_vis:
            shutil.copyfile(old_vis, self._path("vis", item.key, ".jpg"))
        self._log(entry)
        return True


# -- resume ---------------------------------------------------------------------------------------


def _read_journal(path: Path) -> list[dict[str, Any]]:
    entries = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # the line a killed run was writing
            continue
    return entries


def _resume(cfg: Any, ctx: StageContext, source: Path, scan: FolderScan, writer: Writer,
            names: dict[int, str]) -> set[str]:
    """Adopt the images the newest failed infer run on this source finished; their relative paths."""
    model_sha = ctx.input_entry("model")["sha256"]
    for record in reversed(ctx.manifest.runs()):
        if record["stage"] != "infer" or record["status"] != FAILED or record["run_id"] == ctx.run_id:
            continue
        old_dir = ctx.manifest.abs(record["run_dir"])
        old_cfg = (ctx.manifest.config_of(record) or {}).get("infer")
        if not isinstance(old_cfg, dict) or old_cfg.get("source") is None or _source_key(old_cfg["source"]) != str(source):
            continue
        old_model = next((e.get("sha256") for e in record.get("inputs", []) if e.get("role") == "model"), None)
        changed = [k for k in RESUME_KEYS if old_cfg.get(k) != cfg.infer.get(k)]
        if old_model != model_sha or changed:
            why = "another model" if old_model != model_sha else "other settings (" + ", ".join(
                f"infer.{k}: {old_cfg.get(k)} -> {cfg.infer.get(k)}" for k in changed) + ")"
            ctx.warn(f"infer.resume: the newest failed run on this source, {record['run_id']}, used {why}; "
                     "labelling every image again")
            return set()
        items = {it.rel: it for it in scan.images}
        done: set[str] = set()
        replaced: list[str] = []
        for old in _read_journal(old_dir / JOURNAL):
            item = items.get(old.get("path"))
            if item is None or item.rel in done:
                continue
            if not _unchanged(old, item.path):
                replaced.append(item.rel)
            elif writer.adopt(old, old_dir, item, names):
                done.add(item.rel)
        if replaced:
            shown = ", ".join(replaced[:3]) + (" ..." if len(replaced) > 3 else "")
            ctx.warn(f"infer.resume: {len(replaced)} image(s) changed since {record['run_id']} labelled them "
                     f"(size or sha256: {shown}); labelling them again")
        ctx.log.info("infer.resume: %d of %d images already labelled by %s; labelling the other %d",
                     len(done), len(scan.images), record["run_id"], len(scan.images) - len(done))
        ctx.extra["resumed_from"] = record["run_id"]
        return done
    ctx.warn(f"infer.resume=true: no failed infer run on {source} in this results_dir; labelling every image")
    return set()


def _unchanged(old: dict[str, Any], path: Path) -> bool:
    """Whether the file is the one the journal line was written for (a line without identity is not)."""
    try:
        if old.get("bytes") != path.stat().st_size:
            return False
        return old.get("sha256") == sha256_file(path)
    except OSError:
        return False


def _source_key(value: Any) -> str:
    return os.path.abspath(Path(str(value)).expanduser())


# -- the dataset, summary and review list --------------------------------------------------------------


def _split(keys: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """The datasets' seeded split (`seeded_split`); with no validation share, both lists hold every image."""
    val = seeded_split(keys, val_fraction, seed)
    if not val:  # one image or dataset.val_fraction=0: data.yaml still needs a val list
        return keys, keys
    return [k for k in keys if k not in val], [k for k in keys if k in val]


def _write_dataset(cfg: Any, ctx: StageContext, writer: Writer, names: dict[int, str], source: Path) -> Path:
    suffix = {e["key"]: Path(e["path"]).suffix for e in writer.entries}
    keys = sorted(suffix)
    train, val = _split(keys, float(cfg.dataset.val_fraction), int(cfg.seed))
    for name, part in (("train.txt", train), ("val.txt", val)):
        atomic_write_text(ctx.run_dir / name, "".join(f"./images/{k}{suffix[k]}\n" for k in part))
    atomic_write_text(ctx.run_dir / "classes.txt", "".join(f"{names[i]}\n" for i in sorted(names)))
    data = {"train": "train.txt", "val": "val.txt", "nc": len(names), "names": {i: names[i] for i in sorted(names)}}
    header = (f"# Pseudo-labels from stage=infer run {ctx.run_id}\n# source: {source}\n"
              f"# model: {ctx.input_path('model')} (conf >= {cfg.infer.conf})\n"
              "# No `path:`: paths are relative to this file. Check review.txt before training on these labels.\n")
    data_yaml = ctx.run_dir / "data.yaml"
    atomic_write_text(data_yaml, header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return data_yaml


def _warn_if_mostly_empty(ctx: StageContext, entries: list[dict[str, Any]], conf: float) -> None:
    """Most images without a box: say so, with the infer.conf that would give the median image one."""
    empty = sum(1 for e in entries if not e["boxes"])
    if not entries or empty <= EMPTY_WARN * len(entries):
        return
    bests = sorted(e["best"] for e in entries if e["best"] is not None)
    if not bests:
        hint = (f"the model finds nothing even at {BEST_FLOOR}: check that infer.input is a model trained on "
                "images like these")
    else:
        median = bests[(len(bests) - 1) // 2]
        suggest = max(BEST_FLOOR, math.floor(median * 1000) / 1000)  # rounded down: the median image keeps its box
        hint = f"the median best score is {median:.3f}; infer.conf={suggest:g} would give half the images a box"
    ctx.warn(f"{empty} of {len(entries)} images got no box at infer.conf={conf}: {hint}")


def _finish(cfg: Any, ctx: StageContext, source: Path, scan: FolderScan, predictor: Predictor, writer: Writer,
            resumed: set[str], images_per_s: float) -> StageResult:
    names = dict(predictor.names)
    per_class = Counter(c for e in writer.entries for c, *_ in e["boxes"])
    boxes_per_class = {names.get(i, str(i)): per_class.get(i, 0) for i in sorted(set(names) | set(per_class))}
    lo, hi = (float(v) for v in cfg.infer.review_band)
    conf = float(cfg.infer.conf)
    scored = [e for e in writer.entries if e["best"] is not None]
    review = sorted((e for e in scored if lo <= e["best"] <= hi), key=lambda e: (e["best"], e["path"]))
    what = f"whose best detection confidence is in [{lo}, {hi}]"
    if not review and scored:  # none in the band: the ones nearest the threshold are still the ones to check
        review = sorted(scored, key=lambda e: (abs(e["best"] - conf), e["path"]))[:REVIEW_NEAREST]
        what = f"nearest to infer.conf={conf} (none in infer.review_band=[{lo}, {hi}])"
    atomic_write_text(ctx.run_dir / "review.txt",
                      f"# {len(review)} images {what}: check these first\n"
                      "# best_conf\timage (relative to the source folder)\n"
                      + "".join(f"{e['best']:.3f}\t{e['path']}\n" for e in review))
    _warn_if_mostly_empty(ctx, writer.entries, conf)
    metrics = {
        "images": len(writer.entries), "skipped": len(scan.skipped), "boxes": sum(per_class.values()),
        "images_per_s": round(images_per_s, 3), "boxes_per_class": boxes_per_class,
        "images_with_boxes": sum(1 for e in writer.entries if e["boxes"]), "review": len(review),
        "resumed": len(resumed), "ignored_files": len(scan.ignored),
    }
    outputs: list[tuple[str, Path]] = []
    if "yolo" in writer.formats:
        outputs += [("labels", ctx.run_dir / "labels"), ("dataset", _write_dataset(cfg, ctx, writer, names, source))]
    if "kitti" in writer.formats:
        outputs.append(("labels_kitti", ctx.run_dir / "labels_kitti"))
    summary = {
        "source": str(source), "recursive": bool(cfg.infer.recursive), **predictor.describe(),
        "conf": float(cfg.infer.conf), "iou": float(cfg.infer.iou), "review_band": [lo, hi],
        **metrics, "resumed_from": ctx.extra.get("resumed_from"),
        "skipped_files": [{"path": s.rel, "reason": s.reason} for s in scan.skipped],
        "ignored": scan.ignored, "renamed": scan.renamed,
    }
    summary["classes"] = {str(k): v for k, v in names.items()}
    atomic_write_text(ctx.run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    outputs += [("summary", ctx.run_dir / "summary.json"), ("review", ctx.run_dir / "review.txt"),
                ("detections", ctx.run_dir / JOURNAL)]
    ctx.extra["infer"] = {"source": str(source), "backend": predictor.format, "imgsz": list(predictor.imgsz)}
    ctx.log.info("infer: %d images labelled (%d resumed), %d skipped, %d boxes (%s), %.2f images/s; %d to review",
                 metrics["images"], len(resumed), metrics["skipped"], metrics["boxes"],
                 ", ".join(f"{k} {v}" for k, v in boxes_per_class.items()), images_per_s, len(review))
    return StageResult(outputs=outputs, metrics=metrics)
