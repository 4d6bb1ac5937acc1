"""Supervised fine-tuning of a causal LM on chat data (or continued pre-training on plain text), on any
topology `accelerate launch` sets up.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/sft.py \
        --config recipes/configs/sft_smollm2.yaml [--field value ...]

The data may be messages, ShareGPT, Alpaca, prompt/completion or plain text, one dataset or a mixture
(core/data/sft.py). Loss is on assistant (completion) tokens only, or on every token of plain text,
averaged over all target tokens of an optimizer step on all ranks, so gradient accumulation and data
parallelism give exactly the gradient of one big batch.
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
from recipes.core.data.chat import PadCollator, causal_lm_inputs, make_collator
from recipes.core.data.loading import make_train_loader
from recipes.core.data.sft import load_sft_data
from recipes.core.distributed.prepare import prepare
from recipes.core.errors import run_recipe
from recipes.core.launch.startup import setup_accelerator
from recipes.core.losses.accumulation import backward_scale, eval_loss_results, target_tokens
from recipes.core.losses.causal_lm import CausalLMLoss
from recipes.core.model import lora
from recipes.core.model.optimizer import make_optimizer
from recipes.core.model.pretrained import load_pretrained
from recipes.core.model.source import load_tokenizer
from recipes.core.output.checkpoint_io import accelerate_io
from recipes.core.output.final_model import save_final_model
from recipes.core.train.recipe import Recipe
from recipes.core.train.run import Run


@dataclass
class SFTConfig(TrainingConfig):
    dataset_format: str = field(
        "auto",
        "auto | messages | sharegpt | alpaca | prompt_completion | text. auto: detected from the columns "
        "(messages; conversations; instruction + output; prompt + completion; text); set it when they fit "
        "several.",
    )
    messages_column: str = field("messages", "Column holding a list of {role, content} chat turns.")
    dataset_text_field: str = field(
        "text", "Column holding plain text (format text: continued pre-training)."
    )
    dataset_columns: dict[str, str] = dataclasses.field(
        default_factory=dict,
        metadata={
            "help": "Dataset columns of a format's fields when their names differ, e.g. {prompt: question, "
            "completion: answer} or {conversations: dialog}."
        },
    )
    dataset_mixture: list[dict[str, Any]] = dataclasses.field(
        default_factory=list,
        metadata={
            "help": "Several datasets mixed with the seed instead of dataset_name: a list of {dataset, "
            "[config], [split], [eval_split], [format], [columns], and one of weight (share of the mixture), "
            "samples (a number of rows) or fraction (of that dataset's rows)}; see README 'Your data'."
        },
    )
    max_seq_length: int = field(
        512,
        "Tokens per sample after the chat template; longer samples are truncated. Plain text is packed "
        "into blocks of this many tokens.",
        minimum=1,
    )
    packing: bool = field(
        False,
        "Padding-free training batches: each micro-batch's samples go end to end in one row, attending only "
        "within their own sample, so no compute is spent on padding. Same samples, loss and steps as padded.",
    )
    loss_chunk_tokens: int = field(
        256,
        "The loss is computed from the last hidden states through the LM head for this many target tokens at "
        "a time, so logits of all tokens never exist at once (forward or backward); the same loss. 0: all "
        "logits at once.",
        minimum=0,
    )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(SFTConfig, argv)

    # ---------------------------------------------------------------- compute
    accelerator, ga = setup_accelerator(cfg)  # the doctor's checks first: a bad combination fails in seconds
    run = Run.of_accelerator(RECIPE, cfg, accelerator)  # seeds; checks output_dir (writes nothing yet)
    log, ranks = run.log, run.ranks

    # ---------------------------------------------------------------- data
    tokenizer = load_tokenizer(cfg)  # checks first that model_name_or_path names a model
    # Rank 0 tokenises and caches, the others read the cache; bad data stops every rank, as one.
    train_set, eval_set, data = run.main_process_first(lambda: load_data(cfg, tokenizer))
    log(data.summary(cfg.max_seq_length))
    run.check_data(train_set, data.to_dict())  # enough for one optimizer step, before any DataLoader
    collate = make_collator(cfg.packing, tokenizer.pad_token_id, cfg.pad_to_multiple_of)
    train_loader = make_train_loader(train_set, cfg, collate)
    eval_loader = None
    if eval_set is not None:
        collate = PadCollator(tokenizer.pad_token_id, cfg.pad_to_multiple_of)
        eval_loader = DataLoader(eval_set, batch_size=cfg.per_device_eval_batch_size, collate_fn=collate)

    # ---------------------------------------------------------------- model and optimizer
    # Attention kernel, activation checkpointing; the memory census counts what loading left.
    model = load_pretrained(AutoModelForCausalLM, cfg, on_loaded=run.model_loaded)
    model = lora.apply_lora(model, cfg, lora.CAUSAL_LM)  # unchanged without use_peft
    # The loss from the last hidden states, through the LM head a chunk of tokens at a time.
    loss_of = CausalLMLoss(model, cfg.loss_chunk_tokens, accelerator.autocast)
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

    def evaluate(step: int) -> None:
        if eval_loader is not None:
            eval_loss = evaluate_loss(accelerator, model, loss_of, eval_loader)
            run.records.log_eval(step, eval_loss_results(eval_loss), log)

    # ---------------------------------------------------------------- train
    loop = run.training_loop(
        plan=plan,
        io=accelerate_io(accelerator, model, optimizer),  # resumes model, optimizer, RNG, data position
        scheduler=scheduler,
        evaluate=evaluate,
    )
    with loop:
        for window in loop.windows(train_loader, model):
            # The token mean of the whole step on all ranks: accumulation and data parallelism are one batch.
            window_tokens = ranks.sum(sum(target_tokens(batch["labels"]) for batch in window))
            scale = backward_scale(window_tokens, accelerator.num_processes, ga)
            for batch in window.micro_batches(accelerator, model):
                with accelerator.accumulate(model):
                    outputs = model(**causal_lm_inputs(batch), **loss_of.model_kwargs)
                    summed = loss_of(outputs, batch["labels"])
                    accelerator.backward(window.add_loss(summed) * scale)
                    if accelerator.sync_gradients:  # the window's last micro-batch: gradients are complete
                        loop.clip_gradients(window, accelerator, model)  # max_grad_norm; skip if non-finite
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=False)  # in place: DDP bucket views, see make_accelerator
            scheduler.step()
            loop.step_done(window, count=window_tokens)

        # ------------------------------------------------------------ save
        final_dir = save_final_model(accelerator, model, tokenizer, cfg, lora.CAUSAL_LM)
    log(f"fine-tuned model saved to {final_dir}; curves in {cfg.output_dir}/curves.png")
    accelerator.end_training()


def load_data(cfg: SFTConfig, tokenizer) -> tuple:
    """Tokenised train and eval samples (eval None without evaluation) and the report of what they are
    made of (core/data/sft.py): printed, and recorded in plan.json."""
    return load_sft_data(cfg, tokenizer)


def plan_data(cfg: SFTConfig, tokenizer: Callable[[], Any]) -> tuple[Any, dict]:
    """The train set and its data record, exactly as the run loads them (for `recipes plan`)."""
    train_set, _, data = load_data(cfg, tokenizer())
    return train_set, data.to_dict()


@torch.no_grad()
def evaluate_loss(accelerator, model, loss_of: CausalLMLoss, loader) -> float:
    """Token-averaged loss over the whole eval split; duplicates from uneven sharding are dropped."""
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for batch in loader:
        outputs = model(**causal_lm_inputs(batch), **loss_of.model_kwargs)
        losses, counts = loss_of.per_sample(outputs, batch["labels"])
        losses, counts = accelerator.gather_for_metrics((losses, counts))
        total_loss += losses.sum().item()
        total_tokens += counts.sum().item()
    model.train()
    return total_loss / total_tokens


RECIPE = Recipe(
    name="sft",
    config_class=SFTConfig,
    script=__file__,
    plan_data=plan_data,
    unit="tokens",  # target tokens
    lora_task=lora.CAUSAL_LM,
)

if __name__ == "__main__":
    run_recipe(main)
