"""DeepSpeed ZeRO-1/2/3 (and offload) through the real `accelerate launch` on 2 CPU processes: the same
steps, schedule, losses and final weights as DDP, with the recipe as the only source of the batch,
accumulation, clipping and precision settings.

The runs are the shared job (helpers.JOB) on every shipped ZeRO config: 44 samples at micro batch 2 on 2
ranks, GA 2, so every epoch ends in a short window; 12 steps over 2 epochs. max_grad_norm 0.5 is below
every gradient norm of these runs, so DeepSpeed's silent default of 1.0 would clip differently.
"""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    FLOAT64_UNIT_ROUNDOFF,
    JOB_STEPS,
    JOB_WARMUP,
    REPO,
    adam_tolerance,
    assert_same_training,
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
from safetensors import safe_open
from transformers import AutoConfig

from recipes.core.distributed.accelerator import settle_deepspeed_config
from recipes.core.distributed.deepspeed_contract import (
    RECIPE_OWNED,
    DeepSpeedConfigError,
    DeepSpeedRun,
    check,
    fill,
)
from recipes.core.doctor.deepspeed import check_deepspeed, check_deepspeed_with_run
from recipes.core.doctor.findings import DoctorError
from recipes.core.model.shape import model_shape
from recipes.core.plan.model_states import zero3_gathered_bytes

ZERO_CONFIGS = {  # reference run -> the ds config its accelerate config (accelerate_configs/ds_<name>.yaml) names
    "zero1": "ds_configs/zero1.json",
    "zero2": "ds_configs/zero2.json",
    "zero2_offload": "ds_configs/zero2_offload.json",
    "zero3": "ds_configs/zero3.json",
    "zero3_offload": "ds_configs/zero3_offload.json",
}
LAUNCHED = [pytest.param(name, marks=pytest.mark.slow) for name in ZERO_CONFIGS]


def expected_lr(step: int, peak: float, warmup: int, total: int) -> float:
    done = step - 1
    return peak * done / warmup if done < warmup else peak * (total - done) / (total - warmup)


@pytest.mark.parametrize("name", LAUNCHED)
def test_zero_stage_runs_the_planned_steps_with_the_exact_schedule(reference, name):
    out = reference(name)
    plan = load_plan(out)
    assert (plan["world_size"], plan["gradient_accumulation_steps"]) == (2, 2)
    assert plan["total_optimizer_steps"] == JOB_STEPS
    records = train_records(out)
    assert [r["step"] for r in records] == list(range(1, JOB_STEPS + 1))
    for r in records:
        # the schedule's factor times the peak, and this formula, each round a quotient and a product
        assert r["lr"] == pytest.approx(
            expected_lr(r["step"], 1e-3, JOB_WARMUP, JOB_STEPS), rel=4 * FLOAT64_UNIT_ROUNDOFF, abs=0
        )
    assert records[0]["lr"] == 0.0  # warmup starts at 0: the first step must not move the weights


@pytest.mark.parametrize("name", LAUNCHED)
def test_zero_stage_matches_ddp_losses_grad_norms_and_final_weights(reference, tiny_llama, name):
    """The LR the records show is the LR the engine's optimizer used: a scheduler that changed only a copy
    of the param groups would leave DeepSpeed at the peak LR from step 1 (where DDP uses 0), and the
    weights would differ by about the LR, far more than rounding."""
    zero, ddp = reference(name), reference("ddp")
    ours, theirs = train_records(zero), train_records(ddp)
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in theirs]  # same data in every step
    for a, b in zip(ours, theirs, strict=True):
        assert a["grad_norm"] is not None  # logged from the engine, which clipped inside backward
        assert b["grad_norm"] > 0.5  # clipping was active on every step
    assert_same_training(zero, ddp)  # the partitions reduce in another order: rounding
    final = load_weights(zero / "final")
    assert max_weight_diff(final, load_weights(tiny_llama)) > 1e-3  # training moved well past the tolerance


@pytest.mark.parametrize("name", LAUNCHED)
def test_deepspeed_receives_the_recipe_values_for_every_auto_entry(reference, name):
    resolved = json.loads((reference(name) / "ds_config.json").read_text())
    assert resolved["gradient_accumulation_steps"] == 2
    assert resolved["gradient_clipping"] == 0.5  # the recipe's max_grad_norm, not Accelerate's default 1.0
    assert resolved["train_micro_batch_size_per_gpu"] == 2
    assert resolved["train_batch_size"] == 2 * 2 * 2
    assert resolved["bf16"]["enabled"] is False and resolved["fp16"]["enabled"] is False
    assert "scheduler" not in resolved and "optimizer" not in resolved
    shipped = json.loads((REPO / ZERO_CONFIGS[name]).read_text())
    assert resolved["zero_optimization"]["stage"] == shipped["zero_optimization"]["stage"]
    offload = resolved["zero_optimization"].get("offload_optimizer", {}).get("device", "none")
    assert offload == ("cpu" if name.endswith("offload") else "none")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero3", "zero3_offload"])
def test_zero3_final_model_is_gathered_and_reloads_with_from_pretrained(reference, tiny_llama, name):
    from transformers import AutoModelForCausalLM

    final_dir = reference(name) / "final"
    saved = load_weights(final_dir)
    original = load_weights(tiny_llama)
    # Full tensors, not ZeRO-3 partitions.
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in original.items()}
    reloaded = AutoModelForCausalLM.from_pretrained(final_dir, dtype=torch.float32).state_dict()
    assert max_weight_diff({k: reloaded[k] for k in saved}, saved) == 0.0


@pytest.mark.slow
def test_zero2_accumulation_equals_one_big_batch(reference, tiny_llama):
    """Micro batch 2 x GA 2 on 2 ranks covers the same 8 samples per step as one process at batch 8 (batch
    i goes to rank i mod 2), the short last window of each epoch included."""
    small, big = reference("zero2"), reference("big_batch")
    small_records, big_records = train_records(small), train_records(big)
    assert [r["tokens"] for r in small_records] == [r["tokens"] for r in big_records]
    big_weights, sums = load_weights(big / "final"), run_sums(big)
    n_weights = sum(t.numel() for t in big_weights.values())
    for a, b in zip(small_records, big_records, strict=True):  # the same sums, added in another order
        assert abs(a["loss"] - b["loss"]) <= step_loss_tolerance(b, big_records, sums, n_weights), (a, b)
    tolerance = adam_tolerance(sums.gradient, [r["lr"] for r in big_records], n_weights)
    assert weight_distance(load_weights(small / "final"), big_weights) <= tolerance
    assert max_weight_diff(big_weights, load_weights(tiny_llama)) > 1e-3


# -------------------------------------------------------------------- conflicts fail before training
@pytest.mark.slow  # DeepSpeed's process group loads (and on a fresh machine builds) its C++ op
def test_a_ds_config_number_that_contradicts_the_recipe_stops_the_run(deepspeed_env, tiny_llama, tmp_path):
    """Clipping in the JSON against the recipe's max_grad_norm: caught at start-up, before the Accelerator
    is made, in a one-process DeepSpeed run in this process (the environment `accelerate launch` would set)."""
    ds_config = json.loads((REPO / "ds_configs/zero2.json").read_text())
    ds_config["gradient_clipping"] = 1.0
    (tmp_path / "ds.json").write_text(json.dumps(ds_config, indent=2))
    deepspeed_env(tmp_path / "ds.json")
    with pytest.raises(DoctorError) as err:
        in_process("sft", job_args(tiny_llama, tmp_path / "out"))
    assert str(err.value) == (
        "1 config problem(s) found before training:\n"
        f"{tmp_path / 'ds.json'}:5: gradient_clipping: 1.0 differs from the recipe's max_grad_norm 0.5\n"
        '    fix: set it to "auto" (the recipe\'s value is used)'
    )
    assert not (tmp_path / "out" / "plan.json").exists()  # stopped before training


def shipped(name: str) -> dict:
    return json.loads((REPO / ZERO_CONFIGS[name]).read_text())


def resolve(config: dict, **overrides) -> dict:
    """`config` checked and filled as a run under Accelerate does it (settle_deepspeed_config)."""
    values = dict(
        micro_batch_size=2, gradient_accumulation_steps=4, max_grad_norm=0.5, mixed_precision="no",
        data_parallel_size=2,
    )  # fmt: skip
    run = DeepSpeedRun(**{**values, **overrides})
    check(config, run, "ds.json")
    fill(config, run)
    return config


def test_auto_entries_take_the_recipe_values():
    config = resolve(shipped("zero2"), max_grad_norm=0.0, gradient_accumulation_steps=3)
    assert config["gradient_accumulation_steps"] == 3
    assert config["gradient_clipping"] == 0.0  # 0 disables clipping in the recipe and in DeepSpeed
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["train_batch_size"] == 2 * 3 * 2
    assert config["bf16"]["enabled"] is config["fp16"]["enabled"] is False
    run = DeepSpeedRun(micro_batch_size=2, gradient_accumulation_steps=3, max_grad_norm=0.0, mixed_precision="no",
                       data_parallel_size=2)  # fmt: skip
    assert list(run.owned_values()) == list(RECIPE_OWNED)  # the table is what fill fills


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("gradient_accumulation_steps", 8, "gradient_accumulation_steps: 8 differs from the recipe's "
         "gradient accumulation 4; DeepSpeed's wins"),
        ("gradient_clipping", 1.0, "gradient_clipping: 1.0 differs from the recipe's max_grad_norm 0.5"),
        ("train_micro_batch_size_per_gpu", 4, "train_micro_batch_size_per_gpu: 4 differs from the recipe's "
         "per_device_train_batch_size 2"),
        ("train_batch_size", 32, "train_batch_size: 32 is not micro x GA x data-parallel size = 2 x 4 x 2 = 16"),
        ("bf16", {"enabled": True}, "bf16.enabled: enabled here, but the recipe's mixed_precision is 'no'"),
        ("fp16", {"enabled": False}, None),  # agrees with mixed_precision no
        ("scheduler", {"type": "WarmupLR"}, "scheduler: a DeepSpeed scheduler block next to the recipe's own"),
        ("optimizer", {"type": "AdamW"}, "optimizer: a DeepSpeed optimizer block next to the recipe's own"),
    ],
)  # fmt: skip
def test_a_value_set_in_the_ds_config_and_the_recipe_must_agree(key, value, message):
    config = shipped("zero2")
    config[key] = value
    if message is None:
        assert resolve(config)[key] == value
        return
    with pytest.raises(DeepSpeedConfigError) as err:
        resolve(config)
    assert str(err.value).startswith(f"1 config problem(s) found before training:\nds.json: {message}")


def test_a_bf16_run_fills_precision_and_refuses_a_config_that_disables_it():
    assert resolve(shipped("zero2"), mixed_precision="bf16")["bf16"]["enabled"] is True
    config = shipped("zero2")
    config["bf16"]["enabled"] = False
    with pytest.raises(DeepSpeedConfigError) as err:
        resolve(config, mixed_precision="bf16")
    message = "ds.json: bf16.enabled: disabled here, but the recipe's mixed_precision is 'bf16'"
    assert message in str(err.value)


def test_zero3_without_gathering_on_save_is_refused_before_training():
    config = shipped("zero3")
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = "auto"
    with pytest.raises(
        DeepSpeedConfigError,
        match=r"ds\.json: zero_optimization\.stage3_gather_16bit_weights_on_model_save: ZeRO-3 without it",
    ):
        resolve(config)


def test_keeping_the_best_model_is_refused_under_zero3_only():
    """The classification recipe keeps the weights of its best evaluation, which ZeRO-3 partitions."""
    with pytest.raises(DeepSpeedConfigError) as err:
        resolve(shipped("zero3"), keeps_best_model=True)
    assert str(err.value) == (
        "1 config problem(s) found before training:\n"
        "recipe config: metric_for_best_model: keeping the best model needs whole weights on every rank, which "
        "ZeRO-3 partitions\n    fix: set metric_for_best_model: null (the last model is then tested and saved) "
        "or use ZeRO stage 1 or 2"
    )
    resolve(shipped("zero2"), keeps_best_model=True)
    resolve(shipped("zero3"))


# ---------------------------------------------------------------- one contract, three callers
@pytest.mark.parametrize(
    "change, said",
    [
        (
            {"scheduler": {"type": "WarmupLR"}},
            ("scheduler", "a DeepSpeed scheduler block next to the recipe's own scheduler: DeepSpeed raises, or "
             "the run uses a scheduler the recipe's plan does not describe", "remove the scheduler block; the "
             "recipe YAML sets the learning rate, warmup and AdamW settings"),
        ),
        (
            {"gradient_accumulation_steps": 8},
            ("gradient_accumulation_steps", "8 differs from the recipe's gradient accumulation 4; DeepSpeed's "
             "wins and the run no longer matches its plan", 'set it to "auto"'),
        ),
        (
            {"gradient_clipping": 1.0},
            ("gradient_clipping", "1.0 differs from the recipe's max_grad_norm 0.5",
             'set it to "auto" (the recipe\'s value is used)'),
        ),
    ],
    ids=["scheduler", "accumulation", "clipping"],
)  # fmt: skip
def test_doctor_runtime_and_pipeline_report_a_bad_ds_config_in_the_same_words(
    change, said, tmp_path, monkeypatch
):
    """One bad key in a ZeRO-1 config: `recipes doctor`, a recipe's start-up under Accelerate (on the config
    Accelerate built from the file) and the pipeline recipe (the config it gives deepspeed.initialize) name
    the same key, problem and fix. Both recipes run micro batch 2 x GA 4 on 2 data-parallel ranks."""
    from recipes.core.distributed.pipeline import resolve_ds_config
    from recipes.sft import SFTConfig
    from recipes.sft_pipeline import SFTPipelineConfig

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**shipped("zero1"), **change}, indent=2))
    ds, file = json.loads(path.read_text()), str(path)
    values = dict(per_device_train_batch_size=2, gradient_accumulation_steps=4, max_grad_norm=0.5)
    sft = SFTConfig(**values, mixed_precision="no")
    pipeline = SFTPipelineConfig(**values, mixed_precision="no", deepspeed_config=file)  # 2 stages

    def doctor(recipe, world_size: int) -> list[tuple]:
        recipe = dataclasses.asdict(recipe)
        found = check_deepspeed(ds, file) + check_deepspeed_with_run(ds, recipe, world_size, file)
        assert {f.file for f in found} == {file}
        return [(f.key, f.problem, f.fix) for f in found]

    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", file)
    plugin = SimpleNamespace(deepspeed_config=json.loads(path.read_text()))  # as Accelerate read the file
    accelerator = SimpleNamespace(num_processes=2, state=SimpleNamespace(deepspeed_plugin=plugin))
    with pytest.raises(DeepSpeedConfigError) as runtime:
        settle_deepspeed_config(accelerator, sft)
    with pytest.raises(DeepSpeedConfigError) as engine:
        resolve_ds_config(ds, DeepSpeedRun.of(dataclasses.asdict(pipeline), 4, ds), file)
    for err in (runtime.value, engine.value):
        assert err.found == [(file, *said)]
    assert doctor(sft, 2) == doctor(pipeline, 4) == [said]


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
        config = load_config_from_file(str(REPO / f"accelerate_configs/ds_{name}.yaml"))
        assert config.distributed_type == "DEEPSPEED"
        assert config.deepspeed_config == {"deepspeed_config_file": ds_path}, name
        assert config.num_machines == 1
        assert config.mixed_precision in (None, "no")  # precision comes from the recipe only


# ---------------------------------------------------------------- model-state bytes, counted from the tensors


def census(output_dir) -> dict:
    """The run's memory census: {point: {category: [bytes per rank]}} (core/train/memory_census.py)."""
    [end] = [r for r in read_jsonl(output_dir / "metrics.jsonl") if "memory_census" in r]
    return end["memory_census"]


def parameter_numels(model_dir) -> dict[str, int]:
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return {name: math.prod(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118


@pytest.mark.slow
def test_zero3_keeps_its_partition_and_gathers_only_what_it_computes(reference, tiny_llama):
    numels = parameter_numels(tiny_llama)
    config = AutoConfig.from_pretrained(tiny_llama)
    partition = 4 * sum(math.ceil(n / 2) for n in numels.values())  # fp32, each tensor split in 2
    # Accelerate's "auto" persistence threshold is 10 x hidden size: smaller tensors stay whole.
    persistent = 4 * sum(n for n in numels.values() if n <= 10 * config.hidden_size)
    counted = census(reference("zero3"))
    assert set(counted) == {"loaded", "start", "forward", "backward", "after_step"}
    for rank in (0, 1):
        at = {point: {c: v[rank] for c, v in values.items()} for point, values in counted.items()}
        # Loaded under zero.Init: from_pretrained hands back partitions only, before DeepSpeed's engine exists.
        assert at["loaded"]["parameters"] == partition
        assert at["loaded"]["gathered_parameters"] == at["loaded"]["master_weights"] == 0
        for point in ("start", "forward", "backward", "after_step"):
            assert at[point]["parameters"] == partition
            assert at[point]["master_weights"] == partition  # DeepSpeed's fp32 copy, also in fp32
            assert at[point]["persistent_parameters"] == persistent
        assert at["start"]["gathered_parameters"] == at["after_step"]["gathered_parameters"] == 0
        # Mid-step no more than two layers, or the LM head, is gathered: never the whole model.
        assert (
            0
            < at["forward"]["gathered_parameters"]
            <= zero3_gathered_bytes(model_shape(str(tiny_llama)), "fp32")
        )
        assert at["after_step"]["gradients"] == partition  # the gradient partitions' flat buffer
        # Adam's two moments, and its 4-byte step counters (one per flat partition DeepSpeed steps on)
        counters = at["after_step"]["optimizer_states"] - 2 * partition
        assert counters % 4 == 0 and 0 < counters <= 4 * 2


@pytest.mark.slow
def test_ddp_holds_every_gradient_once_in_its_buckets(reference, tiny_llama):
    n = sum(parameter_numels(tiny_llama).values())
    tensors = len(parameter_numels(tiny_llama))
    counted = census(reference("ddp"))
    for rank in (0, 1):
        assert counted["loaded"]["parameters"][rank] == 4 * n  # every process loads the whole model
        for point, values in counted.items():
            # The resident set next to each count: the whole process (libraries too), its peak since the
            # last reset no lower than it.
            assert values["model_states"][rank] < values["resident"][rank] <= values["peak_resident"][rank]
            if point == "loaded":  # before DDP and its buckets exist
                continue
            assert values["parameters"][rank] == 4 * n
            # Gradients are views into the all-reduce buckets, also while accumulating (zeroed in place).
            assert (values["communication_buckets"][rank], values["gradients"][rank]) == (4 * n, 0), point
        # AdamW: two fp32 moments and a step counter per tensor
        assert counted["after_step"]["optimizer_states"][rank] == 8 * n + 4 * tensors
        assert counted["after_step"]["model_states"][rank] == 16 * n + 4 * tensors


@pytest.mark.slow
def test_model_states_per_process_fall_from_ddp_to_zero1_zero2_and_zero3(reference):
    peak = {
        name: max(max(values["model_states"]) for values in census(reference(name)).values())
        for name in ("ddp", "zero1", "zero2", "zero3")
    }
    assert peak["zero3"] < peak["zero2"] < peak["zero1"] < peak["ddp"], peak
