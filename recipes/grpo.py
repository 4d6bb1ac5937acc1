"""Learning from rewards with GRPO (and its DAPO and Dr. GRPO normalisations), on any topology
`accelerate launch` sets up; field names and meanings are TRL's GRPOConfig's.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/grpo.py \
        --config recipes/configs/grpo_smollm2.yaml [--field value ...]

Each generation batch samples num_generations completions of each of its prompts (core/train/rollouts.py:
what decides the samples, and how every rank comes to hold the whole batch), scores them with the reward
functions named in reward_funcs (core/losses/rewards.py) and gives each the group-relative advantage of
its prompt's group. The batch is then trained on num_iterations times, in optimizer steps of whole groups
(core/plan/grpo.py); the clipped surrogate (plus beta x KL to a reference) is normalised over the whole
optimizer step on all ranks (core/losses/grpo.py), so gradient accumulation and data parallelism give
exactly the gradient of one big batch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

from recipes.core.config import ConfigError, TrainingConfig, field, parse_config
from recipes.core.data.prompts import IDS, load_prompt_data
from recipes.core.distributed.fsdp import reshard
from recipes.core.distributed.prepare import prepare
from recipes.core.errors import run_recipe
from recipes.core.launch.startup import setup_accelerator
from recipes.core.losses.accumulation import backward_scale
from recipes.core.losses.completions import completion_inputs, stored_logps, token_logps
from recipes.core.losses.grpo import (
    LOSS_TYPES,
    SCALE_REWARDS,
    Clipping,
    step_divisor,
    token_losses,
    weighted_sum,
)
from recipes.core.losses.reference import evaluating, token_reference
from recipes.core.losses.rewards import load_reward_functions
from recipes.core.model import lora
from recipes.core.model.generation import Sampling
from recipes.core.model.optimizer import make_optimizer
from recipes.core.model.pretrained import load_pretrained
from recipes.core.model.source import load_tokenizer, require_model
from recipes.core.output.checkpoint_io import accelerate_io
from recipes.core.output.final_model import save_final_model
from recipes.core.plan.grpo import plan_for_grpo_config
from recipes.core.plan.workload import Workload
from recipes.core.train.recipe import Recipe
from recipes.core.train.rollouts import (
    Rollouts,
    cut_completions,
    evaluate_rewards,
    micro_batch_schedule,
    reward_names,
    step_metrics,
    write_completions,
)
from recipes.core.train.run import Run


@dataclass
class GRPOConfig(TrainingConfig):
    reward_funcs: list[str] = dataclasses.field(
        default_factory=list,
        metadata={
            "help": "Reward functions as module:function, called f(prompts, completions, completion_ids, "
            "**columns) -> one number (or None) per completion."
        },
    )
    reward_weights: list[float] = dataclasses.field(
        default_factory=list, metadata={"help": "One weight per reward function; empty: 1 each."}
    )
    num_generations: int = field(8, "Completions sampled per prompt (a group).", minimum=2)
    max_prompt_length: int = field(512, "Prompt tokens kept (the last ones).", minimum=1)
    max_completion_length: int = field(256, "Tokens sampled per completion at most.", minimum=1)
    temperature: float = field(1.0, "Sampling temperature (0: greedy); logits are divided by it.", minimum=0)
    top_p: float = field(
        1.0, "Nucleus sampling: the smallest set of tokens with this probability.", minimum=0
    )
    top_k: int = field(0, "Sample among the k most likely tokens; 0: off.", minimum=0)
    steps_per_generation: int | None = field(
        None, "Micro-batches per rank a generation batch makes; null: gradient_accumulation_steps.", minimum=1
    )
    generation_batch_size: int | None = field(
        None, "Completions per generation batch over all ranks, instead of steps_per_generation.", minimum=1
    )
    num_iterations: int = field(1, "Passes over each generation batch (TRL's mu).", minimum=1)
    epsilon: float = field(
        0.2, "Clipping of the importance ratio: [1 - epsilon, 1 + epsilon_high].", minimum=0
    )
    epsilon_high: float | None = field(None, "Upper clipping (DAPO's clip-higher); null: epsilon.", minimum=0)
    beta: float = field(0.0, "Weight of the KL to the reference; 0: no reference is loaded.", minimum=0)
    loss_type: str = field("dapo", "dapo (token mean over the step) | grpo (per sequence) | dr_grpo.")
    scale_rewards: str = field("group", "Advantages divided by the std of the group | batch | none.")
    ref_model_name_or_path: str = field(
        "", "Reference (beta > 0); empty: the starting model, or with use_peft the adapter disabled."
    )
    dataset_columns: dict[str, str] = dataclasses.field(
        default_factory=dict,
        metadata={"help": "The prompt column when named otherwise, e.g. {prompt: question}."},
    )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(GRPOConfig, argv)
    check_config(cfg)
    rewards = load_reward_functions(cfg.reward_funcs, cfg.reward_weights or None)  # imports fail in seconds

    # ---------------------------------------------------------------- compute
    accelerator, ga = setup_accelerator(cfg)  # the doctor's checks first: a bad combination fails in seconds
    run = Run.of_accelerator(RECIPE, cfg, accelerator)  # seeds; checks output_dir (writes nothing yet)
    log, ranks = run.log, run.ranks

    # ---------------------------------------------------------------- data and plan
    tokenizer = load_tokenizer(cfg)  # checks first that model_name_or_path names a model
    if cfg.beta and cfg.ref_model_name_or_path:
        require_model(cfg.ref_model_name_or_path, cfg.trust_remote_code, field="ref_model_name_or_path")
    train_set, eval_set, data = run.main_process_first(lambda: load_prompt_data(cfg, tokenizer))
    log(data.summary(cfg.max_prompt_length))
    # Refuses, with values that work, a generation batch of partial groups or a group split across steps.
    plan = plan_for_grpo_config(cfg, len(train_set), ranks.num_processes, ga)

    # ---------------------------------------------------------------- policy, reference and optimizer
    model = load_pretrained(AutoModelForCausalLM, cfg, on_loaded=run.model_loaded)
    model = lora.apply_lora(model, cfg, lora.CAUSAL_LM)  # unchanged without use_peft
    parameters = lora.parameter_fields(model, log)
    optimizer = make_optimizer(model, cfg)
    model, optimizer = prepare(accelerator, model, optimizer)
    reference = token_reference(cfg, accelerator, model) if cfg.beta else None
    # Kept out of accelerator.prepare: a prepared scheduler steps once per process per optimizer step.
    scheduler = get_linear_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_optimizer_steps)

    # ---------------------------------------------------------------- generation batches
    rollouts = Rollouts(
        plan=plan,
        ranks=ranks,
        seed=cfg.seed,  # with the position in the run, decides the prompts and the samples
        train_set=train_set,
        rewards=rewards,
        sampling=Sampling(1, cfg.max_completion_length, cfg.temperature, cfg.top_p, cfg.top_k),
        tokenizer=tokenizer,
        prompt_column=cfg.dataset_columns.get("prompt", "prompt"),
        chat=data.train.chat,
        scale_rewards=cfg.scale_rewards,
    )
    # logp_old is the sampling policy's wherever the weights moved since sampling; else the ratio is 1.
    needs_old = plan.needs_old_logps
    clipping = Clipping(cfg.epsilon, cfg.epsilon_high)

    def inputs_of(batch, completions: list[int]) -> dict[str, torch.Tensor]:
        prompts = [train_set[batch.prompt_rows[c // plan.num_generations]][IDS] for c in completions]
        ids = [batch.ids[c] for c in completions]
        return completion_inputs(prompts, ids, rollouts.pad_token_id, accelerator.device)

    def logps_at_generation(batch, completions: list[int]) -> dict[str, torch.Tensor]:
        inputs, found = inputs_of(batch, completions), {}
        if needs_old:
            with evaluating(model):
                found["old"] = token_logps(model, inputs, cfg.temperature)
        if reference is not None:
            found["ref"] = reference(inputs)
        reshard(model)  # forwards without a backward leave FSDP2's outer units gathered (no-op otherwise)
        return found

    def evaluate(step: int) -> None:
        if eval_set is not None:
            results = evaluate_rewards(rollouts, eval_set, accelerator, model, cfg.per_device_eval_batch_size)
            run.records.log_eval(step, results, log)

    # ---------------------------------------------------------------- train
    loop = run.training_loop(
        plan=plan,
        io=accelerate_io(accelerator, model, optimizer),  # resumes model, optimizer, RNG, data position
        scheduler=scheduler,
        evaluate=evaluate,
        tracked={"generation_batch": rollouts},  # the batch a resumed run goes on training on
        plan_record={**plan.to_dict(), **parameters, "data": data.to_dict()},
    )
    own = rollouts.own_completions()
    names, completions_file = reward_names(rewards), Path(cfg.output_dir) / "completions.jsonl"
    if ranks.is_main_process:  # after a resume: the batches sampled after its checkpoint are sampled again
        cut_completions(completions_file, rollouts.current.index if rollouts.current else -1)
    with loop:
        for window in loop.windows(micro_batch_schedule(plan), model):
            previous = rollouts.current
            batch = rollouts.batch_for(
                window.epoch, window.batches[0], accelerator, model, logps_at_generation
            )
            fresh = batch is not previous
            if fresh and ranks.is_main_process:  # what was sampled and how it scored, for reading and checks
                write_completions(completions_file, batch, tokenizer, plan.num_generations, names)
            step = window.batches[0].position // ga  # of the pass; its completions are whole groups
            completions = range(step * plan.completions_per_step, (step + 1) * plan.completions_per_step)
            tokens = sum(len(batch.ids[c]) for c in completions)
            divisor = step_divisor(
                tokens, plan.completions_per_step, cfg.loss_type, cfg.max_completion_length
            )
            scale = backward_scale(divisor, accelerator.num_processes, ga)
            counts = torch.zeros(2, device=accelerator.device)  # clipped tokens, summed KL
            training_started = time.perf_counter()
            for ref in window.micro_batches(accelerator, model):
                with accelerator.accumulate(model):
                    mine = own[ref.position]
                    inputs = inputs_of(batch, mine)
                    logps = token_logps(model, inputs, cfg.temperature)
                    old = stored_logps(batch.old_logps, mine, logps) if needs_old else logps.detach()
                    ref_logps = stored_logps(batch.ref_logps, mine, logps) if reference is not None else None
                    advantages = batch.advantages[mine].to(logps.device)
                    losses, clipped, kl = token_losses(logps, old, advantages, clipping, ref_logps, cfg.beta)
                    mask = inputs["completion_mask"]
                    summed = weighted_sum(losses, mask, cfg.loss_type)
                    accelerator.backward(window.add_loss(summed) * scale)
                    counts[0] += (clipped * mask).sum()
                    if kl is not None:
                        counts[1] += (kl.detach() * mask).sum()
                    if accelerator.sync_gradients:  # the window's last micro-batch: gradients are complete
                        loop.clip_gradients(window, accelerator, model)  # max_grad_norm; skip if non-finite
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=False)  # in place: DDP bucket views, see make_accelerator
            scheduler.step()
            clipped_tokens, kl_sum = ranks.sum(counts)
            metrics = step_metrics(batch, completions, rewards, plan.num_generations)
            metrics["completion_tokens"] = tokens
            metrics["clip_fraction"] = clipped_tokens / tokens
            if reference is not None:
                metrics["kl"] = kl_sum / tokens
            metrics["generation_time"] = batch.generation_time if fresh else 0.0
            metrics["generated_tokens_per_s"] = sum(map(len, batch.ids)) / batch.sampling_time
            metrics["training_time"] = time.perf_counter() - training_started
            loop.step_done(
                window,
                count=plan.completions_per_step,
                loss=ranks.sum(window.loss_sum) / divisor,
                metrics=metrics,
            )

        # ------------------------------------------------------------ save
        final_dir = save_final_model(accelerator, model, tokenizer, cfg, lora.CAUSAL_LM)
    log(f"model saved to {final_dir}; curves in {cfg.output_dir}/curves.png")
    accelerator.end_training()


def check_config(cfg: GRPOConfig) -> None:
    """Settings that cannot train, refused before anything is loaded."""
    if not cfg.reward_funcs:
        raise ConfigError("reward_funcs is empty; name at least one reward function as module:function")
    for name, value, choices in (
        ("loss_type", cfg.loss_type, LOSS_TYPES),
        ("scale_rewards", cfg.scale_rewards, SCALE_REWARDS),
    ):
        if value not in choices:
            raise ConfigError(f"{name} is {value!r}; use one of {', '.join(choices)}")


def reference_kind(cfg: GRPOConfig) -> str | None:
    """What token_reference compares to: nothing (beta 0), the policy with its adapter disabled, or a
    frozen copy."""
    if not cfg.beta:
        return None
    return "adapter" if cfg.use_peft and not cfg.ref_model_name_or_path else "copy"


def plan_data(cfg: GRPOConfig, tokenizer: Callable[[], Any]) -> tuple[Any, dict]:
    """The train prompts and their data record, exactly as the run loads them (for `recipes plan`)."""
    check_config(cfg)
    train_set, _, data = load_prompt_data(cfg, tokenizer())
    return train_set, data.to_dict()


RECIPE = Recipe(
    name="grpo",
    config_class=GRPOConfig,
    script=__file__,
    plan_data=plan_data,
    unit="completions",
    length_field="max_completion_length",
    lora_task=lora.CAUSAL_LM,
    step_plan=lambda cfg, prompts, world_size: plan_for_grpo_config(cfg, prompts, world_size),
    workload=lambda cfg: Workload(1, reference_kind(cfg)),
)

if __name__ == "__main__":
    run_recipe(main)
