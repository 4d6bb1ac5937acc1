"""What users would run instead of the recipe, on the same job: a bare PyTorch loop and the Trainer.

    python -m bench.baselines bare|trainer --job '<Job as JSON>' --out result.json
    python -m bench.baselines tokenize --job '<Job as JSON>' --out result.json

Both training runners read the data through the recipe's own loading and tokenisation, so the tensors
are the recipe's, and take the samples in the order the recipe's seedable sampler draws them. The clock
runs over the training loop only, as the recipe's train_runtime does.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    get_linear_schedule_with_warmup,
)

from bench.job import Job, sample_order
from recipes.core.config import parse_config
from recipes.core.data.chat import PadCollator, causal_lm_inputs, make_collator
from recipes.core.losses.accumulation import accumulation_windows, summed_token_loss
from recipes.core.model.optimizer import make_optimizer
from recipes.core.plan.steps import plan_for_config
from recipes.sft import SFTConfig, load_data


def job_setup(job: Job, output_dir: str) -> tuple:
    """The recipe's config, tokenised train split and plan for this job on one process."""
    cfg = parse_config(SFTConfig, job.recipe_args(output_dir))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path)
    train_set, _, _ = load_data(cfg, tokenizer)
    plan = plan_for_config(cfg, num_samples=len(train_set), world_size=1)
    return cfg, tokenizer, train_set, plan


def device_and_autocast(job: Job) -> tuple[torch.device, torch.autocast | None]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if job.mixed_precision == "no":
        return device, None
    dtype = torch.bfloat16 if job.mixed_precision == "bf16" else torch.float16
    return device, torch.autocast(device.type, dtype=dtype)


def bare(job: Job, output_dir: str) -> dict:
    """Forward, backward, clipping and the optimizer step with the recipe's loss, nothing else."""
    cfg, tokenizer, train_set, plan = job_setup(job, output_dir)
    device, autocast = device_and_autocast(job)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path, dtype=torch.float32).to(device)
    model.train()
    optimizer = make_optimizer(model, cfg)
    scheduler = get_linear_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_optimizer_steps)
    loader = DataLoader(
        train_set,
        batch_size=cfg.per_device_train_batch_size,
        sampler=sample_order(len(train_set), cfg.seed),
        collate_fn=make_collator(cfg.packing, tokenizer.pad_token_id),
    )
    step_tokens, step_losses = [], []
    started = time.perf_counter()
    for window in accumulation_windows(loader, cfg.gradient_accumulation_steps):
        tokens = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in window)
        loss_sum = 0.0
        for batch in window:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast or torch.enable_grad():
                logits = model(**causal_lm_inputs(batch)).logits
                summed, _ = summed_token_loss(logits, batch["labels"])
            (summed / tokens).backward()
            loss_sum += summed.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        step_tokens.append(tokens)
        step_losses.append(loss_sum / tokens)
    runtime = time.perf_counter() - started
    return {
        "runner": "bare",
        "steps": len(step_tokens),
        "step_tokens": step_tokens,
        "step_losses": step_losses,
        "target_tokens": sum(step_tokens),
        "runtime": runtime,
    }


class _LoopClock(TrainerCallback):
    """Times the Trainer's training loop: from on_train_begin (after its setup) to on_train_end."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.runtime = time.perf_counter() - self.started


def trainer(job: Job, output_dir: str) -> dict:
    """transformers.Trainer with the job's batch, accumulation, epochs, schedule and clipping; its samples
    come in the recipe's order (sequential sampling over the dataset put in that order)."""
    if job.packing:
        raise ValueError("the Trainer runner trains padded batches; run it with packing off")
    cfg, tokenizer, train_set, plan = job_setup(job, output_dir)
    ordered = train_set.select(sample_order(len(train_set), cfg.seed))
    target_tokens = sum(ordered["num_targets"])
    model = AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path, dtype=torch.float32)
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=1,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=plan.warmup_steps,
        max_grad_norm=cfg.max_grad_norm,
        train_sampling_strategy="sequential",
        bf16=job.mixed_precision == "bf16",
        fp16=job.mixed_precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        seed=cfg.seed,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    clock = _LoopClock()
    run = Trainer(
        model=model,
        args=args,
        train_dataset=ordered.remove_columns("num_targets"),
        data_collator=PadCollator(tokenizer.pad_token_id),
        callbacks=[clock],
    )
    run.train()
    losses = [r["loss"] for r in run.state.log_history if "loss" in r]
    return {
        "runner": "trainer",
        "steps": run.state.global_step,
        "step_losses": losses,
        "target_tokens": target_tokens,
        "runtime": clock.runtime,
    }


def tokenize(job: Job, output_dir: str) -> dict:
    """Seconds to load and tokenise the job's train split the way the recipe does, with whatever the
    datasets cache (HF_DATASETS_CACHE) already holds."""
    cfg = parse_config(SFTConfig, job.recipe_args(output_dir))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path)
    started = time.perf_counter()
    train_set, _, _ = load_data(cfg, tokenizer)
    return {"runner": "tokenize", "samples": len(train_set), "seconds": time.perf_counter() - started}


RUNNERS = {"bare": bare, "trainer": trainer, "tokenize": tokenize}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("runner", choices=RUNNERS)
    parser.add_argument("--job", required=True, help="the Job as JSON")
    parser.add_argument("--out", required=True, help="where to write the result JSON")
    args = parser.parse_args()
    job = Job(**json.loads(args.job))
    result = RUNNERS[args.runner](job, str(Path(args.out).parent / "output"))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
