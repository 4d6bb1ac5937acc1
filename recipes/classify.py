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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    get_linear_schedule_with_warmup,
)

from recipes.core.config import TrainingConfig, field, parse_config
from recipes.core.data.classification import (
    check_metric_config,
    classifier_inputs,
    load_classification_data,
)
from recipes.core.data.loading import make_train_loader
from recipes.core.distributed.fsdp import full_state_dict, load_full_state_dict
from recipes.core.distributed.prepare import prepare
from recipes.core.errors import run_recipe
from recipes.core.evaluation.classification import BestModel, predict_and_score, write_test_results
from recipes.core.evaluation.metrics import load_metrics
from recipes.core.launch.startup import setup_accelerator
from recipes.core.losses.accumulation import backward_scale
from recipes.core.model import lora
from recipes.core.model.optimizer import make_optimizer
from recipes.core.model.pretrained import load_pretrained
from recipes.core.model.source import load_tokenizer
from recipes.core.output.checkpoint_io import accelerate_io
from recipes.core.output.final_model import save_final_model
from recipes.core.train.recipe import Recipe
from recipes.core.train.run import Run


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
            "help": "Class names in id order. Empty: the ClassLabel names, else for integer labels the ids 0 "
            "to the largest, else the train split's sorted labels."
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
    accelerator, ga = setup_accelerator(cfg)  # the doctor's checks first: a bad combination fails in seconds
    run = Run.of_accelerator(RECIPE, cfg, accelerator)  # seeds; checks output_dir, picks the checkpoint
    log, ranks = run.log, run.ranks

    # ---------------------------------------------------------------- data
    tokenizer = load_tokenizer(cfg)  # checks first that model_name_or_path names a model
    # Rank 0 tokenises and caches, the others read the cache; bad data stops every rank, as one.
    data = run.main_process_first(lambda: load_classification_data(cfg, tokenizer))
    metrics = run.main_process_first(lambda: load_metrics(cfg.metrics))
    label_names, splits = data.label_names, data.splits
    train_set = splits["train"]
    log(data.summary())
    run.check_data(train_set, data.to_dict())  # one optimizer step, before any DataLoader
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=cfg.pad_to_multiple_of)
    train_loader = make_train_loader(train_set, cfg, collate)
    eval_loaders = {
        name: DataLoader(split, batch_size=cfg.per_device_eval_batch_size, collate_fn=collate)
        for name, split in splits.items()
        if name != "train"
    }

    # ---------------------------------------------------------------- model and optimizer
    model = load_pretrained(  # a new head for these classes; attention kernel, activation checkpointing
        AutoModelForSequenceClassification,
        cfg,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
        ignore_mismatched_sizes=True,
        new_modules=lora.HEAD_MODULES,  # left unquantised under load_in_4bit / load_in_8bit
        on_loaded=run.model_loaded,  # the memory census counts what loading left
    )
    model = lora.apply_lora(model, cfg, lora.SEQUENCE_CLASSIFICATION)  # the head trains in full
    parameters = lora.parameter_fields(model, log)  # trainable and total, printed and planned
    optimizer = make_optimizer(model, cfg)
    # accelerator.prepare for the launch's engine: under FSDP sharded by FSDP2 (core/distributed/prepare.py)
    model, optimizer, train_loader = prepare(accelerator, model, optimizer, train_loader)
    eval_loaders = {name: accelerator.prepare(loader) for name, loader in eval_loaders.items()}

    # ---------------------------------------------------------------- plan and schedule
    plan = run.plan(train_set, len(train_loader), gradient_accumulation_steps=ga, **parameters)
    # Kept out of accelerator.prepare: a prepared scheduler steps once per process per optimizer step.
    scheduler = get_linear_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_optimizer_steps)
    best = BestModel(cfg.metric_for_best_model, cfg.greater_is_better)

    def evaluate(step: int) -> None:
        if cfg.eval_split is None:
            return
        results, _ = predict_and_score(
            accelerator, model, eval_loaders[cfg.eval_split], metrics, cfg.metric_kwargs
        )
        results = {f"eval_{k}": v for k, v in results.items()}
        run.records.log_eval(step, results, log)
        if step > 0:  # the untrained model is never the one kept
            best.update(step, results, lambda: full_state_dict(accelerator, model))

    # ---------------------------------------------------------------- train
    loop = run.training_loop(
        plan=plan,
        io=accelerate_io(accelerator, model, optimizer),  # resumes model, optimizer, RNG, data position
        scheduler=scheduler,
        evaluate=evaluate,
        tracked={"best_model": best},
    )
    with loop:
        for window in loop.windows(train_loader, model):
            # The sample mean of the whole step on all ranks: accumulation and data parallelism are one batch.
            window_samples = ranks.sum(sum(len(batch["labels"]) for batch in window))
            scale = backward_scale(window_samples, accelerator.num_processes, ga)
            for batch in window.micro_batches(accelerator, model):
                with accelerator.accumulate(model):
                    logits = model(**classifier_inputs(batch)).logits
                    summed = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
                    accelerator.backward(window.add_loss(summed) * scale)
                    if accelerator.sync_gradients:  # the window's last micro-batch: gradients are complete
                        loop.clip_gradients(window, accelerator, model)  # max_grad_norm; skip if non-finite
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=False)  # in place: DDP bucket views, see make_accelerator
            scheduler.step()
            loop.step_done(window, count=window_samples)

        # ------------------------------------------------------------ keep the best, test, save
        if best.state is not None and best.step != loop.step:
            load_full_state_dict(accelerator, model, best.state)
            log(f"kept the model of step {best.step} ({best.key} {best.value:.4f})")
        kept_step = best.step or loop.step
        if cfg.test_split:
            score_test_split(
                accelerator, model, eval_loaders[cfg.test_split], metrics, cfg, kept_step, label_names, log
            )
        final_dir = save_final_model(accelerator, model, tokenizer, cfg, lora.SEQUENCE_CLASSIFICATION)
    log(f"model of step {kept_step} saved to {final_dir}; curves in {cfg.output_dir}/curves.png")
    accelerator.end_training()


def score_test_split(
    accelerator, model, loader, metrics, cfg: ClassifyConfig, kept_step: int, label_names: list[str], log
) -> None:
    """Score the kept model on the test split: eval_results.json and test_predictions.jsonl."""
    results, predictions = predict_and_score(accelerator, model, loader, metrics, cfg.metric_kwargs)
    results = {
        "step": kept_step,
        "split": cfg.test_split,
        "num_samples": len(predictions["idx"]),
        **{f"test_{k}": v for k, v in results.items()},
    }
    if accelerator.is_main_process:
        write_test_results(cfg.output_dir, results, predictions, label_names)
    log("test: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items() if k.startswith("test_")))


def plan_data(cfg: ClassifyConfig, tokenizer: Callable[[], Any]) -> tuple[Any, dict]:
    """The train set and the data record, exactly as the run loads them (for `recipes plan`)."""
    data = load_classification_data(cfg, tokenizer())
    return data.splits["train"], data.to_dict()


def head_size(cfg: ClassifyConfig, tokenizer: Callable[[], Any]) -> dict[str, int]:
    """The new head's classes, for the parameter count `recipes plan` shows."""
    data = load_classification_data(dataclasses.replace(cfg, test_split=None), tokenizer())
    return {"num_labels": len(data.label_names)}


RECIPE = Recipe(
    name="classify",
    config_class=ClassifyConfig,
    script=__file__,
    plan_data=plan_data,
    unit="samples",
    tokens_column="num_tokens",
    lora_task=lora.SEQUENCE_CLASSIFICATION,
    model_kwargs=head_size,
)

if __name__ == "__main__":
    run_recipe(main)
