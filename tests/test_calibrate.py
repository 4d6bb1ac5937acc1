"""`recipes plan --calibrate K`: the extrapolation arithmetic, and the command on real steps."""

import json

import pytest
from helpers import FLOAT64_UNIT_ROUNDOFF, OFFLINE, REPO, make_tiny_decoder

from recipes.cli import main
from recipes.core.launch.calibrate import extrapolate, micro_batches_per_rank, window_size
from recipes.core.plan.steps import make_plan

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
    # 0.8 and 0.2 are rounded to binary, then 5 operations round: within 8 u of the decimal 9.0
    extrapolated = extrapolate([2.0, 0.8, 0.8, 0.2], calibration, PLAN)
    assert extrapolated == pytest.approx(9.0, rel=8 * FLOAT64_UNIT_ROUNDOFF, abs=0)
    with pytest.raises(ValueError, match="at least 2 measured steps"):
        extrapolate([1.0], calibration, PLAN)


@pytest.mark.slow
def test_plan_calibrate_times_real_steps_and_extrapolates_them_over_the_plan(tmp_path, monkeypatch, capsys):
    """How close the prediction lands is a speed figure, measured by the benchmark (`python -m bench`,
    section plan); this proves the command runs real steps and extrapolates them as documented."""
    model = make_tiny_decoder(tmp_path / "model", "llama")
    # 48 samples at micro batch 8 with drop_last: 6 batches, GA 2 -> 3 steps per epoch, 4 epochs = 12 steps.
    recipe = tmp_path / "sft_calibrate.yaml"
    recipe.write_text(
        f"model_name_or_path: {model}\ndataset_name: recipes/data/sft_instructions\neval_split: null\n"
        "max_seq_length: 512\nper_device_train_batch_size: 8\ngradient_accumulation_steps: 2\n"
        "max_train_samples: 48\ndataloader_drop_last: true\nnum_train_epochs: 4\nlogging_steps: 1\n"
    )
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)
    args = ["plan", "--config", str(recipe), "--accelerate-config", "accelerate_configs/cpu.yaml"]
    assert main([*args, "--calibrate", "3", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    estimate = planned["estimate"]
    assert planned["total_optimizer_steps"] == 12 and planned["batches_per_epoch_per_rank"] == 6
    assert estimate["calibration_steps"] == 3
    assert estimate["seconds_per_step"] > 0 and estimate["warmup_step_seconds"] > 0
    # 3 + 1 steps were timed; all 24 micro-batches of the plan = the warm-up step's 2 once, then 22 at the
    # steady time per micro-batch (every timed step after the warm-up has 2 micro-batches).
    steady_per_micro_batch = estimate["seconds_per_step"] / 2
    # each side adds the times (2 roundings), divides, multiplies and adds the warm-up: within 5 u of the
    # exact value, all terms positive
    assert estimate["calibrated_wall_clock_seconds"] == pytest.approx(
        estimate["warmup_step_seconds"] + 22 * steady_per_micro_batch, rel=10 * FLOAT64_UNIT_ROUNDOFF, abs=0
    )
