"""Write a held-out set for a lineage trained on the embedded synthetic dataset.

    .venv/bin/python bench/heldout_synthetic.py RESULTS OUT [--images 1000] [--seed-offset 1000]

Every stage picks its checkpoint on the val split (Ultralytics' best.pt), so the val mAP of a model
chosen there reads high, and a model built on it without a new choice (NNCF PTQ of the recovered
float checkpoint) inherits that; a model trained further (QAT) does not. A comparison of the two
on val is biased toward PTQ. This draws `--images` new images from the same generator, image size
and classes as the lineage's dataset (its newest train run's config), with the seed moved by
`--seed-offset` so no image is one any seed below that offset trains or validates on, and writes them
as the val split of OUT/data.yaml: `bench/cpu_engines.py RESULTS --map-data OUT/data.yaml`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.datasets.synthetic import generate  # noqa: E402


def lineage_dataset(results: Path) -> tuple[dict, int]:
    """The dataset settings and seed of the newest train run in `results` (its config.yaml)."""
    configs = sorted((results / "train").glob("train-*/config.yaml"))
    if not configs:
        raise SystemExit(f"error: {results} has no train run (train/train-*/config.yaml); run stage=train first")
    cfg = yaml.safe_load(configs[-1].read_text())
    if cfg["dataset"].get("path") is not None:
        raise SystemExit(f"error: {configs[-1].parent.name} trained on {cfg['dataset']['path']}, not the synthetic "
                         "dataset; hold out a split of that data instead (dataset.val_fraction, or a test: split)")
    return cfg["dataset"], int(cfg.get("seed", 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="results dir whose train run used the synthetic dataset")
    ap.add_argument("out", type=Path, help="folder to write (images/, labels/, data.yaml)")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--seed-offset", type=int, default=1000)
    args = ap.parse_args()
    if args.images < 1:
        ap.error("--images must be at least 1")
    ds, seed = lineage_dataset(args.results)
    data = generate(args.out, n_train=1, n_val=args.images, n_unlabeled=0, imgsz=int(ds["synthetic_imgsz"]),
                    n_classes=int(ds["synthetic_classes"]), seed=seed + args.seed_offset)
    print(f"{args.images} held-out images ({ds['synthetic_imgsz']} px, {ds['synthetic_classes']} classes, "
          f"seed {seed + args.seed_offset}): {data}")


if __name__ == "__main__":
    main()
