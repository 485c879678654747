"""Our threshold pruning (TAO semantics) vs torch-pruning's amount-based pruning at the same size.

    .venv/bin/python bench/prune_compare.py --results-dir /tmp/pc --build [--pth 0.3 0.5 0.7]
    .venv/bin/python bench/prune_compare.py --results-dir RESULTS --override dataset=vinid --merge

Baseline: the newest succeeded `train` record of --results-dir (with --build, trained first by
`python -m pipeline stage=train`). For each pth:

- ours: `stage=prune prune.pth=P` on the baseline, then `stage=retrain retrain.qat=false`;
- torch-pruning: the same baseline, C2f/C3k2 swapped as stage=prune does, pruned by
  `tp.pruner.BasePruner` with `GroupMagnitudeImportance(p=2)`, one uniform per-layer
  `pruning_ratio`, round_to=8, the Detect head's output convs and DFL ignored (as ours); the ratio
  found by bisection so the parameter count matches ours within 1%. One uniform ratio with
  round_to=8 moves the count in steps of 5-20% on yolov8n, so ours' size usually falls inside a
  step: then both neighbours (fewer and more params than ours) are kept, and the verdict
  interpolates their mAP to ours' size. Each is saved with pipeline.models.save_checkpoint, then
  `stage=retrain retrain.input=<it> retrain.qat=false` in the same results dir: the same retrain
  config, so the same budget.

Every CLI call gets the --override list (e.g. experiment=smoke). mAP50-95 after pruning is the
retrain record's evaluation of the pruned model right after loading (the same evaluator for both);
params / GFLOPs are at the model's training size. With --unpruned-retrain (default) the unpruned
model gets the same retrain too, a reference for "what the extra epochs alone give".
The JSON (--out) holds rows, a verdict per (dataset, pth) = ours - torch-pruning mAP50-95 after
retrain, and the tables as Markdown.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_out, write  # noqa: E402

from pipeline.errors import UserError  # noqa: E402
from pipeline.manifest import Manifest  # noqa: E402
from pipeline.models import count_params, load_checkpoint, load_model, model_figures, save_checkpoint  # noqa: E402

ROUND_TO = 8  # torch-pruning's round_to; ours rounds kept channels to prune.granularity (8)
PARAM_TOLERANCE = 0.01  # |params theirs / params ours - 1| the bisection aims under
# Keys this script sets itself on every call; an --override of one would make the arms differ.
RESERVED = ("stage", "results_dir", "prune.pth", "prune.mode", "prune.input", "prune.evaluate",
            "retrain.input", "retrain.qat")


# ---------------------------------------------------------------- torch-pruning, amount-based


def prune_amount(model: nn.Module, ratio: float, round_to: int = ROUND_TO) -> nn.Module:
    """Prune `model` in place with torch-pruning: GroupMagnitudeImportance(p=2), uniform `ratio` per layer.

    `model` must already have its C2f/C3k2 blocks swapped (pipeline.modules.swap_split_blocks);
    the Detect head's output convs and DFL are ignored, as in pipeline.pruning.
    """
    import torch_pruning as tp

    from pipeline.pruning import _raw_head_outputs, head_output_layers

    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)  # the graph is traced through autograd
    if ratio <= 0:
        return model
    stride = int(max(getattr(model, "stride", torch.tensor([32.0])).max().item(), 32))
    example = torch.zeros(1, 3, 2 * stride, 2 * stride)  # the size ChannelPruner traces at
    pruner = tp.pruner.BasePruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=float(ratio),
        global_pruning=False, round_to=round_to, ignored_layers=head_output_layers(model),
        output_transform=_raw_head_outputs,
    )
    pruner.step()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def match_params(model: nn.Module, target_params: int, round_to: int = ROUND_TO, iterations: int = 10,
                 tolerance: float = PARAM_TOLERANCE) -> list[tuple[nn.Module, float, int]]:
    """torch-pruning's amount-based pruning of copies of `model` at the ratios nearest `target_params`.

    Returns [(pruned copy, pruning_ratio, params)]: one entry when a ratio lands within `tolerance`
    of the target; otherwise the two reachable counts either side of it (below first). One uniform
    ratio with round_to=8 moves every layer of a width at the same ratios, so the count moves in
    steps of several percent and the target often falls inside one. A coarse scan brackets the
    target (the count is not monotone near ratio 1: layers whose kept channels round to 0 are left
    whole), then bisection narrows the bracket to one step. `model` is not changed.
    """
    from pipeline.modules import swap_split_blocks
    from pipeline.pruning import _attention_units

    base = copy.deepcopy(model)
    if _attention_units(base):
        raise UserError("the torch-pruning arm supports models without attention blocks (yolov8*); "
                        "YOLO11's C2PSA needs the stand-in that pipeline.pruning.ChannelPruner builds")
    swap_split_blocks(base)
    total = count_params(base)
    if target_params >= total:
        return [(prune_amount(base, 0.0), 0.0, total)]
    # fewest params still > target; ratio 0 (nothing cut) is the first step above any target below the total
    above: tuple[nn.Module, float, int] | None = (prune_amount(copy.deepcopy(base), 0.0), 0.0, total)
    below: tuple[nn.Module, float, int] | None = None  # most params <= target

    def trial(ratio: float) -> int:
        nonlocal above, below
        pruned = prune_amount(copy.deepcopy(base), ratio, round_to)
        n = count_params(pruned)
        if n > target_params and (above is None or n < above[2]):
            above = (pruned, ratio, n)
        elif n <= target_params and (below is None or n > below[2]):
            below = (pruned, ratio, n)
        return n

    def close(entry: tuple[nn.Module, float, int] | None, tol: float = tolerance) -> bool:
        return entry is not None and abs(entry[2] - target_params) <= tol * target_params

    lo, hi = 0.0, None
    for ratio in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        if trial(ratio) <= target_params:
            hi = ratio
            break
        lo = ratio
    if hi is not None:
        for _ in range(iterations):
            if close(below, tolerance / 10) or close(above, tolerance / 10):
                break  # the bisection ends on one step of the count; this near, no step is closer
            mid = (lo + hi) / 2
            if trial(mid) > target_params:
                lo = mid
            else:
                hi = mid
    found = [e for e in (below, above) if e is not None]
    best = min(found, key=lambda e: abs(e[2] - target_params))
    return [best] if close(best) or len(found) == 1 else found


# ---------------------------------------------------------------- pipeline CLI calls


class BenchError(Exception):
    """A failure this script reports as one line (exit 2)."""


def cli(results_dir: Path, stage_args: list[str], overrides: list[str], log_file: Path) -> dict[str, Any]:
    """Run `python -m pipeline <stage_args> <overrides>`; return the record it added (it must have succeeded)."""
    stage = stage_args[0].split("=", 1)[1]
    manifest = Manifest(results_dir)
    before = {r["run_id"] for r in manifest.runs()}
    cmd = [sys.executable, "-m", "pipeline", *stage_args, *overrides, f"results_dir={results_dir}"]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    print(f"  $ {' '.join(cmd[1:])}  (log: {log_file})", flush=True)
    with open(log_file, "w", encoding="utf-8") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    new = [r for r in manifest.runs() if r["run_id"] not in before and r["stage"] == stage]
    if rc != 0 or not new or new[-1]["status"] != "succeeded":
        lines = log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        why = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "no output")
        raise BenchError(f"stage={stage} failed (exit {rc}): {why} [log: {log_file}]")
    return new[-1]


def dataset_check(overrides: list[str], results_dir: Path) -> tuple[str, str | None]:
    """(dataset name, why it is unusable or None) from the config these overrides compose."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.config import register

    register()
    try:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, f"results_dir={results_dir}"])
        name, path = str(cfg.dataset.name), cfg.dataset.path
    except (HydraException, OmegaConfBaseException) as exc:
        raise BenchError(f"--override {' '.join(overrides)}: {str(exc).splitlines()[0]}") from None
    if path is not None and not (REPO / str(path)).exists():
        return name, f"dataset.path={path} does not exist"
    return name, None


# ---------------------------------------------------------------- the comparison


def _row(dataset: str, method: str, pth: float | None, **fields: Any) -> dict[str, Any]:
    keys = ("pruning_ratio", "params", "gflops", "kept_params_ratio", "mAP50_95_after_prune",
            "mAP50_95_after_retrain", "retrain_epochs", "seconds")
    return {"dataset": dataset, "method": method, "pth": pth, **{k: fields.get(k) for k in keys},
            **{k: v for k, v in fields.items() if k not in keys}}


def compare(results_dir: Path, pths: list[float], overrides: list[str], build: bool, unpruned_retrain: bool,
            dataset: str, save: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run both arms for every pth; `save(rows, verdicts)` is called after each step (partial results survive)."""
    logs = results_dir / "prune_compare"
    if build:
        print(f"[{dataset}] training the baseline", flush=True)
        cli(results_dir, ["stage=train"], overrides, logs / "train.log")
    if not (results_dir / "manifest.json").exists():
        raise BenchError(f"--results-dir {results_dir} holds no manifest.json: train a baseline there "
                         f"(python -m pipeline stage=train results_dir={results_dir}) or pass --build")
    manifest = Manifest(results_dir)
    found = manifest.latest_output(("train",))
    if found is None:
        raise BenchError(f"--results-dir {results_dir} has no succeeded train run; pass --build to train one")
    train, entry = found
    manifest.verify_artifact(entry)
    base_path = manifest.abs(entry["path"])
    tm = train["metrics"]
    print(f"[{dataset}] baseline {train['run_id']}: {tm['params']:,} params, mAP50-95 {tm['mAP50_95']:.4f}", flush=True)

    rows: list[dict[str, Any]] = []
    verdicts: list[dict[str, Any]] = []
    unpruned = _row(dataset, "unpruned", None, pruning_ratio=0.0, params=tm["params"], gflops=tm["gflops"],
                    kept_params_ratio=1.0, mAP50_95_after_prune=tm["mAP50_95"], seconds=train["seconds"],
                    train_run=train["run_id"], train_epochs=tm.get("epochs"))
    rows.append(unpruned)
    if unpruned_retrain:
        rec = cli(results_dir, ["stage=retrain", f"retrain.input={base_path}", "retrain.qat=false"], overrides,
                  logs / "retrain-unpruned.log")
        unpruned.update(mAP50_95_after_retrain=rec["metrics"]["mAP50_95"], retrain_epochs=rec["metrics"]["epochs"],
                        retrain_run=rec["run_id"], retrain_seconds=rec["seconds"])
    save(rows, verdicts)

    ckpt = load_checkpoint(base_path)
    from pipeline.imgsz import model_imgsz, side

    imgsz = side(model_imgsz(base_path) or 640)
    base_model = load_model(base_path)
    done: dict[int, dict[str, Any]] = {}  # torch-pruning params -> its row (retrained once)
    for pth in pths:
        print(f"[{dataset}] pth={pth}: ours", flush=True)
        pr = cli(results_dir, ["stage=prune", f"prune.input={base_path}", "prune.mode=threshold", f"prune.pth={pth}",
                               "prune.evaluate=false"], overrides, logs / f"prune-ours-{pth}.log")
        rt = cli(results_dir, ["stage=retrain", f"retrain.input={manifest.output_path(pr)}", "retrain.qat=false"],
                 overrides, logs / f"retrain-ours-{pth}.log")
        pm, rm = pr["metrics"], rt["metrics"]
        ours = _row(dataset, "ours", pth, params=pm["params"], gflops=pm["gflops"],
                    kept_params_ratio=pm["kept_params_ratio"], mAP50_95_after_prune=rm["mAP50_95_after_load"],
                    mAP50_95_after_retrain=rm["mAP50_95"], retrain_epochs=rm["epochs"],
                    seconds=round(pr["seconds"] + rt["seconds"], 1), prune_run=pr["run_id"], retrain_run=rt["run_id"],
                    prune_seconds=pr["seconds"], retrain_seconds=rt["seconds"])
        rows.append(ours)
        save(rows, verdicts)

        print(f"[{dataset}] pth={pth}: torch-pruning to {pm['params']:,} params", flush=True)
        t0 = time.perf_counter()
        candidates = match_params(base_model, int(pm["params"]))
        search_seconds = time.perf_counter() - t0
        theirs = []
        for pruned, ratio, n in candidates:
            print(f"  pruning_ratio {ratio:.4f}: {n:,} params ({n / pm['params'] - 1:+.2%} vs ours; bisection "
                  f"{search_seconds:.1f} s)", flush=True)
            if n in done:  # every ratio of one step gives the same channels: that model is retrained already
                print(f"  the same model as at pth={done[n]['pth']:g}: its retrain is reused", flush=True)
                row = {**done[n], "pth": pth, "pruning_ratio": round(ratio, 5), "search_seconds": round(search_seconds, 1),
                       "seconds": round(search_seconds + done[n]["retrain_seconds"], 1), "reused_from_pth": done[n]["pth"],
                       "params_vs_ours": round(n / pm["params"] - 1, 4)}
            else:
                tp_file = logs / f"torch-pruning-{pth}-ratio{ratio:.4f}.pt"
                save_checkpoint(pruned, tp_file, extra={
                    "train_args": dict(ckpt.get("train_args") or {}),
                    "pruning": {"method": "torch-pruning BasePruner, GroupMagnitudeImportance(p=2), uniform per layer",
                                "pruning_ratio": ratio, "round_to": ROUND_TO, "matched_to": pr["run_id"],
                                "source": str(base_path)},
                })
                rt = cli(results_dir, ["stage=retrain", f"retrain.input={tp_file}", "retrain.qat=false"], overrides,
                         logs / f"retrain-torch-pruning-{pth}-ratio{ratio:.4f}.log")
                rm = rt["metrics"]
                row = _row(
                    dataset, "torch-pruning amount", pth, pruning_ratio=round(ratio, 5), params=n,
                    gflops=model_figures(pruned, imgsz)["gflops"], kept_params_ratio=round(n / tm["params"], 4),
                    mAP50_95_after_prune=rm["mAP50_95_after_load"], mAP50_95_after_retrain=rm["mAP50_95"],
                    retrain_epochs=rm["epochs"], seconds=round(search_seconds + rt["seconds"], 1),
                    retrain_run=rt["run_id"], search_seconds=round(search_seconds, 1), retrain_seconds=rt["seconds"],
                    params_vs_ours=round(n / pm["params"] - 1, 4))
                done[n] = row
            theirs.append(row)
            rows.append(row)
            save(rows, verdicts)
        verdicts.append(verdict(ours, theirs))
        save(rows, verdicts)
    return rows, verdicts


def verdict(ours: dict[str, Any], theirs: list[dict[str, Any]]) -> dict[str, Any]:
    """ours - torch-pruning mAP50-95 after retrain at ours' parameter count.

    With one torch-pruning model (within 1% of ours' size) that is the difference; with two (ours'
    size falls inside one of its steps) their mAP is interpolated linearly in params to ours' count,
    and `ours_minus_larger` compares with the larger one (a conservative margin for ours).
    """
    n, m = ours["params"], ours["mAP50_95_after_retrain"]
    if len(theirs) == 1:
        at_ours = theirs[0]["mAP50_95_after_retrain"]
    else:
        (n0, m0), (n1, m1) = ((t["params"], t["mAP50_95_after_retrain"]) for t in theirs)
        at_ours = m0 + (m1 - m0) * (n - n0) / (n1 - n0)
    larger = max(theirs, key=lambda t: t["params"])
    return {
        "dataset": ours["dataset"], "pth": ours["pth"], "ours_mAP50_95": m, "params_ours": n, "gflops_ours": ours["gflops"],
        "torch_pruning": [{k: t[k] for k in ("pruning_ratio", "params", "params_vs_ours", "gflops",
                                             "mAP50_95_after_retrain")} for t in theirs],
        "torch_pruning_mAP50_95_at_ours_params": round(at_ours, 4),
        "ours_minus_theirs": round(m - at_ours, 4),
        "ours_minus_larger": round(m - larger["mAP50_95_after_retrain"], 4) if larger["params"] >= n else None,
    }


# ---------------------------------------------------------------- output


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict[str, Any]], verdicts: list[dict[str, Any]]) -> str:
    """The rows and the verdicts as two Markdown tables."""
    lines = ["| dataset | method | pth | pruning_ratio | params | kept params | GFLOPs | mAP50-95 after prune "
             "| mAP50-95 after retrain | retrain epochs | seconds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['method']} | {_fmt(r['pth'], 'g')} | {_fmt(r['pruning_ratio'], '.3f')} "
                     f"| {r['params']:,} | {_fmt(r['kept_params_ratio'], '.3f')} | {_fmt(r['gflops'], '.3f')} "
                     f"| {_fmt(r['mAP50_95_after_prune'], '.4f')} | {_fmt(r['mAP50_95_after_retrain'], '.4f')} "
                     f"| {_fmt(r['retrain_epochs'], 'd')} | {_fmt(r['seconds'], '.0f')} |")
    lines += ["", "| dataset | pth | params ours | ours mAP50-95 | torch-pruning: params (vs ours) -> mAP50-95 "
              "| theirs at ours' params | ours - theirs | ours - larger theirs |", "|---|---|---|---|---|---|---|---|"]
    for v in verdicts:
        tps = "; ".join(f"{t['params']:,} ({t['params_vs_ours']:+.1%}) -> {t['mAP50_95_after_retrain']:.4f}"
                        for t in v["torch_pruning"])
        lines.append(f"| {v['dataset']} | {v['pth']:g} | {v['params_ours']:,} | {v['ours_mAP50_95']:.4f} | {tps} "
                     f"| {v['torch_pruning_mAP50_95_at_ours_params']:.4f} | {v['ours_minus_theirs']:+.4f} "
                     f"| {_fmt(v['ours_minus_larger'], '+.4f')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-dir", type=Path, help="results dir holding (or, with --build, to hold) the trained "
                    "baseline; default with --build: a new temporary folder")
    ap.add_argument("--build", action="store_true", help="train the baseline first (python -m pipeline stage=train)")
    ap.add_argument("--pth", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="thresholds for ours")
    ap.add_argument("--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="Hydra overrides for every CLI call (e.g. experiment=smoke, dataset=vinid)")
    ap.add_argument("--no-unpruned-retrain", dest="unpruned_retrain", action="store_false",
                    help="skip retraining the unpruned model with the same budget (the reference row)")
    ap.add_argument("--merge", action="store_true", help="keep other datasets' rows already in --out")
    add_out(ap, "prune_compare")
    args = ap.parse_args()
    if args.results_dir is None and not args.build:
        print("error: give --results-dir (a results dir with a trained baseline) or --build", file=sys.stderr)
        return 2
    results_dir = (args.results_dir or Path(tempfile.mkdtemp(prefix="prune-compare-"))).expanduser().resolve()
    bad = [o for o in args.override if o.split("=", 1)[0].lstrip("+~") in RESERVED]
    if bad:
        print(f"error: --override {' '.join(bad)}: this script sets these keys itself", file=sys.stderr)
        return 2

    try:
        dataset, unusable = dataset_check(args.override, results_dir)
        old = json.loads(args.out.read_text()) if args.merge and args.out.exists() else {}
        kept_rows = [r for r in old.get("rows", []) if r["dataset"] != dataset]
        kept_verdicts = [v for v in old.get("verdicts", []) if v["dataset"] != dataset]
        import torch_pruning

        meta = {"results_dirs": {**old.get("results_dirs", {}), dataset: str(results_dir)},
                "overrides": {**old.get("overrides", {}), dataset: args.override},
                "skipped": {k: v for k, v in old.get("skipped", {}).items() if k != dataset},
                "pth": args.pth, "torch_pruning": torch_pruning.__version__, "round_to": ROUND_TO}

        def save(rows: list[dict[str, Any]], verdicts: list[dict[str, Any]]) -> None:
            all_rows, all_verdicts = kept_rows + rows, kept_verdicts + verdicts
            write(args.out, {**meta, "rows": all_rows, "verdicts": all_verdicts,
                             "markdown": markdown(all_rows, all_verdicts)})

        if unusable:
            print(f"[{dataset}] skipped: {unusable}", flush=True)
            meta["skipped"][dataset] = unusable
            save([], [])
            return 0
        torch.manual_seed(0)
        rows, verdicts = compare(results_dir, list(args.pth), list(args.override), args.build,
                                 args.unpruned_retrain, dataset, save)
    except (BenchError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(kept_rows + rows, kept_verdicts + verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
