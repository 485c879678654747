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


def test_base_is_a_pinned_ngc_pytorch_whose_torch_satisfies_our_pins():
    froms = [rest for op, rest in instructions() if op == "FROM"]
    assert len(froms) == 1
    m = re.fullmatch(r"nvcr\.io/nvidia/pytorch:(\d{2})\.(\d{2})-py3", froms[0])
    assert m, froms[0]
    # NGC's torch is a pre-release ("2.8.0a0+..."), which PEP 440 orders *below* 2.8: ModelOpt's
    # torch>=2.8 needs an image on torch 2.9.0a0 or newer, i.e. 25.09 or later.
    assert (int(m[1]), int(m[2])) >= (25, 9), froms[0]


def test_installs_the_gpu_extra_keeping_the_base_torch_and_checks_it():
    runs = " ".join(rest for op, rest in instructions() if op == "RUN")
    assert '-e ".[gpu]"' in runs and "PIP_CONSTRAINT=/tmp/constraints.txt" in runs
    assert "pip check" in runs and "torch.__version__ == sys.argv[1]" in runs
    assert "|| true" not in runs  # a failed pin or install must fail the build


def test_one_onnx_runtime_build_per_host():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=\[ ;]", d, maxsplit=1)[0] for d in project["dependencies"]]
    assert "onnxruntime" not in names and "onnxruntime-gpu" not in names
    extras = project["optional-dependencies"]
    assert any(d.startswith("onnxruntime>=") for d in extras["cpu"])
    assert any(d.startswith("onnxruntime-gpu") for d in extras["gpu"])
    assert not any(d.startswith("onnxruntime") for d in extras["test"])
    assert '".[cpu,test]"' in (REPO / ".ci" / "setup").read_text()


def test_entrypoint_keeps_ngcs_and_runs_the_pipeline_on_a_volume_as_non_root():
    ins = instructions()
    entry = json.loads(next(rest for op, rest in ins if op == "ENTRYPOINT"))
    assert entry[0] == "/opt/nvidia/nvidia_entrypoint.sh"
    assert entry[1:4] == ["python", "-m", "pipeline"] and "results_dir=/results" in entry
    assert any(op == "VOLUME" and "/results" in rest for op, rest in ins)
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    # Ubuntu 24.04 images already have UID 1000 (`ubuntu`): creating it unconditionally fails the build.
    useradd = " ".join(rest for op, rest in ins if op == "RUN" and "useradd" in rest)
    assert "getent passwd 1000" in useradd
    assert not any(op == "ENV" and "YOLO_CONFIG_DIR" in rest for op, rest in ins)
    for src in ("pipeline", "stages", "conf", "pyproject.toml"):
        assert any(op == "COPY" and rest.startswith(src) for op, rest in ins), src


def test_readme_docker_commands_share_memory_with_the_host():
    runs = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("docker run")]
    assert runs and all("--ipc=host" in line or "--shm-size" in line for line in runs)


def test_dockerignore_keeps_context_small():
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "results"):
        assert entry in ignored


def test_a_config_dir_the_user_cannot_write_does_not_stop_the_pipeline(tmp_path):
    """The image's run-time case: YOLO_CONFIG_DIR made by root at build time, run as another user.

    Where this machine lets another user run the interpreter, that is what runs; otherwise (the
    interpreter under a private /root, as here) the folder is made unwritable for root too: a path
    below a regular file, where every mkdir and write fails.
    """
    import os
    import shutil
    import subprocess
    import sys

    results = tmp_path / "results"
    code = ("import os, pipeline, ultralytics.utils as u; "
            "print(os.environ['YOLO_CONFIG_DIR']); print(u.SETTINGS_FILE)")
    other = shutil.which("runuser")
    probe = subprocess.run([other, "-u", "nobody", "--", sys.executable, "-c", "pass"], capture_output=True) \
        if other and os.geteuid() == 0 else None
    if probe is not None and probe.returncode == 0:
        locked = tmp_path / "root-made"
        (locked / "Ultralytics").mkdir(parents=True)
        os.chmod(tmp_path, 0o755)
        os.chmod(locked, 0o755)
        prefix = [other, "-u", "nobody", "--"]
    else:
        (tmp_path / "a-file").write_text("")
        locked = tmp_path / "a-file" / "yolo-config"
        prefix = []
    env = {**os.environ, "YOLO_CONFIG_DIR": str(locked), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([*prefix, sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    used = Path(proc.stdout.splitlines()[0])
    assert used != locked and (used / "Ultralytics").is_dir()
    if not prefix:
        proc = subprocess.run([sys.executable, "-m", "pipeline", "stage=dataset", "experiment=smoke",
                               f"results_dir={results}"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (results / "manifest.json").is_file()
