"""GPU figures: training speed and PyTorch inference latency (issue 11, item 5).

    .venv/bin/python bench/gpu.py [--runs 100] [--out FILE] [--override KEY=VALUE ...]

On a CUDA GPU: trains the default experiment for 2 epochs on GPU 0 with the pipeline's own
stage=train (images/s = training images / the 2nd epoch's seconds from results.csv, so CUDA
warm-up is left out; the epoch includes Ultralytics' per-epoch validation), times the trained
model in PyTorch (FP32 and FP16, batch 1 and 16, 640 px). TensorRT engines (ours and
Ultralytics', with layer precisions and parity) are bench/gpu_check.py's. Without a
CUDA GPU it writes {"skipped": "no CUDA GPU"} to --out and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_out, write  # noqa: E402

from pipeline.manifest import Manifest  # noqa: E402

IMGSZ = 640
BATCHES = (1, 16)


def compose_cfg(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    from pipeline.config import register

    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def training_speed(work: Path, overrides: list[str]) -> tuple[dict[str, Any], Path]:
    """2 epochs of the default experiment on GPU 0: images/s of the 2nd; returns (figures, best.pt)."""
    from pipeline.runner import run_stage

    cfg = compose_cfg(["stage=train", f"results_dir={work}", "train.epochs=2", "train.device=0", "device=0",
                       *overrides])
    record = run_stage(cfg, "train", [])
    if record["status"] != "succeeded":
        raise RuntimeError(f"stage=train failed: {record.get('error')}")
    with open(Manifest(work).output_path(record, "log"), newline="", encoding="utf-8") as f:
        rows = [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(f)]
    epoch_s = float(rows[-1]["time"]) - float(rows[-2]["time"])  # "time" is cumulative seconds
    images = int(record["dataset"]["images"]["train"])
    return {"train_images": images, "train_imgsz": int(cfg.train.imgsz), "train_batch": int(cfg.train.batch),
            "epoch_seconds": round(epoch_s, 2), "train_images_per_s": round(images / epoch_s, 1),
            "train_record_seconds": record["seconds"], "gpu": torch.cuda.get_device_name(0)}, Manifest(work).output_path(record)


def torch_latency(model_pt: Path, runs: int) -> dict[str, Any]:
    """Median ms of one forward pass (synchronised) at 640 px, FP32 and FP16, batch 1 and 16."""
    from pipeline.engines.common import median_ms
    from pipeline.models import load_model

    out: dict[str, Any] = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16")):
        model = load_model(model_pt).to("cuda", dtype).eval()
        for b in BATCHES:
            x = torch.zeros(b, 3, IMGSZ, IMGSZ, device="cuda", dtype=dtype)

            def once(model: torch.nn.Module = model, x: torch.Tensor = x) -> None:
                with torch.inference_mode():
                    model(x)
                torch.cuda.synchronize()

            out[f"torch_{name}_b{b}_ms"] = median_ms(once, runs)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100, help="timed runs per latency figure (after warm-up)")
    ap.add_argument("--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="Hydra overrides for the training run (default: experiment=default)")
    ap.add_argument("--work", type=Path, default=None, help="results dir for the runs (default: a temporary one)")
    add_out(ap, "gpu")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA GPU", flush=True)
        write(args.out, {"skipped": "no CUDA GPU"})
        return 0
    logging.basicConfig(level=logging.INFO)
    work = (args.work or Path(tempfile.mkdtemp(prefix="bench-gpu-"))).resolve()
    figures, best = training_speed(work, list(args.override))
    print(f"training: {figures['train_images_per_s']} images/s ({figures['gpu']})", flush=True)
    figures |= torch_latency(best, args.runs)
    figures |= {"imgsz": IMGSZ, "runs": args.runs, "torch": torch.__version__, "results_dir": str(work)}
    table = "| figure | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in figures.items())
    print(table)
    write(args.out, {**figures, "markdown": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
