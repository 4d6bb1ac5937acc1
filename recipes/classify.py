"""Fine-tune a pretrained encoder for text classification, on any topology `accelerate launch` sets up.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/classify.py \
        --config recipes/configs/classify_minilm.yaml [--field value ...]

The loss is the mean cross-entropy over all samples of an optimizer step on all ranks, so gradient
accumulation and data parallelism give exactly the gradient of one big batch. Metrics come from the
`evaluate` library over predictions gathered from every rank (duplicates of uneven sharding dropped).
The best evaluation by `metric_for_best_model` is kept: its weights are the ones tested and saved.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    get_linear_schedule_with_warmup,
)

from recipes.core import lora
from recipes.core.accumulation import accumulation_windows, backward_scale
from recipes.core.checkpoint import Checkpointer
from recipes.core.classification import (
    BestModel,
    check_metric_config,
    load_splits,
    model_inputs,
    predict_and_score,
    write_test_results,
)
from recipes.core.config import ConfigError, TrainingConfig, field, parse_config
from recipes.core.data import make_train_loader
from recipes.core.errors import run_recipe
from recipes.core.inputs import require_model
from recipes.core.metrics import load_metrics
from recipes.core.nonfinite import NonFiniteSteps
from recipes.core.optim import make_optimizer
from recipes.core.plots import write_curves
from recipes.core.records import RunRecords
from recipes.core.runtime import setup_accelerator
from recipes.core.steps import plan_for_config
from recipes.core.tracking import start_tracking


@dataclass
class ClassifyConfig(TrainingConfig):
    text_column: str = field("text", "Column holding the text to classify.")
    text_pair_column: str | None = field(
        None, "Optional second text column (sentence-pair tasks such as NLI)."
    )
    label_column: str = field("label", "Column holding the label: a class name or a class id.")
    label_names: list[str] = dataclasses.field(
        default_factory=list,
        metadata={
            "help": "Class names in id order. Empty: the ClassLabel names, else the train split's sorted labels."
        },
    )
    max_seq_length: int = field(128, "Tokens per sample; longer texts are truncated.")
    test_split: str | None = field(
        "test", "Split scored with the kept model at the end (eval_results.json); null skips."
    )
    metrics: list[str] = dataclasses.field(
        default_factory=lambda: ["accuracy", "f1"],
        metadata={
            "help": "evaluate metrics; shipped ones (recipes/metrics) load offline, others from the Hub."
        },
    )
    metric_kwargs: dict[str, dict[str, Any]] = dataclasses.field(
        default_factory=lambda: {"f1": {"average": "macro"}},
        metadata={"help": "Extra arguments per metric, e.g. {f1: {average: macro}}."},
    )
    metric_for_best_model: str | None = field(
        "f1", "Eval value (a metric's key, or loss) whose best evaluation is kept; null keeps the last model."
    )
    greater_is_better: bool | None = field(
        None, "Direction of metric_for_best_model; default: true unless it is a loss."
    )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(ClassifyConfig, argv)
    check_metric_config(cfg)

    # ---------------------------------------------------------------- compute
    # The doctor's checks run first, so a bad config combination fails in seconds.
    accelerator, ga = setup_accelerator(cfg)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3 and cfg.metric_for_best_model:
        raise ConfigError(
            "keeping the best model needs whole weights on every rank, which ZeRO-3 partitions; set "
            "metric_for_best_model: null (the last model is then tested and saved) or use ZeRO stage 1 or 2"
        )
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
        label_names, splits = load_splits(cfg, tokenizer)
        metrics = load_metrics(cfg.metrics)
    train_set = splits["train"]
    log(f"train samples: {len(train_set)}, classes: {label_names}")
    collate = DataCollatorWithPadding(tokenizer)
    train_loader = make_train_loader(train_set, cfg, collate)
    eval_loaders = {
        name: DataLoader(data, batch_size=cfg.per_device_eval_batch_size, collate_fn=collate)
        for name, data in splits.items()
        if name != "train"
    }

    # ---------------------------------------------------------------- model and optimizer
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg.model_name_or_path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
        ignore_mismatched_sizes=True,
        dtype=torch.float32,
        trust_remote_code=cfg.trust_remote_code,
    )
    model = lora.apply_lora(model, cfg, lora.SEQUENCE_CLASSIFICATION)  # the head trains in full
    parameters = lora.parameter_fields(model, log)  # trainable and total, printed and planned
    optimizer = make_optimizer(model, cfg)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    eval_loaders = {name: accelerator.prepare(loader) for name, loader in eval_loaders.items()}

    # ---------------------------------------------------------------- plan and schedule
    plan = plan_for_config(
        cfg,
        num_samples=len(train_set),
        world_size=accelerator.num_processes,
        gradient_accumulation_steps=ga,
        tokens_per_sample=sum(train_set["num_tokens"]) / len(train_set),
        **parameters,
    )
    plan.check_loader_length(len(train_loader))
    # Kept out of accelerator.prepare: a prepared scheduler steps once per process per optimizer step.
    scheduler = get_linear_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_optimizer_steps)
    checkpoints.track(lr_scheduler=scheduler)
    records.write_config(cfg)
    records.write_plan(plan.to_dict())
    start_tracking(accelerator, "classify", cfg)
    log(plan.summary())

    # ---------------------------------------------------------------- train
    best = BestModel(cfg.metric_for_best_model, cfg.greater_is_better)
    checkpoints.track(best_model=best)
    checkpoints.total_steps = plan.total_optimizer_steps
    start = checkpoints.resume()  # model, optimizer, scheduler, best model, RNG and data position

    def evaluate(step: int) -> None:
        if cfg.eval_split is None:
            return
        loader = eval_loaders[cfg.eval_split]
        results, _ = predict_and_score(accelerator, model, loader, metrics, cfg.metric_kwargs)
        results = {f"eval_{k}": v for k, v in results.items()}
        records.log({"step": step, **results})
        log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        if step > 0:  # the untrained model is never the one kept
            best.update(step, results, lambda: accelerator.get_state_dict(model))

    if start.step == 0:
        evaluate(step=0)
    step, model_dp = start.step, accelerator.num_processes
    progress = tqdm(
        total=plan.total_optimizer_steps, initial=step, disable=not accelerator.is_main_process, desc="train"
    )
    # from_pretrained returns the model in eval mode (dropout off); nothing else may be relied on to switch it.
    model.train()
    for epoch in range(start.epoch, plan.num_epochs):
        train_loader.set_epoch(epoch)
        skip = start.batches_in_epoch if epoch == start.epoch else 0  # already trained on before a resume
        batches = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        for window_index, window in enumerate(accumulation_windows(batches, ga), start=skip // ga):
            started = time.perf_counter()
            window_samples = accelerator.reduce(
                torch.tensor(sum(len(b["labels"]) for b in window), device=accelerator.device),
                reduction="sum",
            ).item()
            lr = scheduler.get_last_lr()[0]
            # Align Accelerate's counter so that the window's last micro-batch, and only it, syncs.
            accelerator.step = ga - len(window)
            loss_sum = torch.zeros((), device=accelerator.device)
            grad_norm, skipped = None, False
            for batch in window:
                with accelerator.accumulate(model):
                    logits = model(**model_inputs(batch)).logits
                    summed = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
                    accelerator.backward(summed * backward_scale(window_samples, model_dp, ga))
                    loss_sum += summed.detach()
                    if accelerator.sync_gradients:  # clips; whether to skip is decided the same on every rank
                        grad_norm, skipped = nonfinite.check(model, loss_sum)
                    if not skipped:  # only with on_nonfinite: skip and a non-finite loss or gradient norm
                        optimizer.step()
                    optimizer.zero_grad()
            scheduler.step()
            step += 1
            loss = accelerator.reduce(loss_sum, reduction="sum").item() / window_samples
            skip_fields = nonfinite.step_done(step, loss, grad_norm, skipped)  # or stops the run
            step_time = time.perf_counter() - started
            progress.update(1)
            progress.set_postfix(
                loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_per_s=f"{window_samples / step_time:.1f}"
            )
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
                samples=window_samples,
                step_time=step_time,
            )
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step != plan.total_optimizer_steps:
                evaluate(step)
            batches_done = min((window_index + 1) * ga, len(train_loader))
            if checkpoints.step_done(step, epoch, batches_done, len(train_loader)):  # SIGTERM/SIGINT came
                checkpoints.exit_interrupted(step)
            if step == plan.total_optimizer_steps:
                break
    progress.close()
    evaluate(step)

    # ---------------------------------------------------------------- keep the best, test, save
    if best.state is not None and best.step != step:
        accelerator.unwrap_model(model).load_state_dict(best.state)
        log(f"kept the model of step {best.step} ({best.key} {best.value:.4f})")
    kept_step = best.step or step
    if cfg.test_split:
        results, predictions = predict_and_score(
            accelerator, model, eval_loaders[cfg.test_split], metrics, cfg.metric_kwargs
        )
        results = {
            "step": kept_step,
            "split": cfg.test_split,
            "num_samples": len(predictions["idx"]),
            **{f"test_{k}": v for k, v in results.items()},
        }
        if accelerator.is_main_process:
            write_test_results(cfg.output_dir, results, predictions, label_names)
        log("test: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items() if k.startswith("test_")))

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
    lora.merge_in_fresh_process(accelerator, model, cfg, final_dir, lora.SEQUENCE_CLASSIFICATION)  # merged/
    accelerator.wait_for_everyone()
    log(f"model of step {kept_step} saved to {final_dir}; curves in {cfg.output_dir}/curves.png")
    accelerator.end_training()


def plan_inputs(cfg: ClassifyConfig) -> tuple[int, float]:
    """Training samples and mean tokens per sample, exactly as the run will count them."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    _, splits = load_splits(dataclasses.replace(cfg, eval_split=None, test_split=None), tokenizer)
    return len(splits["train"]), sum(splits["train"]["num_tokens"]) / len(splits["train"])


def plan_parameters(cfg: ClassifyConfig) -> dict[str, int]:
    """Trainable and total parameters the run will report, from the model config and the label count."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    label_names, _ = load_splits(dataclasses.replace(cfg, eval_split=None, test_split=None), tokenizer)
    return lora.planned_parameter_fields(cfg, lora.SEQUENCE_CLASSIFICATION, num_labels=len(label_names))


if __name__ == "__main__":
    run_recipe(main)
