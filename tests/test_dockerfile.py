"""The Docker image cannot be built here (no daemon): check the Dockerfile for its essentials."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_base_is_pinned_ngc_pytorch():
    froms = [rest for op, rest in instructions() if op == "FROM"]
    assert len(froms) == 1
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", froms[0]), froms[0]


def test_installs_package_with_gpu_extra_and_keeps_base_torch():
    runs = " ".join(rest for op, rest in instructions() if op == "RUN")
    assert '-e ".[gpu]"' in runs and "constraints" in runs


def test_entrypoint_runs_the_pipeline_on_a_volume_as_non_root():
    ins = instructions()
    entry = json.loads(next(rest for op, rest in ins if op == "ENTRYPOINT"))
    assert entry[:3] == ["python", "-m", "pipeline"] and "results_dir=/results" in entry
    assert any(op == "VOLUME" and "/results" in rest for op, rest in ins)
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    for src in ("pipeline", "stages", "conf", "pyproject.toml"):
        assert any(op == "COPY" and rest.startswith(src) for op, rest in ins), src


def test_dockerignore_keeps_context_small():
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "results"):
        assert entry in ignored
