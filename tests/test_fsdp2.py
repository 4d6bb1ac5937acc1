"""FSDP2 (torch's fully_shard) through the shipped accelerate configs on 2 real CPU processes (gloo).

Accelerate does not switch CPU processes to FSDP; the recipes apply the preparation Accelerate applies on
GPUs (its own fsdp2_prepare_model with the plugin it builds from the same launch environment) themselves,
so these runs shard exactly as a GPU run does, and stop if a single parameter were left unsharded
(core/distributed/fsdp.py). Everything after the preparation (deferred gradient reduction in accumulation windows,
clipping of sharded gradients, sharded checkpoints, the gathered final model) is the recipes' own code on
every device.

The runs are the shared job (helpers.JOB): 12 steps over 2 epochs, GA 2 on 2 ranks, checkpoints at 4 and
8. fp32 FSDP2 gives DDP's numbers to float rounding (only the order of the reductions differs).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    FLOAT64_UNIT_ROUNDOFF,
    JOB_STEPS,
    JOB_WARMUP,
    REPO,
    adam_tolerance,
    assert_same_run,
    assert_same_training,
    bf16_loss_tolerance,
    eval_loss_tolerance,
    eval_records,
    finish,
    in_process,
    job_args,
    launch,
    load_plan,
    load_weights,
    max_weight_diff,
    resume_copy,
    run_sums,
    step_loss_tolerance,
    train_records,
    weight_distance,
)
from safetensors.torch import load_file

from recipes.cli import main as cli_main
from recipes.core.distributed.fsdp import FSDPNotApplied
from recipes.core.doctor.diagnose import diagnose, preflight
from recipes.core.doctor.findings import DoctorError
from recipes.core.doctor.topology import read_topology
from recipes.core.launch.command import free_port
from recipes.core.model.shape import model_shape
from recipes.core.plan.model_states import FSDP2Layout, fsdp2_state_bytes
from recipes.sft import SFTConfig

FSDP2 = "accelerate_configs/fsdp2.yaml"
OFFLOAD = "accelerate_configs/fsdp2_offload.yaml"
MULTINODE = "accelerate_configs/fsdp2_multinode.yaml"


def expected_lr(step: int, peak: float = 1e-3, warmup: int = JOB_WARMUP, total: int = JOB_STEPS) -> float:
    done = step - 1
    return peak * done / warmup if done < warmup else peak * (total - done) / (total - warmup)


# ---------------------------------------------------------------- FSDP2 against DDP and one big batch
@pytest.mark.slow
def test_fsdp2_takes_the_planned_steps_at_the_exact_lrs_and_matches_ddp(reference, tiny_llama):
    fsdp, ddp = reference("fsdp2"), reference("ddp")
    plan = load_plan(fsdp)
    assert (plan["world_size"], plan["gradient_accumulation_steps"], plan["total_optimizer_steps"]) == (
        2,
        2,
        12,
    )
    ours, theirs = train_records(fsdp), train_records(ddp)
    assert [r["step"] for r in ours] == list(range(1, JOB_STEPS + 1))
    for r in ours:
        # the schedule's factor times the peak, and this formula, each round a quotient and a product
        assert r["lr"] == pytest.approx(expected_lr(r["step"]), rel=4 * FLOAT64_UNIT_ROUNDOFF, abs=0)
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in theirs]
    assert all(b["grad_norm"] > 0.5 for b in theirs)  # clipping acted on every step
    # FSDP2 reduce-scatters where DDP all-reduces: the same sums in another order (the gradient norm is
    # that of the sharded gradients)
    assert_same_training(fsdp, ddp)
    final = load_weights(fsdp / "final")
    assert max_weight_diff(final, load_weights(tiny_llama)) > 1e-3  # training moved well past the tolerance


@pytest.mark.slow
def test_fsdp2_accumulation_equals_one_big_batch(reference, tiny_llama):
    """GA 2 on 2 ranks, each micro-batch's gradient kept unsharded until the window's last backward
    reduce-scatters it, against one process at micro batch 8 (GA 1)."""
    small, big = reference("fsdp2"), reference("big_batch")
    big_records, big_weights, sums = train_records(big), load_weights(big / "final"), run_sums(big)
    n_weights = sum(t.numel() for t in big_weights.values())
    for a, b in zip(train_records(small), big_records, strict=True):
        assert a["tokens"] == b["tokens"]
        assert abs(a["loss"] - b["loss"]) <= step_loss_tolerance(b, big_records, sums, n_weights), (a, b)
    tolerance = adam_tolerance(sums.gradient, [r["lr"] for r in big_records], n_weights)
    assert weight_distance(load_weights(small / "final"), big_weights) <= tolerance
    assert max_weight_diff(big_weights, load_weights(tiny_llama)) > 1e-3


@pytest.mark.slow
def test_fsdp2_final_model_is_gathered_and_reloads_with_from_pretrained(reference, tiny_llama):
    from transformers import AutoModelForCausalLM

    final_dir = reference("fsdp2") / "final"
    saved = load_weights(final_dir)
    original = load_weights(tiny_llama)
    assert {k: (v.shape, v.dtype) for k, v in saved.items()} == {
        k: (v.shape, v.dtype) for k, v in original.items()
    }  # whole fp32 tensors, not shards
    reloaded = AutoModelForCausalLM.from_pretrained(final_dir, dtype=torch.float32).state_dict()
    assert max_weight_diff({k: reloaded[k] for k in saved}, saved) == 0.0


@pytest.mark.slow
def test_fsdp2_checkpoint_is_sharded_safetensors_that_load_without_unpickling(reference, tiny_llama):
    """Each rank wrote its own half of every parameter and Adam state; no file needs unpickling."""
    checkpoint = reference("fsdp2") / "checkpoint-8"
    names = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    assert not [n for n in names if n.endswith((".bin", ".pkl", ".pth"))], sorted(names)
    for pt in [n for n in names if n.endswith(".pt")]:  # RNG states and the scheduler
        torch.load(checkpoint / pt, weights_only=True)
    assert {"rng_state_0.pt", "rng_state_1.pt", "lr_scheduler.pt", "optimizer_param_groups.json"} <= names
    full = load_weights(tiny_llama)
    # Adam: exp_avg and exp_avg_sq of each element, and a step count per parameter (not sharded: written once)
    for part, per_element, scalars in (("model", 1, 0), ("optimizer", 2, len(full))):
        files = sorted((checkpoint / part).glob("*.safetensors"))
        assert len(files) == 2, files  # one per rank
        elements = sum(t.numel() for path in files for t in load_file(str(path)).values())
        assert elements == per_element * sum(v.numel() for v in full.values()) + scalars
    groups = json.loads((checkpoint / "optimizer_param_groups.json").read_text())
    step_9 = train_records(reference("fsdp2"))[8]
    assert {v for k, v in groups.items() if k.endswith(".lr")} == {step_9["lr"]}  # the next step's LR


@pytest.mark.slow
def test_sigterm_under_fsdp2_checkpoints_and_resume_equals_the_uninterrupted_run(
    reference, tiny_llama, tmp_path
):
    import test_checkpoint as ckpt

    out = tmp_path / "run"
    args = job_args(tiny_llama, out, "--save_total_limit", str(ckpt.SAVE_TOTAL_LIMIT))
    stopped = ckpt.stop_with_signal(FSDP2, args, out, tmp_path / "run.log", signal.SIGTERM, processes=2)
    output = launch(FSDP2, "sft", [*args, "--resume_from_checkpoint", "latest"]).stdout
    assert f"resumed from {out / f'checkpoint-{stopped}'}: step {stopped}" in output
    assert_same_run(reference("fsdp2"), out)  # every record and the final weights, bit for bit
    ckpt.assert_rotated(out, stopped)


@pytest.mark.slow
def test_bf16_tied_embeddings_packing_and_checkpointing_on_two_machines_and_exact_resume(reference, tmp_path):
    """The multi-node config as two machines of one process each, on Qwen2 (input and output embeddings
    are one tensor, as in the default model), in bf16 (FSDP2's mixed precision: bf16 compute and
    reductions, fp32 master weights) with packing and activation checkpointing, against the fp32 run on
    one process: every step's loss and every eval loss to bf16's rounding (bf16_loss_tolerance, the
    gradients also reduced in bf16). Weights are not compared element by element: AdamW moves each weight
    by about the LR in the direction of its gradient's sign, which rounding flips for gradients near zero.
    Then the run resumed from its checkpoint in the second epoch equals it."""
    out, port = tmp_path / "out", free_port()
    args = [*reference.args("1proc_qwen2"), "--output_dir", str(out), "--mixed_precision", "bf16"]
    args += ["--packing", "true", "--gradient_checkpointing", "true"]
    machines = []
    for rank in (0, 1):
        launch_args = ["--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank)]
        launch_args += ["--main_process_ip", "127.0.0.1"]
        log = tmp_path / f"machine_{rank}.log"
        machines.append((launch(MULTINODE, "sft", args, log=log, port=port, launch_args=launch_args), log))
    output = "".join(finish(proc, log) for proc, log in machines)
    assert "FSDP2: parameters sharded over 2 processes in bf16 (fp32 masters)" in output
    fp32 = reference("1proc_qwen2")
    ours, theirs = train_records(out), train_records(fp32)
    assert [(r["step"], r["tokens"], r["lr"]) for r in ours] == [
        (r["step"], r["tokens"], r["lr"]) for r in theirs
    ]
    n_weights = sum(t.numel() for t in load_weights(fp32 / "final").values())
    for a, b in zip(ours, theirs, strict=True):
        tolerance = bf16_loss_tolerance(b["loss"], theirs, b["step"] - 1, n_weights, roundings=3)
        assert abs(a["loss"] - b["loss"]) <= tolerance, (a, b)
    worst = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(ours, theirs, strict=True))
    assert worst > 1e-6, worst  # bf16 took effect: far from the fp32 losses' own differences (1e-7)
    pairs = list(zip(eval_records(out), eval_records(fp32), strict=True))
    assert [a["step"] for a, _ in pairs] == [0, 4, 8, 12]
    for a, b in pairs:
        tolerance = bf16_loss_tolerance(b["eval_loss"], theirs, b["step"], n_weights, roundings=3)
        assert abs(a["eval_loss"] - b["eval_loss"]) <= tolerance, (a, b)
    final = load_weights(out / "final")
    assert {v.dtype for v in final.values()} == {torch.float32}  # the fp32 masters are saved
    assert final.keys() == load_weights(fp32 / "final").keys()
    # The tied tensor is written once per rank; resuming restores it under both names.
    for path in (out / "checkpoint-8" / "model").glob("*.safetensors"):
        assert "model.embed_tokens.weight" in load_file(str(path)) and "lm_head.weight" not in load_file(
            str(path)
        )
    resumed = resume_copy(out, 8, tmp_path / "resumed")
    launch(FSDP2, "sft", [*args, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    assert_same_run(out, resumed)


@pytest.mark.slow
def test_classify_under_fsdp2_equals_ddp_and_keeps_the_same_best_model(classify_reference, tmp_path):
    """The classification job (evaluated every 3 steps, the model of the lowest eval loss kept: gathered
    from the shards at each better evaluation, loaded back into the shards at the end) against DDP."""
    ddp, args = classify_reference("ddp")
    out = tmp_path / "fsdp2"
    launch(FSDP2, "classify", [*args, "--output_dir", str(out)])  # BERT: BertLayer wrapped (see below)
    ours, theirs = train_records(out), train_records(ddp)
    assert [(r["step"], r["lr"]) for r in ours] == [(r["step"], r["lr"]) for r in theirs]
    ddp_weights, sums = load_weights(ddp / "final"), run_sums(ddp)
    n_weights = sum(t.numel() for t in ddp_weights.values())
    for a, b in zip(ours, theirs, strict=True):  # reduce-scattered where DDP all-reduces: another order
        tolerance = step_loss_tolerance(b, theirs, sums, n_weights, count="samples")
        assert abs(a["loss"] - b["loss"]) <= tolerance, (a, b)
    for a, b in zip(eval_records(out), eval_records(ddp), strict=True):
        assert a.keys() == b.keys()
        assert abs(a["eval_loss"] - b["eval_loss"]) <= eval_loss_tolerance(b, theirs, sums, n_weights), (a, b)
        # shares of the predictions, which change only where two logits lie within rounding of each other
        shares = a.keys() - {"step", "eval_loss"}
        assert {k: a[k] for k in shares} == {k: b[k] for k in shares}
    # Attention key biases shift every score of a query equally, which softmax ignores: their gradient is
    # zero but for rounding noise, which AdamW scales up to steps of about the LR whose sign depends on the
    # order of the reductions. Every other weight is held to DDP's.
    ours = load_weights(out / "final")
    kept = [k for k in ddp_weights if not k.endswith("key.bias")]
    assert len(kept) == len(ddp_weights) - 2  # one per layer
    n_kept = sum(ddp_weights[k].numel() for k in kept)
    tolerance = adam_tolerance(sums.gradient, [r["lr"] for r in theirs], n_kept)
    assert weight_distance({k: ours[k] for k in kept}, {k: ddp_weights[k] for k in kept}) <= tolerance


# ---------------------------------------------------------------- FSDP asked for where it cannot act
def test_a_one_process_fsdp_launch_on_cpu_is_refused_before_training(tiny_llama, tmp_path, monkeypatch):
    """One CPU process has no process group to shard over; Accelerate would train it unsharded."""
    for key, value in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(FSDPNotApplied, match="FSDP on 1 CPU process"):
        in_process("sft", job_args(tiny_llama, tmp_path / "out", "--max_steps", "1", "--warmup_steps", "0"))
    assert not (tmp_path / "out").exists()


def launch_env(accelerate_config: Path | str) -> dict[str, str]:
    """The environment `accelerate launch` gives the recipe processes of an accelerate config."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(accelerate_config), "recipe.py"])
    _validate_launch_command(args)
    return dict(prepare_multi_gpu_env(args))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"fsdp_version": 1}, "fsdp_config.fsdp_version: FSDP1"),
        ({"fsdp_sharding_strategy": "SHARD_GRAD_OP"}, "fsdp_config.fsdp_sharding_strategy: an FSDP1 setting"),
        ({"fsdp_activation_checkpointing": True}, "activation checkpointing is the recipe's"),
    ],
)
def test_the_recipe_refuses_at_start_up_what_the_doctor_refuses(tmp_path, change, message):
    acc = yaml.safe_load((REPO / FSDP2).read_text())
    preflight(SFTConfig(), 2, launch_env(REPO / FSDP2))  # the shipped config passes
    acc["fsdp_config"].update(change)
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(acc))
    with pytest.raises(DoctorError, match=message):
        preflight(SFTConfig(), 2, launch_env(tmp_path / "a.yaml"))
    findings = diagnose(str(tmp_path / "a.yaml"))
    assert [f.key for f in findings] == [f"fsdp_config.{next(iter(change))}"]


def test_fsdp_with_torch_compile_or_deepspeed_is_refused_at_start_up():
    env = launch_env(REPO / FSDP2)
    with pytest.raises(DoctorError, match="recipe config: torch_compile: torch_compile under FSDP2"):
        preflight(SFTConfig(torch_compile=True), 2, env)
    with pytest.raises(DoctorError, match="FSDP and DeepSpeed both set in the launch environment"):
        preflight(SFTConfig(), 2, {**env, "ACCELERATE_USE_DEEPSPEED": "true"})


def test_dpo_under_fsdp_takes_only_a_reference_precomputed_by_the_policy():
    from recipes.dpo import DPOConfig

    env = launch_env(REPO / FSDP2)
    message = "recipe config: precompute_ref_log_probs: a reference model next to the policy under FSDP"
    for refused in (
        DPOConfig(),  # a frozen copy
        DPOConfig(use_peft=True),  # the adapter disabled
        DPOConfig(precompute_ref_log_probs=True, ref_model_name_or_path="other"),
    ):
        with pytest.raises(DoctorError, match=message):
            preflight(refused, 2, env)
        preflight(refused, 2, {})  # each passes without FSDP
    preflight(DPOConfig(precompute_ref_log_probs=True), 2, env)


# ---------------------------------------------------------------- the doctor on FSDP configs
def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BASE = (
    "distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_version: 2\n"
    "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
)


@pytest.mark.parametrize(
    "text, key, line, problem, fix",
    [
        (
            BASE + "  fsdp_offload_param: true\n",
            "fsdp_config.fsdp_offload_param",
            6,
            "unknown key",
            "did you mean 'fsdp_offload_params'?",
        ),
        (
            BASE.replace("  fsdp_version: 2\n", ""),
            "fsdp_config",
            3,
            "no fsdp_version, so Accelerate runs FSDP1 (its default)",
            "add fsdp_version: 2",
        ),
        (
            BASE + "  fsdp_backward_prefetch: BACKWARD_PRE\n",
            "fsdp_config.fsdp_backward_prefetch",
            6,
            "an FSDP1 setting next to fsdp_version: 2",
            "remove it",
        ),
        (
            BASE + "  fsdp_reshard_after_forward: FULL_SHARD\n",
            "fsdp_config.fsdp_reshard_after_forward",
            6,
            "'FULL_SHARD' is FSDP1's form of it",
            "true: each layer is gathered again for backward",
        ),
        (
            BASE + "deepspeed_config:\n  zero_stage: 2\n",
            "deepspeed_config",
            6,
            "FSDP and DeepSpeed both set",
            "remove deepspeed_config",
        ),
        (
            BASE.replace("num_processes: 2", "num_processes: 4")
            + "parallelism_config:\n  parallelism_config_dp_replicate_size: 2\n"
            + "  parallelism_config_dp_shard_size: 4\n",
            "parallelism_config.parallelism_config_dp_shard_size",
            8,
            "dp_replicate_size x dp_shard_size = 8, but num_processes is 4",
            "make dp_replicate_size x dp_shard_size equal num_processes",
        ),
        (
            "distributed_type: MULTI_GPU\nnum_processes: 2\nfsdp_config:\n  fsdp_version: 2\n",
            "fsdp_config",
            3,
            "ignored: distributed_type is MULTI_GPU",
            "set distributed_type: FSDP, or remove fsdp_config",
        ),
    ],
)
def test_doctor_names_the_fsdp_problem_its_line_and_the_fix(tmp_path, text, key, line, problem, fix):
    findings = diagnose(write(tmp_path / "a.yaml", text))
    assert [(f.key, f.line) for f in findings] == [(key, line)], findings
    assert problem in findings[0].problem and findings[0].fix.startswith(fix)


def test_doctor_checks_the_wrap_class_against_the_recipe_model_and_exits_1(tmp_path, capsys):
    from transformers import AutoConfig

    model = tmp_path / "model"
    AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, vocab_size=100).save_pretrained(model)  # fmt: skip
    recipe = write(tmp_path / "sft_x.yaml", f"model_name_or_path: {model}\n")
    good = write(tmp_path / "good.yaml", BASE + "  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer\n")
    bad = write(tmp_path / "bad.yaml", BASE + "  fsdp_transformer_layer_cls_to_wrap: Qwen2DecoderLayer\n")
    assert diagnose(good, recipe_config=recipe) == []
    assert cli_main(["doctor", "--accelerate-config", bad, "--config", recipe]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:6: fsdp_config.fsdp_transformer_layer_cls_to_wrap: Qwen2DecoderLayer: no module of" in out
    assert "set it to the model's decoder layer class" in out


def test_a_wrap_class_that_holds_the_input_embeddings_is_refused_with_the_layer_class_to_use(
    encoder, tmp_path
):
    """BERT's own layer classes are BertEmbeddings and BertLayer; Accelerate's FSDP2 preparation shards
    the input embeddings on their own as well, which fails inside a sharded BertEmbeddings. Unset, the
    recipes wrap BertLayer (the classify run above); named, the class is refused."""
    recipe = write(tmp_path / "classify_x.yaml", f"model_name_or_path: {encoder}\n")
    assert diagnose(str(REPO / FSDP2), recipe_config=recipe) == []
    bad = write(
        tmp_path / "bad.yaml", BASE + "  fsdp_transformer_layer_cls_to_wrap: BertEmbeddings,BertLayer\n"
    )
    findings = diagnose(bad, recipe_config=recipe)
    assert [(f.key, f.line) for f in findings] == [("fsdp_config.fsdp_transformer_layer_cls_to_wrap", 6)]
    assert findings[0].problem.startswith("BertEmbeddings holds the input embeddings")
    assert findings[0].fix == "set fsdp_transformer_layer_cls_to_wrap: BertLayer"


# ---------------------------------------------------------------- plan
@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    from transformers import AutoConfig

    directory = tmp_path_factory.mktemp("small_llama")
    AutoConfig.for_model("llama", vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         ).save_pretrained(directory)  # fmt: skip
    return directory


# The small Llama: 82,592 parameters, 18,592 outside the embeddings (tests/test_estimate.py); its largest
# FSDP unit is the 1,000 x 32 embedding (32,000 parameters; a decoder layer holds 9,280).
TOTAL, UNIT = 82_592, 32_000


def test_fsdp2_memory_is_sharded_states_plus_gathered_units(small_llama):
    shape = model_shape(str(small_llama))
    # fp32 on 2 processes: fp32 masters 4 x 82,592 / 2 + two gathered units 2 x 4 x 32,000; one unit's
    # unsharded fp32 gradient next to the 4 x 82,592 / 2 shard; Adam 8 x 82,592 / 2.
    assert fsdp2_state_bytes(shape, FSDP2Layout(2), "fp32") == (
        165_184 + 256_000,
        165_184 + 128_000,
        330_368,
        0,
    )
    # bf16, accumulating, hybrid (sharded over 4 of 8): masters stay fp32; gathered units and the whole
    # model's unsharded gradient (kept through the accumulation window) in bf16.
    assert fsdp2_state_bytes(shape, FSDP2Layout(4), "bf16", accumulating=True) == (
        82_592 + 128_000,
        82_592 + 165_184,
        165_184,
        0,
    )
    # Offload: the sharded states leave the device; without resharding the whole model stays gathered.
    assert fsdp2_state_bytes(shape, FSDP2Layout(2, offload=True, reshard_after_forward=False), "bf16") == (
        165_184,
        64_000,
        0,
        165_184 + 165_184 + 330_368,
    )


def test_plan_reads_fsdp2_full_and_hybrid_sharding_from_the_accelerate_config(small_llama, tmp_path, capsys):
    assert read_topology(str(REPO / FSDP2)).fsdp_shard_size == 2
    assert read_topology(str(REPO / OFFLOAD)).fsdp_offload is True
    hybrid = yaml.safe_load((REPO / MULTINODE).read_text())
    hybrid["parallelism_config"] = {
        "parallelism_config_dp_replicate_size": 2,
        "parallelism_config_dp_shard_size": 8,
    }
    hybrid_file = write(tmp_path / "hybrid.yaml", yaml.safe_dump(hybrid))
    recipe = write(
        tmp_path / "sft_small.yaml",
        f"model_name_or_path: {small_llama}\nper_device_train_batch_size: 4\ngradient_accumulation_steps: 1\n"
        "max_seq_length: 64\n",
    )
    for acc, shard, sharding in (
        (str(REPO / FSDP2), 2, "FSDP2 sharded over 2"),
        (hybrid_file, 8, "FSDP2 sharded over 8, 2 replicas (hybrid)"),
    ):
        argv = ["plan", "--config", recipe, "--num-samples", "100", "--accelerate-config", acc, "--json"]
        assert cli_main(argv) == 0
        est = json.loads(capsys.readouterr().out)["estimate"]
        assert est["sharding"] == sharding
        mem = est["memory_per_device"]
        assert mem["optimizer_states"] == 8 * TOTAL / shard
        assert mem["parameters"] == 4 * TOTAL / shard + 2 * 4 * UNIT
        assert "FSDP2 accounting" in est["memory_formula"]
