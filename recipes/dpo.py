"""Preference tuning of a causal LM with DPO (and IPO, hinge, robust DPO), on any topology
`accelerate launch` sets up; typically on the SFT recipe's output.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/dpo.py \
        --config recipes/configs/dpo_smollm2.yaml [--field value ...]

The data are prompt / chosen / rejected pairs (core/data/preferences.py); the unit of a batch is a pair,
whose chosen and rejected sequences go through the model in one forward. The loss (core/losses/dpo.py)
compares the policy's summed log-probabilities of each completion with the reference model's
(core/losses/reference.py: a frozen copy, the policy with its LoRA adapter disabled, or precomputed) and is
averaged over all pairs of an optimizer step on all ranks, so gradient accumulation and data parallelism
give exactly the gradient of one big batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

from recipes.core.config import TrainingConfig, field, parse_config
from recipes.core.data.loading import make_train_loader
from recipes.core.data.preferences import PairCollator, check_lengths, load_preference_data
from recipes.core.distributed.fsdp import reshard
from recipes.core.distributed.prepare import prepare
from recipes.core.errors import run_recipe
from recipes.core.evaluation.pairs import evaluate_pairs
from recipes.core.launch.startup import setup_accelerator
from recipes.core.losses.accumulation import backward_scale
from recipes.core.losses.causal_lm import CausalLMLoss
from recipes.core.losses.dpo import METRICS, check_loss_config, chosen_and_rejected, pair_losses, pair_metrics
from recipes.core.losses.reference import build_reference, sequence_logps
from recipes.core.model import lora
from recipes.core.model.optimizer import make_optimizer
from recipes.core.model.pretrained import load_pretrained
from recipes.core.model.source import load_tokenizer, require_model
from recipes.core.output.checkpoint_io import accelerate_io
from recipes.core.output.final_model import save_final_model
from recipes.core.plan.workload import Workload
from recipes.core.train.recipe import Recipe
from recipes.core.train.run import Run


@dataclass
class DPOConfig(TrainingConfig):
    beta: float = field(
        0.1, "How far the policy may move from the reference: rewards are beta x log-ratio.", minimum=0
    )
    loss_type: str = field(
        "sigmoid", "sigmoid (DPO) | ipo | hinge (SLiC) | robust (robust DPO, with label_smoothing)."
    )
    label_smoothing: float = field(
        0.0,
        "Probability that a pair's preference is wrong (sigmoid: conservative DPO; robust), in [0, 0.5).",
        minimum=0,
        maximum=0.5,
    )
    max_prompt_length: int = field(
        512, "Prompt tokens kept (the last ones, next to the reply); longer prompts are truncated.", minimum=1
    )
    max_length: int = field(
        1024, "Tokens of prompt + completion; longer completions are cut at the end.", minimum=2
    )
    precompute_ref_log_probs: bool = field(
        False,
        "Compute the reference's log-probabilities of every train and eval pair in one pass before "
        "training and keep them with the data, so the reference is not in memory while training.",
    )
    ref_model_name_or_path: str = field(
        "",
        "Reference model; empty: the starting model (model_name_or_path), or with use_peft that model with "
        "the adapter disabled (no second copy).",
    )
    dataset_columns: dict[str, str] = dataclasses.field(
        default_factory=dict,
        metadata={
            "help": "Columns of prompt, chosen and rejected when named otherwise, e.g. {prompt: question}."
        },
    )
    loss_chunk_tokens: int = field(
        256,
        "Log-probabilities come from the last hidden states through the LM head this many target tokens at "
        "a time, so logits of all tokens never exist at once; 0: all logits at once.",
        minimum=0,
    )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(DPOConfig, argv)
    check_config(cfg)

    # ---------------------------------------------------------------- compute
    accelerator, ga = setup_accelerator(cfg)  # the doctor's checks first: a bad combination fails in seconds
    run = Run.of_accelerator(RECIPE, cfg, accelerator)  # seeds; checks output_dir (writes nothing yet)
    log, ranks = run.log, run.ranks

    # ---------------------------------------------------------------- data
    tokenizer = load_tokenizer(cfg)  # checks first that model_name_or_path names a model
    if cfg.ref_model_name_or_path:
        require_model(cfg.ref_model_name_or_path, cfg.trust_remote_code, field="ref_model_name_or_path")
    # Rank 0 tokenises and caches, the others read the cache; bad data stops every rank, as one.
    train_set, eval_set, data = run.main_process_first(lambda: load_preference_data(cfg, tokenizer))
    log(data.summary(cfg.max_prompt_length, cfg.max_length))
    run.check_data(train_set, data.to_dict())  # enough pairs for one optimizer step, before any DataLoader
    collate = PairCollator(tokenizer.pad_token_id, cfg.pad_to_multiple_of)

    # ---------------------------------------------------------------- policy, reference and optimizer
    # Attention kernel, activation checkpointing; the memory census counts what loading left.
    model = load_pretrained(AutoModelForCausalLM, cfg, on_loaded=run.model_loaded)
    model = lora.apply_lora(model, cfg, lora.CAUSAL_LM)  # unchanged without use_peft
    loss_of = CausalLMLoss(model, cfg.loss_chunk_tokens, accelerator.autocast)
    parameters = lora.parameter_fields(model, log)  # trainable and total, printed and planned
    optimizer = make_optimizer(model, cfg)
    # accelerator.prepare for the launch's engine: under FSDP sharded by FSDP2 (core/distributed/prepare.py)
    model, optimizer = prepare(accelerator, model, optimizer)
    reference = build_reference(cfg, accelerator, model, loss_of)
    log(f"reference model: {reference.description}")
    if cfg.precompute_ref_log_probs:  # before any checkpoint is loaded: the starting weights
        batch_size = cfg.per_device_eval_batch_size
        train_set = reference.precompute(accelerator, train_set, collate, batch_size)
        if eval_set is not None:
            eval_set = reference.precompute(accelerator, eval_set, collate, batch_size)
        reference.release()
        reshard(model)  # forwards without a backward leave FSDP2's outer units gathered (no-op otherwise)
        log("reference log-probabilities precomputed for every train and eval pair")
    train_loader = accelerator.prepare(make_train_loader(train_set, cfg, collate))
    eval_loader = None
    if eval_set is not None:
        eval_loader = accelerator.prepare(
            DataLoader(eval_set, batch_size=cfg.per_device_eval_batch_size, collate_fn=collate)
        )

    # ---------------------------------------------------------------- plan and schedule
    plan = run.plan(train_set, len(train_loader), gradient_accumulation_steps=ga, **parameters)
    # Kept out of accelerator.prepare: a prepared scheduler steps once per process per optimizer step.
    scheduler = get_linear_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_optimizer_steps)

    def losses_and_metrics(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each pair's loss (differentiable when gradients are on) and its METRICS."""
        ref_chosen, ref_rejected = chosen_and_rejected(reference(batch))
        policy_chosen, policy_rejected = chosen_and_rejected(sequence_logps(model, loss_of, batch))
        logps = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
        losses = pair_losses(*logps, cfg.beta, cfg.loss_type, cfg.label_smoothing)
        return losses, pair_metrics(*logps, cfg.beta)

    def evaluate(step: int) -> None:
        if eval_loader is not None:
            run.records.log_eval(
                step, evaluate_pairs(accelerator, model, eval_loader, losses_and_metrics, METRICS), log
            )

    # ---------------------------------------------------------------- train
    loop = run.training_loop(
        plan=plan,
        io=accelerate_io(accelerator, model, optimizer),  # resumes model, optimizer, RNG, data position
        scheduler=scheduler,
        evaluate=evaluate,
    )
    with loop:
        for window in loop.windows(train_loader, model):
            # The pair mean of the whole step on all ranks: accumulation and data parallelism are one batch.
            window_pairs = ranks.sum(sum(len(batch["labels"]) // 2 for batch in window))
            scale = backward_scale(window_pairs, accelerator.num_processes, ga)
            metric_sums = torch.zeros(len(METRICS), device=accelerator.device)
            for batch in window.micro_batches(accelerator, model):
                with accelerator.accumulate(model):
                    losses, metrics = losses_and_metrics(batch)
                    metric_sums += metrics.sum(dim=0)
                    accelerator.backward(window.add_loss(losses.sum()) * scale)
                    if accelerator.sync_gradients:  # the window's last micro-batch: gradients are complete
                        loop.clip_gradients(window, accelerator, model)  # max_grad_norm; skip if non-finite
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=False)  # in place: DDP bucket views, see make_accelerator
            scheduler.step()
            means = [value / window_pairs for value in ranks.sum(metric_sums)]
            loop.step_done(window, count=window_pairs, metrics=dict(zip(METRICS, means, strict=True)))

        # ------------------------------------------------------------ save
        final_dir = save_final_model(accelerator, model, tokenizer, cfg, lora.CAUSAL_LM)
    log(f"preference-tuned model saved to {final_dir}; curves in {cfg.output_dir}/curves.png")
    accelerator.end_training()


def check_config(cfg: DPOConfig) -> None:
    """Loss and length settings that cannot train, refused before anything is loaded."""
    check_loss_config(cfg.beta, cfg.loss_type, cfg.label_smoothing)
    check_lengths(cfg.max_prompt_length, cfg.max_length)


def plan_data(cfg: DPOConfig, tokenizer: Callable[[], Any]) -> tuple[Any, dict]:
    """The train pairs (their target tokens: chosen and rejected) and their data record, exactly as the run
    loads them (for `recipes plan`)."""
    check_config(cfg)
    train_set, _, data = load_preference_data(cfg, tokenizer())
    return train_set, data.to_dict()


def plan_workload(cfg: DPOConfig) -> Workload:
    """For `recipes plan`'s estimate: two sequences per pair, and the reference's forward over them every
    step (a frozen copy, or the disabled adapter) or once before training (precomputed)."""
    if cfg.precompute_ref_log_probs:
        return Workload(sequences_per_sample=2, reference="precomputed")
    adapter = cfg.use_peft and not cfg.ref_model_name_or_path
    return Workload(sequences_per_sample=2, reference="adapter" if adapter else "copy")


RECIPE = Recipe(
    name="dpo",
    config_class=DPOConfig,
    script=__file__,
    plan_data=plan_data,
    unit="pairs",
    length_field="max_length",
    lora_task=lora.CAUSAL_LM,
    workload=plan_workload,
)

if __name__ == "__main__":
    run_recipe(main)
