"""The GRPO recipe: it takes exactly the planned optimizer steps at get_linear_schedule_with_warmup's LRs, its
advantages and losses are the loss functions' on the completions it recorded (a first pass has ratio 1 and
no clipping), two DDP processes sample the same completions and train the same weights as one process with
the accumulation that gives the same global batch, and bad input stops it with one paragraph, exit 2."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    MEASURED,
    TWO_PROCESSES,
    adam_tolerance,
    float32_tolerance,
    forward_terms,
    in_process,
    launch,
    load_plan,
    load_weights,
    make_tiny_decoder,
    max_weight_diff,
    read_jsonl,
    resume_copy,
    train_records,
    weight_distance,
    write_jsonl,
)
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

from recipes.cli import main as recipes
from recipes.core.data.chat import render_prompt
from recipes.core.errors import run_recipe
from recipes.core.losses.completions import completion_inputs, token_logps
from recipes.core.losses.grpo import Clipping, group_advantages, step_divisor, token_losses, weighted_sum
from recipes.core.model.generation import Sampling, sample
from recipes.data.generators.arithmetic import ARITHMETIC_DIR, write_arithmetic_dataset
from recipes.rewards import correct_answer, number_only

FSDP2, ZERO2, ZERO3 = (
    "accelerate_configs/fsdp2.yaml",
    "accelerate_configs/ds_zero2.yaml",
    "accelerate_configs/ds_zero3.yaml",
)


def letter_e(prompts, completions, **_):
    """A reward the tiny random model's completions spread over: the letters e in the completion (an
    assistant turn after chat prompts, a string after text prompts)."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(text.count("e")) for text in texts]


def seen_by_reward(prompts, completions, answer, **_):
    """Records what a reward function is handed (prompt, completion, column) in a file beside the data."""
    with open(os.environ["GRPO_SEEN"], "a") as f:
        for row in zip(prompts, completions, answer, strict=True):
            f.write(json.dumps(row) + "\n")
    return [0.0] * len(completions)


def explode(prompts, completions, **_):
    raise ValueError("no score for you")


# ---------------------------------------------------------------- the job
# 12 prompts, 4 generations each; 8 completions (2 prompts) per optimizer step, as micro batch 4 x GA 2 on
# one process or micro batch 4 x 2 ranks; generation batches of 16 completions (4 prompts), each trained in
# 2 optimizer steps, so the second step of each is off the sampling policy (its logp_old was kept); 3
# generation batches, 6 steps, warmup 2. A checkpoint after every step keeps the weights each step started from.
# 5 eval prompts in chunks of 2: on 2 ranks one samples twice, the other once.
STEPS, WARMUP, LR = 6, 2, 1e-2
JOB = {
    "reward_funcs": "test_grpo_recipe:letter_e",
    "num_generations": 4,
    "per_device_train_batch_size": 4,
    "global_batch_size": 8,
    "generation_batch_size": 16,
    "max_completion_length": 8,
    "temperature": 1.0,
    "learning_rate": LR,
    "warmup_steps": WARMUP,
    "max_grad_norm": 1000,  # above every step's norm: recorded, never clipped
    "per_device_eval_batch_size": 2,  # 5 eval prompts: 2 chunks on rank 0, 1 on rank 1
    "save_steps": 1,
    "seed": 3,
    "report_to": "none",
}


def job_args(model: Path, data: Path, output: Path, **overrides) -> list[str]:
    values = {"model_name_or_path": model, "dataset_name": data, "output_dir": output, **JOB, **overrides}
    return [x for key, value in values.items() for x in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_decoder(tmp_path_factory.mktemp("grpo_model"), "llama")


@pytest.fixture(scope="module")
def prompt_data(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("grpo_data")
    questions = [f"What is {a} + {a + 3}?" for a in range(17)]
    rows = [
        {"prompt": [{"role": "user", "content": q}], "answer": str(2 * a + 3)}
        for a, q in enumerate(questions)
    ]
    write_jsonl(directory / "train.jsonl", rows[:12])
    write_jsonl(directory / "validation.jsonl", rows[12:])
    return directory


@pytest.fixture(scope="module")
def one_process(model_dir, prompt_data, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("grpo_one") / "run"
    in_process("grpo", job_args(model_dir, prompt_data, output))
    return output


def batches(run: Path) -> dict[int, list[dict]]:
    """completions.jsonl by generation batch, in completion order."""
    found: dict[int, list[dict]] = {}
    for row in read_jsonl(run / "completions.jsonl"):
        found.setdefault(row["generation_batch"], []).append(row)
    return found


# ---------------------------------------------------------------- one process
def test_the_run_takes_the_planned_steps_at_the_schedules_lrs(one_process):
    plan = load_plan(one_process)
    assert (plan["total_optimizer_steps"], plan["warmup_steps"]) == (STEPS, WARMUP)
    assert (plan["completions_per_step"], plan["optimizer_steps_per_generation_batch"]) == (8, 2)
    records = train_records(one_process)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(r["completions"] == 8 for r in records)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    scheduler = get_linear_schedule_with_warmup(optimizer, WARMUP, STEPS)
    expected = []
    for _ in range(STEPS):
        expected.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert [r["lr"] for r in records] == expected
    assert sorted(batches(one_process)) == [0, 1, 2]


def test_rewards_and_advantages_are_the_reward_function_and_group_advantages_of_the_completions(one_process):
    for rows in batches(one_process).values():
        assert [r["generation"] for r in rows] == [0, 1, 2, 3] * 4
        completions = [[{"role": "assistant", "content": r["completion"]}] for r in rows]
        rewards = letter_e(None, completions)
        assert [r["reward"] for r in rows] == rewards
        advantages = group_advantages(torch.tensor(rewards, dtype=torch.float64).float(), 4)
        assert [r["advantage"] for r in rows] == advantages.tolist()


def test_a_first_pass_has_ratio_one_and_its_loss_is_the_closed_form(one_process):
    """On the step that samples its generation batch the importance ratio is 1: nothing is clipped and each
    token's loss is -A (dapo: the token mean over the step, sum_i -A_i n_i / sum_i n_i)."""
    records = train_records(one_process)
    for step in (1, 3, 5):
        record = records[step - 1]
        rows = batches(one_process)[step // 2][:8]
        lengths = [len(r["completion_ids"]) for r in rows]
        assert record["clip_fraction"] == 0.0 and record["completion_tokens"] == sum(lengths)
        expected = -math.fsum(r["advantage"] * n for r, n in zip(rows, lengths, strict=True)) / sum(lengths)
        # float32 token losses summed over the step's tokens, each at most max |A| in size
        scale = max(abs(r["advantage"]) for r in rows)
        assert abs(record["loss"] - expected) <= float32_tolerance(sum(lengths), scale)
        assert record["reward"] == sum(r["reward"] for r in rows) / 8


def test_lora_in_bf16_takes_the_planned_steps_and_its_first_passes_have_the_closed_form_loss(
    model_dir, prompt_data, tmp_path
):
    """bf16 autocast with LoRA adapters: the plan and schedule are the fp32 run's; a step that samples its
    generation batch still has ratio exactly 1 (logp_old is logp itself, detached), so its loss is the
    closed form to float32 summation; only the adapters train and final/ holds them alone."""
    run = tmp_path / "run"
    overrides = dict(mixed_precision="bf16", use_peft=True, max_steps=3, save_steps=0)
    in_process("grpo", job_args(model_dir, prompt_data, run, **overrides))
    records = train_records(run)
    assert [r["step"] for r in records] == [1, 2, 3] and load_plan(run)["total_optimizer_steps"] == 3
    for step in (1, 3):
        record, rows = records[step - 1], batches(run)[step // 2][:8]
        lengths = [len(r["completion_ids"]) for r in rows]
        assert record["clip_fraction"] == 0.0 and record["completion_tokens"] == sum(lengths)
        expected = -math.fsum(r["advantage"] * n for r, n in zip(rows, lengths, strict=True)) / sum(lengths)
        scale = max(abs(r["advantage"]) for r in rows)
        assert abs(record["loss"] - expected) <= float32_tolerance(sum(lengths), scale)
    adapter = load_file(run / "final" / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    plan = load_plan(run)
    assert sum(t.numel() for t in adapter.values()) == plan["trainable_parameters"] < plan["total_parameters"]
    assert any(
        t.abs().max() > 0 for name, t in adapter.items() if "lora_B" in name
    )  # B starts at 0: it trained
    assert not (run / "final" / "model.safetensors").exists()


def test_an_off_policy_steps_loss_is_the_clipped_surrogate_from_the_weights_it_sampled_with(
    one_process, model_dir, prompt_data
):
    """Step 6 trains the second half of the generation batch sampled after step 4: logp_old from the weights
    of checkpoint-4, logp from those of checkpoint-5, recomputed here with the loss functions."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [render_prompt(tokenizer, row["prompt"]) for row in read_jsonl(prompt_data / "train.jsonl")]
    rows = batches(one_process)[2][8:]
    record = train_records(one_process)[5]

    def logps_after(step: int) -> list[torch.Tensor]:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.load_state_dict(load_file(str(one_process / f"checkpoint-{step}" / "model.safetensors")))
        found = []
        for half in (rows[:4], rows[4:]):  # the run's micro-batches
            inputs = micro_batch(half)
            with torch.no_grad():
                found.append(token_logps(model.eval(), inputs, 1.0))
        return found

    def micro_batch(half: list[dict]) -> dict:
        return completion_inputs(
            [prompts[r["prompt_row"]] for r in half],
            [r["completion_ids"] for r in half],
            tokenizer.pad_token_id,
            torch.device("cpu"),
        )

    tokens = sum(len(r["completion_ids"]) for r in rows)
    divisor = step_divisor(tokens, 8, "dapo", 8)
    total, magnitude, clipped = 0.0, 0.0, 0
    for half, logps, old in zip((rows[:4], rows[4:]), logps_after(5), logps_after(4), strict=True):
        advantages = torch.tensor([r["advantage"] for r in half])
        losses, was_clipped, _ = token_losses(logps, old, advantages, Clipping(0.2))
        mask = micro_batch(half)["completion_mask"]
        total += weighted_sum(losses, mask, "dapo").item()
        magnitude += (losses.abs() * mask).sum().item()
        clipped += int((was_clipped * mask).sum())
    assert record["clip_fraction"] == clipped / tokens
    # The forward's and the step's sums, in float32, relative to the magnitudes they add.
    config = AutoConfig.from_pretrained(model_dir)
    terms = forward_terms(config, mask.shape[1] + 32) + config.vocab_size + tokens
    assert abs(record["loss"] - total / divisor) <= float32_tolerance(terms, magnitude / divisor)


def test_seeded_samples_do_not_depend_on_the_batch_they_are_drawn_in(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = [
        render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in ("What is 1 + 2?", "Hi", "Why?")
    ]
    sampling = Sampling(max_completion_length=10, temperature=0.8, top_k=50, top_p=0.9)

    def drawn(indices: list[int]) -> list[list[int]]:
        chosen = [prompts[i] for i in indices]
        seeds = [100 + i for i in indices]
        return sample(
            model, chosen, sampling, tokenizer.pad_token_id, tokenizer.eos_token_id, seeds=seeds
        ).ids

    every = drawn([0, 1, 2])
    assert drawn([2, 0]) == [every[2], every[0]] and drawn([1]) == [every[1]]
    assert len({tuple(ids) for ids in every}) == 3


# ---------------------------------------------------------------- two processes
@pytest.fixture(scope="module")
def two_processes(model_dir, prompt_data, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("grpo_two") / "run"
    args = job_args(model_dir, prompt_data, output)
    result = launch(TWO_PROCESSES, "grpo", args)  # helpers.launch puts this module (the reward) on the path
    assert "world size 2" in result.stdout + result.stderr
    return output


def assert_trains_as_one_process(ours_dir: Path, one_process: Path) -> None:
    """The same completions (rewards, advantages), steps, LRs and counts as one process, and its losses and
    final weights to the rounding of another order of sums."""
    # The same seeds, prompts and (to rounding) weights: the same completions, rewards and advantages.
    assert read_jsonl(ours_dir / "completions.jsonl") == read_jsonl(one_process / "completions.jsonl")
    ours, theirs = train_records(ours_dir), train_records(one_process)
    exact = ("step", "lr", "completions", "completion_tokens", "reward", "reward_std", "frac_reward_zero_std")
    assert [[r[k] for k in exact] for r in ours] == [[r[k] for k in exact] for r in theirs]
    # The gradients add the same terms in another order (two ranks' halves, then their mean): each step's
    # gradient within 2 n u of its norm, and Adam carries that into steps of at most lr x sqrt(weights).
    # A loss moves by its own rounding (float32 token losses of size |A| x ratio, under 2 for groups of 4
    # and a ratio clipped at 1.2) plus the weights' distance times its gradient's norm (the largest recorded).
    weights = load_weights(one_process / "final")
    config = AutoConfig.from_pretrained(one_process / "final")
    n_weights = sum(t.numel() for t in weights.values())
    gradient_terms = 2 * forward_terms(config, 32) + config.vocab_size + 8 * 8
    tolerance = adam_tolerance(gradient_terms, [r["lr"] for r in theirs], n_weights)
    assert weight_distance(load_weights(ours_dir / "final"), weights) <= tolerance
    gradient = max(r["grad_norm"] for r in theirs)
    for x, y in zip(ours, theirs, strict=True):
        assert abs(x["loss"] - y["loss"]) <= float32_tolerance(gradient_terms, 2.0) + gradient * tolerance, (
            x,
            y,
        )


@pytest.mark.slow
def test_two_ddp_processes_sample_the_same_completions_and_train_the_same_weights(one_process, two_processes):
    assert load_plan(two_processes)["gradient_accumulation_steps"] == 1
    assert_trains_as_one_process(two_processes, one_process)


@pytest.mark.slow
def test_zero2_trains_as_one_process(one_process, model_dir, prompt_data, tmp_path):
    """ZeRO-2 keeps whole weights on every rank (sampling needs no gather) and partitions the gradients and
    Adam states: the same completions and, to rounding, the same weights as one process."""
    output = tmp_path / "run"
    launch(ZERO2, "grpo", job_args(model_dir, prompt_data, output))
    assert json.loads((output / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    assert_trains_as_one_process(output, one_process)


@pytest.mark.slow
@pytest.mark.parametrize("topology", [FSDP2, ZERO3], ids=["fsdp2", "zero3"])
def test_sharded_weights_are_gathered_for_generation_and_train_as_one_process(
    one_process, model_dir, prompt_data, tmp_path, topology
):
    """Under FSDP2 and ZeRO-3 each rank holds half of every parameter: generation runs on the weights
    gathered once per generation batch (with the engines' per-module hooks held off), and the shards train
    as one process does (reduce-scatter instead of local sums)."""
    output, gathers = tmp_path / "run", tmp_path / "gathers.jsonl"
    # gather_spy.letter_e is letter_e, from a module that counts each rank's all-gathers (see its docstring).
    args = job_args(model_dir, prompt_data, output, reward_funcs="gather_spy:letter_e")
    result = launch(topology, "grpo", args, env={"GRPO_GATHERS": str(gathers)})
    if topology == FSDP2:
        assert "FSDP2: parameters sharded over 2 processes" in result.stdout + result.stderr
    else:
        assert json.loads((output / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3
    assert_trains_as_one_process(output, one_process)
    # Once per generation batch: each rank gathers when the weights are made whole (3 generation batches, and
    # 2 evaluations: before the first step and after the last), then samples its 8 tokens per completion
    # (in 1 or 2 chunks at evaluation) without one all-gather.
    records = read_jsonl(gathers)
    assert sorted(r["rank"] for r in records) == [0] * 5 + [1] * 5
    assert all(r["entering"] > 0 for r in records), records
    assert all(r["sampling"] and not any(r["sampling"]) for r in records), records


# ---------------------------------------------------------------- errors
def test_a_reward_function_that_raises_stops_the_run_with_one_paragraph_and_exit_2(
    model_dir, prompt_data, tmp_path, capsys
):
    args = job_args(model_dir, prompt_data, tmp_path / "run", reward_funcs="test_grpo_recipe:explode")
    with pytest.raises(SystemExit) as stopped:
        run_recipe(lambda: in_process("grpo", args))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    error = err.strip().splitlines()[-1]
    assert "Traceback" not in err and error.startswith(
        "error: reward function test_grpo_recipe:explode raised ValueError: no score for you; it is called as "
        "f(prompts, completions, completion_ids, answer)"
    )


def test_a_generation_batch_of_partial_groups_is_refused_before_loading_with_values_that_work(
    model_dir, prompt_data, tmp_path, capsys
):
    args = job_args(model_dir, prompt_data, tmp_path / "run", num_generations=3, generation_batch_size=8)
    with pytest.raises(SystemExit) as stopped:
        run_recipe(lambda: in_process("grpo", args))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    error = err.strip().splitlines()[-1]  # one line, after the datasets progress bars; no traceback
    assert error.startswith("error: ") and "Traceback" not in err
    assert "is not a whole number of groups of num_generations 3" in error and "; use " in error
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the default job
def test_recipes_plan_prints_the_grpo_plan_of_the_default_config(capsys):
    assert (
        recipes(["plan", "--config", "recipes/configs/grpo_smollm2.yaml", "--num-samples", "512", "--json"])
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert (plan["total_optimizer_steps"], plan["warmup_steps"]) == (30, 3)  # warmup: ceil(0.1 x 30)
    assert (plan["completions_per_step"], plan["prompts_per_step"], plan["generation_batches_per_epoch"]) == (
        32,
        4,
        128,
    )


def test_the_bundled_arithmetic_task_is_its_generators_output_and_its_rewards_score_answers(tmp_path):
    write_arithmetic_dataset(tmp_path)
    for split in ("train", "validation"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (ARITHMETIC_DIR / f"{split}.jsonl").read_bytes()
    train = read_jsonl(ARITHMETIC_DIR / "train.jsonl")
    validation = read_jsonl(ARITHMETIC_DIR / "validation.jsonl")
    assert (len(train), len(validation)) == (512, 64)
    assert not {r["prompt"][1]["content"] for r in train} & {r["prompt"][1]["content"] for r in validation}
    replies = [
        [{"role": "assistant", "content": text}] for text in ("21", "The answer is 21.", "12 + 9 = 21", "22")
    ]
    assert correct_answer(None, replies, answer=["21"] * 4) == [1.0, 1.0, 1.0, 0.0]
    assert number_only(None, replies) == [1.0, 0.0, 0.0, 1.0]


# ---------------------------------------------------------------- resume and the reference
def test_a_run_resumed_in_the_middle_of_a_generation_batch_trains_exactly_as_the_uninterrupted_one(
    one_process, model_dir, prompt_data, tmp_path
):
    """checkpoint-3 lies between the two steps of generation batch 1: the resumed run trains step 4 on the
    completions and logp_old the checkpoint kept (sampling them again would draw from moved weights)."""
    resumed = resume_copy(one_process, 3, tmp_path / "resumed")
    in_process("grpo", job_args(model_dir, prompt_data, resumed, resume_from_checkpoint="latest"))
    ours, theirs = read_jsonl(resumed / "metrics.jsonl"), read_jsonl(one_process / "metrics.jsonl")
    measured = MEASURED | {
        "generation_time",
        "training_time",
        "generated_tokens_per_s",
        "train_completions_per_second",
    }
    assert [{k: v for k, v in r.items() if k not in measured} for r in ours] == [
        {k: v for k, v in r.items() if k not in measured} for r in theirs
    ]  # the same floats: the same operations in the same order on the same values
    assert max_weight_diff(load_weights(resumed / "final"), load_weights(one_process / "final")) == 0.0
    assert read_jsonl(resumed / "completions.jsonl") == read_jsonl(one_process / "completions.jsonl")


@pytest.mark.parametrize("lora", [False, True], ids=["frozen_copy", "disabled_adapter"])
def test_with_beta_the_kl_to_the_starting_model_is_zero_at_the_first_step_and_then_grows(
    model_dir, prompt_data, tmp_path, lora
):
    run = tmp_path / "run"
    overrides = dict(beta=0.1, warmup_steps=0, max_steps=3, save_steps=0, use_peft=lora)
    in_process("grpo", job_args(model_dir, prompt_data, run, **overrides))
    kls = [r["kl"] for r in train_records(run)]
    # The reference is a frozen copy of the same weights, or the policy without its adapter (whose update is
    # 0 before the first step: LoRA starts B at 0): the per-token log-ratio d is rounding (float32
    # over the forward's sums, relative to |logp| <= log(vocabulary) for this barely trained model), and
    # the estimator exp(d) - d - 1 is d^2 / 2 to leading order.
    config = AutoConfig.from_pretrained(model_dir)
    d = float32_tolerance(forward_terms(config, 32) + config.vocab_size, math.log(config.vocab_size))
    assert 0 <= kls[0] <= d**2 and kls[2] > d**2


def test_a_dataset_without_the_prompt_column_is_named_with_its_columns(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "questions.jsonl", [{"question": "What is 1 + 2?", "answer": "3"}] * 8)
    args = job_args(model_dir, data, tmp_path / "run", eval_split="null")
    with pytest.raises(SystemExit) as stopped:
        run_recipe(lambda: in_process("grpo", args))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    error = err.strip().splitlines()[-1]  # one line, after the datasets progress bars; no traceback
    assert error.startswith("error: ") and "Traceback" not in err
    assert "has no column 'prompt'; its columns are ['question', 'answer']" in error
    assert not (tmp_path / "run").exists()


def test_completion_logps_in_a_padded_batch_are_those_of_each_sequence_alone(model_dir):
    """Prompts left-padded and completions right-padded, with positions counting real tokens only: each
    completion token's log-probability is that of its sequence run alone, unpadded (as it was sampled)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in ("What is 1 + 2?", "Hi")]
    completions = [[5, 17, 230], [42, 7, 7, 99, 3]]
    assert len(prompts[0]) != len(prompts[1])
    inputs = completion_inputs(prompts, completions, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        batched = token_logps(model, inputs, 0.7)
        for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            logits = (
                model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1] / 0.7
            )
            alone = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
            # float32 forwards of different shapes: the deepest chain of sums, relative to |logp|
            config = AutoConfig.from_pretrained(model_dir)
            bound = float32_tolerance(forward_terms(config, 32) + config.vocab_size, alone.abs().max().item())
            assert (batched[row, : len(completion)] - alone).abs().max() <= bound
            assert inputs["completion_mask"][row].tolist() == [1] * len(completion) + [0] * (
                5 - len(completion)
            )


def test_a_tokenizer_without_a_pad_token_pads_with_its_end_of_sequence_token(
    model_dir, prompt_data, tmp_path
):
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(model)
    assert AutoTokenizer.from_pretrained(model).pad_token_id is None
    run = tmp_path / "run"
    in_process("grpo", job_args(model, prompt_data, run, max_steps=2, save_steps=0))
    assert [r["step"] for r in train_records(run)] == [1, 2]
    eos = tokenizer.eos_token_id
    for row in batches(run)[0]:  # a completion ends at its first end-of-sequence token, or is truncated
        ids = row["completion_ids"]
        assert eos not in ids[:-1] and row["truncated"] == (ids[-1] != eos) and len(ids) <= 8


def test_text_prompts_are_tokenised_as_they_are_and_reward_functions_get_strings_and_columns(
    model_dir, tmp_path, monkeypatch
):
    rows = [{"prompt": f"Question {i}: what is {i} + 1?", "answer": str(i + 1)} for i in range(8)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    monkeypatch.setenv("GRPO_SEEN", str(tmp_path / "seen.jsonl"))
    run = tmp_path / "run"
    reward_funcs = "[test_grpo_recipe:letter_e, test_grpo_recipe:seen_by_reward]"
    in_process(
        "grpo",
        job_args(
            model_dir, data, run, eval_split="null", max_steps=1, warmup_steps=0, reward_funcs=reward_funcs
        ),
    )
    seen = read_jsonl(tmp_path / "seen.jsonl")
    recorded = batches(run)[0]
    assert len(seen) == len(recorded) == 16
    for (prompt, completion, answer), row in zip(seen, recorded, strict=True):
        assert (prompt, answer) == (rows[row["prompt_row"]]["prompt"], rows[row["prompt_row"]]["answer"])
        assert completion == row["completion"] and row["rewards"]["letter_e"] == completion.count("e")
    record = load_plan(run)["data"]["train"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = [len(tokenizer(row["prompt"])["input_ids"]) for row in rows]  # no chat template around them
    assert record["chat"] is False and record["mean_tokens"] == sum(lengths) / len(lengths)
