"""All benchmarks, one command: bench/results/<date>-<host>.json and .md.

    .venv/bin/python bench/run.py [--sections NAME ...] [--chain RESULTS_DIR] [--quick]

Each section is its own script in bench/ (run alone for its options) and runs here as a child
process, one after another (never two at once: timings on a shared machine are noisy enough).
Its JSON lands under "sections" of the day's file; sections run again the same day replace their
entry, the others stay, so one slow section can be redone without redoing the rest. The Markdown
file is rendered from the whole JSON.

--chain: a results dir of a finished default chain (`python -m pipeline results_dir=DIR`): the CPU
engine comparison times its models. Without it, cpu_engines builds one first (about 12 minutes).
--quick: tiny sizes everywhere, to check the harness itself; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from _common import RESULTS, machine  # noqa: E402

# section -> (script, full-size arguments, --quick arguments). Order = run order: the cheap and
# timing-sensitive ones first, the long training comparisons last.
SECTIONS: dict[str, tuple[str, list[str], list[str]]] = {
    "dataset_import": ("dataset_import.py", [], ["--images", "200"]),
    "kmeans": ("kmeans.py", [], ["--boxes", "5000", "--seeds", "1"]),
    "prune_speed": ("prune_speed.py", [], ["--model", "yolov8n", "--repeats", "1"]),
    # Runs on this VM vary by +-10%: enough interleaved pairs that the median ratio resolves 5%.
    "train_overhead": ("train_overhead.py", ["--repeats", "7"], ["--repeats", "1", "--images", "32", "--imgsz", "96"]),
    "infer_throughput": ("infer_throughput.py", ["--backends", "pt", "openvino", "--repeats", "3"],
                         ["--images", "4", "8", "--imgsz", "160", "--repeats", "1"]),
    "cpu_engines": ("cpu_engines.py", ["--build", "--experiment", "default"],
                    ["--build", "--experiment", "smoke", "--imgsz", "160", "--calib-images", "16", "--no-map"]),
    "prune_compare": ("prune_compare.py", ["--build"], ["--build", "--override", "experiment=smoke", "--pth", "0.5"]),
    "threads": ("threads.py", ["--repeats", "2", "--epochs", "2"], ["--experiment", "smoke", "--repeats", "1", "--epochs", "1"]),
    "gpu": ("gpu.py", [], []),
    "gpu_check": ("gpu_check.py", [], []),
}


def run_section(name: str, args: list[str], out: Path) -> dict[str, Any]:
    script = BENCH / SECTIONS[name][0]
    cmd = [sys.executable, str(script.relative_to(BENCH.parent)), *args, "--out", str(out)]
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=BENCH.parent).returncode
    seconds = round(time.perf_counter() - t0, 1)
    if rc != 0 or not out.is_file():
        return {"status": "failed", "returncode": rc, "seconds": seconds, "command": cmd[1:]}
    return {"status": "ok", "seconds": seconds, "command": cmd[1:], "result": json.loads(out.read_text())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    ap.add_argument("--chain", type=Path, help="results dir of a finished default chain (for cpu_engines)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness, figures mean nothing")
    ap.add_argument("--out", type=Path, help="JSON to write (default bench/results/<date>-<host>[-quick].json)")
    a = ap.parse_args()

    stem = f"{datetime.now():%Y-%m-%d}-{platform.node()}" + ("-quick" if a.quick else "")
    out = a.out or RESULTS / f"{stem}.json"
    report: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    report.setdefault("sections", {})
    sections_dir = out.with_suffix("")  # <stem>/<section>.json: each script's own output, kept
    for name in a.sections:
        full, quick = SECTIONS[name][1:]
        args = list(quick if a.quick else full)
        if a.chain and name == "cpu_engines":
            args = [str(a.chain.resolve())] + [x for x in args if x not in ("--build", "--experiment", "default")]
        report["sections"][name] = run_section(name, args, sections_dir / f"{name}.json")
        report.update(machine(), quick=a.quick)
        _save(out, report)  # after every section: a crash late in a long run keeps the rest
    print(f"\nwrote {out} and {out.with_suffix('.md')}")
    failed = [n for n in a.sections if report["sections"][n]["status"] != "ok"]
    if failed:
        print(f"failed sections: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


def _save(out: Path, report: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(report, indent=1) + "\n"), (out.with_suffix(".md"), markdown(report))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


# -- Markdown ---------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(v) for v in r) + " |" for r in rows), ""]


def _dataset_import(r: dict[str, Any]) -> list[str]:
    return [f"{r['images']} images imported and validated in {r['import_validate_s']} s "
            f"({r['images_per_s']} images/s); reuse {r['reuse_s']} s.", ""]


def _kmeans(r: dict[str, Any]) -> list[str]:
    return _table(["seed", "seconds", "steps", "mean IoU", "BPR"],
                  [[x["seed"], x["seconds"], x["steps"], x["mean_iou"], x["bpr"]] for x in r["rows"]])


def _prune_speed(r: dict[str, Any]) -> list[str]:
    return [f"{r['model']}, {r['threads']} threads (goal < {r['goal_s']} s):", "",
            *_table(["mode", "pth", "kept_params_ratio", "median s"],
                    [[x["mode"], x["pth"], x["kept_params_ratio"], x["median_s"]] for x in r["rows"]])]


def _train_overhead(r: dict[str, Any]) -> list[str]:
    line = (f"{r['epochs']} epoch, {r['images']} images at {r['imgsz']} px: ours {r['median_s']['ours']} s, "
            f"plain Ultralytics {r['median_s']['plain']} s (same {r.get('threads', '?')} threads), ratio "
            f"**{r['ratio_ours_over_plain']}** (goal < {r['goal_ratio_below']})")
    if "ratio_ours_over_plain_default_threads" in r:
        line += (f"; plain with Ultralytics' own thread count {r['median_s']['plain_default']} s, ratio "
                 f"{r['ratio_ours_over_plain_default_threads']}")
    return [line + ".", ""]


def _infer_throughput(r: dict[str, Any]) -> list[str]:
    rows = [[b, x["ultralytics"]["marginal_images_per_s"], x["ours"]["marginal_images_per_s"], x["ratio_marginal"],
             x["ratio_end_to_end"]] for b, x in r["results"].items()]
    return [f"{r['images'][1]} images at {r['imgsz']} px, model: {r['model']}", "",
            *_table(["backend", "yolo predict img/s", "ours img/s", "ratio (marginal)", "ratio (end to end)"], rows)]


def _cpu_engines(r: dict[str, Any]) -> list[str]:
    lines = [f"{r.get('cpu_model')}, {r['threads']} threads, batch 1, results dir {r['results_dir']}", ""]
    for size, block in r["sizes"].items():
        lines += [f"{size} px:", "", *_table(
            ["artifact", "runtime", "latency ms", "speedup_vs_unpruned_fp32_onnx", "mAP50-95", "size MB"],
            [[x["name"], x["runtime"], x["latency_ms"], x["speedup_vs_unpruned_fp32_onnx"], x.get("mAP50_95"),
              x.get("size_mb")] for x in block["rows"]])]
        lines += [f"goals: {json.dumps(block.get('goals', {}))}", ""]
    return lines


def _generic(r: dict[str, Any]) -> list[str]:
    if isinstance(r.get("markdown"), str):
        return [r["markdown"], ""]
    if "skipped" in r:
        return [f"skipped: {r['skipped']}", ""]
    return ["```", json.dumps(r, indent=1)[:3000], "```", ""]


RENDER = {"dataset_import": _dataset_import, "kmeans": _kmeans, "prune_speed": _prune_speed,
          "train_overhead": _train_overhead, "infer_throughput": _infer_throughput, "cpu_engines": _cpu_engines}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Benchmarks: {report.get('host')} ({report.get('cpu_model')}, {report.get('cpu_count')} CPUs)", "",
             "Written by `bench/run.py`" + (" --quick (sizes too small to mean anything)" if report.get("quick") else "")
             + ". Each section: its script, when it ran, the machine's load then.", ""]
    for name, sec in report["sections"].items():
        lines += [f"## {name}", ""]
        if sec["status"] != "ok":
            lines += [f"**failed** (exit {sec['returncode']}) after {sec['seconds']} s: `{' '.join(sec['command'])}`", ""]
            continue
        res = sec["result"]
        lines += [f"`{' '.join(sec['command'])}`: {sec['seconds']} s, at {res.get('date')}, "
                  f"load average {res.get('load_average')}", ""]
        try:
            lines += RENDER.get(name, _generic)(res)
        except (KeyError, TypeError) as exc:  # a section's JSON from an older script version
            lines += [f"(cannot render: missing {exc})", *_generic(res)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
