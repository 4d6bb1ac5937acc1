"""The SFT recipe does exactly what its plan says, on one process and on two (the shared job of
helpers.JOB: 44 samples, 8 per optimizer step, 6 steps per epoch with a short last window, 12 in all)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    JOB_STEPS,
    JOB_STEPS_PER_EPOCH,
    adam_tolerance,
    eval_records,
    float32_tolerance,
    in_process,
    job_args,
    load_plan,
    load_weights,
    max_weight_diff,
    read_jsonl,
    run_sums,
    step_loss_tolerance,
    train_records,
    weight_distance,
)

from recipes.cli import main as recipes_cli
from recipes.core.doctor.findings import DoctorError

# reference name: (processes, gradient accumulation) the shared job resolves to there
TOPOLOGIES = {"1proc": (1, 4), "big_batch": (1, 1), "ddp": (2, 2)}
NAMES = ["1proc", "big_batch", pytest.param("ddp", marks=pytest.mark.slow)]  # ddp launches 2 processes


@pytest.fixture(scope="module")
def max_steps_run(tiny_llama, tmp_path_factory):
    """The shared job stopped by max_steps 8 in the middle of its second epoch, with warmup from a ratio."""
    out = tmp_path_factory.mktemp("max_steps")
    in_process(
        "sft", job_args(tiny_llama, out, "--max_steps", "8", "--warmup_steps", "0", "--warmup_ratio", "0.3")
    )
    return out


@pytest.mark.parametrize("name", NAMES)
def test_run_takes_exactly_the_planned_optimizer_steps(reference, name):
    processes, ga = TOPOLOGIES[name]
    plan = load_plan(reference(name))
    assert plan["world_size"] == processes  # the run really saw this many processes
    # global_batch_size 8 sets the accumulation from the world size: 8 / (micro batch x ranks)
    assert (plan["gradient_accumulation_steps"], plan["global_batch_size"]) == (ga, 8)
    assert plan["total_optimizer_steps"] == JOB_STEPS
    assert [r["step"] for r in train_records(reference(name))] == list(range(1, JOB_STEPS + 1))


def test_max_steps_stops_the_run_mid_epoch_at_exactly_that_step(max_steps_run):
    plan = load_plan(max_steps_run)
    assert (plan["total_optimizer_steps"], plan["num_epochs"], plan["warmup_steps"]) == (8, 2, 3)  # ceil(2.4)
    records = train_records(max_steps_run)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["epoch"] == round(1 + 2 / JOB_STEPS_PER_EPOCH, 4)


@pytest.mark.parametrize("name", [*NAMES, "max_steps"])
def test_every_step_uses_the_lr_of_the_documented_formula(reference, max_steps_run, name):
    out_dir = max_steps_run if name == "max_steps" else reference(name)
    plan = load_plan(out_dir)
    peak, warmup, total = plan["learning_rate"], plan["warmup_steps"], plan["total_optimizer_steps"]
    lrs = [r["lr"] for r in train_records(out_dir)]
    for step, lr in enumerate(lrs, start=1):
        done = step - 1
        expected = peak * (done / warmup) if done < warmup else peak * ((total - done) / (total - warmup))
        assert lr == expected, (step, lr, expected)
    assert lrs.index(max(lrs)) == warmup and max(lrs) == peak  # the peak is the step right after warmup
    assert [i for i, lr in enumerate(lrs) if lr == 0.0] == [0]  # 0 only where warmup starts
    [end] = [r for r in read_jsonl(out_dir / "metrics.jsonl") if "lr_after_training" in r]
    assert (end["step"], end["lr_after_training"]) == (total, 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_run_reports_its_loop_time_throughput_and_every_process_peak_memory(reference, name):
    out_dir = reference(name)
    records = read_jsonl(out_dir / "metrics.jsonl")
    [end] = [r for r in records if "train_runtime" in r]
    steps = train_records(out_dir)
    # The loop's wall clock holds every step's time plus data loading between steps.
    assert sum(r["step_time"] for r in steps) <= end["train_runtime"]
    tokens = sum(r["tokens"] for r in steps)
    # Both are rounded (runtime to 1 us, throughput to 0.001): allow exactly what rounding can change.
    runtime = end["train_runtime"]
    assert abs(end["train_tokens_per_second"] - tokens / runtime) <= tokens * 5e-7 / runtime**2 + 5e-4
    processes, _ = TOPOLOGIES[name]
    assert len(end["peak_memory_mib_per_process"]) == processes
    # Every process holds at least the torch runtime and the model; a tiny model fits in well under 4 GiB.
    assert all(100 < mib < 4096 for mib in end["peak_memory_mib_per_process"])
    assert len(end["setup_peak_memory_mib_per_process"]) == processes
    assert all(mib > 100 for mib in end["setup_peak_memory_mib_per_process"])


@pytest.mark.parametrize("name", ["1proc", "big_batch"])
def test_one_process_epoch_trains_on_every_target_token_once(reference, name, tiny_llama):
    from transformers import AutoTokenizer

    from recipes.core.config import parse_config
    from recipes.sft import SFTConfig, load_data

    cfg = parse_config(SFTConfig, reference.args(name))
    train_set, _, _ = load_data(cfg, AutoTokenizer.from_pretrained(tiny_llama))
    records = train_records(reference(name))
    for epoch in range(2):
        steps = records[epoch * JOB_STEPS_PER_EPOCH : (epoch + 1) * JOB_STEPS_PER_EPOCH]
        assert sum(r["tokens"] for r in steps) == sum(train_set["num_targets"])
        assert steps[-1]["epoch"] == epoch + 1.0


def test_accumulation_equals_one_big_batch_on_one_process(reference, tiny_llama):
    assert_one_big_batch(reference("1proc"), reference("big_batch"), tiny_llama)


@pytest.mark.slow
def test_accumulation_and_data_parallelism_equal_one_big_batch(reference, tiny_llama):
    assert_one_big_batch(reference("ddp"), reference("big_batch"), tiny_llama)


def assert_one_big_batch(ours, big_batch, initial) -> None:
    """Micro-batches accumulated (and spread over ranks) give the per-step losses and the final weights of
    one batch of all 8 samples, the short last window of each epoch included."""
    records, reference = train_records(ours), train_records(big_batch)
    assert [r["tokens"] for r in records] == [r["tokens"] for r in reference]
    reference_weights, sums = load_weights(big_batch / "final"), run_sums(big_batch)
    n_weights = sum(t.numel() for t in reference_weights.values())
    for a, b in zip(records, reference, strict=True):  # the same sums, added in another order
        assert abs(a["loss"] - b["loss"]) <= step_loss_tolerance(b, reference, sums, n_weights), (a, b)
    tolerance = adam_tolerance(sums.gradient, [r["lr"] for r in reference], n_weights)
    assert weight_distance(load_weights(ours / "final"), reference_weights) <= tolerance
    assert max_weight_diff(reference_weights, load_weights(initial)) > 1e-3  # moved well past the tolerance


@pytest.mark.slow
def test_eval_loss_is_the_same_on_two_processes_with_an_uneven_eval_split(reference):
    # 13 eval samples at batch 4 on 2 ranks: the second rank's last batch repeats samples, which
    # gather_for_metrics drops; before training the weights are identical, so the losses must be too.
    one, two = eval_records(reference("1proc"))[0], eval_records(reference("ddp"))[0]
    assert one["step"] == two["step"] == 0
    # the same weights: the eval loss's sums, added in another order
    tolerance = float32_tolerance(run_sums(reference("1proc")).eval_loss, one["eval_loss"])
    assert abs(one["eval_loss"] - two["eval_loss"]) <= tolerance


@pytest.mark.slow
def test_run_leaves_config_plan_metrics_and_a_loadable_model(reference, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = reference("ddp")
    assert {p.name for p in out_dir.iterdir()} >= {"config.yaml", "plan.json", "metrics.jsonl", "final"}
    model = AutoModelForCausalLM.from_pretrained(out_dir / "final", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out_dir / "final")
    assert tokenizer.chat_template
    saved = load_weights(out_dir / "final")
    assert max_weight_diff(saved, load_weights(tiny_llama)) > 1e-3  # it trained
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)
    assert [e["step"] for e in eval_records(out_dir)] == [0, 4, 8, 12]


@pytest.mark.slow
def test_recipes_plan_prints_what_the_run_then_did(reference, capsys):
    assert recipes_cli(["plan", *reference.args("ddp"), "--num-processes", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    plan = load_plan(reference("ddp"))
    assert {key: printed[key] for key in plan} == plan
    assert set(printed) - set(plan) == {"estimate"}  # cost estimate on top of the run's own plan


def test_global_batch_size_that_does_not_divide_fails_before_anything_is_written(tiny_llama, tmp_path):
    with pytest.raises(DoctorError) as err:
        in_process("sft", job_args(tiny_llama, tmp_path / "out", "--global_batch_size", "9"))
    assert (
        "global_batch_size: 9 is not divisible by per_device_train_batch_size x data-parallel size = 2 x 1 = 2"
        in str(err.value)
    )
    assert "(nearest: 8 or 10)" in str(err.value)
    assert not (tmp_path / "out").exists()
