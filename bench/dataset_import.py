"""Benchmark: import + validate a 5,000-image Darknet flat folder with `pipeline.datasets.prepare`.

Generates the folder once (synthetic images, 320 px JPEG, YOLO labels beside them, classes.txt)
in a temp folder, then times prepare() on it: the first, cold call (scan, header checks, links,
label validation, report) and the second call (listing hash only: the copy is reused).
Prints the figures and writes them as JSON (default bench/results/dataset_import.json).

    .venv/bin/python bench/dataset_import.py [--images 5000] [--imgsz 320] [--out FILE]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_out, write  # noqa: E402

from pipeline.config import DatasetConfig  # noqa: E402
from pipeline.datasets import prepare  # noqa: E402
from pipeline.datasets.synthetic import SHAPES, generate  # noqa: E402


def make_darknet_folder(folder: Path, n: int, imgsz: int) -> None:
    """A flat folder of n images with same-stem .txt labels and classes.txt (from the generator)."""
    staging = folder.parent / "staging"
    generate(staging, n_train=n, n_val=0, n_unlabeled=0, imgsz=imgsz, n_classes=3, seed=0)
    folder.mkdir(parents=True)
    for img in (staging / "images" / "train").iterdir():
        os.replace(img, folder / img.name)
        os.replace(staging / "labels" / "train" / f"{img.stem}.txt", folder / f"{img.stem}.txt")
    (folder / "classes.txt").write_text("\n".join(SHAPES[:3]) + "\n")
    shutil.rmtree(staging)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--imgsz", type=int, default=320)
    add_out(ap, "dataset_import")
    args = ap.parse_args()
    log = logging.getLogger("bench")
    with tempfile.TemporaryDirectory(prefix="bench-dataset-") as tmp:
        src = Path(tmp) / "darknet"
        t0 = time.perf_counter()
        make_darknet_folder(src, args.images, args.imgsz)
        gen_s = time.perf_counter() - t0
        cfg = DatasetConfig(path=str(src))
        t0 = time.perf_counter()
        info = prepare(cfg, Path(tmp) / "results", 0, log)
        cold_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepare(cfg, Path(tmp) / "results", 0, log)
        reuse_s = time.perf_counter() - t0
    result = {
        "images": args.images, "imgsz": args.imgsz, "generate_s": round(gen_s, 2),
        "import_validate_s": round(cold_s, 2), "images_per_s": round(args.images / cold_s, 1),
        "reuse_s": round(reuse_s, 3), "counts": info.counts, "defects": info.defects,
        "cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2), "python": platform.python_version(),
    }
    print(f"generated {args.images} images ({args.imgsz} px) in {gen_s:.1f} s")
    print(f"prepare() import + validation: {cold_s:.2f} s ({result['images_per_s']} images/s); "
          f"reuse: {reuse_s:.3f} s; load average {result['load_avg_1min']} on {result['cpus']} CPUs")
    write(args.out, result)


if __name__ == "__main__":
    main()
