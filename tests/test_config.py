"""Config composition through Hydra's compose API, and validation of values."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.config import MODEL_NAMES, register, validate
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
