"""What every bench script shares: where its JSON goes and what describes the machine."""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def add_out(ap: argparse.ArgumentParser, name: str) -> None:
    """--out FILE (default bench/results/<name>-<date>-<host>.json)."""
    ap.add_argument("--out", type=Path, default=RESULTS / f"{name}-{datetime.now():%Y-%m-%d}-{platform.node()}.json",
                    help="JSON file to write (bench/run.py collects it)")


def machine() -> dict[str, Any]:
    from pipeline.engines.common import cpu_model

    return {"date": datetime.now().isoformat(timespec="seconds"), "host": platform.node(), "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]}


def write(out: Path, data: dict[str, Any]) -> None:
    """Write `data` (plus the machine description) as JSON, atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({**machine(), **data}, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}", flush=True)
