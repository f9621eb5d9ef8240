"""The transfer study's configs (configs/transfer): one command per target and token form."""

import json
from pathlib import Path

import pytest
import yaml

from loctune.compare import CompareConfig
from loctune.config import load_config
from loctune.models.checkpoints import SHIPPED, resolve_checkpoint

STUDY_METHODS = ("ce", "distance_inverse", "dist2", "label_smoothing", "two_bin", "gem",
                 "gem_linear", "gem_distance_inverse", "wasserstein")
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "transfer").glob("*.yaml"))


def test_there_is_a_config_for_each_token_form():
    codecs = set()
    for path in CONFIGS:
        folder = Path(resolve_checkpoint(load_config(CompareConfig, path).model.name))
        recipe = yaml.safe_load((folder / "pretrain_config.yaml").read_text())
        codecs.add(recipe["codec"].split(":")[0])
    assert {"rowcol", "patch"} <= codecs


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_transfer_config_follows_the_protocol(path):
    cfg = load_config(CompareConfig, path)
    # every cell fine-tunes one shipped checkpoint that has never seen the target
    assert cfg.model.name in SHIPPED and cfg.model.codec is None
    config = json.loads((Path(resolve_checkpoint(cfg.model.name)) / "config.json").read_text())
    assert cfg.data.name not in config["trained_on"]
    # paired seeds, one-hot CE as the baseline, knobs tuned on validation
    assert len(cfg.seeds) >= 5 and cfg.baseline == "ce" and "ce" in cfg.methods
    assert cfg.tune and all(len(c) >= 2 for c in cfg.tune.values())
    # every supervision method of the study, and every one with a knob has it tuned
    assert set(cfg.methods) == set(STUDY_METHODS)
    assert set(cfg.methods) - set(cfg.tune) == {"ce", "two_bin"}
    assert Path(cfg.out_dir).parts[:2] == ("runs", "transfer")
