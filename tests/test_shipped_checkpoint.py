"""The checkpoints shipped in the package (loctune/assets/<name>)."""

import json

import pytest

from loctune.models.checkpoints import SHIPPED


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_checkpoint_is_todays_pretrain_recipe_and_localises(name):
    """A shipped checkpoint must be what ``loctune pretrain`` builds today with its recorded
    overrides (loctune.models.checkpoints.rebuild_command) and score as its metrics.json
    says."""
    from pathlib import Path

    import yaml

    from loctune.config import apply_overrides, config_from_dict, config_to_dict
    from loctune.evaluate import evaluate
    from loctune.models import load_model
    from loctune.models.checkpoints import resolve_checkpoint
    from loctune.models.small_vlm import small_vlm_config
    from loctune.pretrain import SOURCE_NAME, PretrainConfig, SourceConfig, source_corpus

    folder = Path(resolve_checkpoint(name))
    # read through today's dataclass: fields added since with a neutral default
    # (e.g. loss.emd_weight=0) leave the recorded recipe unchanged
    recorded_yaml = yaml.safe_load((folder / "pretrain_config.yaml").read_text())
    saved = config_to_dict(config_from_dict(PretrainConfig, recorded_yaml))
    expected = config_to_dict(apply_overrides(PretrainConfig(), SHIPPED[name][1]))
    saved.pop("out_dir"), expected.pop("out_dir")
    assert saved == expected, "rebuild the shipped checkpoint: PretrainConfig's defaults changed"
    config = json.loads((folder / "config.json").read_text())
    assert config["trained_on"] == [SOURCE_NAME]
    preset = config_to_dict(small_vlm_config(expected["model"]))
    for key in ("vision_stem", "vision_backbone", "vision_stages", "image_size", "patch_size",
                "pixel_shuffle", "projector_positions", "text_width", "text_depth"):
        assert config[key] == preset[key], key
    recorded = json.loads((folder / "metrics.json").read_text())
    adapter = load_model(name)
    # the first 40 of the same held-out scenes the recorded figure was measured on
    test = source_corpus(SourceConfig(n_test=40), "test")["grounding"]
    acc = evaluate(adapter, test, batch_size=40, progress=False).metrics["acc50"]
    assert abs(acc - recorded["grounding"]["acc50"]) < 0.2
    assert acc > 3 * recorded["grounding_mean_box"]["acc50"]
