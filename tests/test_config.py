"""Config composition through Hydra's compose API, and validation of values."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.config import (
    MODEL_FAMILIES,
    MODEL_NAMES,
    Config,
    FitConfig,
    RetrainConfig,
    TrainConfig,
    help_text,
    meaning,
    register,
    validate,
)
from pipeline.errors import UserError

CONF = str(Path(__file__).resolve().parent.parent / "conf")


def cfg_with(*overrides: str):
    register()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_defaults_match_tao_for_prune():
    cfg = cfg_with()
    assert cfg.prune.normalizer == "max" and cfg.prune.equalization == "union"
    assert cfg.prune.granularity == 8 and cfg.prune.min_filters == 16
    assert OmegaConf.select(cfg, "stage").value == "all"
    validate(cfg)


def test_smoke_experiment_is_tiny():
    cfg = cfg_with("experiment=smoke")
    assert cfg.train.epochs <= 2 and cfg.train.imgsz <= 128 and cfg.dataset.synthetic_train <= 64


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_group(name):
    assert cfg_with(f"model={name}").model.name == name


@pytest.mark.parametrize(
    ("override", "key"),
    [("prune.pth=1.5", "prune.pth"), ("prune.pth=-0.1", "prune.pth"), ("train.epochs=-1", "train.epochs"),
     ("prune.normalizer=l3", "prune.normalizer"), ("engine.backend=tflite", "engine.backend"),
     ("infer.review_band=[0.6,0.2]", "infer.review_band"), ("model.name=yolov9z", "model.name")],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        validate(cfg_with(override))


@pytest.mark.parametrize("args", [["stage=foo"], ["prune.pth=abc"], ["nokey=1"], ["prune.pth=2"],
                                  ["train.epochs=ten"]])
def test_cli_rejects_with_exit_2(args, tmp_path):
    proc = run_cli(*args, f"results_dir={tmp_path}", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr


# -- one base for train.* and retrain.*, sizes that follow the model ---------------------------------

@pytest.mark.parametrize(("experiment", "side"),
                         [("default", 160), ("smoke", 96), ("full", 640), ("converged", 160)])
def test_presets_set_the_size_once_and_keep_their_effective_sizes(experiment, side):
    cfg = cfg_with(f"experiment={experiment}")
    assert cfg.train.imgsz == cfg.kmeans.width == cfg.kmeans.height == side
    assert cfg.retrain.imgsz is None  # the pruned model's training size (the train size), found at run time
    validate(cfg)


def test_converged_preset_is_the_default_run_trained_to_convergence():
    default, converged = cfg_with("experiment=default"), cfg_with("experiment=converged")
    assert converged.experiment == "converged" and converged.train.epochs == 100 and converged.prune.pth == 0.7
    assert (converged.retrain.epochs, converged.retrain.qat_epochs) == (30, 5)
    # the QAT recipe measured on converged lineages; the schema's defaults stay for the short default run
    assert (converged.retrain.qat_calib, converged.retrain.qat_lr0) == ("percentile", 1e-4)
    assert (default.retrain.qat_calib, default.retrain.qat_lr0) == ("max", 1e-3)
    assert converged.dataset == default.dataset and converged.train.sparsity == default.train.sparsity == "l1"
    assert converged.train.nbs == default.train.nbs and converged.retrain.nbs == default.retrain.nbs


def test_kmeans_size_follows_train_unless_set():
    assert cfg_with("train.imgsz=320").kmeans.width == 320
    cfg = cfg_with("train.imgsz=320", "kmeans.width=384")
    assert (cfg.kmeans.width, cfg.kmeans.height) == (384, 320)


def test_train_and_retrain_share_one_base():
    assert issubclass(TrainConfig, FitConfig) and issubclass(RetrainConfig, FitConfig)
    assert {"resume"} == {f for f in TrainConfig.__dataclass_fields__} - set(FitConfig.__dataclass_fields__)
    assert {"qat", "qat_epochs", "qat_lr0", "qat_head", "qat_calib", "qat_7bit_weights", "calib_batches", "distill",
            "distill_weight"} == (
        set(RetrainConfig.__dataclass_fields__) - set(FitConfig.__dataclass_fields__))


@pytest.mark.parametrize("section", ["train", "retrain"])
@pytest.mark.parametrize("bad", ["batch=0", "imgsz=16", "momentum=1.5", "workers=-1", "threads=-1",
                                 "sparsity=l2", "lr0=-0.1", "nbs=0", "mosaic=2", "close_mosaic=-1"])
def test_base_rules_hold_for_both_sections(section, bad):
    with pytest.raises(UserError, match=rf"^{section}\.{bad.split('=')[0]}="):
        validate(cfg_with(f"{section}.{bad}"))


def test_zero_epochs_is_refused_for_train_and_means_qat_only_for_retrain():
    with pytest.raises(UserError, match=r"train\.epochs=0 is out of range"):
        validate(cfg_with("train.epochs=0"))
    validate(cfg_with("retrain.epochs=0"))


# -- one meaning for threads ----------------------------------------------------------------------------

THREAD_SECTIONS = ("train", "retrain", "evaluate", "export", "engine", "infer")


def test_threads_mean_the_same_everywhere():
    cfg = cfg_with()
    hints = {f.name: f.default_factory for f in Config.__dataclass_fields__.values() if f.name in THREAD_SECTIONS}
    for section in THREAD_SECTIONS:
        assert cfg[section].threads == 0
        assert meaning(hints[section], "threads").startswith("CPU compute threads; 0 = auto: the cores other processes leave free")
        validate(cfg_with(f"{section}.threads=0"))
        validate(cfg_with(f"{section}.threads=1024"))
        with pytest.raises(UserError, match=rf"{section}\.threads=1025"):
            validate(cfg_with(f"{section}.threads=1025"))


# -- ranges of every size and batch key, the optional ones included ---------------------------------

@pytest.mark.parametrize("override", ["evaluate.imgsz=-32", "evaluate.batch=0", "export.imgsz=16", "infer.imgsz=0",
                                      "retrain.imgsz=8", "engine.calib_batch=0", "engine.max_batch=0",
                                      "kmeans.width=4", "seed=-1", "prune.pth=nan"])
def test_size_and_batch_ranges_name_the_key(override):
    with pytest.raises(UserError, match=rf"^{override.split('=')[0].replace('.', '[.]')}=.* is out of range"):
        validate(cfg_with(override))


@pytest.mark.parametrize("override", ["evaluate.imgsz=320", "export.imgsz=null", "retrain.imgsz=96", "infer.batch=1"])
def test_values_in_range_pass(override):
    validate(cfg_with(override))


# -- unknown keys, model names ------------------------------------------------------------------------

@pytest.mark.parametrize(("override", "named", "nearest"),
                         [("+train.epoch=5", "train.epoch", "train.epochs"),
                          ("+retrain.qat_epoch=1", "retrain.qat_epoch", "retrain.qat_epochs"),
                          ("+sead=1", "sead", "seed")])
def test_keys_added_with_plus_are_refused_with_the_nearest_key(override, named, nearest):
    with pytest.raises(UserError) as err:
        validate(cfg_with(override))
    assert str(err.value).startswith(f"{named} is not a configuration key; did you mean {nearest}?")


def test_a_wrong_model_name_lists_the_families():
    with pytest.raises(UserError, match="model.name='yolov9z'") as err:
        validate(cfg_with("model.name=yolov9z"))
    assert all(pattern.format("{n,s,m,l,x}") in str(err.value) for pattern in MODEL_FAMILIES.values())


def test_model_names_come_from_one_rule_not_a_file_each():
    assert len(MODEL_NAMES) == 25 and {"yolo11x", "yolo26n", "yolo12s", "yolov5lu", "yolov8m"} <= set(MODEL_NAMES)
    assert not (Path(CONF) / "model").exists()


# -- every key explains itself --------------------------------------------------------------------------

def test_every_key_has_a_meaning_and_help_lists_it_by_section():
    text = help_text()
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    keys = [k for k, v in _leaves(OmegaConf.to_container(OmegaConf.structured(Config)))]
    assert keys and set(rows) == set(keys)
    for key in keys:
        assert len(rows[key].split(None, 2)) == 3, f"{key} has no meaning in pipeline/config.py"
    assert text.index("train.epochs") < text.index("retrain.epochs") < text.index("export.opset")
    assert "retrain.*: stage=retrain" in text


def test_help_shows_the_values_this_command_line_gives():
    rows = {line.split()[0]: line.split(None, 2) for line in help_text(cfg_with("experiment=smoke")).splitlines()
            if line.startswith("  ")}
    assert rows["train.epochs"][1] == "2" and rows["kmeans.width"][1] == "96"
    assert rows["retrain.imgsz"][1] == "null" and rows["infer.formats"][1] == "[yolo,kitti]"
    assert rows["train.threads"][2] == "CPU compute threads; 0 = auto: the cores other processes leave free (measured)"
    assert rows["stage"][2].endswith("infer | all | report | help")
    assert help_text().count("\n  train.epochs ") == 1 and " 100 " in _row(help_text(), "train.epochs")


def _row(text: str, key: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"  {key} "))


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# -- the command line: one line, exit 2, before any import work ----------------------------------------

@pytest.mark.parametrize(("args", "says"), [
    (["+train.epoch=5"], "train.epoch is not a configuration key; did you mean train.epochs?"),
    (["stage=train", "train.epochs=0"], "train.epochs=0 is out of range"),
    (["stage=evaluate", "evaluate.imgsz=-32"], "evaluate.imgsz=-32 is out of range"),
    (["stage=evaluate", "evaluate.batch=0"], "evaluate.batch=0 is out of range"),
    (["stage=infer", "infer.source=/data/ảnh"], "write 'infer.source=\"/data/ảnh\"'"),
    (["model=yolov9z"], "Available options in 'model'"),
])
def test_cli_names_the_fix_and_exits_2_before_any_work(args, says, tmp_path):
    proc = run_cli(*args, f"results_dir={tmp_path / 'results'}", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr
    if says.startswith(("+", "train", "evaluate")):
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "results").exists()  # no dataset import, no record


def test_a_quoted_non_ascii_value_is_accepted(tmp_path):
    proc = run_cli("stage=report", "infer.source='/data/ảnh'", f"results_dir={tmp_path}", "--cfg", "job",
                   timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "source: /data/ảnh" in proc.stdout
