"""The stage registry: everything that knows the stages reads it; a new stage is one row plus a module."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_runner import fake_stages, make_cfg  # noqa: F401  (fixture)

import stages
from pipeline import app
from pipeline.config import Config, Stage
from pipeline.manifest import SUCCEEDED, Manifest
from pipeline.runner import run_stage, stage_config
from stages import COMMANDS, STAGES, StageSpec, chain

REPO = Path(__file__).resolve().parent.parent

# A whole stage: reads its own section, writes a model, reports a metric.
HELLO = '''
from pipeline.context import StageResult


def run(cfg, ctx):
    out = ctx.run_dir / "hello.txt"
    out.write_text(f"hello seed={cfg.seed}")
    return StageResult(outputs=[("model", out)], metrics={"letters": 5})
'''
# One that takes the model of the stage before it.
SHOUT = '''
from pipeline.context import StageResult


def run(cfg, ctx):
    out = ctx.run_dir / "shout.txt"
    out.write_text(ctx.input_path("model").read_text().upper())
    return StageResult(outputs=[("model", out)], metrics={"from": ctx.input_record()["run_id"]})
'''


@pytest.fixture
def example_stages(tmp_path, monkeypatch):
    """Two tiny stage modules on sys.path and their registry rows (replacing the real ones)."""
    for name, code in (("hello_stage", HELLO), ("shout_stage", SHOUT)):
        (tmp_path / f"{name}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = {"hello": StageSpec("hello", "hello_stage", produces_model=True),
            "shout": StageSpec("shout", "shout_stage", upstream=("hello",), produces_model=True)}
    monkeypatch.setattr(stages, "STAGES", rows)
    return tmp_path


def test_cli_choices_are_the_registry_and_the_commands():
    assert [s.value for s in Stage] == [*STAGES, *COMMANDS]
    assert Stage("prune") == "prune" and Stage.all == "all"


def test_rows_point_at_modules_known_stages_and_real_sections():
    order = set(STAGES)
    sections = {f.name for f in dataclasses.fields(Config)}
    for name, row in STAGES.items():
        assert row.name == name
        assert importlib.util.find_spec(row.module) is not None, row.module
        assert set(row.upstream) <= order - {name}, name
        assert set(row.sections) <= sections, name


def test_stages_that_evaluate_artifacts_hash_the_evaluate_section(tmp_path):
    cfg = make_cfg(tmp_path)
    for stage in ("prune", "export", "engine"):
        assert "evaluate" in stage_config(cfg, stage), stage
    for stage in ("kmeans", "train", "retrain", "infer"):
        assert "evaluate" not in stage_config(cfg, stage), stage
    assert set(stage_config(cfg, "train")) == {"train", "seed", "dataset", "model"}


def test_chain_adds_infer_only_with_a_source(tmp_path):
    names = [s.name for s in chain(make_cfg(tmp_path))]
    assert names == ["kmeans", "train", "evaluate", "prune", "retrain", "export", "engine"]
    with_source = [s.name for s in chain(make_cfg(tmp_path, f"infer.source={tmp_path}"))]
    assert with_source == [*names, "infer"]


def test_missing_input_names_the_earliest_upstream_stage(tmp_path, fake_stages):  # noqa: F811
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="run stage=train first"):
        run_stage(make_cfg(tmp_path), "evaluate")


def test_a_new_stage_is_one_row_and_a_module(tmp_path, example_stages):
    cfg = make_cfg(tmp_path / "r")
    hello = run_stage(cfg, "hello")
    assert hello["status"] == SUCCEEDED and hello["metrics"] == {"letters": 5}
    assert (tmp_path / "r" / hello["run_dir"] / "hello.txt").read_text() == "hello seed=0"
    shout = run_stage(cfg, "shout")  # its input resolved from the registry's upstream
    assert shout["inputs"][0]["produced_by"] == hello["run_id"]
    assert Manifest(tmp_path / "r").output_of(shout).read_text() == "HELLO SEED=0"


def test_stage_all_runs_the_registry_chain(tmp_path, example_stages):
    cfg = make_cfg(tmp_path / "r", "seed=1")
    records = app.run_all(cfg, [])
    assert [r["stage"] for r in records] == ["hello", "shout"]
    assert records[1]["metrics"]["from"] == records[0]["run_id"]
    run_stage(make_cfg(tmp_path / "r", "seed=2"), "hello")  # now the newest hello in the results dir
    # The chain reuses its own hello and feeds shout that one (not the newest): shout is reused too.
    assert [r["run_id"] for r in app.run_all(cfg, [])] == [r["run_id"] for r in records]


def test_the_cli_offers_and_runs_a_registered_stage(tmp_path):
    """Through the real entry point: the row alone makes `stage=hello` a valid choice."""
    (tmp_path / "hello_stage.py").write_text(HELLO)
    script = tmp_path / "cli.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(tmp_path)!r}, {str(REPO)!r}]
        import stages
        stages.STAGES["hello"] = stages.StageSpec("hello", "hello_stage")
        from pipeline.__main__ import main
        sys.argv = ["pipeline", "stage=hello", "results_dir={tmp_path / 'r'}"]
        main()
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "[hello] succeeded" in proc.stdout
    assert [r["stage"] for r in Manifest(tmp_path / "r").runs()] == ["hello"]


def test_stage_help_dispatches_to_the_key_printer(tmp_path, monkeypatch):
    import pipeline.config

    printed = []
    monkeypatch.setattr(pipeline.config, "print_help", lambda cfg: printed.append(str(cfg.results_dir)), raising=False)
    app.run(make_cfg(tmp_path, "stage=help"), [])
    assert printed == [str(tmp_path)]  # the composed config is what help prints the values of
    assert not (tmp_path / "manifest.json").exists()  # help records nothing


def test_the_docs_table_is_the_registry():
    text = (REPO / "docs" / "pipeline.md").read_text(encoding="utf-8")
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    table = {cells[0].strip(): cells for cells in rows[1:]}
    assert list(table) == list(STAGES)
    for name, (_, upstream, model, reads) in table.items():
        row = STAGES[name]
        assert set(re.findall(r"[a-z]+", upstream)) & set(STAGES) == set(row.upstream), name
        assert (model.strip() == "yes") == row.produces_model, name
        assert reads.strip() == (", ".join(row.reads) or "-"), name
