"""A quiet console: Ultralytics' banner, its repeated requirement notes and its validation table only
with verbose=true; the stage's start line and summary line always."""

from __future__ import annotations

import pytest
from conftest import run_cli


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """An untrained model of the synthetic dataset's classes as ONNX: evaluating it runs Ultralytics'
    device banner and its onnxruntime requirement check, the two lines the quiet console leaves out."""
    from ultralytics import YOLO

    from pipeline.models import build_model, save_checkpoint

    model = build_model("yolov8n", nc=3)
    model.names = {0: "circle", 1: "square", 2: "triangle"}
    pt = save_checkpoint(model, tmp_path_factory.mktemp("onnx") / "tiny.pt")
    return YOLO(str(pt)).export(format="onnx", imgsz=64, dynamic=True, simplify=False)


@pytest.mark.parametrize("verbose", [False, True])
def test_evaluate_console_is_quiet_unless_verbose(tiny_onnx, tmp_path, verbose):
    proc = run_cli("experiment=smoke", "stage=evaluate", f"evaluate.input={tiny_onnx}", "evaluate.imgsz=64",
                   f"results_dir={tmp_path / 'results'}", f"verbose={str(verbose).lower()}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "[evaluate] run evaluate-" in out and "[evaluate] succeeded: evaluate-" in out
    noisy = ("Ultralytics 8.", "ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS", "mAP50-95)", "FutureWarning")
    if verbose:
        assert all(s in out for s in noisy[:3]), out[-3000:]
    else:
        assert not [s for s in noisy if s in out], out[-3000:]
        assert "evaluate:" in out  # the progress bar stays, titled by the stage


@pytest.mark.parametrize("verbose", [False, True])
def test_library_prints_reach_the_console_only_when_verbose(verbose, capsys, caplog, monkeypatch):
    """ModelOpt print()s "Inserted N quantizers" at every QAT prepare and restore: the log keeps it."""
    import logging

    from pipeline import yolo_env

    monkeypatch.setenv("PIPELINE_VERBOSE", "1" if verbose else "0")
    with caplog.at_level(logging.INFO, logger="pipeline"), yolo_env.library_prints():
        print("Inserted 42 quantizers")
    printed = capsys.readouterr().out
    assert ("Inserted 42 quantizers" in printed) is verbose
    assert ("Inserted 42 quantizers" in caplog.text) is not verbose


@pytest.mark.parametrize("verbose", [False, True])
def test_expected_library_warnings_are_hidden_unless_verbose(verbose, monkeypatch):
    import logging

    from pipeline import yolo_env

    monkeypatch.setenv("PIPELINE_VERBOSE", "1" if verbose else "0")

    def record(name: str, message: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, None)

    expected = record("ultralytics", "This model has no one-to-one head; using one-to-many outputs.")
    other = record("ultralytics", "Dataset has no labels")
    ours = record("pipeline", "This model has no one-to-one head")  # our own warnings always show
    assert yolo_env._console_filter(expected) is verbose
    assert yolo_env._console_filter(other) and yolo_env._console_filter(ours)
