"""DeepSpeed ZeRO-1/2/3 (and offload) through the real `accelerate launch` on 2 CPU processes: the same
steps, schedule, losses and final weights as DDP, with the recipe as the only source of the batch,
accumulation, clipping and precision settings.

Shared runs: 56 samples at micro batch 2 on 2 ranks are 14 batches per rank, so GA 4 makes windows of
4, 4, 4 and 2 micro-batches: 4 optimizer steps per epoch, 8 over 2 epochs, with a partial window at the
end of each epoch. max_grad_norm 0.5 is below every gradient norm of these runs, so DeepSpeed's silent
default of 1.0 would clip differently.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import (
    REPO,
    SFT_DATA,
    eval_records,
    free_port,
    load_plan,
    load_weights,
    max_weight_diff,
    offline_env,
    train_records,
)

from recipes.core.deepspeed_support import DeepSpeedConfigError, apply_recipe_values

DDP = "accelerate_configs/cpu_2proc.yaml"
ZERO_CONFIGS = {  # accelerate config -> the ds config it must point at
    "ds_zero1": "ds_configs/zero1.json",
    "ds_zero2": "ds_configs/zero2.json",
    "ds_zero2_offload": "ds_configs/zero2_offload.json",
    "ds_zero3": "ds_configs/zero3.json",
    "ds_zero3_offload": "ds_configs/zero3_offload.json",
}
COMMON = [
    "--config", "recipes/configs/sft_smollm2.yaml", "--dataset_name", str(SFT_DATA),
    "--max_seq_length", "96", "--learning_rate", "1e-3", "--max_grad_norm", "0.5", "--seed", "7",
    "--logging_steps", "1",
]  # fmt: skip
SHARED = [
    "--max_train_samples", "56", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4",
    "--num_train_epochs", "2", "--warmup_steps", "3", "--max_eval_samples", "8", "--per_device_eval_batch_size", "4",
]  # fmt: skip
EXPECTED_STEPS = 8  # worked out in the module docstring


def accelerate_launch(
    config: str, args: list[str], launch_args: list[str] = (), check: bool = True
) -> subprocess.CompletedProcess:
    """The real `accelerate launch` on a free port; raises with the output when it fails and check is set."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / config),
           "--main_process_port", str(free_port()), *launch_args, str(REPO / "recipes/sft.py"), *args]  # fmt: skip
    result = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, **offline_env()}, capture_output=True, text=True, timeout=900
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-8000:]}")
    return result


def run(config: str, out_dir, model, extra: list[str], num_processes: int = 2) -> None:
    args = [*COMMON, "--model_name_or_path", str(model), "--output_dir", str(out_dir), *extra]
    accelerate_launch(config, args, ["--num_processes", str(num_processes)])


@pytest.fixture(scope="module")
def ddp_run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run(DDP, out, tiny_llama, SHARED)
    return out


@pytest.fixture(scope="module")
def zero_runs(tiny_llama, tmp_path_factory):
    """One run per shipped ZeRO accelerate config (the first one builds DeepSpeed's C++ op on a fresh machine)."""
    out = {}
    for name in ZERO_CONFIGS:
        out[name] = tmp_path_factory.mktemp(name)
        run(f"accelerate_configs/{name}.yaml", out[name], tiny_llama, SHARED)
    return out


def expected_lr(step: int, peak: float, warmup: int, total: int) -> float:
    done = step - 1
    return peak * done / warmup if done < warmup else peak * (total - done) / (total - warmup)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZERO_CONFIGS)
def test_zero_stage_runs_the_planned_steps_with_the_exact_schedule(zero_runs, name):
    out = zero_runs[name]
    plan = load_plan(out)
    assert plan["world_size"] == 2
    assert plan["gradient_accumulation_steps"] == 4
    assert plan["total_optimizer_steps"] == EXPECTED_STEPS
    records = train_records(out)
    assert [r["step"] for r in records] == list(range(1, EXPECTED_STEPS + 1))
    for r in records:
        assert r["lr"] == pytest.approx(expected_lr(r["step"], 1e-3, 3, EXPECTED_STEPS), rel=1e-12, abs=1e-15)
    assert records[0]["lr"] == 0.0  # warmup starts at 0: the first step must not move the weights


@pytest.mark.slow
@pytest.mark.parametrize("name", ZERO_CONFIGS)
def test_zero_stage_matches_ddp_losses_grad_norms_and_final_weights(zero_runs, ddp_run, tiny_llama, name):
    """The LR the records show is the LR the engine's optimizer used: a scheduler that changed only a copy
    of the param groups would leave DeepSpeed at the peak LR from step 1 (where DDP uses 0), and the
    weights would differ by about the LR (1e-3), ten times the tolerance."""
    ours, reference = train_records(zero_runs[name]), train_records(ddp_run)
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in reference]  # same data in every step
    for a, b in zip(ours, reference, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4)
        assert a["grad_norm"] is not None  # logged from the engine, which clipped inside backward
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4)
        assert b["grad_norm"] > 0.5  # clipping was active on every step
    for a, b in zip(eval_records(zero_runs[name]), eval_records(ddp_run), strict=True):
        assert math.isclose(a["eval_loss"], b["eval_loss"], rel_tol=1e-4)
    final = load_weights(zero_runs[name] / "final")
    assert max_weight_diff(final, load_weights(ddp_run / "final")) <= 1e-4
    assert max_weight_diff(final, load_weights(tiny_llama)) > 1e-3  # training moved well past the tolerance


@pytest.mark.slow
@pytest.mark.parametrize("name", ZERO_CONFIGS)
def test_deepspeed_receives_the_recipe_values_for_every_auto_entry(zero_runs, name):
    resolved = json.loads((zero_runs[name] / "ds_config.json").read_text())
    assert resolved["gradient_accumulation_steps"] == 4
    assert resolved["gradient_clipping"] == 0.5  # the recipe's max_grad_norm, not Accelerate's default 1.0
    assert resolved["train_micro_batch_size_per_gpu"] == 2
    assert resolved["train_batch_size"] == 2 * 4 * 2
    assert resolved["bf16"]["enabled"] is False and resolved["fp16"]["enabled"] is False
    assert "scheduler" not in resolved and "optimizer" not in resolved
    shipped = json.loads((REPO / ZERO_CONFIGS[name]).read_text())
    assert resolved["zero_optimization"]["stage"] == shipped["zero_optimization"]["stage"]
    offload = resolved["zero_optimization"].get("offload_optimizer", {}).get("device", "none")
    assert offload == ("cpu" if name.endswith("offload") else "none")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ds_zero3", "ds_zero3_offload"])
def test_zero3_final_model_is_gathered_and_reloads_with_from_pretrained(zero_runs, tiny_llama, name):
    from transformers import AutoModelForCausalLM

    final_dir = zero_runs[name] / "final"
    saved = load_weights(final_dir)
    original = load_weights(tiny_llama)
    # Full tensors, not ZeRO-3 partitions.
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in original.items()}
    reloaded = AutoModelForCausalLM.from_pretrained(final_dir, dtype=torch.float32).state_dict()
    assert max_weight_diff({k: reloaded[k] for k in saved}, saved) == 0.0


# -------------------------------------------------------------------- accumulation under ZeRO-2
@pytest.fixture(scope="module")
def zero2_equivalent_runs(tiny_llama, tmp_path_factory):
    """48 samples: 16 per optimizer step either way, and the same samples in each step (batch i goes to
    rank i mod 2, so a rank's 4 micro-batches of 2 cover the same 16 samples as 2 ranks x one batch of 8)."""
    out = {}
    for name, micro, ga in (("micro2_ga4", 2, 4), ("micro8_ga1", 8, 1)):
        out[name] = tmp_path_factory.mktemp(name)
        extra = ["--max_train_samples", "48", "--per_device_train_batch_size", str(micro),
                 "--gradient_accumulation_steps", str(ga), "--num_train_epochs", "1", "--warmup_steps", "0",
                 "--eval_split", "null"]  # fmt: skip
        run("accelerate_configs/ds_zero2.yaml", out[name], tiny_llama, extra)
    return out


@pytest.mark.slow
def test_zero2_accumulation_equals_one_big_batch(zero2_equivalent_runs, tiny_llama):
    small, big = zero2_equivalent_runs["micro2_ga4"], zero2_equivalent_runs["micro8_ga1"]
    assert load_plan(small)["total_optimizer_steps"] == load_plan(big)["total_optimizer_steps"] == 3
    small_records, big_records = train_records(small), train_records(big)
    assert [r["tokens"] for r in small_records] == [r["tokens"] for r in big_records]
    for a, b in zip(small_records, big_records, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5)
    big_weights = load_weights(big / "final")
    assert max_weight_diff(load_weights(small / "final"), big_weights) <= 1e-5
    assert max_weight_diff(big_weights, load_weights(tiny_llama)) > 1e-3


# -------------------------------------------------------------------- conflicts fail before training
@pytest.mark.slow
def test_a_ds_config_number_that_contradicts_the_recipe_stops_the_run(tiny_llama, tmp_path):
    """Clipping in the JSON against the recipe's max_grad_norm: caught when the Accelerator is made."""
    ds_config = json.loads((REPO / "ds_configs/zero2.json").read_text())
    ds_config["gradient_clipping"] = 1.0
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    accelerate_config = yaml.safe_load((REPO / "accelerate_configs/ds_zero2.yaml").read_text())
    accelerate_config["deepspeed_config"]["deepspeed_config_file"] = str(tmp_path / "ds.json")
    (tmp_path / "accelerate.yaml").write_text(yaml.safe_dump(accelerate_config))
    args = [*COMMON, *SHARED, "--model_name_or_path", str(tiny_llama), "--output_dir", str(tmp_path / "out")]
    result = accelerate_launch(str(tmp_path / "accelerate.yaml"), args, ["--num_processes", "1"], check=False)
    assert result.returncode != 0
    assert (
        f"error: DeepSpeed config {tmp_path / 'ds.json'} disagrees with the recipe:\n"
        "- gradient_clipping is 1.0 but the recipe's max_grad_norm gives 0.5; "
        'set it to "auto" so that the recipe decides'
    ) in result.stderr
    assert not (tmp_path / "out" / "plan.json").exists()  # stopped before training


def shipped(name: str) -> dict:
    return json.loads((REPO / ZERO_CONFIGS[name]).read_text())


def resolve(config: dict, **overrides) -> dict:
    values = dict(
        config_file="ds.json", gradient_accumulation_steps=4, max_grad_norm=0.5, micro_batch_size=2,
        world_size=2, mixed_precision="no",
    )  # fmt: skip
    values.update(overrides)
    apply_recipe_values(config, **values)
    return config


def test_auto_entries_take_the_recipe_values():
    config = resolve(shipped("ds_zero2"), max_grad_norm=0.0, gradient_accumulation_steps=3)
    assert config["gradient_accumulation_steps"] == 3
    assert config["gradient_clipping"] == 0.0  # 0 disables clipping in the recipe and in DeepSpeed
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["train_batch_size"] == 2 * 3 * 2


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("gradient_accumulation_steps", 8, "gradient_accumulation_steps is 8 but the recipe's "
         "gradient_accumulation_steps gives 4"),
        ("gradient_clipping", 1.0, "gradient_clipping is 1.0 but the recipe's max_grad_norm gives 0.5"),
        ("train_micro_batch_size_per_gpu", 4, "train_micro_batch_size_per_gpu is 4 but the recipe's "
         "per_device_train_batch_size gives 2"),
        ("train_batch_size", 32, "train_batch_size is 32 but the recipe's per_device_train_batch_size x "
         "gradient_accumulation_steps x processes gives 16"),
        ("bf16", {"enabled": True}, "bf16.enabled is True but the recipe's mixed_precision is 'no'"),
        ("scheduler", {"type": "WarmupLR"}, 'remove the "scheduler" block'),
        ("optimizer", {"type": "AdamW"}, 'remove the "optimizer" block'),
    ],
)  # fmt: skip
def test_a_value_set_in_the_ds_config_and_the_recipe_must_agree(key, value, message):
    config = shipped("ds_zero2")
    config[key] = value
    with pytest.raises(
        DeepSpeedConfigError, match=r"DeepSpeed config ds\.json disagrees with the recipe"
    ) as err:
        resolve(config)
    assert message in str(err.value)


def test_zero3_without_gathering_on_save_is_refused_before_training():
    config = shipped("ds_zero3")
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = "auto"
    with pytest.raises(DeepSpeedConfigError, match="stage3_gather_16bit_weights_on_model_save must be true"):
        resolve(config)


def test_every_shipped_ds_config_leaves_recipe_values_auto_and_has_no_schedule():
    assert sorted(p.name for p in (REPO / "ds_configs").glob("zero*.json")) == sorted(
        p.rsplit("/", 1)[1] for p in ZERO_CONFIGS.values()
    )
    for name, path in ZERO_CONFIGS.items():
        config = shipped(name)
        for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                    "gradient_clipping"):  # fmt: skip
            assert config[key] == "auto", (path, key)
        assert config["bf16"]["enabled"] == config["fp16"]["enabled"] == "auto", path
        assert "scheduler" not in config and "optimizer" not in config, path
        offloads = "offload_optimizer" in config["zero_optimization"]
        # Offload with the recipe's torch optimizer: DeepSpeed must not swap in its own CPU Adam.
        assert config.get("zero_force_ds_cpu_optimizer", True) is not offloads, path


def test_every_ds_accelerate_config_loads_and_points_at_its_ds_config():
    from accelerate.commands.config.config_args import load_config_from_file

    for name, ds_path in ZERO_CONFIGS.items():
        config = load_config_from_file(str(REPO / f"accelerate_configs/{name}.yaml"))
        assert config.distributed_type == "DEEPSPEED"
        assert config.deepspeed_config == {"deepspeed_config_file": ds_path}, name
        assert config.num_machines == 1
        assert config.mixed_precision in (None, "no")  # precision comes from the recipe only
