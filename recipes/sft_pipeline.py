"""Supervised fine-tuning with the model split into pipeline stages (DeepSpeed PipelineEngine), combined
with data parallelism over the remaining processes: dp = world size / pipeline_stages.

    accelerate launch --config_file accelerate_configs/pipeline_2proc.yaml recipes/sft_pipeline.py \
        --config recipes/configs/sft_pipeline_smollm2.yaml [--field value ...]
    deepspeed --num_gpus 4 recipes/sft_pipeline.py --config recipes/configs/sft_pipeline_smollm2.yaml

Accelerate cannot drive a PipelineEngine, so the launcher only starts the processes and this recipe calls
deepspeed.initialize itself. Data, config fields, plan.json, metrics.jsonl, the LR schedule and the
checkpoints (saved through the engine) are those of recipes/sft.py, and so is the loss: the token mean
over the whole optimizer step on all ranks.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

from recipes.core.accumulation import accumulation_windows, backward_scale
from recipes.core.chat import IGNORE_INDEX, PadCollator
from recipes.core.checkpoint import Checkpointer
from recipes.core.checkpoint_io import DeepSpeedEngineIO
from recipes.core.config import ConfigError, field, parse_config
from recipes.core.data import make_train_loader
from recipes.core.errors import run_recipe
from recipes.core.optim import make_optimizer
from recipes.core.pipeline import (
    PipelineClipper,
    TokenLoss,
    build_pipeline,
    check_architecture,
    export_pretrained,
    init_deepspeed_comm,
    initialize_engine,
    resolve_ds_config,
)
from recipes.core.pipeline_plan import module_boundaries, pipeline_view
from recipes.core.records import RunRecords
from recipes.core.runtime import init_distributed, resolve_gradient_accumulation
from recipes.core.steps import data_parallel_size, plan_for_config
from recipes.sft import SFTConfig, load_data, plan_inputs  # noqa: F401 - plan_inputs serves `recipes plan`


@dataclass
class SFTPipelineConfig(SFTConfig):
    pipeline_stages: int = field(
        2, "Pipeline stages the decoder layers are split into; must divide the world size."
    )
    deepspeed_config: str = field(
        "ds_configs/pipeline.json", 'DeepSpeed JSON (ZeRO stage 0 or 1); "auto" values come from this config.'
    )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(SFTPipelineConfig, recipe_args(sys.argv[1:] if argv is None else argv))
    if cfg.mixed_precision != "no":
        raise ConfigError(f"mixed_precision {cfg.mixed_precision!r}: the pipeline recipe trains in fp32 only")
    if cfg.use_peft:
        raise ConfigError(
            "use_peft: the pipeline recipe does not support LoRA yet; train LoRA adapters with recipes/sft.py "
            "(1 process, DDP or ZeRO-1/2/3), or set use_peft: false"
        )
    if cfg.packing:  # pipeline stages exchange fixed-layout tensors, not position ids
        raise ConfigError("packing: the pipeline recipe trains padded batches only; set packing: false")
    if cfg.on_nonfinite != "stop":  # the engine applies the update inside train_batch
        raise ConfigError(f"on_nonfinite {cfg.on_nonfinite!r}: the pipeline recipe can only stop; set stop")

    # ---------------------------------------------------------------- compute
    state = init_distributed()
    init_deepspeed_comm()
    try:
        dp = data_parallel_size(state.num_processes, cfg.pipeline_stages)
    except ValueError as err:
        raise ConfigError(
            f"{err} (pipeline_stages {cfg.pipeline_stages}, {state.num_processes} processes)"
        ) from None
    ga = resolve_gradient_accumulation(
        cfg.gradient_accumulation_steps, cfg.global_batch_size, cfg.per_device_train_batch_size, dp
    )
    ds_file, micro = cfg.deepspeed_config, cfg.per_device_train_batch_size
    ds_config = resolve_ds_config(_read_json(ds_file), micro, ga, dp, cfg.max_grad_norm, ds_file)
    set_seed(cfg.seed)
    log = state.print
    engine_io = DeepSpeedEngineIO(state)  # checkpoints go through the engine once it exists
    checkpoints = Checkpointer(engine_io, cfg, log)  # checks output_dir, picks the checkpoint to resume
    records = RunRecords(cfg.output_dir, state.is_main_process, resume_step=checkpoints.resume_step)

    # ---------------------------------------------------------------- data
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    with state.main_process_first():  # rank 0 tokenises and caches; the others read the cache
        train_set, eval_set, train_stats = load_data(cfg, tokenizer)
    log(
        f"train samples: {len(train_set)} ({train_stats.truncated} truncated to {cfg.max_seq_length} tokens, "
        f"{train_stats.dropped_without_targets} dropped with no assistant token left)"
    )

    # ---------------------------------------------------------------- model, pipeline and optimizer
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model_name_or_path, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code
    )
    loss_fn = TokenLoss()
    module, source = build_pipeline(model, cfg.pipeline_stages, loss_fn)
    optimizer = make_optimizer(module, cfg)
    engine = engine_io.engine = initialize_engine(module, optimizer, ds_config)
    source.release()
    model_config, num_layers = model.config, model.config.num_hidden_layers
    del model
    if engine.module.parts != module_boundaries(num_layers, cfg.pipeline_stages):
        raise RuntimeError(f"DeepSpeed split the layers as {engine.module.parts}, not as the plan says")
    grid = engine.grid
    dp_rank, dp_group = grid.get_data_parallel_rank(), grid.get_data_parallel_group()
    clipper = None
    if cfg.max_grad_norm > 0 and engine.zero_optimization_stage() == 0:
        clipper = PipelineClipper(
            optimizer, module.parameters(), cfg.max_grad_norm, grid.get_pipe_parallel_group()
        )

    # Sharded over the data-parallel ranks exactly as Accelerate shards recipes/sft.py's loader (same seeded
    # sampler, same round-robin batches), so both recipes see the same samples in the same steps.
    collate = PadCollator(tokenizer.pad_token_id)
    train_loader = prepare_data_loader(
        make_train_loader(train_set, cfg, collate),
        num_processes=dp,
        process_index=dp_rank,
        even_batches=True,
        use_seedable_sampler=True,
        data_seed=cfg.seed,
    )
    eval_loader = None
    if eval_set is not None:
        eval_loader = prepare_data_loader(
            DataLoader(eval_set, batch_size=cfg.per_device_eval_batch_size, collate_fn=collate),
            num_processes=dp,
            process_index=dp_rank,
            even_batches=False,
        )

    # ---------------------------------------------------------------- plan and schedule
    plan = plan_for_config(
        cfg,
        num_samples=len(train_set),
        world_size=state.num_processes,
        pipeline_stages=cfg.pipeline_stages,
        gradient_accumulation_steps=ga,
        tokens_per_sample=sum(train_set["num_targets"]) / len(train_set),
    )
    plan.check_loader_length(len(train_loader))
    view = pipeline_view(num_layers, cfg.pipeline_stages, dp, ga)
    scheduler = get_linear_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_optimizer_steps)
    checkpoints.track(lr_scheduler=scheduler)
    checkpoints.total_steps = plan.total_optimizer_steps
    start = checkpoints.resume()  # layers, optimizer, scheduler, RNG and data position of the checkpoint
    records.write_config(cfg)
    records.write_plan({**plan.to_dict(), "pipeline": view})
    log(plan.summary())
    log("pipeline: " + "; ".join(view["layer_partition"]) + f"; bubble {view['bubble_fraction']:.1%}")
    if view["bubble_advice"]:
        log(f"note: {view['bubble_advice']}")

    # ---------------------------------------------------------------- train
    def evaluate(step: int) -> None:
        if eval_loader is None:
            return
        eval_loss = evaluate_loss(engine, loss_fn, eval_loader, dp_group)
        records.log({"step": step, "eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))})
        log(f"step {step}: eval_loss {eval_loss:.4f}")

    if start.step == 0:
        evaluate(step=0)
    step = start.step
    progress = tqdm(total=plan.total_optimizer_steps, initial=step, disable=not records.enabled, desc="train")
    for epoch in range(start.epoch, plan.num_epochs):
        train_loader.set_epoch(epoch)
        skip = start.batches_in_epoch if epoch == start.epoch else 0  # already trained on before a resume
        batches = skip_first_batches(train_loader, skip) if skip else train_loader
        for window_index, window in enumerate(accumulation_windows(batches, ga), start=skip // ga):
            started = time.perf_counter()
            window_tokens = _sum_over(dp_group, sum(_targets(b) for b in window), engine.device)
            lr = scheduler.get_last_lr()[0]
            # A short last window of an epoch is an optimizer step of its own, as in recipes/sft.py.
            engine.set_train_batch_size(cfg.per_device_train_batch_size * len(window) * dp)
            loss_fn.scale = backward_scale(window_tokens, dp, len(window))
            loss = engine.train_batch(iter(_pipe_batches(window))).item()
            grad_norm = clipper.last_norm if clipper else engine.get_global_grad_norm()
            scheduler.step()
            step += 1
            checkpoints.require_finite(step, loss, grad_norm)  # stops before a diverged step is saved
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            records.log_step(
                plan,
                epoch=epoch,
                window_index=window_index,
                logging_steps=cfg.logging_steps,
                step=step,
                lr=lr,
                loss=loss,
                grad_norm=grad_norm,
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
    records.log({"step": step, "lr_after_training": scheduler.get_last_lr()[0]})
    evaluate(step)

    # ---------------------------------------------------------------- save
    final_dir = f"{cfg.output_dir}/final"
    export_pretrained(engine.module, dp_rank, model_config, tokenizer, final_dir)
    torch.distributed.barrier()
    log(f"fine-tuned model saved to {final_dir}")
    torch.distributed.destroy_process_group()


def plan_pipeline(cfg: SFTPipelineConfig, plan) -> dict:
    """The stage layout and bubble `recipes plan` shows next to the step plan."""
    config = AutoConfig.from_pretrained(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    check_architecture(config)
    return pipeline_view(
        config.num_hidden_layers,
        plan.pipeline_stages,
        plan.data_parallel_size,
        plan.gradient_accumulation_steps,
    )


def recipe_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N (LOCAL_RANK is in the environment as well)."""
    return [arg for arg in argv if not arg.startswith("--local_rank")]


def _read_json(path: str) -> dict:
    if not Path(path).is_file():
        raise ConfigError(
            f"deepspeed_config {path} does not exist; point deepspeed_config at a DeepSpeed JSON file"
        )
    return json.loads(Path(path).read_text())


def _targets(batch: dict) -> int:
    return int(batch["labels"][:, 1:].ne(IGNORE_INDEX).sum())


def _sum_over(group, value: int, device) -> int:
    total = torch.tensor(value, dtype=torch.long, device=device)
    torch.distributed.all_reduce(total, group=group)
    return int(total)


def _pipe_batches(batches: list[dict]) -> list[tuple]:
    """The engine feeds inputs to the first stage and labels to the last."""
    return [((b["input_ids"], b["attention_mask"]), b["labels"]) for b in batches]


@torch.no_grad()
def evaluate_loss(engine, loss_fn: TokenLoss, loader, dp_group) -> float:
    """Token-averaged loss over the whole eval split. Ranks with fewer batches get batches without targets, so
    every pipeline runs the same number of micro-batches and nothing is counted twice."""
    batches = list(loader)
    count = torch.tensor(len(batches), device=engine.device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    filler = (
        {**batches[0], "labels": torch.full_like(batches[0]["labels"], IGNORE_INDEX)} if batches else None
    )
    if filler is None:
        raise ConfigError(
            "the eval split has fewer batches than data-parallel ranks; lower per_device_eval_batch_size"
        )
    batches += [filler] * (int(count) - len(batches))
    tokens = _sum_over(dp_group, sum(_targets(b) for b in batches), engine.device)
    loss_fn.scale = 1.0
    # eval_batch averages the micro-batch sums over micro-batches and data-parallel ranks.
    mean = engine.eval_batch(iter(_pipe_batches(batches)), num_micro_batches=int(count))
    return float(mean) * int(count) * engine.dp_world_size / tokens


if __name__ == "__main__":
    run_recipe(main)
