"""One-shot check of an NVIDIA GPU host (issue 23): environment, the smoke chain on CUDA, TensorRT engines.

    PYTHONPATH=$PWD .venv/bin/python bench/gpu_check.py [--out FILE] [--work DIR] [--budget SECONDS]

1. Environment: GPU, driver, CUDA, torch, TensorRT, ModelOpt (and whether modelopt.onnx imports),
   ONNX Runtime and its execution providers.
2. The smoke chain on GPU 0 (`python -m pipeline experiment=smoke stage=all device=0`): every
   stage's status, seconds and headline figures (train, prune, retrain with QAT, export, engine, infer).
3. Where TensorRT is usable: the unpruned trained model and the QAT model exported at 640 px, then
   our engines (fp16, int8 by ModelOpt PTQ, the QAT model's QDQ) through stage=engine, each with
   its build path (typing, AutoCast), per-layer precision counts, parity against ONNX Runtime and
   mAP; and Ultralytics' own `export(format="engine", half=True)` and `int8=True` of the same
   unpruned model. Every engine is timed the same way (pipeline.engines.tensorrt.Runner, real
   images, batch 1 and 8).

Sized for under 8 minutes on one H100/H200; sections that would start after --budget seconds are
skipped and say so. Without a CUDA GPU or TensorRT it records what it skipped and why, and exits 0.
One JSON out (bench/_common.py `write`), with a markdown table of the engines.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_out, write  # noqa: E402

IMGSZ = 640
BATCHES = (1, 8)
ENGINE_BATCH = 8  # engine.max_batch of every engine here, so batch 8 is inside each profile


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception as exc:  # noqa: BLE001 (a broken install is a finding, not a crash)
        return f"not importable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"


def environment() -> dict[str, Any]:
    """What this host offers the pipeline: GPU, driver, CUDA, and the runtimes' versions."""
    import torch

    env: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                   compute_capability=f"{major}.{minor}",
                   gpu_memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    smi = shutil.which("nvidia-smi")
    if smi:
        proc = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30)
        env["driver"] = proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else None
    else:
        env["driver"] = None
    for name in ("tensorrt", "onnxruntime", "openvino", "modelopt", "ultralytics", "onnx"):
        env[name] = _version(name)
    try:
        import modelopt.onnx  # noqa: F401

        env["modelopt_onnx"] = True
    except ImportError as exc:  # ModelOpt's [onnx] extra (onnx-graphsurgeon): PTQ and AutoCast need it
        env["modelopt_onnx"] = f"not importable ({str(exc).splitlines()[0]})"
    try:
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        env["onnxruntime_providers"] = []
    from pipeline.engines import tensorrt as trtb

    env["tensorrt_usable"], env["tensorrt_why"] = trtb.available()
    return env


def cli(work: Path, *overrides: str, timeout: int) -> tuple[bool, str]:
    """`python -m pipeline ...` in a subprocess; (ok, last lines of its output)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline", f"results_dir={work}", *overrides], cwd=REPO,
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s"
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    return proc.returncode == 0, tail


def _newest(work: Path, stage: str) -> dict[str, Any] | None:
    from pipeline.manifest import Manifest

    done = Manifest(work).succeeded(stage)
    return done[-1] if done else None


def _path(work: Path, record: dict[str, Any], role: str = "model") -> Path:
    from pipeline.manifest import Manifest

    return Manifest(work).output_path(record, role)


def _data_yaml(work: Path, record: dict[str, Any]) -> Path:
    from pipeline.manifest import Manifest

    return Manifest(work).abs(next(i for i in record["inputs"] if i["role"] == "dataset")["path"])


CHAIN_FIGURES = ("mAP50_95", "mAP50", "params", "latency_ms", "backend", "precision", "typing", "autocast_fp16",
                 "executed_precision", "layer_precision", "mean_rel_diff_vs_onnx", "images", "qdq_nodes", "eval_batch")


def smoke_chain(work: Path, timeout: int) -> dict[str, Any]:
    """The smoke chain on GPU 0: per stage, status, seconds and its headline figures."""
    from pipeline.manifest import Manifest

    t0 = time.perf_counter()
    ok, tail = cli(work, "experiment=smoke", "stage=all", "device=0", timeout=timeout)
    stages = {}
    for record in Manifest(work).runs():
        m = record.get("metrics") or {}
        stages[record["stage"]] = {"status": record["status"], "seconds": record.get("seconds"),
                                   **{k: m[k] for k in CHAIN_FIGURES if k in m},
                                   **({"error": record.get("error")} if record.get("error") else {})}
    out: dict[str, Any] = {"ok": ok, "seconds": round(time.perf_counter() - t0, 1), "stages": stages}
    if not ok:
        out["output_tail"] = tail
    return out


def _images(data_yaml: Path, n: int) -> Any:
    from pipeline.engines.common import fit_batch, load_batch, split_images

    return fit_batch(load_batch(split_images(data_yaml, "val")[:n], (IMGSZ, IMGSZ)), n)


def time_engine(path: Path, data_yaml: Path, runs: int) -> dict[str, Any]:
    """Median ms at batch 1 and 8 on real validation images, the same way for every engine."""
    from pipeline.engines import tensorrt as trtb

    runner = trtb.Runner(path)
    x = _images(data_yaml, max(BATCHES))
    return {f"b{b}_ms": runner.latency_ms(x[:b], runs) for b in BATCHES}


def export_640(work: Path, model: Path, timeout: int) -> Path:
    ok, tail = cli(work, "experiment=smoke", "stage=export", f"export.input={model}", f"export.imgsz={IMGSZ}",
                   "export.evaluate=false", "device=0", timeout=timeout)
    record = _newest(work, "export")
    if not ok or record is None:
        raise RuntimeError(f"stage=export of {model} failed: {tail}")
    return _path(work, record)


ENGINE_FIGURES = ("typing", "autocast_fp16", "tensorrt_path", "builder_flags", "ptq", "executed_precision",
                  "layer_precision", "max_abs_diff_vs_onnx", "mean_rel_diff_vs_onnx", "mAP50_95", "mAP50",
                  "eval_batch", "profile", "size_mb")


def our_engine(work: Path, onnx: Path, precision: str, data_yaml: Path, runs: int, timeout: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    ok, tail = cli(work, "experiment=smoke", "stage=engine", f"engine.input={onnx}", "engine.backend=tensorrt",
                   f"engine.precision={precision}", f"engine.max_batch={ENGINE_BATCH}", "device=0", timeout=timeout)
    record = _newest(work, "engine")
    if not ok or record is None:  # a failed run leaves the chain's engine as the newest succeeded one
        return {"ok": False, "output_tail": tail}
    m = record["metrics"]
    return {"ok": True, "build_and_check_s": round(time.perf_counter() - t0, 1),
            **{k: m[k] for k in ENGINE_FIGURES if k in m}, **time_engine(_path(work, record), data_yaml, runs)}


def ultralytics_engine(work: Path, pt: Path, data_yaml: Path, int8: bool, runs: int) -> dict[str, Any]:
    """Ultralytics' own TensorRT export of the unpruned model (dynamic, batch up to 8, as ours)."""
    from ultralytics import YOLO

    folder = work / ("ultralytics_int8" if int8 else "ultralytics_fp16")
    folder.mkdir(parents=True, exist_ok=True)
    model_pt = folder / "model.pt"
    shutil.copy2(pt, model_pt)
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"int8": True, "data": str(data_yaml)} if int8 else {"half": True}
    engine = Path(YOLO(str(model_pt)).export(format="engine", imgsz=IMGSZ, dynamic=True, batch=ENGINE_BATCH,
                                             device=0, verbose=False, **kwargs))
    return {"ok": True, "build_s": round(time.perf_counter() - t0, 1), **time_engine(engine, data_yaml, runs)}


def table(engines: dict[str, dict[str, Any]]) -> str:
    rows = ["| engine | typing | executed | int8 / fp16 / fp32 / reformat layers | parity (mean rel) | mAP50-95 "
            "| b1 ms | b8 ms |", "|---|---|---|---|---|---|---|---|"]
    for name, r in engines.items():
        if not r.get("ok"):
            rows.append(f"| {name} | failed or skipped: {r.get('skipped') or r.get('error') or 'see output_tail'} "
                        "| | | | | | |")
            continue
        lp = r.get("layer_precision") or {}
        layers = " / ".join(str(lp.get(k, "")) for k in ("int8", "fp16", "fp32", "reformat")) if lp else ""
        rows.append(f"| {name} | {r.get('typing', '')} | {r.get('executed_precision', '')} | {layers} "
                    f"| {r.get('mean_rel_diff_vs_onnx', '')} | {r.get('mAP50_95', '')} | {r.get('b1_ms')} "
                    f"| {r.get('b8_ms')} |")
    return "\n".join(rows) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100, help="timed runs per latency figure (after warm-up)")
    ap.add_argument("--work", type=Path, default=None, help="results dir for the runs (default: a temporary one)")
    ap.add_argument("--budget", type=float, default=420.0,
                    help="seconds after which no new section starts (the rest is recorded as skipped)")
    add_out(ap, "gpu_check")
    args = ap.parse_args()
    start = time.perf_counter()
    report: dict[str, Any] = {"environment": environment(), "skipped": {}}
    env = report["environment"]
    if not env["cuda_available"]:
        why = "no CUDA GPU is visible to torch"
        report["skipped"] = {"smoke_chain": why, "engines": why, "ultralytics": why}
        print(f"skipped: {why}", flush=True)
        write(args.out, report)
        return 0
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))).resolve()
    report["results_dir"] = str(work)

    def left() -> float:
        return args.budget - (time.perf_counter() - start)

    report["smoke_chain"] = chain = smoke_chain(work, timeout=300)
    print(f"smoke chain: {'ok' if chain['ok'] else 'FAILED'} in {chain['seconds']} s", flush=True)
    if not env["tensorrt_usable"]:
        report["skipped"].update(engines=f"TensorRT is not usable: {env['tensorrt_why']}",
                                 ultralytics=f"TensorRT is not usable: {env['tensorrt_why']}")
    elif _newest(work, "train") is None:
        report["skipped"].update(engines="the smoke chain trained no model", ultralytics="the smoke chain trained no model")
    else:
        train = _newest(work, "train")
        data_yaml = _data_yaml(work, train)
        engines: dict[str, dict[str, Any]] = {}
        sources: dict[str, Path] = {}
        try:
            sources["float"] = export_640(work, _path(work, train), timeout=180)
            retrain = _newest(work, "retrain")
            if retrain is not None:
                sources["qdq"] = export_640(work, _path(work, retrain), timeout=180)
        except RuntimeError as exc:
            report["export_error"] = str(exc)
        plans = [("ours fp16", "float", "fp16"), ("ours int8 (ModelOpt PTQ)", "float", "int8"),
                 ("ours QDQ (QAT)", "qdq", "int8")]
        for name, source, precision in plans:
            if source not in sources:
                engines[name] = {"ok": False, "skipped": f"no {source} ONNX at {IMGSZ} px"}
            elif left() <= 0:
                engines[name] = {"ok": False, "skipped": f"time budget (--budget {args.budget:.0f} s) spent"}
            else:
                engines[name] = our_engine(work, sources[source], precision, data_yaml, args.runs, timeout=240)
            print(f"{name}: {engines[name]}", flush=True)
        for name, int8 in (("ultralytics half=True", False), ("ultralytics int8=True", True)):
            if left() <= 0:
                engines[name] = {"ok": False, "skipped": f"time budget (--budget {args.budget:.0f} s) spent"}
                continue
            try:
                engines[name] = ultralytics_engine(work, _path(work, train), data_yaml, int8, args.runs)
            except Exception as exc:  # noqa: BLE001 (the vendor's export failing is a finding to record)
                engines[name] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            print(f"{name}: {engines[name]}", flush=True)
        report["engines"] = engines
        report["markdown"] = table(engines)
        print(report["markdown"], flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    write(args.out, report)
    failed = not chain["ok"] or any(not r.get("ok") and "skipped" not in r for r in report.get("engines", {}).values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
