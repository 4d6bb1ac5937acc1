"""Supervised fine-tuning of a causal LM on chat data, on any topology `accelerate launch` sets up.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/sft.py \
        --config recipes/configs/sft_smollm2.yaml [--field value ...]

Loss is on assistant tokens only, averaged over all target tokens of an optimizer step on all ranks, so
gradient accumulation and data parallelism give exactly the gradient of one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

from recipes.core import lora
from recipes.core.accumulation import backward_scale, eval_loss_results, target_tokens
from recipes.core.chat import PadCollator, make_collator, model_inputs, tokenize_dataset
from recipes.core.checkpoint_io import AccelerateIO
from recipes.core.config import TrainingConfig, field, parse_config
from recipes.core.data import first_n, load_split, make_train_loader, require_columns
from recipes.core.errors import run_recipe
from recipes.core.final_model import save_final_model
from recipes.core.inputs import load_tokenizer
from recipes.core.lm_loss import CausalLMLoss
from recipes.core.model_setup import load_pretrained
from recipes.core.optim import make_optimizer
from recipes.core.run import Run
from recipes.core.runtime import setup_accelerator


@dataclass
class SFTConfig(TrainingConfig):
    messages_column: str = field("messages", "Column holding a list of {role, content} chat turns.")
    max_seq_length: int = field(
        512, "Tokens per sample after the chat template; longer samples are truncated."
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
    )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(SFTConfig, argv)

    # ---------------------------------------------------------------- compute
    accelerator, ga = setup_accelerator(cfg)  # the doctor's checks first: a bad combination fails in seconds
    run = Run.of_accelerator("sft", cfg, accelerator)  # seeds; checks output_dir, picks the checkpoint
    log, ranks = run.log, run.ranks

    # ---------------------------------------------------------------- data
    tokenizer = load_tokenizer(cfg)  # checks first that model_name_or_path names a model
    with accelerator.main_process_first():  # rank 0 tokenises and caches; the others read the cache
        train_set, eval_set, train_stats = load_data(cfg, tokenizer)
    log(train_stats.summary(cfg.max_seq_length))
    collate = make_collator(cfg.packing, tokenizer.pad_token_id, cfg.pad_to_multiple_of)
    train_loader = make_train_loader(train_set, cfg, collate)
    eval_loader = None
    if eval_set is not None:
        collate = PadCollator(tokenizer.pad_token_id, cfg.pad_to_multiple_of)
        eval_loader = DataLoader(eval_set, batch_size=cfg.per_device_eval_batch_size, collate_fn=collate)

    # ---------------------------------------------------------------- model and optimizer
    model = load_pretrained(AutoModelForCausalLM, cfg)  # attention kernel, activation checkpointing
    model = lora.apply_lora(model, cfg, lora.CAUSAL_LM)  # unchanged without use_peft
    # The loss from the last hidden states, through the LM head a chunk of tokens at a time.
    loss_of = CausalLMLoss(model, cfg.loss_chunk_tokens, accelerator.autocast)
    parameters = lora.parameter_fields(model, log)  # trainable and total, printed and planned
    optimizer = make_optimizer(model, cfg)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)

    # ---------------------------------------------------------------- plan and schedule
    plan = run.plan(train_set, len(train_loader), "num_targets", gradient_accumulation_steps=ga, **parameters)
    # Kept out of accelerator.prepare: a prepared scheduler steps once per process per optimizer step.
    scheduler = get_linear_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_optimizer_steps)

    def evaluate(step: int) -> None:
        if eval_loader is not None:
            eval_loss = evaluate_loss(accelerator, model, loss_of, eval_loader)
            run.records.log_eval(step, eval_loss_results(eval_loss), log)

    # ---------------------------------------------------------------- train
    loop = run.training_loop(
        plan=plan,
        io=AccelerateIO(accelerator),  # resumes model, optimizer, RNG and data position
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
                    outputs = model(**model_inputs(batch), **loss_of.model_kwargs)
                    summed = loss_of(outputs, batch["labels"])
                    accelerator.backward(window.add_loss(summed) * scale)
                    if accelerator.sync_gradients:  # the window's last micro-batch: gradients are complete
                        loop.clip_gradients(window, accelerator, model)  # max_grad_norm; skip if non-finite
                    optimizer.step()
                    optimizer.zero_grad()
            scheduler.step()
            loop.step_done(window, count=window_tokens)

        # ------------------------------------------------------------ save
        final_dir = save_final_model(accelerator, model, tokenizer, cfg, lora.CAUSAL_LM)
    log(f"fine-tuned model saved to {final_dir}; curves in {cfg.output_dir}/curves.png")
    accelerator.end_training()


def load_data(cfg: SFTConfig, tokenizer) -> tuple:
    """Tokenised train and eval splits (eval is None when eval_split is null) and the train stats."""
    train_raw = first_n(
        load_split(cfg.dataset_name, cfg.train_split, cfg.dataset_config_name), cfg.max_train_samples
    )
    require_columns(train_raw, [cfg.messages_column], f"split {cfg.train_split!r} of {cfg.dataset_name}")
    train_set, stats = tokenize_dataset(train_raw, tokenizer, cfg.max_seq_length, cfg.messages_column)
    eval_set = None
    if cfg.eval_split:
        eval_raw = first_n(
            load_split(cfg.dataset_name, cfg.eval_split, cfg.dataset_config_name), cfg.max_eval_samples
        )
        require_columns(eval_raw, [cfg.messages_column], f"split {cfg.eval_split!r} of {cfg.dataset_name}")
        eval_set, _ = tokenize_dataset(eval_raw, tokenizer, cfg.max_seq_length, cfg.messages_column)
    return train_set, eval_set, stats


def plan_inputs(cfg: SFTConfig) -> tuple[int, float]:
    """Training samples and mean target tokens per sample, exactly as the run will count them."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    train_set, _, _ = load_data(cfg, tokenizer)
    return len(train_set), sum(train_set["num_targets"]) / len(train_set)


def plan_parameters(cfg: SFTConfig) -> dict[str, int]:
    """Trainable and total parameters the run will report, from the model config alone."""
    return lora.planned_parameter_fields(cfg, lora.CAUSAL_LM)


@torch.no_grad()
def evaluate_loss(accelerator, model, loss_of: CausalLMLoss, loader) -> float:
    """Token-averaged loss over the whole eval split; duplicates from uneven sharding are dropped."""
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for batch in loader:
        outputs = model(**model_inputs(batch), **loss_of.model_kwargs)
        losses, counts = loss_of.per_sample(outputs, batch["labels"])
        losses, counts = accelerator.gather_for_metrics((losses, counts))
        total_loss += losses.sum().item()
        total_tokens += counts.sum().item()
    model.train()
    return total_loss / total_tokens


if __name__ == "__main__":
    run_recipe(main)
