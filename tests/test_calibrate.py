"""`recipes plan --calibrate K`: extrapolation arithmetic, and a real prediction against a real full run."""

import contextlib
import json
import os

import pytest
from helpers import REPO, launch, load_plan, make_tiny_decoder, offline_env, train_records

from recipes.cli import main
from recipes.core.calibrate import extrapolate, micro_batches_per_rank, window_size
from recipes.core.steps import make_plan

# 50 samples, micro batch 4 -> 13 batches per epoch on 1 rank; GA 4 -> windows 4, 4, 4, 1 (4 steps/epoch)
PLAN = make_plan(
    num_samples=50,
    world_size=1,
    micro_batch_size=4,
    gradient_accumulation_steps=4,
    num_train_epochs=3,
    learning_rate=1e-3,
).to_dict()


def test_window_sizes_include_the_short_last_window_of_each_epoch():
    assert (PLAN["optimizer_steps_per_epoch"], PLAN["total_optimizer_steps"]) == (4, 12)
    assert [window_size(PLAN, s) for s in range(1, 13)] == [4, 4, 4, 1] * 3
    assert micro_batches_per_rank(PLAN) == 3 * 13 == sum(window_size(PLAN, s) for s in range(1, 13))


def test_max_steps_mid_epoch_counts_only_the_windows_run():
    plan = {**PLAN, "total_optimizer_steps": 6}  # one epoch (13) + two full windows (8)
    assert micro_batches_per_rank(plan) == 13 + 8


def test_extrapolation_counts_warmup_once_and_steady_time_per_micro_batch():
    calibration = {**PLAN, "total_optimizer_steps": 4}
    # measured: warm-up 2.0 s, then steps of 4, 4 and 1 micro-batches taking 0.8, 0.8 and 0.2 s
    # steady time per micro-batch = (0.8 + 0.8 + 0.2) / (4 + 4 + 1) = 0.2 s
    # full plan: 39 micro-batches, the first step's 4 are the warm-up -> 2.0 + 0.2 x 35 = 9.0 s
    assert extrapolate([2.0, 0.8, 0.8, 0.2], calibration, PLAN) == pytest.approx(9.0, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 measured steps"):
        extrapolate([1.0], calibration, PLAN)


@pytest.fixture
def timing_priority():
    """Timing on a shared 2-core machine: other work there can halve a run's speed for seconds at a time.
    When allowed, both runs (children inherit the policy) get a real-time FIFO priority, so that what they
    measure is this machine's speed rather than its neighbours' load; otherwise they run as usual."""
    before = os.sched_getscheduler(0), os.sched_getparam(0)
    with contextlib.suppress(PermissionError, OSError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    yield
    with contextlib.suppress(PermissionError, OSError):
        os.sched_setscheduler(0, before[0], before[1])


def test_calibrated_prediction_lands_within_10_percent_of_the_full_run(
    tmp_path, monkeypatch, capsys, timing_priority
):
    model = make_tiny_decoder(tmp_path / "model", "llama", num_layers=12)
    # Every sample is longer than 48 tokens, so every micro-batch is exactly 8 x 48 and costs the same;
    # drop_last keeps the last batch full. 3 epochs of 2-batch steps; the 25 + 1 calibration steps cross
    # an epoch boundary.
    recipe = tmp_path / "sft_calibrate.yaml"
    recipe.write_text(
        f"model_name_or_path: {model}\ndataset_name: recipes/data/sft_instructions\neval_split: null\n"
        "max_seq_length: 48\nper_device_train_batch_size: 8\ngradient_accumulation_steps: 2\n"
        "dataloader_drop_last: true\nnum_train_epochs: 3\nlearning_rate: 1.0e-3\nlogging_steps: 1\n"
    )
    # One thread per process: step times then depend far less on what else the two cores are doing.
    env = {**offline_env(), "OMP_NUM_THREADS": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)

    assert (
        main(
            [
                "plan",
                "--config",
                str(recipe),
                "--accelerate-config",
                "accelerate_configs/cpu.yaml",
                "--calibrate",
                "15",
                "--json",
            ]
        )
        == 0
    )
    # the JSON object is the last line (a library may log a warning to stdout when first imported)
    planned = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    predicted = planned["estimate"]["calibrated_wall_clock_seconds"]

    full = tmp_path / "full"
    launch(
        "accelerate_configs/cpu.yaml",
        "recipes/sft.py",
        ["--config", str(recipe), "--output_dir", str(full)],
        env=env,
    )
    records = train_records(full)
    assert len(records) == load_plan(full)["total_optimizer_steps"] == planned["total_optimizer_steps"]
    assert planned["total_optimizer_steps"] > 25 + 1  # the extrapolation covers steps it did not run
    measured = sum(r["step_time"] for r in records)
    assert abs(predicted - measured) / measured < 0.10, (predicted, measured)
