"""Where an OpenVINO IR spends its time on this CPU: per-node counters, summed by layer type.

    .venv/bin/python bench/ov_profile.py DIR_OR_XML [DIR_OR_XML ...] [--imgsz 160] [--threads 2]

Each model is compiled as the engine stage and bench/cpu_engines.py compile it (static shape,
`--threads` inference threads, latency hint) with PERF_COUNT on, run `--warmup` + `--runs` times
on random input, and the per-node real times of the last `--runs` calls are summed by the node's
executed layer type. Printed per model: wall ms per call, the sum of node times (what the nodes
cost; the rest of the wall time is the runtime's own per-call cost), the number of executed nodes,
and the costliest layer types and nodes. A floor row (one 3x3 conv on the same input) shows the
fixed cost of one inference call on this machine. Used to decide what to remove from a graph at
small input sizes, where the count of nodes, not their arithmetic, sets the latency.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import add_out, write  # noqa: E402


def floor_ir(work: Path, imgsz: int) -> Path:
    """An IR with a single 3x3 conv (3->16, stride 2) on the model's input: the per-call floor."""
    import openvino as ov
    from openvino import opset13 as ops

    x = ops.parameter([1, 3, imgsz, imgsz], np.float32, name="images")
    w = ops.constant(np.random.default_rng(0).standard_normal((16, 3, 3, 3)).astype(np.float32))
    y = ops.convolution(x, w, [2, 2], [1, 1], [1, 1], [1, 1])
    xml = work / "floor.xml"
    ov.save_model(ov.Model([y], [x], "floor"), str(xml))
    return xml


def profile(xml: Path, imgsz: int, threads: int, warmup: int, runs: int) -> dict[str, Any]:
    import openvino as ov

    from pipeline.engines.openvino import compile_config, recorded_precision

    core = ov.Core()
    model = core.read_model(str(xml))
    model.reshape([1, 3, imgsz, imgsz])
    config = compile_config(recorded_precision(xml), {"INFERENCE_NUM_THREADS": threads,
                                                      "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True})
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    for _ in range(warmup):
        request.infer([x])
    by_type: Counter[str] = Counter()
    by_node: Counter[str] = Counter()
    kinds: dict[str, str] = {}
    walls = []
    executed = 0
    for _ in range(runs):
        t = time.perf_counter()
        request.infer([x])
        walls.append((time.perf_counter() - t) * 1e3)
        executed = 0
        for info in request.profiling_info:
            us = info.real_time.total_seconds() * 1e6
            if info.status.name != "EXECUTED":
                continue
            executed += 1
            kind = f"{info.node_type}:{info.exec_type}"
            by_type[kind] += us / runs
            by_node[info.node_name] += us / runs
            kinds[info.node_name] = kind
    counts: dict[str, int] = defaultdict(int)
    for name in by_node:
        counts[kinds[name]] += 1
    return {"model": str(xml), "wall_ms": round(statistics.median(walls), 3),
            "nodes_ms": round(sum(by_node.values()) / 1e3, 3), "executed_nodes": executed,
            "by_type": [{"type": k, "nodes": counts[k], "us": round(v, 1)} for k, v in by_type.most_common()],
            "top_nodes": [{"node": k, "type": kinds[k], "us": round(v, 1)} for k, v in by_node.most_common(15)]}


def resolve(arg: str) -> Path:
    p = Path(arg)
    if p.suffix == ".xml":
        return p
    found = sorted(p.glob("*.xml"))
    if not found:
        raise SystemExit(f"no OpenVINO IR (*.xml) in {p}: pass an IR or a folder that holds one")
    return found[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--top", type=int, default=12, help="layer types printed per model")
    add_out(ap, "ov_profile")
    a = ap.parse_args()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for xml in [floor_ir(Path(tmp), a.imgsz)] + [resolve(m) for m in a.models]:
            r = profile(xml, a.imgsz, a.threads, a.warmup, a.runs)
            r["model"] = "floor (one conv)" if xml.name == "floor.xml" else r["model"]
            out.append(r)
            print(f"\n{r['model']}: wall {r['wall_ms']:.3f} ms, nodes {r['nodes_ms']:.3f} ms, "
                  f"{r['executed_nodes']} executed nodes", flush=True)
            for t in r["by_type"][: a.top]:
                print(f"  {t['type']:<40} {t['nodes']:>4} nodes {t['us']:>9.1f} us")
    write(a.out, {"imgsz": a.imgsz, "threads": a.threads, "runs": a.runs, "models": out})


if __name__ == "__main__":
    main()
