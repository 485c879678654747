"""CPU engines side by side: is ours (pruned + QAT -> OpenVINO) ahead of what a user would do anyway?

    .venv/bin/python bench/cpu_engines.py RESULTS_DIR [--imgsz 96 640] [--threads 2]
    .venv/bin/python bench/cpu_engines.py --build [--experiment smoke] [--sweep "prune.pth=0.5" ...]

RESULTS_DIR holds one or more `stage=all` chains (one trained model; every prune setting run into the
same results dir adds a lineage, the train and control runs are reused). The results dir is only
read; for every image size (default: the model's trained size and 640) the script builds, in a
scratch folder, and times:

  - unpruned FP32 ONNX (`yolo export format=onnx`) on ONNX Runtime             <- the baseline
  - the vendor's INT8 (`yolo export format=openvino int8=True`) on OpenVINO     <- what a user gets
  - Ultralytics' own QAT (`train quantize=8`, our retrain's epoch budget), its QDQ ONNX compiled by
    OpenVINO (`format=openvino` refuses QAT models); a row that says why when it cannot be built
  - the control: the control lineage's engine (the unpruned model through the same retrain/engine)
  - ours: every pruned lineage's engine, labelled with its prune mode and setting
    (the control and ours at a size other than the trained one: our export stage at that size, which
    measures a QAT model's activation ranges again there, `export.recalibrate=auto`)
  - ours without QAT: the same lineage's pruned float model through our export stage -> OpenVINO INT8
    by NNCF PTQ

batch 1, fixed threads, in interleaved blocks (these machines are noisy: compare ratios, never
numbers from different runs), each block of each artifact in a fresh process of its own (two
runtimes, or several compiled models, in one process leave worker threads spinning that slow
whatever runs next: measured 4.2 ms for the FP32 ONNX alone, 4.8 after OpenVINO calls in the same
process, 7.8 in a process holding eight compiled models), median of >= 50 runs after `--warmup` calls per
block (25: with 5, the vendor and the control, one architecture, read 1.89 and 2.40 ms), with each artifact's
own mAP50-95 on the validation split, its executed precision, and speedups vs the vendor, the
unpruned FP32 ONNX and the control. The `goals` block says, per pruned lineage, whether it is
>= 2x the vendor, >= 5x the FP32 ONNX, within 1 mAP50-95 point of the control, and whether its QAT
engine is at least as fast and as accurate as NNCF PTQ of the same model (docs/report.md).
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pipeline  # noqa: E402,F401  (offline Ultralytics, OpenVINO telemetry blocked)
from pipeline.engines import onnxruntime as ortb  # noqa: E402
from pipeline.engines import openvino as ovb  # noqa: E402
from pipeline.engines.common import (  # noqa: E402
    CalibrationSet,
    cpu_flags,
    load_batch,
    onnx_metadata,
    pick,
    split_images,
)
from pipeline.latency import timed_calls  # noqa: E402
from pipeline.manifest import Manifest, Record  # noqa: E402
from pipeline.models import size_mb  # noqa: E402
from stages.report import _kind, recipe_key, retrain_settings  # noqa: E402  (the report's own lineage kinds and recipes)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write  # noqa: E402,I001

BASELINE, VENDOR, ULTRA_QAT, CONTROL = ("unpruned FP32 ONNX", "vendor: unpruned OpenVINO INT8",
                                        "Ultralytics QAT (quantize=8) -> OpenVINO", "control engine")
# The CPU features that decide what INT8 buys (VNNI / AMX) and what the float path runs (AVX-512).
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16")


def run_config(manifest: Manifest, record: Record) -> dict[str, Any]:
    """The resolved config a run was recorded with ({} when it has none)."""
    return manifest.config_of(record) or {}


def prune_label(config: dict[str, Any]) -> str:
    """`threshold pth=0.5`, `target params=0.5`, `latency ratio=0.5 at 640 px`, `... drop_blocks=3`:
    what a prune run asked for."""
    p = config.get("prune", {})
    mode = p.get("mode", "threshold")
    drop = f" drop_blocks={p['drop_blocks']}" if p.get("drop_blocks") else ""
    if mode == "latency":
        at = f" at {p['latency_imgsz']} px" if p.get("latency_imgsz") else ""
        return f"latency ratio={p.get('target_latency_ratio')}{at}{drop}"
    if mode == "target":
        by = "flops" if p.get("target_flops_ratio") is not None else "params"
        return f"target {by}={p.get(f'target_{by}_ratio')}{drop}"
    return f"{mode} pth={p.get('pth')}{drop}"


def discover(results: Path, only: tuple[str, ...] = ()) -> dict[str, Any]:
    """The trained model, the control lineage and every pruned lineage of a results dir.

    A lineage is keyed by its retrain run; its deployable artifact is the newest engine built from
    that retrain's export, else the export's QDQ ONNX (compiled here). Only lineages of the newest
    trained model are kept, so every row is compared with its own control.
    """
    manifest = Manifest(results)
    runs = manifest.runs()
    trains = manifest.succeeded("train")
    if not trains:
        sys.exit(f"{results} has no succeeded train run; run the chain first (or use --build)")
    train = trains[-1]
    lineages: dict[str, dict[str, Any]] = {}
    for record in runs:
        if record["status"] != "succeeded" or record["stage"] not in ("export", "engine"):
            continue
        chain = manifest.lineage(record, runs)
        if chain[-1]["run_id"] != train["run_id"]:
            continue
        by_stage = {r["stage"]: r for r in chain}
        kind = _kind(chain)
        if kind == "unpruned":  # the unpruned FP32 ONNX: its row is exported here at every size
            continue
        retrain = by_stage["retrain"]
        entry = lineages.setdefault(retrain["run_id"], {"kind": kind, "retrain": retrain, "prune": by_stage.get("prune")})
        entry[record["stage"]] = record  # runs are in time order: the newest wins
    for lin in lineages.values():
        settings = retrain_settings(manifest, manifest.lineage(lin["retrain"], runs))
        lin["recipe"] = recipe_key(settings)
        lin["settings"] = settings or {}
    # One control per retrain recipe (the newest): a pruned lineage is compared with its own.
    control = list({v["recipe"]: v for v in lineages.values() if v["kind"] == "control"}.values())
    pruned = [v for v in lineages.values() if v["kind"] == "pruned"]
    if only:  # the lineages asked for by retrain run id (a control of their recipe stays in)
        pruned = [v for v in pruned if v["retrain"]["run_id"] in only]
        recipes = {v["recipe"] for v in pruned}
        control = [v for v in control if v["retrain"]["run_id"] in only or v["recipe"] in recipes]
    differ = recipe_differences([lin["settings"] for lin in control + pruned])
    for lin in control + pruned:
        label = "control" if lin["kind"] == "control" else prune_label(run_config(manifest, lin["prune"]))
        extra = ", ".join(f"{k}={lin['settings'].get(k)}" for k in differ)
        lin["label"] = f"{label} ({extra})" if extra else label
        lin["float"] = manifest.output_of(lin["retrain"], "float_model")
        lin["engine_path"] = manifest.output_of(lin["engine"]) if "engine" in lin else None
        lin["qdq"] = manifest.output_of(lin["export"]) if "export" in lin else None
    data = next(e for e in train["inputs"] if e["role"] == "dataset")
    return {"manifest": manifest, "train": train, "unpruned": manifest.output_of(train),
            "data": manifest.abs(data["path"]),
            "train_config": run_config(manifest, train), "control": control[-1] if control else None,
            "controls": control, "pruned": pruned}


def recipe_differences(settings: list[dict[str, Any]]) -> list[str]:
    """The retrain keys whose values differ between lineages (what their labels must name)."""
    keys = sorted({k for s in settings for k in s})
    return [k for k in keys if len({repr(s.get(k)) for s in settings}) > 1]


def ultralytics_export(pt: Path, work: Path, **kwargs: Any) -> Path:
    """Ultralytics' own export of a copy of `pt` (nothing is written beside the original)."""
    from ultralytics import YOLO

    work.mkdir(parents=True, exist_ok=True)
    copy = work / "model.pt"
    shutil.copyfile(pt, copy)
    return Path(YOLO(str(copy), task="detect").export(device="cpu", verbose=False, **kwargs))


def ultralytics_qat(found: dict[str, Any], work: Path) -> Path | str:
    """Ultralytics' QAT of the unpruned model with our retrain's epoch budget: its checkpoint, or why not."""
    from ultralytics import YOLO

    lin = found["control"] or (found["pruned"] or [None])[0]
    if lin is None:
        return "no retrain run to take the epoch budget from"
    rc = run_config(found["manifest"], lin["retrain"]).get("retrain", {})
    epochs = int(rc.get("epochs", 0)) + int(rc.get("qat_epochs", 0))
    tc = found["train_config"].get("train", {})
    work.mkdir(parents=True, exist_ok=True)
    copy = work / "model.pt"
    shutil.copyfile(found["unpruned"], copy)
    try:
        model = YOLO(str(copy), task="detect")
        model.train(data=str(found["data"]), epochs=epochs, imgsz=tc.get("imgsz", 640), batch=rc.get("batch", 16),
                    workers=0, device="cpu", quantize=8, project=str(work), name="qat", exist_ok=True, plots=False,
                    verbose=False)
        return work / "qat" / "weights" / "last.pt"  # exported per size by build()
    except Exception as exc:  # the row records why it is absent instead of failing the whole bench
        return f"Ultralytics QAT failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def stage_export(pt: Path, data: Path, imgsz: int, results: Path) -> Path:
    """Our export stage's ONNX of `pt` at `imgsz` (QDQ placement rules included), into a scratch results
    dir that the lineages of one size share (the dataset is imported once).

    A lineage's own engine is built at its trained size: Ultralytics' export bakes the Detect decode's
    anchor count into the graph, so another size needs its own export.
    """
    subprocess.run([sys.executable, "-m", "pipeline", "stage=export", f"export.input={pt}", f"export.imgsz={imgsz}",
                    f"dataset.path={data}", f"results_dir={results}", "export.evaluate=false"], check=True, cwd=REPO)
    manifest = Manifest(results)
    return manifest.output_of(manifest.succeeded("export")[-1])


def compile_onnx(onnx: Path, out: Path, qdq: bool, calib: CalibrationSet | None, log: Any) -> Path:
    """An ONNX compiled to an OpenVINO IR folder by our engine stage's builder (QDQ: trained scales)."""
    ovb.build(onnx, out, "int8", qdq, calib, onnx_metadata(onnx), log)
    return out


def build(found: dict[str, Any], imgsz: int, work: Path, calib_images: int,
          qat_onnx: Path | str) -> list[dict[str, Any]]:
    """Every row's artifact at `imgsz` (see module docstring); rows that cannot be built say why."""
    data = found["data"]
    calib = CalibrationSet(pick(split_images(data, "train"), calib_images), (imgsz, imgsz), 8, f"train split of {data}")
    log = SimpleNamespace(info=lambda *a: print(a[0] % a[1:]), warning=lambda *a: print(a[0] % a[1:]))
    rows = [
        {"name": BASELINE, "kind": "baseline", "runtime": "onnxruntime", "precision": "FP32",
         "path": ultralytics_export(found["unpruned"], work / "u_onnx", format="onnx", imgsz=imgsz)},
        {"name": VENDOR, "kind": "vendor", "runtime": "openvino",
         "path": ultralytics_export(found["unpruned"], work / "u_ov", format="openvino", quantize=8, imgsz=imgsz,
                                    data=str(data))},
    ]
    if isinstance(qat_onnx, Path):
        onnx = ultralytics_export(qat_onnx, work / "uq", format="onnx", imgsz=imgsz)
        rows.append({"name": ULTRA_QAT, "kind": "ultralytics_qat", "runtime": "openvino",
                     "path": compile_onnx(onnx, work / "uq_openvino_model", True, None, log)})
    else:
        rows.append({"name": ULTRA_QAT, "kind": "ultralytics_qat", "absent": qat_onnx})
    unpruned_params = found["train"]["metrics"].get("params")  # QAT and INT8 keep the parameter count
    for row in rows:
        if "absent" not in row:
            row["params"] = unpruned_params
    lineages = found["controls"] + found["pruned"]
    for i, lin in enumerate(lineages):
        params = lin["retrain"]["metrics"].get("params")
        name = (CONTROL + lin["label"][len("control"):]) if lin["kind"] == "control" else f"ours: {lin['label']}"
        own_size = (lin.get("engine") or lin.get("export") or {}).get("metrics", {}).get("imgsz")
        if isinstance(own_size, list):  # engines record (height, width)
            own_size = max(own_size)
        if own_size is not None and int(own_size) != imgsz:
            qdq = stage_export(found["manifest"].output_of(lin["retrain"]), data, imgsz, work / "exports")
            path = compile_onnx(qdq, work / f"l{i}_openvino_model", True, None, log)
        elif lin["engine_path"] is not None and Path(lin["engine_path"]).is_dir():
            path = lin["engine_path"]
        elif lin["qdq"] is not None:
            path = compile_onnx(lin["qdq"], work / f"l{i}_openvino_model", True, None, log)
        else:
            rows.append({"name": name, "kind": lin["kind"], "absent": "lineage has neither an engine nor an export"})
            continue
        rows.append({"name": name, "kind": lin["kind"], "label": lin["label"], "runtime": "openvino", "path": path,
                     "params": params, "retrain_run": lin["retrain"]["run_id"], "recipe": lin["recipe"]})
        if lin["kind"] == "pruned" and lin["float"] is not None:
            # Through our export stage, as `retrain.qat=false` would ship it (its C2f convs merged like the QAT one's).
            pruned_onnx = stage_export(lin["float"], data, imgsz, work / "exports")
            rows.append({"name": f"ours without QAT: {lin['label']} NNCF PTQ", "kind": "ptq", "label": lin["label"],
                         "runtime": "openvino", "params": params, "retrain_run": lin["retrain"]["run_id"],
                         "recipe": lin["recipe"],
                         "path": compile_onnx(pruned_onnx, work / f"l{i}_ptq_openvino_model", False, calib, log)})
    return rows


def runner(row: dict[str, Any], x: Any, threads: int) -> Any:
    """A zero-argument callable doing one batch-1 inference of the row's artifact."""
    if row["runtime"] == "onnxruntime":
        sess = ortb.session(row["path"], threads)
        return lambda: ortb.run(sess, x)
    xml = next(Path(row["path"]).glob("*.xml"))
    compiled = ovb.compile_static(xml, x.shape, threads)
    executed = ovb.executed_precision(compiled)
    row["precision"] = executed["executed_precision"]
    row["inference_precision_hint"] = executed["inference_precision_hint"]
    return lambda: ovb.infer(compiled, x)


def time_block(row: dict[str, Any], x: Any, threads: int, warmup: int, runs: int) -> tuple[list[float], dict[str, Any]]:
    """One block: the row's artifact loaded in this (fresh) process, `warmup` calls, then `runs` timed
    calls (ms); plus what the runtime says it executes."""
    row = dict(row)
    out = timed_calls(runner(row, x, threads), runs, warmup)
    return out, {k: row[k] for k in ("precision", "inference_precision_hint") if k in row}


def time_interleaved(rows: list[dict[str, Any]], x: Any, threads: int, blocks: int, per_block: int,
                     warmup: int = 25) -> None:
    """Per-call times for every row, in blocks that rotate the order, each block in a fresh process
    (module docstring); fills latency figures in place."""
    times: list[list[float]] = [[] for _ in rows]
    block_medians: list[list[float]] = [[] for _ in rows]
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn, max_tasks_per_child=1) as pool:
        for b in range(blocks):
            order = list(range(len(rows)))[b % len(rows):] + list(range(len(rows)))[: b % len(rows)]
            for i in order:
                spec = {k: rows[i][k] for k in ("runtime", "path")}
                block, facts = pool.submit(time_block, spec, x, threads, warmup, per_block).result()
                rows[i].update(facts)
                times[i] += block
                block_medians[i].append(statistics.median(block))
    for row, t, bm in zip(rows, times, block_medians, strict=True):
        row.update(latency_ms=round(statistics.median(t), 3), best_block_median_ms=round(min(bm), 3), runs=len(t))


def evaluate_rows(rows: list[dict[str, Any]], data: Path, imgsz: int) -> None:
    from pipeline.evaluation import evaluate

    for row in rows:
        res = evaluate(str(row["path"]), data, split="val", imgsz=imgsz, batch=1, device="cpu")
        row.update(mAP50=res["mAP50"], mAP50_95=res["mAP50_95"])


def control_of(row: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The timed control row retrained with the row's recipe (else the only or newest control)."""
    controls = [r for r in rows if r.get("kind") == "control" and "latency_ms" in r]
    same = [r for r in controls if r.get("recipe") == row.get("recipe")]
    return (same or controls or [None])[-1]


def speedups(rows: list[dict[str, Any]]) -> None:
    """Each timed row's speedup over the vendor, the unpruned FP32 ONNX and its control (None when absent)."""
    ref = {k: next((r["latency_ms"] for r in rows if r.get("kind") == k and "latency_ms" in r), None)
           for k in ("vendor", "baseline")}
    for row in rows:
        if "latency_ms" in row:
            control = control_of(row, rows)
            for k, name in (("vendor", "vendor"), ("baseline", "unpruned_fp32_onnx")):
                row[f"speedup_vs_{name}"] = round(ref[k] / row["latency_ms"], 3) if ref[k] else None
            row["speedup_vs_control"] = round(control["latency_ms"] / row["latency_ms"], 3) if control else None


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per pruned lineage: >= 2x the vendor, >= 5x the FP32 ONNX, mAP50-95 >= control - 1 point,
    and its QAT engine at least as fast and as accurate as NNCF PTQ of the same model; figures too."""
    out: dict[str, Any] = {}
    for row in rows:
        if row.get("kind") != "pruned" or "latency_ms" not in row:
            continue
        control = control_of(row, rows)
        g: dict[str, Any] = {"vs_vendor": row["speedup_vs_vendor"], "vs_unpruned_fp32_onnx": row["speedup_vs_unpruned_fp32_onnx"]}
        g["vs_vendor_met"] = g["vs_vendor"] is not None and g["vs_vendor"] >= 2.0
        g["vs_unpruned_fp32_onnx_met"] = g["vs_unpruned_fp32_onnx"] is not None and g["vs_unpruned_fp32_onnx"] >= 5.0
        if control is not None and "mAP50_95" in row and "mAP50_95" in control:
            g["mAP50_95_points_vs_control"] = round(100 * (row["mAP50_95"] - control["mAP50_95"]), 2)
            g["accuracy_vs_control_met"] = g["mAP50_95_points_vs_control"] >= -1.0
        ptq = next((r for r in rows if r.get("kind") == "ptq" and r.get("retrain_run") == row.get("retrain_run")
                    and "latency_ms" in r), None)
        if ptq is not None:
            g["qat_vs_ptq_speed"] = round(ptq["latency_ms"] / row["latency_ms"], 3)
            g["qat_vs_ptq_speed_met"] = g["qat_vs_ptq_speed"] >= 1.0
            if "mAP50_95" in row and "mAP50_95" in ptq:
                g["mAP50_95_points_vs_ptq"] = round(100 * (row["mAP50_95"] - ptq["mAP50_95"]), 2)
                g["accuracy_vs_ptq_met"] = g["mAP50_95_points_vs_ptq"] >= 0.0
        g["all_met"] = all(v for k, v in g.items() if k.endswith("_met"))
        out[row["name"]] = g
    return out


def markdown(imgsz: int, rows: list[dict[str, Any]], goal: dict[str, Any]) -> str:
    """The rows and goals as markdown tables."""
    def f(v: Any, spec: str = ".2f") -> str:
        return "-" if v is None else format(v, spec)

    def x(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}x"

    lines = [f"\n### {imgsz} px, batch 1, interleaved\n",
             "| artifact | runtime | precision | ms | mAP50-95 | MB | vs vendor | vs FP32 ONNX | vs control |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "absent" in r:
            lines.append(f"| {r['name']} | absent: {r['absent']} | | | | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['runtime']} | {r.get('precision', '-')} | {f(r.get('latency_ms'))} | "
                     f"{f(r.get('mAP50_95'), '.3f')} | {f(r.get('size_mb'))} | {x(r.get('speedup_vs_vendor'))} | "
                     f"{x(r.get('speedup_vs_unpruned_fp32_onnx'))} | {x(r.get('speedup_vs_control'))} |")
    lines += ["\n| goal (pruned lineage) | vs vendor >= 2x | vs FP32 ONNX >= 5x | mAP vs control >= -1 pt "
              "| QAT vs PTQ speed >= 1x | mAP vs PTQ >= 0 | all |", "|---|---|---|---|---|---|---|"]
    def cell(g: dict[str, Any], fig: str, met: str, unit: str = "x") -> str:
        return f"{f(g.get(fig))}{unit} {'yes' if g.get(met) else 'no'}" if fig in g else "-"

    for name, g in goal.items():
        lines.append(f"| {name} | {cell(g, 'vs_vendor', 'vs_vendor_met')} | "
                     f"{cell(g, 'vs_unpruned_fp32_onnx', 'vs_unpruned_fp32_onnx_met')} | "
                     f"{cell(g, 'mAP50_95_points_vs_control', 'accuracy_vs_control_met', ' pt')} | "
                     f"{cell(g, 'qat_vs_ptq_speed', 'qat_vs_ptq_speed_met')} | "
                     f"{cell(g, 'mAP50_95_points_vs_ptq', 'accuracy_vs_ptq_met', ' pt')} | "
                     f"{'yes' if g['all_met'] else 'no'} |")
    return "\n".join(lines)


def recipe(found: dict[str, Any]) -> dict[str, Any]:
    """Each lineage's chain as run: stage -> that stage's config section and the command-line overrides."""
    manifest = found["manifest"]
    out: dict[str, Any] = {}
    for lin in found["controls"] + found["pruned"]:
        leaf = lin.get("engine") or lin.get("export") or lin["retrain"]
        out[lin["label"]] = {r["stage"]: {"run_id": r["run_id"], "overrides": r.get("overrides", []),
                                          "config": run_config(manifest, r).get(r["stage"])}
                             for r in reversed(manifest.lineage(leaf))}
    return out


def build_chain(results: Path, experiment: str, sweep: list[str]) -> None:
    """`stage=all` into `results`, then once per sweep entry with its overrides (train and control are reused)."""
    for extra in [""] + sweep:
        subprocess.run([sys.executable, "-m", "pipeline", "stage=all", f"experiment={experiment}",
                        f"results_dir={results}", *shlex.split(extra)], cwd=REPO, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="?", type=Path, help="results dir of one or more stage=all chains")
    ap.add_argument("--build", action="store_true", help="run `stage=all` first (into RESULTS, else a scratch dir)")
    ap.add_argument("--experiment", default="smoke", help="experiment preset for --build")
    ap.add_argument("--sweep", nargs="*", default=[], help='with --build: extra lineages, each one quoted set of '
                    'overrides, e.g. "prune.pth=0.5" "prune.mode=latency prune.target_latency_ratio=0.5"')
    ap.add_argument("--imgsz", type=int, nargs="+", help="input sizes (default: the trained size and 640)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=5, help="interleaved timing blocks")
    ap.add_argument("--per-block", type=int, default=12, help="timed runs per artifact per block")
    ap.add_argument("--warmup", type=int, default=25, help="untimed calls before each block (a fresh process "
                    "runs its first calls slower: 5 left rows of one architecture 27%% apart)")
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--no-map", action="store_true", help="skip the mAP evaluations")
    ap.add_argument("--map-data", type=Path, help="data.yaml whose val split the mAP is measured on instead of the "
                    "lineage's own (its checkpoints were chosen on that one: a held-out set reads without that bias; "
                    "bench/heldout_synthetic.py writes one)")
    ap.add_argument("--no-ultralytics-qat", action="store_true", help="skip training Ultralytics' own QAT row")
    ap.add_argument("--only", nargs="*", default=[], help="retrain run ids of the lineages to bench (default: all)")
    ap.add_argument("--tag", default="", help="suffix of the default JSON name")
    ap.add_argument("--out", type=Path, help="JSON to write (default bench/results/cpu_engines-<date>-<host>[-tag].json)")
    args = ap.parse_args()
    if args.blocks * args.per_block < 50:
        ap.error("--blocks x --per-block must give at least 50 timed runs")
    if args.sweep and not args.build:
        ap.error("--sweep needs --build")
    out = args.out or RESULTS / f"cpu_engines-{datetime.now():%Y-%m-%d}-{platform.node()}{'-' + args.tag if args.tag else ''}.json"

    results = args.results or Path(tempfile.mkdtemp(prefix="bench-chain-"))
    if args.build or args.results is None:
        build_chain(results, args.experiment, args.sweep)
    found = discover(results, tuple(args.only))
    trained = found["train_config"].get("train", {}).get("imgsz", 640)
    sizes = args.imgsz or list(dict.fromkeys([int(trained), 640]))
    flags = cpu_flags()
    report: dict[str, Any] = {
        # date, host, CPU model and load average come from _common.machine()
        "cpu_flags": sorted(f for f in FLAGS if f in flags),
        "threads": args.threads, "warmup": args.warmup, "batch": 1, "results_dir": str(results), "train_run": found["train"]["run_id"],
        "recipe": recipe(found),
        "versions": {m: __import__(m).__version__ for m in ("onnxruntime", "openvino", "ultralytics", "torch")},
        "sizes": {},
    }
    map_data = found["data"]
    if args.map_data is not None:
        if not args.map_data.is_file():
            ap.error(f"--map-data {args.map_data} is not a data.yaml file")
        map_data = args.map_data.resolve()
        report["map_data"] = str(map_data)
    with tempfile.TemporaryDirectory(prefix="bench-cpu-engines-") as tmp:
        qat = ("skipped (--no-ultralytics-qat)" if args.no_ultralytics_qat
               else ultralytics_qat(found, Path(tmp) / "ultralytics_qat"))
        for imgsz in sizes:
            rows = build(found, imgsz, Path(tmp) / str(imgsz), args.calib_images, qat)
            timed = [r for r in rows if "absent" not in r]
            x = load_batch(split_images(found["data"], "val")[:1], (imgsz, imgsz))
            time_interleaved(timed, x, args.threads, args.blocks, args.per_block, args.warmup)
            if not args.no_map:
                evaluate_rows(timed, map_data, imgsz)
            speedups(rows)
            for row in timed:
                row["size_mb"] = size_mb(row["path"])
                row["path"] = Path(row["path"]).name
            goal = goals(rows)
            report["sizes"][str(imgsz)] = {"rows": rows, "goals": goal}
            print(markdown(imgsz, rows, goal))
    write(out, report)


if __name__ == "__main__":
    main()
