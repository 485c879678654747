"""Pseudo-labelling throughput: `stage=infer` against `yolo predict` on the same model, folder and machine.

    .venv/bin/python bench/infer_throughput.py [--model M] [--images 32 128] [--imgsz 640] [--repeats 2]
                                               [--threads N] [--backends pt onnx openvino]

The folder is the vinid-products images (img/ + test/, web-size photos, 220-1500 px) hard-linked under
new names until it holds the number of images asked for; `--upscale 4032` re-encodes them at phone
camera size instead (decoding then costs as much as it does on real photo folders). The model defaults to an untrained yolov8n with the vinid classes
(speed does not depend on the weights; with --model give any .pt). For each backend the .pt is
exported once with Ultralytics (`format=onnx dynamic=True`, `format=openvino`), so both tools run
the very same file.

Both sides are run as a user runs them, each command in a fresh process, interleaved, equal work:
  ultralytics: yolo predict model=M source=DIR imgsz=S conf=0.3 save=False save_txt=True device=cpu
  ours:        python -m pipeline stage=infer infer.input=M infer.source=DIR infer.imgsz=S infer.formats=[yolo]
Throughput = marginal images/s between two folder sizes ((N2 - N1) / (t2 - t1), median times), which
cancels process start-up and model loading for both; end-to-end wall time at N2 is reported too.
Results go to bench/results/infer_throughput-<date>-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_out, write  # noqa: E402

sys.path.insert(0, str(REPO))
VINID = Path(os.environ.get("PIPELINE_SHARED", REPO.parent / "shared")) / "datasets" / "vinid-products"
NAMES = ["bia", "cafe", "mytom", "nuoctuong", "sua"]


def make_folder(dst: Path, n: int, upscale: int | None = None) -> Path:
    """`n` images: the vinid images hard-linked under unique names, or re-encoded `upscale` px wide."""
    from PIL import Image

    from pipeline.datasets.images import IMAGE_EXTENSIONS

    src = sorted(p for d in ("img", "test") for p in (VINID / d).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not src:
        sys.exit(f"no images under {VINID}; set PIPELINE_SHARED")
    dst.mkdir(parents=True)
    for i in range(n):
        p = src[i % len(src)]
        target = dst / f"{i:05d}_{p.name}"
        if upscale:
            with Image.open(p) as im:
                im = im.convert("RGB")
                im.resize((upscale, round(im.height * upscale / im.width)), Image.Resampling.BICUBIC).save(
                    target.with_suffix(".jpg"), quality=90)
            continue
        try:
            os.link(p, target)
        except OSError:
            shutil.copyfile(p, target)
    return dst


def make_models(work: Path, model: Path | None, imgsz: int, backends: list[str]) -> dict[str, Path]:
    import pipeline  # noqa: F401  (offline Ultralytics)
    from pipeline.models import build_model, save_checkpoint

    if model is None:
        m = build_model("yolov8n", nc=len(NAMES))
        m.names = dict(enumerate(NAMES))
        model = save_checkpoint(m, work / "yolov8n.pt")
    out = {"pt": model}
    from ultralytics import YOLO

    if "onnx" in backends:
        out["onnx"] = Path(YOLO(str(model)).export(format="onnx", imgsz=imgsz, dynamic=True, simplify=True, device="cpu"))
    if "openvino" in backends:
        out["openvino"] = Path(YOLO(str(model)).export(format="openvino", imgsz=imgsz, device="cpu"))
    return {k: v for k, v in out.items() if k in backends}


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return dt


def commands(model: Path, folder: Path, imgsz: int, work: Path, tag: str) -> dict[str, list[str]]:
    venv = Path(sys.executable).parent
    return {
        "ultralytics": [str(venv / "yolo"), "predict", f"model={model}", f"source={folder}", f"imgsz={imgsz}",
                        "conf=0.3", "save=False", "save_txt=True", "device=cpu", "verbose=False",
                        f"project={work / 'yolo'}", f"name={tag}", "exist_ok=True"],
        "ours": [sys.executable, "-m", "pipeline", "stage=infer", f"results_dir={work / 'ours' / tag}",
                 f"infer.input={model}", f"infer.source={folder}", f"infer.imgsz={imgsz}", "infer.conf=0.3",
                 "infer.formats=[yolo]", "device=cpu"],
    }


def our_loop_rate(results: Path) -> float | None:
    """images_per_s our run recorded (the decode -> write loop alone), newest run."""
    try:
        runs = json.loads((results / "manifest.json").read_text())["runs"]
        return runs[-1]["metrics"]["images_per_s"]
    except (OSError, KeyError, IndexError, json.JSONDecodeError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a .pt (default: untrained yolov8n, 5 classes)")
    ap.add_argument("--images", type=int, nargs=2, default=[32, 128], metavar=("N1", "N2"))
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both tools (default: unset)")
    ap.add_argument("--backends", nargs="+", default=["pt"], choices=["pt", "onnx", "openvino"])
    ap.add_argument("--upscale", type=int, help="re-encode the images this wide (JPEG q90), e.g. 4032 for phone photos")
    add_out(ap, "infer_throughput")
    args = ap.parse_args()

    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false", "ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    import pipeline.yolo_env as ye

    env["YOLO_CONFIG_DIR"] = str(ye.config_dir())
    work = Path(tempfile.mkdtemp(prefix="infer-bench-"))
    try:
        n1, n2 = args.images
        folders = {n: make_folder(work / f"images{n}", n, args.upscale) for n in (n1, n2)}
        models = make_models(work, args.model, args.imgsz, args.backends)
        rows = {}
        for backend, model in models.items():
            times: dict[tuple[str, int], list[float]] = {}
            loop: list[float] = []
            for r in range(args.repeats):
                for n in (n1, n2):
                    for tool, cmd in commands(model, folders[n], args.imgsz, work, f"{backend}-{n}-{r}").items():
                        dt = timed(cmd, env, REPO)
                        times.setdefault((tool, n), []).append(dt)
                        if tool == "ours" and n == n2:
                            rate = our_loop_rate(work / "ours" / f"{backend}-{n}-{r}")
                            if rate:
                                loop.append(rate)
                        print(f"{backend:9s} {tool:12s} {n:5d} images  {dt:7.2f} s", flush=True)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {}
            for tool in ("ultralytics", "ours"):
                t1, t2 = med[(tool, n1)], med[(tool, n2)]
                row[tool] = {"seconds": {str(n1): round(t1, 3), str(n2): round(t2, 3)},
                             "marginal_images_per_s": round((n2 - n1) / (t2 - t1), 3) if t2 > t1 else None,
                             "end_to_end_images_per_s": round(n2 / t2, 3)}
            if loop:
                row["ours"]["loop_images_per_s_median"] = round(statistics.median(loop), 3)
            u, o = row["ultralytics"]["marginal_images_per_s"], row["ours"]["marginal_images_per_s"]
            row["ratio_marginal"] = round(o / u, 3) if u and o else None
            row["ratio_end_to_end"] = round(row["ours"]["end_to_end_images_per_s"]
                                            / row["ultralytics"]["end_to_end_images_per_s"], 3)
            rows[backend] = row
            print(f"{backend}: ours/ultralytics = {row['ratio_marginal']}x marginal, "
                  f"{row['ratio_end_to_end']}x end to end ({n2} images)", flush=True)
        report = {
            "date": datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
            "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "imgsz": args.imgsz,
            "images": [n1, n2], "upscale": args.upscale, "repeats": args.repeats, "omp_num_threads": args.threads,
            "model": str(args.model or "untrained yolov8n (5 classes)"), "results": rows,
        }
        write(args.out, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
