"""The training loop: learning, exact resume after SIGKILL, accumulation and multi-process
equivalence.

A tiny adapter defined here (a few hundred parameters, variable-length answers,
tied embeddings, optional dropout) keeps every run to a second or so. The file
is also a script: ``python tests/test_train.py RUN_DIR key=value ...`` trains
the same setup, which is how the subprocess tests (SIGKILL, ``accelerate
launch`` with two processes) run it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from loctune.codecs import get_codec
from loctune.config import apply_overrides, load_config, parse_overrides, save_config
from loctune.models.base import Generation, VLMAdapter
from loctune.train import TrainConfig, load_weights, train
from loctune.types import Sample

N_LOC = 8
WORDS = ["red", "green", "blue"]
BOS, EOS = N_LOC, N_LOC + 1
VOCAB = N_LOC + 2 + len(WORDS)
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class TinyModel(nn.Module):
    """Mean image colour + token embedding + running mean of the past: causal, tiny, tied head."""

    def __init__(self, dim: int = 16, dropout: float = 0.0):
        super().__init__()
        self.vision = nn.Linear(3, dim)
        self.projector = nn.Linear(dim, dim)
        self.embed = nn.Embedding(VOCAB, dim)
        self.mix = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        image = self.projector(torch.tanh(self.vision(pixels)))[:, None]
        tokens = self.embed(input_ids) + image
        counts = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)[None, :, None]
        past = tokens.cumsum(1) / counts
        hidden = self.norm(torch.tanh(self.mix(torch.cat([tokens, past], -1))))
        return self.head(self.dropout(hidden))


class TinyAdapter(VLMAdapter):
    codec = get_codec("bins", n_bins=N_LOC, token_format="<l{}>")  # four bin tokens per box

    def __init__(self, dropout: float = 0.0):
        self.model = TinyModel(dropout=dropout)

    @property
    def loc_token_ids(self) -> list[int]:
        return list(range(N_LOC))

    def collate(self, samples, train=True):
        rows = []
        for s in samples:
            answer = [k for b in s.boxes for k in self.codec.box_to_locations(b, s.image_size)]
            rows.append(([BOS, N_LOC + 2 + WORDS.index(s.prompt)], answer + [EOS]))
        length = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), length), EOS)
        labels = torch.full((len(rows), length), -100)
        for i, (prompt, answer) in enumerate(rows):
            ids[i, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            labels[i, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
        pixels = torch.tensor([[c / 255 for c in s.load_image().getpixel((0, 0))] for s in samples])
        return {"pixels": pixels, "input_ids": ids, "labels": labels}

    def forward(self, batch):
        return self.model(batch["pixels"], batch["input_ids"])

    def generate(self, samples, max_new_tokens=32):
        return [Generation(text="", token_ids=[], token_logprobs=[]) for _ in samples]

    def save_pretrained(self, path):
        """The adapter's own folder format: here the model's state dict as safetensors."""
        from safetensors.torch import save_model

        Path(path).mkdir(parents=True, exist_ok=True)
        save_model(self.model, str(Path(path) / "tiny.safetensors"))

    @classmethod
    def from_pretrained(cls, path):
        from safetensors.torch import load_model

        adapter = cls()
        load_model(adapter.model, str(Path(path) / "tiny.safetensors"))
        return adapter


def ce_loss(logits, labels, continuous=None, shift=True, num_items_in_batch=None):
    """Stand-in with LocationLoss's call signature: token-summed CE over the step's supervised
    tokens."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum"
    )
    return total / (
        num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum()
    )


def make_samples(n: int = 24) -> list[Sample]:
    """Colour decides where the box is; every third scene has a second box (longer answer)."""
    samples = []
    for i in range(n):
        word = WORDS[i % 3]
        x = 2 + 8 * (i % 3)
        boxes = [(x, 4.0, x + 10.0, 20.0)] + (
            [(x + 4.0, 10.0, x + 12.0, 28.0)] if i % 4 == 0 else []
        )
        samples.append(
            Sample(Image.new("RGB", (32, 32), COLOURS[word]), word, boxes, [word] * len(boxes))
        )
    return samples


def make_adapter(dropout: float = 0.0) -> TinyAdapter:
    torch.manual_seed(1234)
    return TinyAdapter(dropout=dropout)


def base_config(run_dir: Path, **changes) -> TrainConfig:
    defaults = dict(
        run_dir=str(run_dir),
        steps=8,
        batch_size=4,
        lr=3e-2,
        warmup_steps=2,
        min_lr=3e-3,
        log_every=1,
        progress=False,
    )
    return TrainConfig(**{**defaults, **changes})


def weights(adapter: VLMAdapter) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in adapter.model.state_dict().items()}


def assert_same_weights(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6
) -> None:
    shared = a.keys() & b.keys()
    assert shared, "no parameters to compare"
    for k in sorted(shared):
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The weights of ``last/``'s training state (``last/state/``)."""
    file = checkpoint / "state" / "model.safetensors"
    return {k.removeprefix("model."): v for k, v in load_file(file).items()}


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_few_steps_lower_the_loss_and_log_every_step(tmp_path):
    adapter = make_adapter()
    result = train(adapter, make_samples(), base_config(tmp_path, steps=20), loss_fn=ce_loss)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 21))
    assert {"loss", "lr", "samples_per_s", "epoch", "grad_norm"} <= records[0].keys()
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    assert result.metrics["loss"] == records[-1]["loss"]
    assert result.step == 20 and result.best_checkpoint is None
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0].startswith("step,")
    assert (result.last_checkpoint / "state" / "model.safetensors").exists()  # for --resume
    # last/ is also the adapter's own model folder, which its from_pretrained reopens
    assert_same_weights(weights(adapter),
                        weights(TinyAdapter.from_pretrained(result.last_checkpoint)), atol=0)


def test_schedule_warms_up_then_decays_to_min_lr(tmp_path):
    train(
        make_adapter(),
        make_samples(),
        base_config(tmp_path, steps=10, warmup_steps=4, lr=1e-2, min_lr=1e-3),
        loss_fn=ce_loss,
    )
    lrs = [r["lr"] for r in read_metrics(tmp_path)]  # the lr each step used
    assert lrs[:5] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert lrs[-1] == pytest.approx(1e-3)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    """Answers differ in length, so only per-step token normalisation makes these agree."""
    full, accumulated = make_adapter(), make_adapter()
    train(full, make_samples(), base_config(tmp_path / "full", batch_size=4), loss_fn=ce_loss)
    train(
        accumulated,
        make_samples(),
        base_config(tmp_path / "acc", batch_size=2, grad_accum=2),
        loss_fn=ce_loss,
    )
    assert_same_weights(weights(full), weights(accumulated))
    losses = [[r["loss"] for r in read_metrics(tmp_path / d)] for d in ("full", "acc")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    """The child stalls in its 2nd evaluation (step 6; checkpoint at step 4), gets SIGKILL,
    then resumes."""
    overrides = ["steps=10", "save_every=4", "eval_every=3", "dropout=0.2"]
    reference = make_adapter(dropout=0.2)
    train(
        reference,
        make_samples(),
        script_config(tmp_path / "ref", overrides),
        eval_fn=eval_counter,
        loss_fn=ce_loss,
    )

    run_dir = tmp_path / "killed"
    stall = tmp_path / "stalled"
    env = {**os.environ, "STALL_AT_EVAL": "2", "STALL_MARKER": str(stall)}
    child = subprocess.Popen([sys.executable, __file__, str(run_dir), *overrides], env=env)
    try:
        deadline = time.time() + 120
        while not stall.exists():
            assert child.poll() is None, "child exited before reaching the stall point"
            assert time.time() < deadline, "child never reached the stall point"
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    assert json.loads((run_dir / "last" / "trainer_state.json").read_text())["step"] == 4
    assert (
        max(r["step"] for r in read_metrics(run_dir)) == 5
    )  # past the checkpoint: dropped on resume

    resumed = make_adapter(dropout=0.2)  # fresh init; the checkpoint must overwrite all of it
    result = train(
        resumed,
        make_samples(),
        script_config(run_dir, overrides),
        eval_fn=eval_counter,
        resume=True,
        loss_fn=ce_loss,
    )
    assert result.step == 10
    assert_same_weights(weights(reference), weights(resumed))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]  # noqa: E731
    ref_rows, resumed_rows = strip(read_metrics(tmp_path / "ref")), strip(read_metrics(run_dir))
    assert [r["step"] for r in resumed_rows] == [r["step"] for r in ref_rows]
    for a, b in zip(ref_rows, resumed_rows, strict=True):
        assert a == pytest.approx(b, rel=1e-5)


def test_resume_of_a_finished_run_restores_its_weights_and_metrics(tmp_path):
    done = make_adapter()
    first = train(done, make_samples(), base_config(tmp_path), loss_fn=ce_loss)
    again = make_adapter()
    second = train(again, make_samples(), base_config(tmp_path), resume=True, loss_fn=ce_loss)
    assert second.metrics == first.metrics
    assert_same_weights(weights(done), weights(again), atol=0)
    with pytest.raises(ValueError, match="global_batch: 4 then, 2 now"):
        train(
            make_adapter(),
            make_samples(),
            base_config(tmp_path, batch_size=2),
            resume=True,
            loss_fn=ce_loss,
        )


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """Both on CPU (gloo), so that a GPU on the machine does not change the arithmetic."""
    one = make_adapter()
    config = script_config(tmp_path / "one", ["batch_size=4", "cpu=true"])
    train(one, make_samples(), config, eval_fn=eval_counter, loss_fn=ce_loss)
    # What `accelerate launch --cpu` amounts to without MPI: torchrun, and cpu=true for Accelerate.
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = [*launch, __file__, str(tmp_path / "two"), "batch_size=2", "cpu=true"]
    subprocess.run(run, check=True, env=env, timeout=300)
    assert_same_weights(weights(one), checkpoint_weights(tmp_path / "two" / "last"), atol=1e-5)
    losses = [
        [r["loss"] for r in read_metrics(tmp_path / d) if "loss" in r] for d in ("one", "two")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_best_checkpoint_keeps_the_weights_of_the_best_evaluation(tmp_path):
    scores, snapshots = iter([0.1, 0.7, 0.3, 0.2]), []

    def eval_fn(adapter):
        snapshots.append(weights(adapter))
        return {"score": next(scores)}

    config = base_config(tmp_path, eval_every=2, best_metric="score")
    result = train(make_adapter(), make_samples(), config, eval_fn=eval_fn, loss_fn=ce_loss)
    assert len(snapshots) == 4 and result.metrics["eval/score"] == 0.2
    # best/ is the adapter's own save, reopened as any model folder is
    restored = TinyAdapter.from_pretrained(result.best_checkpoint)
    assert_same_weights(snapshots[1], weights(restored), atol=0)
    assert [r["eval/score"] for r in read_metrics(tmp_path) if "eval/score" in r] == [
        0.1,
        0.7,
        0.3,
        0.2,
    ]


def test_staged_training_updates_only_the_unfrozen_parts(tmp_path):
    adapter = make_adapter()
    before = weights(adapter)
    train(
        adapter,
        make_samples(),
        base_config(tmp_path / "stage1", trainable=["projector.*"]),
        loss_fn=ce_loss,
    )
    after = weights(adapter)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"projector.weight", "projector.bias"}
    assert all(p.requires_grad for p in adapter.model.parameters()), (
        "freeze must not outlive the stage"
    )

    train(
        adapter,
        make_samples(),
        base_config(tmp_path / "stage2", freeze=["vision.*"]),
        loss_fn=ce_loss,
    )
    final = weights(adapter)
    assert torch.equal(final["vision.weight"], after["vision.weight"])
    assert not torch.equal(final["mix.weight"], after["mix.weight"])
    with pytest.raises(ValueError, match="'visoin.*' matches no parameter"):
        train(
            adapter,
            make_samples(),
            base_config(tmp_path / "typo", freeze=["visoin.*"]),
            loss_fn=ce_loss,
        )


@pytest.mark.parametrize("order", ["given", "raster"])
def test_object_order_sets_the_order_answers_write_objects_in(order, tmp_path):
    """Boxes and their labels move together; the caller's samples are left as they were."""
    seen = []

    class Recording(TinyAdapter):
        def collate(self, samples, train=True):
            seen.extend((tuple(s.boxes), tuple(s.labels)) for s in samples)
            return super().collate(samples, train)

    upper, lower_left, lower_right = (9.0, 2, 14, 8), (1.0, 12, 6, 20), (3.0, 12, 8, 20)
    sample = Sample(Image.new("RGB", (32, 32)), "red", [lower_right, upper, lower_left],
                    ["c", "a", "b"])
    adapter = Recording()
    train(adapter, [sample], base_config(tmp_path, steps=1, batch_size=1, object_order=order),
          loss_fn=ce_loss)
    if order == "raster":
        expected = ((upper, lower_left, lower_right), ("a", "b", "c"))
    else:
        expected = ((lower_right, upper, lower_left), ("c", "a", "b"))
    assert seen[0] == expected
    assert sample.boxes == [lower_right, upper, lower_left] and sample.labels == ["c", "a", "b"]


def test_an_unknown_object_order_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="object_order must be 'given' or 'raster', got 'area'"):
        TrainConfig(object_order="area")


def test_small_vlm_trains_with_the_default_location_loss_and_resumes(tmp_path):
    """The real pieces together: SmallVLMAdapter, synthetic scenes, LocationLoss from config."""
    small_vlm = pytest.importorskip("loctune.models.small_vlm_adapter")
    synthetic = pytest.importorskip("loctune.data.synthetic")
    samples = synthetic.make_grounding_split("train", 16, seed=0, image_size=64)

    def build():
        torch.manual_seed(0)
        return small_vlm.SmallVLMAdapter.build(
            "rowcol:grid=16",
            texts=synthetic.synthetic_vocabulary(),
            samples=samples,
            config="tiny",
        )

    overrides = ["loss.name=soft_ce", "loss.targets.kind=distance_inverse", "lr=3e-3"]
    config = apply_overrides(base_config(tmp_path, steps=6), overrides)
    trained = build()
    train(trained, samples, config)
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert losses[-1] < losses[0]
    reopened = build()
    train(reopened, samples, config, resume=True)
    assert_same_weights(weights(trained), weights(reopened), atol=0)


def test_config_file_and_overrides_are_typed_and_saved(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(
        f"run_dir: {tmp_path / 'run'}\nlr: 1e-3\nsteps: 3\nbatch_size: 4\nprogress: false\n"
    )
    config = load_config(
        TrainConfig,
        path,
        [
            "grad_accum=2",
            "freeze=[vision.*]",
            "run_dir=" + str(tmp_path / "7"),
            "mixed_precision=no",
        ],
    )
    assert config.lr == 1e-3 and isinstance(config.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert (config.grad_accum, config.freeze, config.run_dir) == (
        2,
        ["vision.*"],
        str(tmp_path / "7"),
    )

    train(make_adapter(), make_samples(), config, loss_fn=ce_loss)
    assert load_config(TrainConfig, tmp_path / "7" / "config.yaml") == config
    save_config(config, tmp_path / "c.json")
    assert load_config(TrainConfig, tmp_path / "c.json") == config
    assert apply_overrides(config, ["loss.name=gem"]).loss.name == "gem"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lrr=1"], r"override 'lrr=1': unknown field 'lrr' for TrainConfig; did you mean 'lr'\?"),
        (["steps=many"], r"override 'steps=many': field 'steps' expects int, got 'many'"),
        (
            ["mixed_precision=fp8"],
            r"field 'mixed_precision' must be one of \['no', 'bf16', 'fp16'\]",
        ),
        (["batch_size=0"], r"batch_size must be >= 1"),
        (["loss.nope=1"], r"unknown field 'loss.nope' for LossConfig"),
        (["lr"], r"override 'lr' must look like 'key=value'"),
    ],
)
def test_bad_overrides_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(TrainConfig, None, overrides)


def test_bad_config_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: 3\nwarmup_steps: [1]\n")
    with pytest.raises(ValueError, match=r"bad.yaml: field 'warmup_steps' expects int, got \[1\]"):
        load_config(TrainConfig, path)
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="bad.yaml: expected a mapping"):
        load_config(TrainConfig, path)
    assert parse_overrides(["a.b=1", "a.c=x"])["a"].keys() == {"b", "c"}


def test_a_partial_section_keeps_the_enclosing_configs_defaults(tmp_path):
    # a compare's cells train without best/ (best_metric ""), unlike a bare TrainConfig; a
    # file's train: section naming steps only must not bring TrainConfig's own defaults back
    from loctune.compare import CompareConfig

    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 7}\nmodel: {name: shapes-patch16}\n")
    cfg = load_config(CompareConfig, path)
    assert (cfg.train.steps, cfg.train.best_metric) == (7, "")
    assert cfg.train.lr == CompareConfig().train.lr != TrainConfig().lr
    # the default model names no codec, so a checkpoint keeps its own
    assert (cfg.model.name, cfg.model.codec) == ("shapes-patch16", None)
    assert load_config(CompareConfig, None, ["train.steps=7"]).train == cfg.train


# --- the script side: the same setup as a separate (killable, launchable) process ---


def script_config(run_dir: Path, overrides: list[str]) -> TrainConfig:
    """``base_config`` plus overrides; ``dropout=`` is the model's, not the loop's."""
    loop = [o for o in overrides if not o.startswith("dropout=")]
    return apply_overrides(base_config(run_dir, steps=6), loop)


def eval_counter(adapter: VLMAdapter) -> dict[str, float]:
    """A cheap deterministic 'metric' (weight norm) that can stall on request, to be killed
    there."""
    norm = float(sum(p.detach().pow(2).sum() for p in adapter.model.parameters()))
    eval_counter.calls += 1
    if str(eval_counter.calls) == os.environ.get("STALL_AT_EVAL"):
        Path(os.environ["STALL_MARKER"]).write_text("stalled")
        time.sleep(600)
    return {"weight_norm": norm}


eval_counter.calls = 0


def main(argv: list[str]) -> None:
    run_dir, overrides = Path(argv[0]), argv[1:]
    dropout = float(next((o.split("=", 1)[1] for o in overrides if o.startswith("dropout=")), 0.0))
    train(
        make_adapter(dropout),
        make_samples(),
        script_config(run_dir, overrides),
        eval_fn=eval_counter,
        loss_fn=ce_loss,
    )


if __name__ == "__main__":
    main(sys.argv[1:])


# --- validation schedule, early stopping, run tables, trackers, non-finite losses ----------


@pytest.mark.parametrize(
    ("changes", "n", "interval"),
    [
        ({"steps": 0, "epochs": 3}, 24, 6),  # 24 samples / batch 4: every epoch is 6 steps
        ({"steps": 0, "epochs": 40}, 24, 24),  # 240 steps: every 4th epoch, 10 validations
        ({"steps": 8, "eval_every": 3}, 24, 3),
        ({"steps": 8, "eval_every": -1}, 24, 0),
    ],
)
def test_validation_runs_every_epoch_by_default_at_most_ten_times(changes, n, interval):
    assert base_config(Path("unused"), **changes).eval_interval(n, 4) == interval


def test_patience_stops_after_evaluations_without_improvement(tmp_path, capsys):
    scores = iter([0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0])
    config = base_config(tmp_path, steps=16, eval_every=2, best_metric="acc50", patience=2,
                         progress=True)
    adapter = make_adapter()
    result = train(adapter, make_samples(), config, loss_fn=ce_loss,
                   eval_fn=lambda a: {"acc50": next(scores), "miou": 0.0})
    assert result.step == 6  # best at step 2, then 2 evaluations without a better one
    restored = make_adapter()
    load_weights(restored, result.last_checkpoint)  # last/ is saved where the run stopped
    assert_same_weights(weights(adapter), weights(restored), atol=0)
    out = capsys.readouterr()
    assert "early stop at step 6" in out.out + out.err
    assert "val step 2 epoch 0.33 | acc50 0.5000 miou 0.0000" in out.out + out.err
    state = json.loads((tmp_path / "last" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["stale_evals"] == 2


def test_metrics_csv_has_one_row_per_validation_and_results_png(tmp_path):
    import csv

    config = base_config(tmp_path, steps=8, eval_every=4, log_every=1)
    train(make_adapter(), make_samples(), config, loss_fn=ce_loss,
          eval_fn=lambda a: {"acc50": 0.5, "ap": float("nan")})
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [4, 8]
    assert all(r["loss"] and r["eval/acc50"] == "0.5" for r in rows)
    assert (tmp_path / "results.png").stat().st_size > 0
    assert all(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().split("\n")
               if line)  # NaN written as null: valid JSON


def test_a_non_finite_loss_stops_the_run_without_saving_it(tmp_path):
    def nan_loss(logits, labels, **kwargs):
        return ce_loss(logits, labels, **kwargs) * float("nan")

    with pytest.raises(FloatingPointError, match="training loss is nan at step 1"):
        train(make_adapter(), make_samples(), base_config(tmp_path), loss_fn=nan_loss)
    assert not (tmp_path / "last").exists()
    with pytest.raises(ValueError, match="lr must be finite|lr must be > 0"):
        base_config(tmp_path, lr=float("inf"))


def test_tensorboard_tracker_logs_under_the_run(tmp_path):
    pytest.importorskip("tensorboard")
    config = base_config(tmp_path, steps=3, log_with=["tensorboard"])
    train(make_adapter(), make_samples(), config, loss_fn=ce_loss)
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


@pytest.mark.parametrize("damage", ["truncate", "zero", "delete_rng", "delete_manifest"])
def test_resume_refuses_a_damaged_checkpoint_naming_the_file(damage, tmp_path):
    train(make_adapter(), make_samples(), base_config(tmp_path), loss_fn=ce_loss)
    last = tmp_path / "last"
    weights_file = next(last.rglob("state/model*.safetensors"))
    rng_file = next(last.rglob("random_states*.pkl"))
    if damage == "truncate":
        weights_file.write_bytes(weights_file.read_bytes()[:-100])
        expected = f"{weights_file.name} has"
    elif damage == "zero":  # the header intact, the tensors zeroed
        data = bytearray(weights_file.read_bytes())
        header = 8 + int.from_bytes(data[:8], "little")
        data[header:] = bytes(len(data) - header)
        weights_file.write_bytes(bytes(data))
        expected = f"{weights_file.name} differs from what was saved"
    elif damage == "delete_rng":
        rng_file.unlink()
        expected = f"{rng_file.name} is missing"
    else:
        (last / "manifest.json").unlink()
        expected = "no manifest.json"
    with pytest.raises(ValueError, match=expected):
        train(make_adapter(), make_samples(), base_config(tmp_path), resume=True,
              loss_fn=ce_loss)


def test_resume_with_another_loss_is_refused_with_the_field_named(tmp_path):
    from loctune.losses import loss_config

    train(make_adapter(), make_samples(), base_config(tmp_path), loss_fn=ce_loss)
    other = base_config(tmp_path, loss=loss_config("gem"))
    with pytest.raises(ValueError, match="loss.name: 'ce' then, 'gem' now"):
        train(make_adapter(), make_samples(), other, resume=True, loss_fn=ce_loss)


def test_a_prompt_longer_than_the_models_positions_is_refused_before_training(tmp_path):
    from loctune.models.small_vlm_adapter import SmallVLMAdapter

    classes = [f"class{k}" for k in range(80)]  # a COCO-sized "detect ..." prompt
    long = Sample(Image.new("RGB", (32, 32)), "detect " + " ; ".join(classes), [(2, 2, 20, 20)],
                  ["class0"], task="detection", image_id="coco-like")
    adapter = SmallVLMAdapter.build("rowcol", samples=[long], config="tiny", seed=0)
    with pytest.raises(ValueError, match=r"sample 'coco-like' needs \d+ positions .* "
                                         r"max_positions=64: shorten the prompt"):
        train(adapter, [long], base_config(tmp_path), loss_fn=ce_loss)
    assert not (tmp_path / "last").exists()
