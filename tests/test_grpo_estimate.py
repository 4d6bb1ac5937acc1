"""The GRPO estimate of `recipes plan`: FLOPs of sampling, logp passes and training, how a step's time
splits between them, the memory it counts and the calibration's extrapolation, against hand arithmetic."""

import json

import pytest
from helpers import FLOAT64_UNIT_ROUNDOFF, OFFLINE, REPO, make_tiny_decoder, read_jsonl
from transformers import AutoConfig, AutoTokenizer

from recipes.cli import main
from recipes.core.data.chat import render_prompt
from recipes.core.launch.calibrate import grpo_extrapolation
from recipes.core.model.shape import model_shape
from recipes.core.plan.estimate import estimate_grpo_run, grpo_estimate_table
from recipes.core.plan.grpo import make_grpo_plan
from recipes.core.plan.hardware import Device, get_device

# The shape of test_estimate's small llama: 2 layers, hidden 32, 4 query heads and 2 key/value heads of 8
# (attention dim 32, key/value dim 16), vocabulary 1,000, untied head.
V, LAYERS, HIDDEN, ATTENTION, KV = 1000, 2, 32, 32, 16
N = 2 * (32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32  # non-embedding: 18,592
TOTAL = N + 2 * V * HIDDEN

# 64 prompts x 4 generations on 2 ranks: micro batch 4, GA 2 -> 16 completions a step; generation batches
# of 4 micro-batches per rank = 32 completions, 2 optimizer steps each (the second off-policy: logp_old
# needed); 8 generation batches, 16 steps. Prompts of 10 tokens, completions of 6.
PLAN = make_grpo_plan(
    num_prompts=64,
    world_size=2,
    micro_batch_size=4,
    num_generations=4,
    learning_rate=1e-5,
    gradient_accumulation_steps=2,
    steps_per_generation=4,
    max_completion_length=6,
)
P, C, B = 10, 6, 32


def forward(tokens: int, context: float) -> float:
    """A forward: 2 FLOPs per non-embedding parameter per token, and QK^T and AV over `context` tokens
    (4 x layers x attention dim per token of context), as flops.py counts a third of 6ND + 12 l d s D."""
    return 2 * N * tokens + 4 * LAYERS * ATTENTION * context * tokens


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("small_llama")
    AutoConfig.for_model(
        "llama",
        vocab_size=V,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ).save_pretrained(directory)
    return directory


def estimate(shape, device=None, **kwargs):
    return estimate_grpo_run(
        PLAN.to_dict(), shape, "fp32", P, C, old_logps=PLAN.needs_old_logps, device=device, **kwargs
    )


def test_flops_count_the_prefill_each_decoded_token_the_logp_pass_and_training(small_llama):
    shape = model_shape(str(small_llama))
    assert (shape.non_embedding_params, shape.total_params, shape.kv_dim) == (N, TOTAL, KV)
    assert PLAN.needs_old_logps and PLAN.optimizer_steps_per_generation_batch == 2
    est = estimate(shape)
    flops = est["flops_per_generation_batch"]
    assert flops["prefill"] == forward(B * P, P)
    assert flops["decode"] == forward(B * C, P + C / 2)  # a decoded token sees P + C/2 tokens on average
    assert flops["logp_passes"] == forward(B * (P + C), P + C)  # logp_old only: beta is 0
    assert est["training_flops_per_step"] == 3 * forward(16 * (P + C), P + C)
    assert est["total_flops"] == 8 * (
        forward(B * P, P) + forward(B * C, P + C / 2) + forward(B * 16, 16)
    ) + 16 * (3 * forward(16 * 16, 16))
    assert (est["generated_tokens_per_step"], est["trained_tokens_per_step"]) == (B * C / 2, 16 * (P + C))
    with_reference = estimate(shape, reference="copy")["flops_per_generation_batch"]["logp_passes"]
    assert with_reference == 2 * forward(B * (P + C), P + C)


def test_decoding_is_bound_by_the_bytes_it_reads_until_the_flops_take_longer(small_llama):
    shape = model_shape(str(small_llama))
    # Per decoded token a rank reads the layers' fp32 weights, the fp32 head and its 16 rows' keys and
    # values over the mean context of 13 tokens: 4 N + 4 V h + 2 x 2 layers x 16 x 13 x 16 rows x 4.
    read = 4 * N + 4 * V * HIDDEN + 2 * LAYERS * KV * 13 * 16 * 4
    slow_memory = Device("slow memory", 1e12, {"fp32": 1e12}, memory_bandwidth=1e9)
    est = estimate(shape, slow_memory, utilization=0.5)
    assert est["decode_bytes_per_token"] == read
    rate = 0.5e12 * 2  # FLOP/s of both ranks at 50% of the peak
    sampling = forward(B * P, P) / rate + C * read / 1e9
    logp = forward(B * 16, 16) / rate
    training = 3 * forward(16 * 16, 16) / rate
    sec = est["seconds"]
    # each side a few roundings of the same exact quantity
    close = {"rel": 16 * FLOAT64_UNIT_ROUNDOFF, "abs": 0}
    assert sec["sampling_per_generation_batch"] == pytest.approx(sampling, **close)
    assert sec["logp_passes_per_generation_batch"] == pytest.approx(logp, **close)
    assert sec["training_per_step"] == pytest.approx(training, **close)
    assert sec["generation_per_step"] == pytest.approx((sampling + logp) / 2, **close)
    assert sec["generation_share"] == pytest.approx(
        (sampling + logp) / 2 / ((sampling + logp) / 2 + training), **close
    )
    assert est["wall_clock_seconds"] == pytest.approx(8 * (sampling + logp) + 16 * training, **close)
    # With bandwidth to spare, a decoding step takes its FLOPs' time.
    fast_memory = Device("fast memory", 1e12, {"fp32": 1e12}, memory_bandwidth=1e18)
    sec = estimate(shape, fast_memory, utilization=0.5)["seconds"]
    decode = forward(B * C, P + C / 2) / rate
    assert sec["sampling_per_generation_batch"] == pytest.approx(forward(B * P, P) / rate + decode, **close)


def test_memory_counts_the_cache_the_gathered_weights_the_adapters_and_the_reference(small_llama):
    shape = model_shape(str(small_llama))
    # The key/value cache of 16 rows at full length (16 tokens), fp32, and one token's fp32 logits per row.
    cache = 2 * LAYERS * KV * 16 * 16 * 4 + 4 * 16 * V
    assert estimate(shape)["sampling_memory"] == cache
    zero3 = estimate(shape, zero_stage=3)
    assert zero3["weights_gathered"] and zero3["sampling_memory"] == cache + 4 * TOTAL
    lora = estimate_grpo_run(
        {**PLAN.to_dict(), "trainable_parameters": 1000},
        shape,
        "fp32",
        P,
        C,
        old_logps=True,
        reference="copy",
    )
    mem = lora["memory_per_device"]
    assert (mem["gradients"], mem["optimizer_states"], mem["reference"]) == (4 * 1000, 8 * 1000, 4 * TOTAL)
    assert estimate(shape, reference="adapter")["memory_per_device"]["reference"] == 0  # the policy itself
    small = Device("small", 1e6, {"fp32": 1e12}, memory_bandwidth=1e9)
    est = estimate(shape, small)
    states = est["memory_per_device"]["total"] - est["memory_per_device"]["activations"]
    assert est["peak_memory"] == max(est["memory_per_device"]["total"], states + cache)
    assert est["fits"] is False and "WARNING: does not fit" in grpo_estimate_table(est)


def test_every_gpu_in_the_table_has_a_datasheet_bandwidth_and_the_cpu_none():
    assert get_device("H100-SXM").memory_bandwidth == 3.35e12
    assert get_device("H200").memory_bandwidth == 4.8e12
    assert get_device("A100-80GB").memory_bandwidth == 2.039e12
    assert get_device("CPU").memory_bandwidth is None


def test_recipes_plan_prints_the_default_jobs_split_from_its_prompts_and_completion_length(capsys):
    argv = ["plan", "--config", "recipes/configs/grpo_smollm2.yaml", "--gpu", "H100-SXM", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    est = result["estimate"]
    # The mean prompt, rendered with the chat template and its generation prompt, as the run keeps it.
    tokenizer = AutoTokenizer.from_pretrained(REPO / ".cache/models/SmolLM2-135M-Instruct")
    rows = read_jsonl(REPO / "recipes/data/arithmetic/train.jsonl")
    lengths = [min(len(render_prompt(tokenizer, row["prompt"])), 64) for row in rows]
    assert result["num_prompts"] == len(rows)
    assert est["prompt_len"] == pytest.approx(
        sum(lengths) / len(lengths), rel=len(rows) * FLOAT64_UNIT_ROUNDOFF
    )
    assert est["completion_len"] == 16  # max_completion_length, an upper bound
    assert (
        est["generated_tokens_per_step"]
        == result["completions_per_generation_batch"] * 16 / (result["optimizer_steps_per_generation_batch"])
    )
    sec = est["seconds"]
    close = {"rel": 16 * FLOAT64_UNIT_ROUNDOFF, "abs": 0}
    assert est["wall_clock_seconds"] == pytest.approx(
        result["generation_batches"]
        * (sec["sampling_per_generation_batch"] + sec["logp_passes_per_generation_batch"])
        + result["total_optimizer_steps"] * sec["training_per_step"],
        **close,
    )
    assert (
        main(
            ["plan", "--config", "recipes/configs/grpo_smollm2.yaml", "--gpu", "CPU", "--completion-len", "9"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "completion 9 (--completion-len)" in out
    rows = {
        line.split("  ", 1)[0]: line.split("  ", 1)[1].strip() for line in out.splitlines() if "  " in line
    }
    assert rows["sampling"] == "- (CPU has no memory bandwidth in the table; use --calibrate)"


def test_the_calibration_counts_the_first_generation_batch_and_step_once():
    # measured: generation batches of 3.0 (warm-up), 1.0 and 2.0 s; steps of 0.5 (warm-up), 0.25 and 0.25 s;
    # a plan of 10 batches and 20 steps: 3.0 + 9 x 1.5 + 0.5 + 19 x 0.25 = 21.75 s, exact in binary
    found = grpo_extrapolation([3.0, 1.0, 2.0], [0.5, 0.25, 0.25], 10, 20)
    assert found == {
        "calibrated_generation_seconds": 1.5,
        "calibrated_training_seconds": 0.25,
        "calibrated_wall_clock_seconds": 21.75,
    }
    assert grpo_extrapolation([3.0], [0.5], 2, 2)["calibrated_wall_clock_seconds"] == 7.0  # the first again
    with pytest.raises(ValueError, match="at least one generation batch"):
        grpo_extrapolation([], [0.5], 2, 2)


@pytest.mark.slow
def test_plan_calibrate_times_real_generation_batches_and_steps(tmp_path, monkeypatch, capsys):
    """How close the prediction lands is a speed figure (benchmark); this proves the command reads the
    generation and training time of each real step and extrapolates them as documented."""
    model = make_tiny_decoder(tmp_path / "model", "llama")
    # 16 prompts x 4 generations, micro batch 4, GA 1, generation batches of 8 completions (2 steps each):
    # 8 generation batches, 16 steps. The calibration's 3 steps sample 2 generation batches.
    recipe = tmp_path / "grpo_calibrate.yaml"
    recipe.write_text(
        f"model_name_or_path: {model}\ndataset_name: recipes/data/arithmetic\neval_split: null\n"
        "reward_funcs:\n- recipes.rewards:correct_answer\nnum_generations: 4\nper_device_train_batch_size: 4\n"
        "generation_batch_size: 8\nmax_completion_length: 4\nmax_train_samples: 16\nreport_to: none\n"
    )
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)
    assert main(["plan", "--config", str(recipe), "--calibrate", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # after DeepSpeed's log line
    est = result["estimate"]
    assert (result["generation_batches"], result["total_optimizer_steps"]) == (8, 16)
    generation, training = est["measured_generation_seconds"], est["measured_training_seconds"]
    assert (len(generation), len(training)) == (2, 3)
    assert {k: est[k] for k in ("calibrated_generation_seconds", "calibrated_training_seconds")} == {
        k: v
        for k, v in grpo_extrapolation(generation, training, 8, 16).items()
        if k != "calibrated_wall_clock_seconds"
    }
    assert (
        est["calibrated_wall_clock_seconds"]
        == grpo_extrapolation(generation, training, 8, 16)["calibrated_wall_clock_seconds"]
    )
