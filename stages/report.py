"""stage=report: the manifest as a table, Markdown, CSV and plots; `report.verify=true` re-hashes artifacts.

Not a recorded stage: it reads `<results_dir>/manifest.json` through `pipeline.manifest.Manifest`
and writes `<results_dir>/report/` (report.md, report.csv, PNG plots), replacing the previous
report. See docs/report.md.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.manifest import (
    FAILED,
    RUNNING,
    SUCCEEDED,
    Manifest,
    Record,
    atomic_write_bytes,
    atomic_write_text,
    recorded_config,
)
from stages import STAGES

MODEL_KEYS = ("mAP50", "mAP50_95", "params", "gflops", "size_mb")
# (column, header, format) of the model table, in order.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("run_id", "run_id", "s"),
    ("stage", "stage", "s"),
    ("from", "from", "s"),
    ("pth", "pth", "g"),
    ("imgsz", "imgsz", "s"),
    ("kept_params_ratio", "kept_params_ratio", ".3f"),
    ("params", "params", ",d"),
    ("gflops", "GFLOPs", ".2f"),
    ("size_mb", "size_MB", ".2f"),
    ("mAP50", "mAP50", ".4f"),
    ("mAP50_95", "mAP50-95", ".4f"),
    ("latency_ms", "latency_ms", ".2f"),
    ("kind", "lineage", "s"),
    ("mAP50_95_vs_control", "mAP50-95 - control", "+.4f"),
    ("speedup_vs_control", "x control", ".2f"),
    ("speedup_vs_fp32_onnx", "x FP32 ONNX", ".2f"),
    ("precision", "precision", "s"),
    ("backend", "backend", "s"),
    ("seconds", "seconds", ".1f"),
)
OTHER_METRICS = 6  # scalar metrics shown for runs without model figures (kmeans, infer, ...)
STAGE_MARKERS = {"train": "s", "evaluate": "D", "prune": "v", "retrain": "^", "export": "o", "engine": "*"}


# -- reading the manifest --------------------------------------------------------------------------

def _prune_setting(record: dict[str, Any], root: Path) -> float | str | None:
    """The pth of a prune run: its metrics, else its run folder's config.yaml (target mode: 'target=R',
    'target_flops=F'; latency mode: 'latency=L', 'latency=L@640' when timed at another size than
    trained); ' drop_blocks=N' follows when depth pruning removed N bottlenecks."""
    m = record.get("metrics", {})
    dropped = len(m.get("blocks_dropped") or [])
    setting = _channel_setting(record, root)
    if not dropped:
        return setting
    return f"{setting:g} drop_blocks={dropped}" if isinstance(setting, float) else f"{setting} drop_blocks={dropped}"


def _channel_setting(record: dict[str, Any], root: Path) -> float | str | None:
    m = record.get("metrics", {})
    if m.get("pth") is not None and m.get("mode", "threshold") == "threshold":
        return m["pth"]
    if m.get("mode") == "target" and m.get("target_flops_ratio") is not None:
        return f"target_flops={m['target_flops_ratio']:g}"
    if m.get("mode") == "latency" and m.get("target_latency_ratio") is not None:
        at = m.get("latency_imgsz")
        return f"latency={m['target_latency_ratio']:g}" + (f"@{at}" if at and at != m.get("imgsz") else "")
    if m.get("mode") == "target" and m.get("target_params_ratio") is not None:
        return f"target={m['target_params_ratio']:g}"
    config = recorded_config(record, root)
    if config is None:
        return m.get("pth")
    prune = config.get("prune") or {}
    if prune.get("mode") == "target" and prune.get("target_params_ratio") is not None:
        return f"target={prune['target_params_ratio']:g}"
    return prune.get("pth")


def _precision(record: dict[str, Any]) -> str | None:
    """Numeric precision of the model artifact (the detection-precision metric is a float: skipped)."""
    m = record.get("metrics", {})
    value = m.get("precision")
    if isinstance(value, str):
        executed = m.get("executed_precision")
        return f"{value} (ran {executed})" if isinstance(executed, str) and executed != value else value
    if record["stage"] == "export":
        return "int8 (QDQ)" if m.get("qdq_nodes") else "fp16" if m.get("half") else "fp32"
    return None


def _backend(record: dict[str, Any]) -> str | None:
    m = record.get("metrics", {})
    if isinstance(m.get("backend"), str):
        return m["backend"]
    # stage=export times its ONNX file with ONNX Runtime (docs/report.md)
    return "onnxruntime" if record["stage"] == "export" and m.get("latency_ms") is not None else None


def _rows(manifest: Manifest, runs: list[Record], succeeded: list[Record]) -> list[dict[str, Any]]:
    """One row per succeeded run that carries model figures, oldest first."""
    rows = []
    for r in succeeded:
        m = r.get("metrics", {})
        if not any(m.get(k) is not None for k in MODEL_KEYS):
            continue
        chain = manifest.lineage(r, runs)
        prune = next((a for a in chain if a["stage"] == "prune"), None)
        train = next((a for a in chain if a["stage"] == "train"), None)
        kept = m.get("kept_params_ratio")
        if kept is None:
            kept = next((a["metrics"]["kept_params_ratio"] for a in chain
                         if a.get("metrics", {}).get("kept_params_ratio") is not None), None)
        if kept is None and train is not None and m.get("params") and train.get("metrics", {}).get("params"):
            kept = m["params"] / train["metrics"]["params"]
        rows.append({
            "run_id": r["run_id"], "stage": r["stage"], "from": Manifest.parent_id(r),
            "pth": _prune_setting(prune, manifest.root) if prune is not None else None,
            "kept_params_ratio": kept, "imgsz": _imgsz(m.get("imgsz")),
            **{k: m.get(k) for k in (*MODEL_KEYS, "latency_ms")},
            "precision": _precision(r), "backend": _backend(r), "seconds": r.get("seconds"),
            "lineage": [a["run_id"] for a in reversed(chain)],
            "kind": _kind(chain), "train_run": train["run_id"] if train is not None else None,
            "recipe": retrain_recipe(manifest, chain),
        })
    _compare_with_control(rows)
    return rows


def _imgsz(value: Any) -> str | None:
    """The input size a run's figures are at: 96, or 96x128 (height x width) when not square."""
    if isinstance(value, (list, tuple)):
        return str(value[0]) if len(set(value)) == 1 else "x".join(map(str, value))
    return None if value is None else str(value)


def _kind(chain: list[Record]) -> str:
    """What a lineage is: pruned; the equal-budget control (retrained unpruned); the unpruned model itself."""
    stages = {a["stage"] for a in chain}
    if "prune" in stages:
        return "pruned"
    return "control" if "retrain" in stages else "unpruned"


# Retrain keys that do not change the training budget or recipe (where it ran, what it read).
_NOT_RECIPE = ("input", "device", "workers", "threads")


def retrain_settings(manifest: Manifest, chain: list[Record]) -> dict[str, Any] | None:
    """A lineage's retrain recipe: its retrain run's `retrain.*` config, less the input and where it ran;
    None without a retrain run or its config.yaml."""
    retrain = next((a for a in chain if a["stage"] == "retrain"), None)
    config = manifest.config_of(retrain) if retrain is not None else None
    if config is None:
        return None
    return {k: v for k, v in (config.get("retrain") or {}).items() if k not in _NOT_RECIPE}


def recipe_key(settings: dict[str, Any] | None) -> str | None:
    """Retrain settings as a comparable string (None when unknown)."""
    return None if settings is None else repr(sorted(settings.items()))


def retrain_recipe(manifest: Manifest, chain: list[Record]) -> str | None:
    """`retrain_settings` as a comparable string (None when unknown)."""
    return recipe_key(retrain_settings(manifest, chain))


def _compare_with_control(rows: list[dict[str, Any]]) -> None:
    """mAP50-95 minus the control's, and speedups over the control's engine and the unpruned FP32 ONNX.

    Within one trained model's family of lineages: a pruned row is compared with the newest control
    row of the same stage (retrain with retrain, engine with engine) **retrained with the same recipe**
    (`retrain_recipe`: a results dir holding a sweep over retrain.distill or retrain.epochs has one
    control per recipe, and a control with another budget is no control); speedups are quoted against
    that control's engine and the newest unpruned float export (ONNX Runtime, batch 1), as measured by
    their own stages.
    """
    def newest(row: dict[str, Any], kind: str, stage: str, ok=lambda r: True) -> dict[str, Any] | None:
        found = [r for r in rows if r["train_run"] == row["train_run"] and r["kind"] == kind and r["stage"] == stage
                 and (kind != "control" or row.get("recipe") is None or r.get("recipe") == row["recipe"]) and ok(r)]
        return found[-1] if found else None

    for row in rows:
        if row["kind"] == "unpruned" and row["stage"] == "train":
            continue
        control = newest(row, "control", row["stage"])
        if control is not None and row["mAP50_95"] is not None and control["mAP50_95"] is not None:
            row["mAP50_95_vs_control"] = row["mAP50_95"] - control["mAP50_95"]
        latency = row.get("latency_ms")
        if not latency:
            continue
        engine = newest(row, "control", "engine", lambda r: bool(r.get("latency_ms")))
        fp32 = newest(row, "unpruned", "export",
                      lambda r: bool(r.get("latency_ms")) and str(r.get("precision")).startswith("fp32"))
        if engine is not None:
            row["speedup_vs_control"] = engine["latency_ms"] / latency
        if fp32 is not None:
            row["speedup_vs_fp32_onnx"] = fp32["latency_ms"] / latency


# -- formatting ------------------------------------------------------------------------------------

def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "s" or isinstance(value, str):
        return str(value)
    try:
        return format(int(value) if fmt.endswith("d") else float(value), fmt)
    except (TypeError, ValueError):
        return str(value)


def _table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = [h for _, h, _ in COLUMNS]
    return headers, [[_cell(row.get(key), fmt) for key, _, fmt in COLUMNS] for row in rows]


def text_table(headers: list[str], cells: list[list[str]]) -> str:
    """Aligned plain-text table: text left, numbers right."""
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(_is_number(c[i]) for c in cells) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return text == "-"


def markdown_table(headers: list[str], cells: list[list[str]]) -> str:
    def esc(v: str) -> str:
        return v.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(esc(c) for c in row) + " |" for row in cells])


def _scalars(metrics: dict[str, Any]) -> str:
    items = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items[:OTHER_METRICS])


# -- plots -----------------------------------------------------------------------------------------

def _label(row: dict[str, Any]) -> str:
    return f"pth={row['pth']:g}" if isinstance(row["pth"], (int, float)) else str(row["pth"] or "unpruned")


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _figure() -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.grid(alpha=0.3)
    ax.margins(0.15)  # room for the point labels
    return fig, ax


def plot_map_vs_kept(rows: list[dict[str, Any]], path: Path) -> bool:
    """mAP50-95 against kept params: one line per prune lineage (prune -> retrain -> export -> engine)."""
    points = [r for r in rows if r["mAP50_95"] is not None and r["kept_params_ratio"] is not None
              and r["stage"] != "evaluate"]
    if not points:
        return False
    fig, ax = _figure()
    by_id = {r["run_id"]: r for r in rows}
    lineages: dict[str, list[dict[str, Any]]] = {}
    for r in points:
        # a prune run and everything built on it; unpruned artifacts group under their train run
        prune_id = next((rid for rid in r["lineage"] if by_id.get(rid, {}).get("stage") == "prune"), None)
        lineages.setdefault(prune_id or r["lineage"][0], []).append(r)
    for members in lineages.values():
        xs = [m["kept_params_ratio"] for m in members]
        ys = [m["mAP50_95"] for m in members]
        line = ax.plot(xs, ys, "-", alpha=0.5)[0] if len(members) > 1 else None
        colour = line.get_color() if line is not None else "tab:gray"
        for m in members:
            ax.scatter(m["kept_params_ratio"], m["mAP50_95"], marker=STAGE_MARKERS.get(m["stage"], "o"),
                       color=colour, s=50, zorder=3)
        best = max(members, key=lambda m: m["mAP50_95"])
        ax.annotate(_label(best), (best["kept_params_ratio"], best["mAP50_95"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    for stage in STAGES:  # the legend in pipeline order
        if stage in STAGE_MARKERS and any(p["stage"] == stage for p in points):
            ax.scatter([], [], marker=STAGE_MARKERS[stage], color="black", label=stage)
    ax.set_xlabel("kept params (fraction of the trained model)")
    ax.set_ylabel("mAP50-95")
    ax.set_title("accuracy vs size")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_map_vs_latency(rows: list[dict[str, Any]], path: Path) -> bool:
    """mAP50-95 against batch-1 latency of every artifact that was timed."""
    points = [r for r in rows if r["mAP50_95"] is not None and r["latency_ms"] is not None]
    if not points:
        return False
    fig, ax = _figure()
    for r in points:
        ax.scatter(r["latency_ms"], r["mAP50_95"], marker=STAGE_MARKERS.get(r["stage"], "o"), s=50, zorder=3)
        runtime = " ".join(v for v in (r["backend"], r["precision"]) if v)
        ax.annotate(f"{_label(r)} {runtime}".strip(), (r["latency_ms"], r["mAP50_95"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    ax.set_xlabel("latency (ms, batch 1)")
    ax.set_ylabel("mAP50-95")
    ax.set_title("accuracy vs latency")
    _save(fig, path)
    return True


# -- verify ----------------------------------------------------------------------------------------

def verify(manifest: Manifest, succeeded: list[dict[str, Any]]) -> tuple[int, list[dict[str, str]]]:
    """Re-hash every output of every succeeded run: (artifacts checked, [{run_id, path, problem}])."""
    checked, problems = 0, []
    for r in succeeded:
        for entry in r.get("outputs", []):
            checked += 1
            if not manifest.abs(entry["path"]).exists():
                problems.append({"run_id": r["run_id"], "path": entry["path"], "problem": "missing"})
                continue
            try:
                manifest.verify_artifact(entry)
            except UserError:
                problems.append({"run_id": r["run_id"], "path": entry["path"], "problem": "modified"})
    return checked, problems


# -- the command -----------------------------------------------------------------------------------

def run_report(cfg: Any) -> dict[str, Any]:
    """Print the runs of `cfg.results_dir` and write report.md, report.csv and plots to `<results_dir>/report/`."""
    root = Path(str(cfg.results_dir)).expanduser()
    if not Manifest.found_in(root):
        raise UserError(f"no runs in {root}; run a stage first (or set results_dir=)")
    manifest = Manifest(root)
    runs = manifest.runs()
    if not runs:
        raise UserError(f"no runs in {root}; run a stage first (or set results_dir=)")
    succeeded = [r for r in runs if r["status"] == SUCCEEDED]
    failed = [r for r in runs if r["status"] == FAILED]
    running = [r for r in runs if r["status"] == RUNNING]
    rows = _rows(manifest, runs, succeeded)
    model_ids = {row["run_id"] for row in rows}
    others = [r for r in succeeded if r["run_id"] not in model_ids]
    headers, cells = _table(rows)

    out = manifest.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    plots: list[Path] = []
    if cfg.report.plots:
        for name, draw in (("map_vs_kept_params.png", plot_map_vs_kept), ("map_vs_latency.png", plot_map_vs_latency)):
            if draw(rows, out / name):
                plots.append(out / name)
            elif (out / name).exists():
                (out / name).unlink()  # a stale plot from an earlier report would mislead
    checked, problems = verify(manifest, succeeded) if cfg.report.verify else (0, [])

    console = _console(manifest.root, headers, cells, others, succeeded, failed, running, checked, problems,
                       cfg.report.verify)
    print(console)
    atomic_write_text(out / "report.csv", _csv(rows))
    atomic_write_text(out / "report.md", _markdown(manifest.root, headers, cells, rows, others, failed, running,
                                                   succeeded, plots, checked, problems, cfg.report.verify))
    if problems:
        listed = ", ".join(f"{p['path']} ({p['problem']})" for p in problems)
        raise UserError(f"report.verify: {len(problems)} of {checked} artifacts no longer match the manifest: {listed}; "
                        "rerun the stages that made them")
    return {"rows": rows, "others": [r["run_id"] for r in others], "failed": [r["run_id"] for r in failed],
            "running": [r["run_id"] for r in running], "files": [out / "report.md", out / "report.csv", *plots],
            "verified": checked, "problems": problems}


def _console(root: Path, headers, cells, others, succeeded, failed, running, checked, problems,
             verified: bool) -> str:
    parts = [f"runs in {root}", text_table(headers, cells) if cells else "(no run with model figures yet)"]
    if others:
        parts.append("other runs:\n" + "\n".join(f"  {r['run_id']}: {_scalars(r.get('metrics', {}))}" for r in others))
    warned = [(r["run_id"], w) for r in succeeded for w in r.get("warnings") or []]
    if warned:
        parts.append("warnings:\n" + "\n".join(f"  {rid}: {w}" for rid, w in warned))
    if running:
        parts.append("running:\n" + "\n".join(f"  {r['run_id']} (pid {r.get('pid')})" for r in running))
    if failed:
        parts.append("failed runs:\n" + "\n".join(f"  {r['run_id']}: {r.get('error') or 'no error recorded'}"
                                                  for r in failed))
    if verified:
        parts.append(f"verify: {checked} artifacts re-hashed, " + (
            f"{len(problems)} do not match:\n" + "\n".join(f"  {p['path']} ({p['problem']}, {p['run_id']})"
                                                          for p in problems) if problems else "all match"))
    parts.append(f"report written to {root / 'report'}")
    return "\n\n".join(parts)


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([key for key, _, _ in COLUMNS])
    for row in rows:
        writer.writerow(["" if row.get(key) is None else row[key] for key, _, _ in COLUMNS])
    return buf.getvalue()


def _markdown(root: Path, headers, cells, rows, others, failed, running, succeeded, plots, checked, problems,
              verified: bool) -> str:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = [f"# Pipeline report: {root}", "",
             f"{len(succeeded)} succeeded, {len(failed)} failed, {len(running)} running; written {now}.", "",
             "## Models", ""]
    lines += [markdown_table(headers, cells) if cells else "No run with model figures yet.", ""]
    chains = _chains(rows)
    if chains:
        lines += ["## Lineage", "", *[f"- {c}" for c in chains], ""]
    if plots:
        lines += ["## Plots", ""] + [line for p in plots for line in (f"![{p.stem}]({p.name})", "")]
    if others:
        lines += ["## Other runs", "", *[f"- `{r['run_id']}`: {_scalars(r.get('metrics', {}))}" for r in others], ""]
    warned = [r for r in succeeded if r.get("warnings")]
    if warned:
        lines += ["## Warnings", ""]
        lines += [f"- `{r['run_id']}`: {w}" for r in warned for w in r["warnings"]] + [""]
    if running:
        lines += ["## Running", "", *[f"- `{r['run_id']}` (pid {r.get('pid')})" for r in running], ""]
    if failed:
        lines += ["## Failed runs", "", markdown_table(
            ["run_id", "stage", "started", "error"],
            [[r["run_id"], r["stage"], str(r.get("started") or "-"), r.get("error") or "no error recorded"]
             for r in failed]), ""]
    if verified:
        lines += ["## Verify", "", f"{checked} artifacts re-hashed; " + (
            f"{len(problems)} do not match the manifest:" if problems else "all match the manifest."), ""]
        lines += [f"- `{p['path']}`: {p['problem']} (from `{p['run_id']}`)" for p in problems]
    return "\n".join(lines).rstrip() + "\n"


def _chains(rows: list[dict[str, Any]]) -> list[str]:
    """'train-... -> prune-... (pth 0.5) -> ...' for every run no other model row builds on."""
    by_id = {r["run_id"]: r for r in rows}
    parents = {rid for r in rows for rid in r["lineage"][:-1]}
    chains = []
    for r in rows:
        if r["run_id"] in parents or len(r["lineage"]) < 2:
            continue
        steps = []
        for rid in r["lineage"]:
            row = by_id.get(rid)
            mp = f", mAP50-95 {row['mAP50_95']:.4f}" if row and row["mAP50_95"] is not None else ""
            extra = f" ({_label(row)}{mp})" if row and row["stage"] == "prune" else (f" ({mp[2:]})" if mp else "")
            steps.append(f"`{rid}`{extra}")
        chains.append(" -> ".join(steps))
    return chains
