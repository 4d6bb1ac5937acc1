"""Supervised fine-tuning of a causal LM on chat data, on any topology `accelerate launch` sets up.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/sft.py \
        --config recipes/configs/sft_smollm2.yaml [--field value ...]

Loss is on assistant tokens only, averaged over all target tokens of an optimizer step on all ranks, so
gradient accumulation and data parallelism give exactly the gradient of one big batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

from recipes.core import lora
from recipes.core.accumulation import (
    accumulation_windows,
    backward_scale,
    per_sample_token_loss,
    summed_token_loss,
)
from recipes.core.chat import PadCollator, make_collator, model_inputs, tokenize_dataset
from recipes.core.checkpoint import Checkpointer
from recipes.core.config import TrainingConfig, field, parse_config
from recipes.core.data import DataError, first_n, load_split, make_train_loader, require_columns
from recipes.core.deepspeed_support import save_resolved_config as save_resolved_deepspeed_config
from recipes.core.errors import run_recipe
from recipes.core.inputs import require_model
from recipes.core.nonfinite import NonFiniteSteps
from recipes.core.optim import make_optimizer
from recipes.core.plots import write_curves
from recipes.core.records import RunRecords
from recipes.core.runtime import setup_accelerator
from recipes.core.steps import plan_for_config
from recipes.core.tracking import start_tracking
from recipes.core.usage import LoopUsage


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


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(SFTConfig, argv)

    # ---------------------------------------------------------------- compute
    # The doctor's checks run first, so a bad config combination fails in seconds.
    accelerator, ga = setup_accelerator(cfg)
    set_seed(cfg.seed)
    log = accelerator.print
    checkpoints = Checkpointer(accelerator, cfg, log)  # checks output_dir, picks the checkpoint to resume
    nonfinite = NonFiniteSteps(accelerator, cfg, checkpoints, log)  # on_nonfinite: stop or skip
    records = RunRecords(
        cfg.output_dir, accelerator.is_main_process, accelerator, resume_step=checkpoints.resume_step
    )

    # ---------------------------------------------------------------- data
    require_model(cfg.model_name_or_path, cfg.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    with accelerator.main_process_first():  # rank 0 tokenises and caches; the others read the cache
        train_set, eval_set, train_stats = load_data(cfg, tokenizer)
    log(
        f"train samples: {len(train_set)} ({train_stats.truncated} truncated to {cfg.max_seq_length} tokens, "
        f"{train_stats.dropped_without_targets} dropped with no assistant token left)"
    )
    train_loader = make_train_loader(train_set, cfg, make_collator(cfg.packing, tokenizer.pad_token_id))
    eval_loader = (
        DataLoader(
            eval_set,
            batch_size=cfg.per_device_eval_batch_size,
            collate_fn=PadCollator(tokenizer.pad_token_id),
        )
        if eval_set
        else None
    )

    # ---------------------------------------------------------------- model and optimizer
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model_name_or_path, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code
    )
    model = lora.apply_lora(model, cfg, lora.CAUSAL_LM)  # unchanged without use_peft
    parameters = lora.parameter_fields(model, log)  # trainable and total, printed and planned
    optimizer = make_optimizer(model, cfg)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)

    # ---------------------------------------------------------------- plan and schedule
    try:
        plan = plan_for_config(
            cfg,
            num_samples=len(train_set),
            world_size=accelerator.num_processes,
            gradient_accumulation_steps=ga,
            tokens_per_sample=sum(train_set["num_targets"]) / len(train_set),
            **parameters,
        )
    except ValueError as err:  # e.g. too few samples for one optimizer step on this world size
        raise DataError(f"{cfg.dataset_name}: {err}") from None
    plan.check_loader_length(len(train_loader))
    # Kept out of accelerator.prepare: a prepared scheduler steps once per process per optimizer step.
    scheduler = get_linear_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_optimizer_steps)
    checkpoints.track(lr_scheduler=scheduler)
    checkpoints.total_steps = plan.total_optimizer_steps
    start = checkpoints.resume()  # model, optimizer, scheduler, RNG and data position of the checkpoint
    records.write_config(cfg)
    records.write_plan(plan.to_dict())
    save_resolved_deepspeed_config(accelerator, cfg.output_dir)
    start_tracking(accelerator, "sft", cfg)
    log(plan.summary())

    # ---------------------------------------------------------------- train
    def evaluate(step: int) -> None:
        if eval_loader is None:
            return
        eval_loss = evaluate_loss(accelerator, model, eval_loader)
        records.log({"step": step, "eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))})
        log(f"step {step}: eval_loss {eval_loss:.4f}")

    if start.step == 0:
        evaluate(step=0)
    step, model_dp = start.step, accelerator.num_processes
    progress = tqdm(
        total=plan.total_optimizer_steps, initial=step, disable=not accelerator.is_main_process, desc="train"
    )
    # from_pretrained returns the model in eval mode (dropout off); nothing else may be relied on to switch it.
    model.train()
    usage, trained_tokens = LoopUsage(accelerator), 0
    for epoch in range(start.epoch, plan.num_epochs):
        train_loader.set_epoch(epoch)
        skip = start.batches_in_epoch if epoch == start.epoch else 0  # already trained on before a resume
        batches = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        for window_index, window in enumerate(accumulation_windows(batches, ga), start=skip // ga):
            started = time.perf_counter()
            window_tokens = accelerator.reduce(
                torch.stack([b["labels"][:, 1:].ne(-100).sum() for b in window]).sum(), reduction="sum"
            ).item()
            lr = scheduler.get_last_lr()[0]
            # Align Accelerate's counter so that the window's last micro-batch, and only it, syncs.
            accelerator.step = ga - len(window)
            loss_sum = torch.zeros((), device=accelerator.device)
            grad_norm, skipped = None, False
            for batch in window:
                with accelerator.accumulate(model):
                    logits = model(**model_inputs(batch)).logits
                    summed, _ = summed_token_loss(logits, batch["labels"])
                    accelerator.backward(summed * backward_scale(window_tokens, model_dp, ga))
                    loss_sum += summed.detach()
                    if accelerator.sync_gradients:  # clips; whether to skip is decided the same on every rank
                        grad_norm, skipped = nonfinite.check(model, loss_sum)
                    if not skipped:  # only with on_nonfinite: skip and a non-finite loss or gradient norm
                        optimizer.step()
                    optimizer.zero_grad()
            scheduler.step()
            step += 1
            trained_tokens += window_tokens
            loss = accelerator.reduce(loss_sum, reduction="sum").item() / window_tokens
            skip_fields = nonfinite.step_done(step, loss, grad_norm, skipped)  # or stops the run
            progress.update(1)
            tokens_per_s = window_tokens / (time.perf_counter() - started)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tokens_per_s=f"{tokens_per_s:.0f}")
            records.log_step(
                plan,
                epoch=epoch,
                window_index=window_index,
                logging_steps=cfg.logging_steps,
                step=step,
                lr=lr,
                loss=loss,
                grad_norm=grad_norm,
                **skip_fields,
                tokens=window_tokens,
                step_time=time.perf_counter() - started,
            )
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step != plan.total_optimizer_steps:
                evaluate(step)
            batches_done = min((window_index + 1) * ga, len(train_loader))
            if checkpoints.step_done(step, epoch, batches_done, len(train_loader)):  # SIGTERM/SIGINT came
                checkpoints.exit_interrupted(step)
            if step == plan.total_optimizer_steps:
                break
    progress.close()
    records.log(
        {"step": step, "lr_after_training": scheduler.get_last_lr()[0], **usage.summary(trained_tokens)}
    )
    evaluate(step)

    # ---------------------------------------------------------------- save
    final_dir = f"{cfg.output_dir}/final"
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    accelerator.unwrap_model(model).save_pretrained(
        final_dir,
        state_dict=state_dict,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        safe_serialization=True,
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(final_dir)
        write_curves(cfg.output_dir)
    lora.merge_in_fresh_process(accelerator, model, cfg, final_dir, lora.CAUSAL_LM)  # merge_adapter: merged/
    accelerator.wait_for_everyone()
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
def evaluate_loss(accelerator, model, loader) -> float:
    """Token-averaged loss over the whole eval split; duplicates from uneven sharding are dropped."""
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for batch in loader:
        logits = model(**model_inputs(batch)).logits
        losses, counts = per_sample_token_loss(logits, batch["labels"])
        losses, counts = accelerator.gather_for_metrics((losses, counts))
        total_loss += losses.sum().item()
        total_tokens += counts.sum().item()
    model.train()
    return total_loss / total_tokens


if __name__ == "__main__":
    run_recipe(main)
