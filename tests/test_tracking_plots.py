"""Tracking and plots: TensorBoard through Accelerate's trackers (with or without an Accelerator), curves.png,
`recipes plan --plot`."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import JOB_STEPS, eval_records, train_records
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from recipes.cli import main as cli
from recipes.core.output.plots import curve_series, schedule_series
from recipes.core.output.tracking import Trackers, hparams, tracker_names
from recipes.core.plan.steps import make_plan
from recipes.sft import SFTConfig

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sft_run(reference):
    """The shared job on one process, with TensorBoard: 12 steps, evaluated at steps 0, 4, 8 and 12."""
    return reference("1proc")


STEPS = list(range(1, JOB_STEPS + 1))


def test_sft_run_writes_tensorboard_loss_and_lr_scalars_equal_to_its_records(sft_run):
    events = list((sft_run / "sft").glob("events.out.tfevents.*"))
    assert len(events) == 1
    board = EventAccumulator(str(events[0])).Reload()
    records = train_records(sft_run)
    assert [r["step"] for r in records] == STEPS
    for key in ("loss", "lr", "grad_norm"):
        scalars = board.Scalars(key)
        assert [e.step for e in scalars] == STEPS
        assert [e.value for e in scalars] == [np.float32(r[key]) for r in records]
    assert [e.step for e in board.Scalars("eval_loss")] == [0, 4, 8, 12]


def test_sft_run_draws_curves_of_every_step_and_evaluation(sft_run):
    assert (sft_run / "curves.png").read_bytes()[:8] == PNG
    series = curve_series([*train_records(sft_run), *eval_records(sft_run)])
    assert series["loss"] == (STEPS, [r["loss"] for r in train_records(sft_run)])
    assert series["lr"][0] == STEPS
    assert series["eval_loss"][0] == series["eval_perplexity"][0] == [0, 4, 8, 12]


def test_curve_series_takes_train_keys_from_train_records_and_every_eval_key():
    records = [
        {"step": 0, "eval_loss": 2.0, "eval_accuracy": 0.25},
        {"step": 1, "lr": 0.0, "loss": 1.5, "grad_norm": 3.0},
        {"step": 2, "lr": 1e-3, "loss": 1.2, "grad_norm": None},
        {"step": 2, "eval_loss": 1.0, "eval_accuracy": 0.75},
        {"step": 2, "lr_after_training": 0.0},
    ]
    assert curve_series(records) == {
        "eval_loss": ([0, 2], [2.0, 1.0]),
        "eval_accuracy": ([0, 2], [0.25, 0.75]),
        "loss": ([1, 2], [1.5, 1.2]),
        "lr": ([1, 2], [0.0, 1e-3]),
    }


def test_schedule_series_is_the_plan_lr_with_warmup_and_epoch_ends():
    plan = make_plan(
        num_samples=100,
        world_size=2,
        micro_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=3,
        warmup_ratio=0.1,
        learning_rate=2e-5,
    )
    steps, lrs, warmup, epoch_ends = schedule_series(plan.to_dict())
    # 25 batches -> 13 per rank -> 7 steps per epoch -> 21 steps, warmup ceil(2.1) = 3
    assert steps == list(range(1, 22)) and warmup == 3 and epoch_ends == [7, 14, 21]
    assert lrs == [plan.lr_at(s) for s in steps]


def test_recipes_plan_plot_draws_the_schedule_it_prints(tmp_path, capsys):
    target = tmp_path / "schedule.png"
    code = cli(
        [
            "plan",
            "--config",
            "recipes/configs/classify_minilm.yaml",
            "--num-samples",
            "100",
            "--num-processes",
            "2",
            "--json",
            "--plot",
            str(target),
        ]
    )
    assert code == 0
    assert target.read_bytes()[:8] == PNG
    assert f"LR schedule drawn in {target}" in capsys.readouterr().err


def test_report_to_names_trackers_and_refuses_uninstalled_ones(tmp_path):
    assert tracker_names("none") == []
    assert tracker_names("tensorboard") == ["tensorboard"]
    assert tracker_names(" TensorBoard ") == ["tensorboard"]
    assert "tensorboard" in tracker_names("all")
    with pytest.raises(ValueError, match="report_to asks for no_such_tracker, which is not installed") as err:
        tracker_names("tensorboard,no_such_tracker")
    assert "set report_to: tensorboard" in str(err.value)


def test_trackers_without_an_accelerator_log_each_record_at_its_step(tmp_path):
    """As the pipeline recipe tracks: Accelerate's TensorBoard tracker built directly, no Accelerator."""
    trackers = Trackers("tensorboard", str(tmp_path), "run")
    trackers.start(SFTConfig(model_name_or_path="m"))
    trackers.log({"step": 1, "loss": 2.5, "grad_norm": None, "skipped": True, "lr": 1e-3})
    trackers.log({"step": 2, "loss": 1.25, "lr": 5e-4, "epoch": 0.5})
    trackers.finish()
    [events] = (tmp_path / "run").glob("events.out.tfevents.*")
    board = EventAccumulator(str(events)).Reload()
    assert sorted(board.Tags()["scalars"]) == ["epoch", "loss", "lr"]  # numbers only: no None, no flags
    assert [(e.step, e.value) for e in board.Scalars("loss")] == [(1, 2.5), (2, 1.25)]
    assert [(e.step, e.value) for e in board.Scalars("lr")] == [(1, np.float32(1e-3)), (2, np.float32(5e-4))]
    assert [e.step for e in board.Scalars("epoch")] == [2]


def test_hparams_are_scalars_every_tracker_accepts():
    values = hparams(SFTConfig(max_train_samples=None, model_name_or_path="m"))
    assert values["max_train_samples"] == "null" and values["model_name_or_path"] == "m"
    assert all(isinstance(v, (bool, int, float, str)) for v in values.values())
