"""The DPO recipe does what its plan says and its arithmetic is exact: the loss is ln 2 while the policy is
the reference, accumulation and data parallelism equal one big batch of pairs, ZeRO-3 trains as DDP does,
under ZeRO-2 bf16 the frozen reference computes in the engine's precision, the precomputed and on-the-fly
references give the same losses, LoRA's disabled adapter is the frozen base, and a run stopped by SIGTERM
resumes into the uninterrupted one.

The runs are one tiny job: 20 pairs of the bundled preference data at micro batch 2, 8 pairs per optimizer
step on every topology (GA 4 on one process, GA 2 on two, GA 1 at micro batch 8): windows of 8, 8 and a
short 4 each epoch, 3 steps per epoch, 6 over 2 epochs, the same pairs in the same step everywhere;
checkpoints every 2 steps, evaluation of 6 pairs before and after training.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    EXAMPLES,
    FLOAT64_UNIT_ROUNDOFF,
    ONE_PROCESS,
    REPO,
    TWO_PROCESSES,
    Sums,
    adam_tolerance,
    assert_curves_and_tensorboard_losses,
    assert_same_run,
    eval_records,
    finish,
    float32_tolerance,
    in_process,
    launch,
    load_plan,
    load_weights,
    max_weight_diff,
    read_jsonl,
    train_records,
    trained_steps,
    wait_for,
    weight_distance,
    workers,
    write_jsonl,
)
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoConfig

from recipes.cli import main as recipes_cli
from recipes.core.config import ConfigError
from recipes.core.errors import DataError
from recipes.core.exit_status import EXIT_INTERRUPTED
from recipes.core.losses.dpo import METRICS, pair_losses
from recipes.core.output.run_dir import MARKER

DPO_CONFIG = "recipes/configs/dpo_smollm2.yaml"
PREFERENCES = REPO / "recipes" / "data" / "preferences"
STEPS, STEPS_PER_EPOCH, WARMUP, BETA = 6, 3, 1, 0.1
PAIRS = [8, 8, 4] * 2
JOB = [
    "--dataset_name", str(PREFERENCES), "--max_train_samples", "20", "--per_device_train_batch_size", "2",
    "--global_batch_size", "8", "--num_train_epochs", "2", "--warmup_steps", str(WARMUP), "--max_prompt_length", "64",
    "--max_length", "96", "--learning_rate", "1e-3", "--beta", str(BETA), "--seed", "7", "--max_eval_samples", "6",
    "--per_device_eval_batch_size", "4", "--logging_steps", "1", "--save_steps", "2", "--report_to", "none",
    "--precompute_ref_log_probs", "false",
]  # fmt: skip
LORA = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--save_steps", "0"]
RUNS = {  # name: (accelerate config, or None to run in this process; extra arguments)
    "1proc": (None, ["--report_to", "tensorboard"]),  # GA 4; the reference is a frozen copy
    "1proc_precomputed": (None, ["--precompute_ref_log_probs", "true"]),
    "big_batch": (None, ["--per_device_train_batch_size", "8", "--save_steps", "0"]),
    "ddp_precomputed": (TWO_PROCESSES, ["--precompute_ref_log_probs", "true"]),
    "zero3": ("accelerate_configs/ds_zero3.yaml", []),  # the frozen copy partitioned like the policy
    "fsdp2_precomputed": ("accelerate_configs/fsdp2.yaml", ["--precompute_ref_log_probs", "true"]),
    "lora": (None, LORA),  # the reference is the policy with its adapter disabled
    "lora_copy": (None, [*LORA, "--ref_model_name_or_path", "{model}"]),  # the same base as a frozen copy
    # TRL's standard form (strings), held-out rows for evaluation, the IPO loss
    "ipo_strings": (None, ["--dataset_name", str(EXAMPLES / "preference.jsonl"), "--eval_split_size", "2",
                           "--loss_type", "ipo", "--global_batch_size", "2", "--save_steps", "0"]),
}  # fmt: skip


def dpo_args(model: Path, output_dir: Path, *extra: str) -> list[str]:
    args = ["--config", DPO_CONFIG, "--model_name_or_path", str(model), "--output_dir", str(output_dir), *JOB]
    return [*args, *(arg.format(model=model) for arg in extra)]


class Runs:
    """`runs[name]`: the output_dir of RUNS[name], made on first use; `runs.args(name)` its arguments."""

    def __init__(self, model: Path, tmp_path_factory):
        self.model, self.tmp_path_factory, self.made = model, tmp_path_factory, {}

    def args(self, name: str, output_dir: Path | None = None) -> list[str]:
        return dpo_args(self.model, output_dir or self[name], *RUNS[name][1])

    def __getitem__(self, name: str) -> Path:
        if name not in self.made:
            out = self.tmp_path_factory.mktemp(f"dpo_{name}")
            config, extra = RUNS[name]
            args = dpo_args(self.model, out, *extra)
            if config is None:
                in_process("dpo", args)
            else:
                launch(config, "dpo", args)
            self.made[name] = out
        return self.made[name]


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory) -> Runs:
    return Runs(tiny_llama, tmp_path_factory)


def slow(name: str):
    return pytest.param(name, marks=pytest.mark.slow)


# ---------------------------------------------------------------- rounding
MAX_LENGTH, EVAL_PAIRS = 96, 6  # the JOB's


def dpo_sums(model: Path) -> Sums:
    """The job's chains of sums: 8 pairs per step, 6 per evaluation, two sequences of up to max_length
    tokens each; a sequence's log-probability is a loss over up to max_length tokens."""
    config = AutoConfig.from_pretrained(model)
    return Sums(config, MAX_LENGTH, 2 * 8, 2 * EVAL_PAIRS, outputs=config.vocab_size)


def reward_size(r: dict, side: str, prefix: str = "") -> float:
    """The mean over the record's pairs of |policy log-probability| + |reference log-probability| of `side`:
    both are negative, so these are the magnitudes of their means, the reference's being the policy's less
    the reward over BETA."""
    policy = abs(r[f"{prefix}logps/{side}"])
    return policy + abs(r[f"{prefix}logps/{side}"] - r[f"{prefix}rewards/{side}"] / BETA)


def reward_tolerance(r: dict, side: str, sums: Sums, prefix: str = "") -> float:
    """How far rounding can move the mean reward of `side`, BETA times the policy's log-probability less the
    reference's, each added up in another order."""
    return BETA * float32_tolerance(sums.loss(MAX_LENGTH), reward_size(r, side, prefix))


def dpo_loss_tolerance(
    r: dict, pairs: int, records: list[dict], after_step: int, n_weights: int, sums: Sums, prefix: str = ""
) -> float:
    """How far rounding can move a DPO loss after optimizer step `after_step` of the reference run's training
    `records`: the mean over `pairs` pairs of -log sigmoid(margin), whose slope in the margin (chosen's
    reward less rejected's) is at most 1, plus the mean's own rounding, plus the distance the steps can
    have put between the runs' weights (adam_tolerance) times the loss's gradient norm."""
    margin = reward_tolerance(r, "chosen", sums, prefix) + reward_tolerance(r, "rejected", sums, prefix)
    lrs = [p["lr"] for p in records if p["step"] <= after_step]
    drift = max(p["grad_norm"] for p in records) * adam_tolerance(sums.gradient, lrs, n_weights)
    return margin + float32_tolerance(pairs, r[f"{prefix}loss"]) + drift


# ---------------------------------------------------------------- the first step: policy = reference
@pytest.mark.parametrize("name", ["1proc", "lora", slow("zero3")])
def test_first_step_loss_is_ln2_and_every_reward_zero_while_the_policy_is_the_reference(runs, name):
    """Before the first update every pair's log-ratio difference is 0: loss ln 2, rewards 0. The margin
    averages 0 while no pair's chosen reward exceeds its rejected one (accuracy 0): so every margin, on
    every rank, is 0."""
    first = train_records(runs[name])[0]
    # the mean of the step's pairs' losses, each ln 2 rounded to float32
    assert abs(first["loss"] - math.log(2)) <= float32_tolerance(first["pairs"], math.log(2))
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    assert first["rewards/accuracies"] == 0.0
    [before] = [r for r in eval_records(runs[name]) if r["step"] == 0]
    assert abs(before["eval_loss"] - math.log(2)) <= float32_tolerance(EVAL_PAIRS, math.log(2))
    assert before["eval_rewards/margins"] == before["eval_rewards/accuracies"] == 0.0


@pytest.mark.parametrize("name", ["1proc_precomputed", slow("ddp_precomputed")])
def test_first_step_loss_is_ln2_with_the_reference_precomputed(runs, tiny_llama, name):
    """Precomputed in batches padded otherwise than training's, the reference agrees to float rounding."""
    first, sums = train_records(runs[name])[0], dpo_sums(tiny_llama)
    chosen = reward_tolerance(first, "chosen", sums)
    margin = chosen + reward_tolerance(first, "rejected", sums)
    # ln 2 rounded, moved by the margin's rounding at a slope of at most 1
    assert abs(first["loss"] - math.log(2)) <= float32_tolerance(first["pairs"], math.log(2)) + margin
    assert abs(first["rewards/margins"]) <= margin and abs(first["rewards/chosen"]) <= chosen


def test_ipo_run_on_prompt_completion_strings_starts_at_its_target_margin_squared(runs):
    """IPO's loss is (h - 1/(2 beta))^2, so 25 at h = 0 with beta 0.1."""
    records = train_records(runs["ipo_strings"])
    # the mean of the step's pairs' losses, each 25 rounded to float32
    assert abs(records[0]["loss"] - (1 / (2 * BETA)) ** 2) <= float32_tolerance(records[0]["pairs"], 25.0)
    assert load_plan(runs["ipo_strings"])["data"]["train"]["form"] == "standard"
    assert load_plan(runs["ipo_strings"])["data"]["eval_pairs"] == 2


# ---------------------------------------------------------------- steps, schedule, records, plan
@pytest.mark.parametrize("name", ["1proc", "big_batch", slow("ddp_precomputed")])
def test_run_takes_the_planned_steps_over_the_planned_pairs_with_the_lr_of_the_formula(runs, name):
    plan = load_plan(runs[name])
    assert (plan["total_optimizer_steps"], plan["global_batch_size"], plan["num_samples"]) == (STEPS, 8, 20)
    assert plan["world_size"] == (2 if name.startswith("ddp") else 1)
    records = train_records(runs[name])
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["pairs"] for r in records] == PAIRS
    peak = plan["learning_rate"]
    for r in records:
        done = r["step"] - 1
        # LambdaLR: the peak times the schedule's factor
        expected = peak * (done / WARMUP) if done < WARMUP else peak * ((STEPS - done) / (STEPS - WARMUP))
        assert r["lr"] == expected
    [end] = [r for r in read_jsonl(runs[name] / "metrics.jsonl") if "lr_after_training" in r]
    assert (end["step"], end["lr_after_training"]) == (STEPS, 0.0)
    assert end["train_pairs_per_second"] > 0


def test_every_step_records_the_loss_rewards_and_logps_also_in_tensorboard(runs):
    out = runs["1proc"]
    records = train_records(out)
    for r in records:
        assert set(METRICS) <= set(r)
        # the mean of the pairs' margins against the difference of the rewards' means: the same float32
        # rewards, subtracted and added up over the pairs in another order
        rewards = BETA * (reward_size(r, "chosen") + reward_size(r, "rejected"))  # at least their magnitudes
        tolerance = float32_tolerance(r["pairs"], rewards)
        assert abs(r["rewards/margins"] - (r["rewards/chosen"] - r["rewards/rejected"])) <= tolerance
        assert float(r["rewards/accuracies"] * r["pairs"]).is_integer()  # a share of the step's pairs
        assert r["logps/chosen"] < 0 and r["logps/rejected"] < 0
    assert records[-1]["rewards/accuracies"] > 0.5  # the tiny model learns the preference of the step's pairs
    assert [r["step"] for r in eval_records(out)] == [0, STEPS]
    assert set(eval_records(out)[-1]) == {"step", "eval_loss", *(f"eval_{name}" for name in METRICS)}
    [events] = (out / "dpo").glob("events.out.tfevents.*")
    board = EventAccumulator(str(events)).Reload()
    for key in ("loss", "rewards/chosen", "rewards/accuracies", "logps/rejected"):
        assert [e.value for e in board.Scalars(key)] == [np.float32(r[key]) for r in records]
    assert [e.step for e in board.Scalars("eval_rewards/accuracies")] == [0, STEPS]


def test_run_draws_curves_and_logs_every_step_loss_to_tensorboard(runs):
    assert_curves_and_tensorboard_losses(runs["1proc"], "dpo", STEPS)


def test_recipes_plan_prints_what_the_run_then_did(runs, capsys):
    assert recipes_cli(["plan", *runs.args("1proc"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    plan = load_plan(runs["1proc"])
    assert {key: printed[key] for key in plan} == plan
    assert plan["data"]["train_pairs"] == 20 and plan["data"]["eval_pairs"] == 6


# ---------------------------------------------------------------- exactness
def assert_trains_like(ours: Path, reference: Path, model: Path, metrics: bool = False) -> None:
    """The reference run's losses (with `metrics` also its gradient norms, rewards, accuracies and
    log-probabilities), eval losses and final weights, to the rounding of the same sums added in another
    order (or on other ranks)."""
    a, b = train_records(ours), train_records(reference)
    theirs = load_weights(reference / "final")
    n_weights, sums = sum(t.numel() for t in theirs.values()), dpo_sums(model)
    for x, y in zip(a, b, strict=True):
        tolerance = dpo_loss_tolerance(y, y["pairs"], b, y["step"] - 1, n_weights, sums)
        assert abs(x["loss"] - y["loss"]) <= tolerance, (x, y)
        if not metrics:
            continue
        # the gradient's rounding moves its norm by no more, relatively
        assert abs(x["grad_norm"] - y["grad_norm"]) <= float32_tolerance(sums.gradient, y["grad_norm"])
        for side in ("chosen", "rejected"):
            logps, terms = f"logps/{side}", sums.loss(MAX_LENGTH)
            assert abs(x[logps] - y[logps]) <= float32_tolerance(terms, abs(y[logps])), (side, x, y)
            assert abs(x[f"rewards/{side}"] - y[f"rewards/{side}"]) <= reward_tolerance(y, side, sums)
        margin = reward_tolerance(y, "chosen", sums) + reward_tolerance(y, "rejected", sums)
        assert abs(x["rewards/margins"] - y["rewards/margins"]) <= margin
        assert x["rewards/accuracies"] == y["rewards/accuracies"]  # a share of the step's pairs
    for x, y in zip(eval_records(ours), eval_records(reference), strict=True):
        tolerance = dpo_loss_tolerance(y, EVAL_PAIRS, b, y["step"], n_weights, sums, prefix="eval_")
        assert abs(x["eval_loss"] - y["eval_loss"]) <= tolerance, (x, y)
    tolerance = adam_tolerance(sums.gradient, [r["lr"] for r in b], n_weights)
    assert weight_distance(load_weights(ours / "final"), theirs) <= tolerance


def assert_one_big_batch(ours: Path, big_batch: Path, initial: Path) -> None:
    records, reference = train_records(ours), train_records(big_batch)
    assert [r["pairs"] for r in records] == [r["pairs"] for r in reference] == PAIRS
    assert_trains_like(ours, big_batch, initial)
    reference_weights = load_weights(big_batch / "final")
    assert max_weight_diff(reference_weights, load_weights(initial)) > 1e-3  # moved well past the tolerance


def test_accumulation_equals_one_big_batch_of_pairs_on_one_process(runs, tiny_llama):
    assert_one_big_batch(runs["1proc"], runs["big_batch"], tiny_llama)


@pytest.mark.slow
def test_accumulation_and_data_parallelism_equal_one_big_batch_of_pairs(runs, tiny_llama):
    """Two ranks, each precomputing its share of the reference values, gathered back in dataset order."""
    assert_one_big_batch(runs["ddp_precomputed"], runs["big_batch"], tiny_llama)


@pytest.mark.slow
def test_zero3_with_its_partitioned_reference_trains_as_ddp_does(runs, tiny_llama):
    zero3, ddp = train_records(runs["zero3"]), train_records(runs["ddp_precomputed"])
    assert [r["pairs"] for r in zero3] == [r["pairs"] for r in ddp]
    assert all(set(METRICS) <= set(r) for r in zero3)
    assert_trains_like(runs["zero3"], runs["ddp_precomputed"], tiny_llama, metrics=True)
    final = load_weights(runs["zero3"] / "final")
    assert max_weight_diff(final, load_weights(tiny_llama)) > 1e-3


@pytest.mark.slow
def test_fsdp2_with_the_sharded_policy_as_its_reference_trains_as_ddp_does(runs, tiny_llama):
    """The reference values precomputed through the FSDP2-sharded policy before its first step."""
    fsdp2, ddp = train_records(runs["fsdp2_precomputed"]), train_records(runs["ddp_precomputed"])
    assert [(r["step"], r["lr"], r["pairs"]) for r in fsdp2] == [
        (r["step"], r["lr"], r["pairs"]) for r in ddp
    ]
    assert all(set(METRICS) <= set(r) for r in fsdp2)
    assert_trains_like(runs["fsdp2_precomputed"], runs["ddp_precomputed"], tiny_llama, metrics=True)
    final = load_weights(runs["fsdp2_precomputed"] / "final")
    assert max_weight_diff(final, load_weights(tiny_llama)) > 1e-3


@pytest.mark.slow  # DeepSpeed's process group loads (and on a fresh machine builds) its C++ op
def test_frozen_copy_under_zero2_bf16_computes_in_the_engines_precision(deepspeed_env, tiny_llama, tmp_path):
    """A one-process ZeRO-2 bf16 run in this process: the policy computes in bf16, and so must the frozen
    copy (an fp32 copy's log-probabilities differ from bf16 ones by far more than rounding ln 2)."""
    deepspeed_env(REPO / "ds_configs" / "zero2.json")
    extra = ["--mixed_precision", "bf16", "--max_steps", "1", "--eval_split", "null", "--save_steps", "0"]
    in_process("dpo", dpo_args(tiny_llama, tmp_path / "out", *extra))
    [first] = train_records(tmp_path / "out")
    # the mean of the step's pairs' losses, each ln 2 rounded to float32
    assert abs(first["loss"] - math.log(2)) <= float32_tolerance(first["pairs"], math.log(2))
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0


def test_precomputed_reference_gives_the_on_the_fly_losses(runs, tiny_llama):
    """Precomputed in batches padded otherwise than training's: the same sums, added in another order."""
    assert_trains_like(runs["1proc_precomputed"], runs["1proc"], tiny_llama)


def test_lora_reference_with_the_adapter_disabled_equals_a_frozen_copy_of_the_base(runs):
    """The disabled adapter leaves the base layers' own operations, those of the frozen copy: the same
    floats, bit for bit."""
    adapter, copy = train_records(runs["lora"]), train_records(runs["lora_copy"])
    assert len(adapter) == STEPS
    for a, b in zip(adapter, copy, strict=True):
        assert a["loss"] == b["loss"] and a["rewards/margins"] == b["rewards/margins"]
    a, b = (load_file(str(runs[n] / "final" / "adapter_model.safetensors")) for n in ("lora", "lora_copy"))
    assert max_weight_diff(a, b) == 0.0
    assert max(t.abs().max().item() for k, t in a.items() if "lora_B" in k) > 1e-3  # the adapter trained


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_resume_equals_the_uninterrupted_run(runs, tiny_llama, tmp_path):
    """Stopped after step 2 or later, then resumed: the precomputed reference is computed again from the
    starting weights (before the checkpoint is loaded), so every record and the final weights are those of
    the run that never stopped."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    args = runs.args("1proc_precomputed", out)
    proc = launch(ONE_PROCESS, "dpo", args, log=log, exit_status=True)
    wait_for(lambda: trained_steps(out) >= 2, proc, log)
    for pid in workers(proc, "dpo"):
        os.kill(pid, signal.SIGTERM)
    output = finish(proc, log, expect_ok=False)
    assert proc.returncode == EXIT_INTERRUPTED, output[-4000:]
    stopped = int(re.search(r"stopped by signal after step (\d+)", output).group(1))
    assert 2 <= stopped < STEPS and (out / f"checkpoint-{stopped}" / MARKER).is_file()
    in_process("dpo", [*args, "--resume_from_checkpoint", "latest"])
    assert_same_run(runs["1proc_precomputed"], out)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--beta", "0"], "beta is 0; it must be > 0"),
        (["--loss_type", "kto"], "loss_type 'kto' is not one of sigmoid, ipo, hinge, robust"),
        (["--loss_type", "hinge", "--label_smoothing", "0.1"], "label_smoothing 0.1 has no meaning for loss_type hinge"),
        (["--max_prompt_length", "96"], r"max_prompt_length \(96\) leaves no room for a completion within max_length \(96\)"),
    ],
)  # fmt: skip
def test_settings_that_cannot_train_are_refused_before_anything_is_loaded(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        in_process("dpo", dpo_args(tmp_path / "no model", tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


def test_data_without_a_usable_pair_stops_the_run_before_output_dir_is_touched(tiny_llama, tmp_path):
    rows = [{**row, "rejected": row["chosen"]} for row in read_jsonl(EXAMPLES / "preference.jsonl")]
    data = write_jsonl(tmp_path / "ties.jsonl", rows)
    with pytest.raises(
        DataError, match=r"none of the 8 rows .* is a usable preference pair \(8 chosen identical"
    ):
        in_process(
            "dpo", dpo_args(tiny_llama, tmp_path / "out", "--dataset_name", str(data), "--eval_split", "null")
        )
    assert not (tmp_path / "out").exists()


def test_pair_losses_follow_their_formulas():
    import torch

    h_values = [-2.0, -0.3, 0.0, 0.7, 3.0]
    policy_chosen = torch.tensor(h_values, dtype=torch.float64)
    zeros = torch.zeros(len(h_values), dtype=torch.float64)
    beta, e = 0.5, 0.2

    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    expected = {
        "sigmoid": [-(1 - e) * log_sigmoid(beta * h) - e * log_sigmoid(-beta * h) for h in h_values],
        "robust": [(-(1 - e) * log_sigmoid(beta * h) + e * log_sigmoid(-beta * h)) / (1 - 2 * e) for h in h_values],
        "hinge": [max(0.0, 1 - beta * h) for h in h_values],
        "ipo": [(h - 1 / (2 * beta)) ** 2 for h in h_values],
    }  # fmt: skip
    # Each side evaluates log-sigmoid (an exponential and a logarithm) and a few products and sums of terms
    # no larger than the loss: within 10 float64 roundings of the exact value each.
    rel = 2 * 10 * FLOAT64_UNIT_ROUNDOFF
    for loss_type, values in expected.items():
        smoothing = e if loss_type in ("sigmoid", "robust") else 0.0
        losses = pair_losses(policy_chosen, zeros, zeros, zeros, beta, loss_type, smoothing)
        assert losses.tolist() == pytest.approx(values, rel=rel, abs=0), loss_type
    # h is the difference of the two log-ratios: shifting chosen's policy and reference alike changes nothing
    # but the rounding of h + 5 (u of |h| + 5), which moves the loss by at most beta times that
    shifted = pair_losses(policy_chosen + 5, zeros, zeros + 5, zeros, beta).tolist()
    plain = pair_losses(policy_chosen, zeros, zeros, zeros, beta).tolist()
    for a, b, h in zip(shifted, plain, h_values, strict=True):
        assert abs(a - b) <= beta * FLOAT64_UNIT_ROUNDOFF * (abs(h) + 5) + rel * b
