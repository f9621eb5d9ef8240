"""One spec grammar (``name:key=value,...``) for codecs and losses; one model section; one run
record that repeats a run from its folder."""

import json
import os

import pytest
import yaml

from loctune.cli import main
from loctune.codecs import RowColCodec, get_codec
from loctune.config import format_spec, load_config, parse_spec
from loctune.data.synthetic import make_grounding_split
from loctune.losses import loss_config
from loctune.models.small_vlm_adapter import SmallVLMAdapter
from loctune.models.spec import ModelConfig, open_model
from loctune.run_config import RunConfig

os.environ["HF_HUB_OFFLINE"] = "1"


def test_spec_strings_parse_and_format_back():
    assert parse_spec("rowcol:grid=16") == ("rowcol", {"grid": 16})
    assert parse_spec("bins:n_bins=1000,strict=false") == (
        "bins", {"n_bins": 1000, "strict": False}
    )
    assert parse_spec("gem") == ("gem", {})
    for name, options in (("bins", {"token_format": "<bin_{}>", "separator": " ; "}),
                          ("patch", {"grid": 8})):
        assert parse_spec(format_spec(name, options)) == (name, options)
    with pytest.raises(ValueError, match="cannot be written as one spec"):
        format_spec("bins", {"separator": ", "})  # a comma would split the value
    with pytest.raises(ValueError, match="expected name:key=value"):
        parse_spec("gem:beta")


def test_codecs_are_named_by_spec_and_know_their_spec():
    codec = get_codec("rowcol:grid=16")
    assert isinstance(codec, RowColCodec) and len(codec.location_tokens) == 16
    assert codec.spec == "rowcol:grid=16"
    assert RowColCodec(8).spec == "rowcol:grid=8"  # built directly, it still knows its options
    assert get_codec("paligemma").spec == "paligemma"
    assert get_codec({"name": "rowcol", "grid": 12}).spec == "rowcol:grid=12"  # older records
    assert get_codec("bins", n_bins=32, strict=False).spec == "bins:n_bins=32,strict=false"
    with pytest.raises(ValueError, match="codec 'rowcol'.*gird.*its options: grid"):
        get_codec("rowcol:gird=16")
    with pytest.raises(KeyError, match="unknown codec 'rowcols'"):
        get_codec("rowcols:grid=16")
    # the loss presets read the same grammar
    assert loss_config("gem:beta=2").beta == 2


def test_a_saved_small_vlm_records_its_codec_spec_and_reopens_with_an_override(tmp_path):
    samples = make_grounding_split("train", 4, seed=0, image_size=32)
    adapter = SmallVLMAdapter.build("bins:n_bins=24,strict=false", samples=samples, config="tiny",
                                    seed=0)
    adapter.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter.json").read_text())
    assert saved["codec"] == "bins:n_bins=24,strict=false"
    assert SmallVLMAdapter.from_pretrained(tmp_path).codec.spec == saved["codec"]
    # an override keeps its options: same tokens, other decoding strictness
    assert SmallVLMAdapter.from_pretrained(tmp_path, codec="bins:n_bins=24").codec.strict
    with pytest.raises(ValueError, match="writes 16 location tokens"):
        SmallVLMAdapter.from_pretrained(tmp_path, codec="bins:n_bins=16")


def test_open_model_refuses_a_checkpoint_that_has_seen_the_target(tmp_path):
    samples = make_grounding_split("train", 4, seed=0, image_size=32)
    fresh = open_model(ModelConfig("small:tiny", codec="rowcol:grid=8"), samples, seed=0,
                       target="synthetic")
    assert fresh.codec.spec == "rowcol:grid=8"
    fresh.save_pretrained(tmp_path / "a")  # a fresh model records nothing
    tuned = open_model(ModelConfig(str(tmp_path / "a")), samples, target="raccoon")
    assert tuned.model.config.trained_on[-1] == "raccoon"
    tuned.save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="was trained on 'raccoon'.*must be unseen"):
        open_model(ModelConfig(str(tmp_path / "b")), samples, target="raccoon", unseen=True)
    assert open_model(ModelConfig(str(tmp_path / "b")), samples, target="bccd", unseen=True)
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        open_model(ModelConfig(str(tmp_path / "missing")), samples)


def test_a_train_run_is_one_record_that_repeats_it(tmp_path, capsys):
    args = ["train", "--model", "small:tiny", "--data", "synthetic", "--codec", "patch:grid=8",
            "--steps", "2", "--n-train", "8", "--n-val", "0", "--method", "gem:beta=2",
            "--project", str(tmp_path / "runs"), "lr=3e-3", "model.image_size=32"]
    assert main(args) == 0
    run = tmp_path / "runs" / "exp"
    assert sorted(p.name for p in run.glob("*.yaml")) == ["config.yaml"]  # one record
    record = yaml.safe_load((run / "config.yaml").read_text())
    assert record["model"]["codec"] == "patch:grid=8" and record["model"]["image_size"] == 32
    assert record["data"] == "synthetic" and record["n_train"] == 8 and record["n_val"] == 0
    assert record["train"]["lr"] == 3e-3 and record["train"]["loss"]["beta"] == 2
    cfg = load_config(RunConfig, run / "config.yaml")
    assert cfg.train.steps == 2 and cfg.model.name == "small:tiny"
    # the folder alone repeats the run, into a new folder
    assert main(["train", "--config", str(run / "config.yaml"),
                 "--project", str(tmp_path / "again")]) == 0
    again = yaml.safe_load((tmp_path / "again" / "exp" / "config.yaml").read_text())
    assert {k: v for k, v in again.items() if k != "train"} == {
        k: v for k, v in record.items() if k != "train"}
    assert {k: v for k, v in again["train"].items() if k != "run_dir"} == {
        k: v for k, v in record["train"].items() if k != "run_dir"}
    saved = json.loads((tmp_path / "again" / "exp" / "model" / "adapter.json").read_text())
    assert saved["codec"] == "patch:grid=8"
    capsys.readouterr()
    assert main(["train", "--model", "small:tiny", "--project", str(tmp_path / "r3")]) == 2
    assert "give --data" in capsys.readouterr().err
    assert main(["train", "--model", "small:tiny", "--data", "synthetic", "n_train=-2",
                 "--project", str(tmp_path / "r4")]) == 2
    assert "n_train must be >= 0" in capsys.readouterr().err


def test_the_readme_study_commands_name_real_fields():
    """Every `loctune compare` / `inspect-study` line of the README builds its config."""
    import shlex
    from pathlib import Path

    from loctune.compare import CompareConfig
    from loctune.config import apply_overrides
    from loctune.inspect.study import InspectStudyConfig

    text = (Path(__file__).parents[1] / "README.md").read_text().replace("\\\n", "")
    studies = {"compare": CompareConfig, "inspect-study": InspectStudyConfig}
    checked = 0
    for line in text.splitlines():
        words = shlex.split(line.split("#")[0]) if line.startswith("loctune ") else []
        if len(words) > 1 and words[1] in studies:
            apply_overrides(studies[words[1]](), [w for w in words[2:] if "=" in w and
                                                  not w.startswith("-")])
            checked += 1
    assert checked >= 8
