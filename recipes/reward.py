"""A reward model trained on preference pairs (Bradley-Terry), on any topology `accelerate launch` sets
up; its output loads as a GRPO reward model (a sequence-classification model with one output).

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/reward.py \
        --config recipes/configs/reward_smollm2.yaml [--field value ...]

The data are prompt / chosen / rejected pairs in the forms the DPO recipe reads (core/data/preferences.py),
with an optional `margin` column; the unit of a batch is a pair, whose chosen and rejected sequences go
through the model in one forward. The loss (core/losses/reward_model.py) is averaged over all pairs of an
optimizer step on all ranks, so gradient accumulation and data parallelism give exactly the gradient of
one big batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

from recipes.core.config import ConfigError, TrainingConfig, field, parse_config
from recipes.core.data.loading import make_train_loader
from recipes.core.data.preferences import PairCollator, check_lengths, load_preference_data
from recipes.core.distributed.prepare import prepare
from recipes.core.errors import run_recipe
from recipes.core.evaluation.pairs import evaluate_pairs
from recipes.core.launch.startup import setup_accelerator
from recipes.core.losses.accumulation import backward_scale
from recipes.core.losses.reward_model import METRICS, chosen_and_rejected, pair_losses, pair_metrics
from recipes.core.model import lora
from recipes.core.model.optimizer import make_optimizer
from recipes.core.model.pretrained import load_pretrained
from recipes.core.model.source import load_tokenizer
from recipes.core.output.checkpoint_io import accelerate_io
from recipes.core.output.final_model import save_final_model
from recipes.core.plan.workload import Workload
from recipes.core.train.recipe import Recipe
from recipes.core.train.run import Run

MARGIN = "margin"  # the optional column of how much better each chosen reply is


@dataclass
class RewardConfig(TrainingConfig):
    center_rewards_coefficient: float = field(
        0.0, "Weight of (r_chosen + r_rejected)^2, which keeps rewards near 0; 0: off.", minimum=0
    )
    max_prompt_length: int = field(
        512, "Prompt tokens kept (the last ones, next to the reply); longer prompts are truncated.", minimum=1
    )
    max_length: int = field(
        1024, "Tokens of prompt + completion; longer completions are cut at the end.", minimum=2
    )
    dataset_columns: dict[str, str] = dataclasses.field(
        default_factory=dict,
        metadata={
            "help": "Columns of prompt, chosen and rejected when named otherwise, e.g. {prompt: question}."
        },
    )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(RewardConfig, argv)
    check_lengths(cfg.max_prompt_length, cfg.max_length)

    # ---------------------------------------------------------------- compute
    accelerator, ga = setup_accelerator(cfg)  # the doctor's checks first: a bad combination fails in seconds
    run = Run.of_accelerator(RECIPE, cfg, accelerator)  # seeds; checks output_dir (writes nothing yet)
    log, ranks = run.log, run.ranks

    # ---------------------------------------------------------------- data
    tokenizer = load_tokenizer(cfg)  # checks first that model_name_or_path names a model
    # Rank 0 tokenises and caches, the others read the cache; bad data stops every rank, as one.
    train_set, eval_set, data = run.main_process_first(
        lambda: load_preference_data(cfg, tokenizer, numbers=(MARGIN,))
    )
    log(data.summary(cfg.max_prompt_length, cfg.max_length))
    run.check_data(train_set, data.to_dict())  # enough pairs for one optimizer step, before any DataLoader
    pad_id = padding_id(tokenizer)
    collate = PairCollator(pad_id, cfg.pad_to_multiple_of)
    train_loader = make_train_loader(train_set, cfg, collate)
    eval_loader = None
    if eval_set is not None:
        eval_loader = DataLoader(eval_set, batch_size=cfg.per_device_eval_batch_size, collate_fn=collate)

    # ---------------------------------------------------------------- model and optimizer
    model = load_pretrained(  # a new one-output head, read at each sequence's last token before padding
        AutoModelForSequenceClassification,
        cfg,
        num_labels=1,
        pad_token_id=pad_id,
        ignore_mismatched_sizes=True,
        new_modules=lora.HEAD_MODULES,  # left unquantised under load_in_4bit / load_in_8bit
        on_loaded=run.model_loaded,
    )
    model = lora.apply_lora(model, cfg, lora.SEQUENCE_CLASSIFICATION)  # the head trains in full
    parameters = lora.parameter_fields(model, log)  # trainable and total, printed and planned
    optimizer = make_optimizer(model, cfg)
    # accelerator.prepare for the launch's engine: under FSDP sharded by FSDP2 (core/distributed/prepare.py)
    model, optimizer, train_loader = prepare(accelerator, model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)

    # ---------------------------------------------------------------- plan and schedule
    plan = run.plan(train_set, len(train_loader), gradient_accumulation_steps=ga, **parameters)
    # Kept out of accelerator.prepare: a prepared scheduler steps once per process per optimizer step.
    scheduler = get_linear_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_optimizer_steps)

    def losses_and_metrics(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each pair's loss (differentiable when gradients are on) and its METRICS."""
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        chosen, rejected = chosen_and_rejected(scores)
        losses = pair_losses(chosen, rejected, batch.get(MARGIN), cfg.center_rewards_coefficient)
        return losses, pair_metrics(chosen, rejected)

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
            window_pairs = ranks.sum(sum(len(batch["input_ids"]) // 2 for batch in window))
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
        final_dir = save_final_model(accelerator, model, tokenizer, cfg, lora.SEQUENCE_CLASSIFICATION)
    log(f"reward model saved to {final_dir}; curves in {cfg.output_dir}/curves.png")
    accelerator.end_training()


def padding_id(tokenizer: Any) -> int:
    """The token the batches are padded with, which the model's config names too: transformers reads a
    sequence's reward at its last token that is not this one. The tokenizer's pad token, else its EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError(
            f"the tokenizer of {tokenizer.name_or_path} has neither a pad nor an EOS token, so a sequence's "
            "last token cannot be found in a padded batch; use a tokenizer that defines one"
        )
    return pad


def plan_data(cfg: RewardConfig, tokenizer: Callable[[], Any]) -> tuple[Any, dict]:
    """The train pairs and their data record, exactly as the run loads them (for `recipes plan`)."""
    check_lengths(cfg.max_prompt_length, cfg.max_length)
    train_set, _, data = load_preference_data(cfg, tokenizer(), numbers=(MARGIN,))
    return train_set, data.to_dict()


def one_output(cfg: RewardConfig, tokenizer: Callable[[], Any]) -> dict[str, int]:
    """The head's size, for the parameter count `recipes plan` shows."""
    return {"num_labels": 1}


RECIPE = Recipe(
    name="reward",
    config_class=RewardConfig,
    script=__file__,
    plan_data=plan_data,
    unit="pairs",
    length_field="max_length",
    lora_task=lora.SEQUENCE_CLASSIFICATION,
    model_kwargs=one_output,
    workload=lambda cfg: Workload(sequences_per_sample=2),  # chosen and rejected, no reference
)

if __name__ == "__main__":
    run_recipe(main)
