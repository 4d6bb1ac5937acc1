"""The SFT recipe through the real `accelerate launch`: the run does exactly what its plan says.

37 training samples at micro batch 2 make 19 batches, the last one short, so on 2 ranks the last round
is topped up (10 batches per rank) and accumulation over 3 leaves a partial last window in every epoch.
"""

from __future__ import annotations

import json
import math

import pytest
from helpers import (
    SFT_DATA,
    eval_records,
    launch,
    load_plan,
    load_weights,
    max_weight_diff,
    read_jsonl,
    train_records,
)

from recipes.cli import main as recipes_cli

ONE_PROCESS, TWO_PROCESSES = "accelerate_configs/cpu.yaml", "accelerate_configs/cpu_2proc.yaml"
COMMON = [
    "--config",
    "recipes/configs/sft_smollm2.yaml",
    "--dataset_name",
    str(SFT_DATA),
    "--max_train_samples",
    "37",
    "--per_device_train_batch_size",
    "2",
    "--max_eval_samples",
    "13",
    "--per_device_eval_batch_size",
    "4",
    "--max_seq_length",
    "96",
    "--learning_rate",
    "1e-3",
    "--logging_steps",
    "1",
]
# name: (processes, GA, extra overrides, expected total steps worked out by hand)
CASES = {
    # 19 batches per epoch, one window each, 2 epochs
    "1proc_ga1": (1, 1, ["--num_train_epochs", "2", "--warmup_steps", "3"], 38),
    # 19 batches -> windows 3,3,3,3,3,3,1 = 7 steps per epoch, 2 epochs; warmup ceil(0.2 x 14) = 3
    "1proc_ga3": (1, 3, ["--num_train_epochs", "2", "--warmup_ratio", "0.2"], 14),
    # 10 batches per rank, 2 epochs
    "2proc_ga1": (2, 1, ["--num_train_epochs", "2", "--warmup_steps", "4"], 20),
    # 10 batches per rank -> windows 3,3,3,1 = 4 steps per epoch; max_steps 6 runs into the second epoch
    "2proc_ga3": (2, 3, ["--num_train_epochs", "1", "--max_steps", "6", "--warmup_steps", "2"], 6),
}


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    out = {}
    for name, (procs, ga, extra, _) in CASES.items():
        out_dir = tmp_path_factory.mktemp(name)
        config = ONE_PROCESS if procs == 1 else TWO_PROCESSES
        args = [
            *COMMON,
            "--model_name_or_path",
            str(tiny_llama),
            "--output_dir",
            str(out_dir),
            "--gradient_accumulation_steps",
            str(ga),
            *extra,
        ]
        out[name] = (out_dir, launch(config, "recipes/sft.py", args), args)
    return out


@pytest.mark.parametrize("name", CASES)
def test_run_takes_exactly_the_planned_optimizer_steps(runs, name):
    procs, ga, _, expected_total = CASES[name]
    out_dir = runs[name][0]
    plan = load_plan(out_dir)
    assert plan["world_size"] == procs  # the run really saw this many processes
    assert plan["gradient_accumulation_steps"] == ga
    assert plan["total_optimizer_steps"] == expected_total
    steps = [r["step"] for r in train_records(out_dir)]
    assert steps == list(range(1, expected_total + 1))


@pytest.mark.parametrize("name", CASES)
def test_every_step_uses_the_lr_of_the_documented_formula(runs, name):
    out_dir = runs[name][0]
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


@pytest.mark.parametrize("name", CASES)
def test_run_reports_its_loop_time_throughput_and_every_process_peak_memory(runs, name):
    out_dir, _, _ = runs[name]
    records = read_jsonl(out_dir / "metrics.jsonl")
    [end] = [r for r in records if "train_runtime" in r]
    steps = train_records(out_dir)
    # The loop's wall clock holds every step's time plus data loading between steps.
    assert sum(r["step_time"] for r in steps) <= end["train_runtime"]
    tokens = sum(r["tokens"] for r in steps)
    # Both are rounded (runtime to 1 us, throughput to 0.001): allow exactly what rounding can change.
    runtime = end["train_runtime"]
    assert abs(end["train_tokens_per_second"] - tokens / runtime) <= tokens * 5e-7 / runtime**2 + 5e-4
    processes = CASES[name][0]
    assert len(end["peak_memory_mib_per_process"]) == processes
    # Every process holds at least the torch runtime and the model; a tiny model fits in well under 4 GiB.
    assert all(100 < mib < 4096 for mib in end["peak_memory_mib_per_process"])


@pytest.mark.parametrize("name", ["1proc_ga1", "1proc_ga3"])
def test_one_process_epoch_trains_on_every_target_token_once(runs, name, tiny_llama):
    from transformers import AutoTokenizer

    from recipes.core.config import parse_config
    from recipes.sft import SFTConfig, load_data

    out_dir, _, args = runs[name]
    cfg = parse_config(SFTConfig, args)
    train_set, _, _ = load_data(cfg, AutoTokenizer.from_pretrained(tiny_llama))
    plan = load_plan(out_dir)
    first_epoch = train_records(out_dir)[: plan["optimizer_steps_per_epoch"]]
    assert sum(r["tokens"] for r in first_epoch) == sum(train_set["num_targets"])
    assert first_epoch[-1]["epoch"] == 1.0


def test_eval_loss_is_the_same_on_two_processes_with_an_uneven_eval_split(runs):
    # 13 eval samples at batch 4 on 2 ranks: the second rank's last batch repeats samples, which
    # gather_for_metrics drops; before training the weights are identical, so the losses must be too.
    one = eval_records(runs["1proc_ga1"][0])[0]
    two = eval_records(runs["2proc_ga1"][0])[0]
    assert one["step"] == two["step"] == 0
    assert math.isclose(one["eval_loss"], two["eval_loss"], rel_tol=1e-6)


def test_run_leaves_config_plan_metrics_and_a_loadable_model(runs, tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = runs["2proc_ga3"][0]
    assert {p.name for p in out_dir.iterdir()} >= {"config.yaml", "plan.json", "metrics.jsonl", "final"}
    model = AutoModelForCausalLM.from_pretrained(out_dir / "final", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out_dir / "final")
    assert tokenizer.chat_template
    saved = load_weights(out_dir / "final")
    initial = load_weights(tiny_llama)
    assert max_weight_diff(saved, initial) > 1e-3  # it trained
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)
    evals = eval_records(out_dir)
    assert [e["step"] for e in evals] == [0, 6]


def test_recipes_plan_prints_what_the_run_then_did(runs, capsys):
    out_dir, _, args = runs["2proc_ga3"]
    assert recipes_cli(["plan", *args, "--num-processes", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    plan = load_plan(out_dir)
    assert {key: printed[key] for key in plan} == plan
    assert set(printed) - set(plan) == {"estimate"}  # cost estimate on top of the run's own plan


def test_global_batch_size_sets_accumulation_from_the_world_size(tiny_llama, tmp_path):
    args = [
        *COMMON,
        "--model_name_or_path",
        str(tiny_llama),
        "--output_dir",
        str(tmp_path),
        "--global_batch_size",
        "8",
        "--max_steps",
        "2",
        "--eval_split",
        "null",
    ]
    launch(TWO_PROCESSES, "recipes/sft.py", args)
    plan = load_plan(tmp_path)
    assert (plan["gradient_accumulation_steps"], plan["global_batch_size"]) == (
        2,
        8,
    )  # 8 / (micro 2 x 2 ranks)
    assert [r["step"] for r in train_records(tmp_path)] == [1, 2]


def test_global_batch_size_that_does_not_divide_fails_before_training(tiny_llama, tmp_path):
    args = [
        *COMMON,
        "--model_name_or_path",
        str(tiny_llama),
        "--output_dir",
        str(tmp_path / "out"),
        "--global_batch_size",
        "10",
    ]
    result = launch(TWO_PROCESSES, "recipes/sft.py", args, check=False)
    assert result.returncode != 0
    assert (
        "global_batch_size: 10 is not divisible by per_device_train_batch_size x data-parallel size = 2 x 2 = 4"
        in result.stderr
    )
    assert "(nearest: 8 or 12)" in result.stderr
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------- accumulation equivalence
EQUIVALENT = {  # name: (processes, micro batch, GA): 8 samples per optimizer step in every case
    "1proc_micro8_ga1": (1, 8, 1),
    "1proc_micro2_ga4": (1, 2, 4),
    "2proc_micro2_ga2": (2, 2, 2),
}


@pytest.fixture(scope="module")
def equivalent_runs(tiny_llama, tmp_path_factory):
    out = {}
    for name, (procs, micro, ga) in EQUIVALENT.items():
        out_dir = tmp_path_factory.mktemp(name)
        args = [
            *COMMON,
            "--model_name_or_path",
            str(tiny_llama),
            "--output_dir",
            str(out_dir),
            "--max_train_samples",
            "40",
            "--per_device_train_batch_size",
            str(micro),
            "--gradient_accumulation_steps",
            str(ga),
            "--num_train_epochs",
            "1",
            "--eval_split",
            "null",
            "--warmup_steps",
            "0",
        ]
        launch(ONE_PROCESS if procs == 1 else TWO_PROCESSES, "recipes/sft.py", args)
        out[name] = out_dir
    return out


def test_accumulation_and_data_parallelism_equal_one_big_batch(equivalent_runs, tiny_llama):
    reference = equivalent_runs["1proc_micro8_ga1"]
    ref_weights = load_weights(reference / "final")
    ref_losses = [r["loss"] for r in train_records(reference)]
    assert len(ref_losses) == 5  # 40 samples / 8 per step
    assert (
        max_weight_diff(ref_weights, load_weights(tiny_llama)) > 1e-3
    )  # weights moved well past the tolerance
    for name in ("1proc_micro2_ga4", "2proc_micro2_ga2"):
        records = train_records(equivalent_runs[name])
        assert [r["tokens"] for r in records] == [r["tokens"] for r in train_records(reference)]
        for ours, theirs in zip((r["loss"] for r in records), ref_losses, strict=True):
            assert math.isclose(ours, theirs, rel_tol=1e-5)
        assert max_weight_diff(load_weights(equivalent_runs[name] / "final"), ref_weights) <= 1e-5
