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

import dataclasses
import sys
from dataclasses import dataclass

import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader
from transformers import AutoConfig, get_linear_schedule_with_warmup

from recipes.core.config import ConfigError, field, parse_config, read_mapping
from recipes.core.data.chat import IGNORE_INDEX, PadCollator
from recipes.core.data.loading import make_train_loader
from recipes.core.distributed.accelerator import init_distributed
from recipes.core.distributed.deepspeed_contract import DeepSpeedRun
from recipes.core.distributed.pipeline import (
    ModelSource,
    PipelineClipper,
    build_pipeline,
    check_architecture,
    check_supported,
    export_pretrained,
    init_deepspeed_comm,
    initialize_engine,
    pipe_batches,
    resolve_ds_config,
)
from recipes.core.distributed.ranks import Ranks
from recipes.core.doctor.diagnose import preflight
from recipes.core.errors import run_recipe
from recipes.core.losses.accumulation import backward_scale, eval_loss_results, target_tokens
from recipes.core.model.optimizer import make_optimizer
from recipes.core.model.pretrained import check_attention
from recipes.core.model.source import load_tokenizer
from recipes.core.output.checkpoint_io import DeepSpeedEngineIO
from recipes.core.plan.pipeline_layout import module_boundaries, pipeline_view
from recipes.core.plan.steps import data_parallel_size, resolve_gradient_accumulation
from recipes.core.train.recipe import Recipe
from recipes.core.train.run import Run
from recipes.sft import SFTConfig, load_data, plan_data


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
    check_supported(cfg)  # what the pipeline engine cannot do yet (precision, LoRA, packing)

    # ---------------------------------------------------------------- compute
    state = init_distributed()
    preflight(cfg, state.num_processes)  # the doctor's checks of the recipe and its DeepSpeed config
    init_deepspeed_comm()
    dp = data_parallel_size(state.num_processes, cfg.pipeline_stages)  # the doctor checked it divides
    ga = resolve_gradient_accumulation(
        cfg.gradient_accumulation_steps, cfg.global_batch_size, cfg.per_device_train_batch_size, dp
    )
    ds_file = cfg.deepspeed_config
    ds_config = read_mapping(ds_file)
    ds_run = DeepSpeedRun.of(dataclasses.asdict(cfg), state.num_processes, ds_config)
    ds_config = resolve_ds_config(ds_config, ds_run, ds_file)  # filled with the recipe's values
    log, end = state.print, torch.distributed.destroy_process_group
    ranks = Ranks(
        num_processes=state.num_processes, process_index=state.process_index, device=state.device, end=end
    )
    run = Run.begin(RECIPE, cfg, ranks, log=log)  # seeds; checks output_dir, picks the checkpoint

    # ---------------------------------------------------------------- data
    tokenizer = load_tokenizer(cfg)  # checks first that model_name_or_path names a model
    # Rank 0 tokenises and caches, the others read the cache; bad data stops every rank, as one.
    train_set, eval_set, data = run.main_process_first(lambda: load_data(cfg, tokenizer))
    log(data.summary(cfg.max_seq_length))
    # Enough for one optimizer step, before any DataLoader; plan.json records what the data are made of.
    run.check_data(train_set, data.to_dict(), pipeline_stages=cfg.pipeline_stages)

    # ---------------------------------------------------------------- model, pipeline and optimizer
    check_attention(cfg.attn_implementation, torch.cuda.is_available())
    # The model on the meta device; each process reads only its own stages' weights, in fp32.
    source = ModelSource(cfg.model_name_or_path, cfg.attn_implementation, cfg.trust_remote_code)
    module = build_pipeline(source, cfg.pipeline_stages, cfg.loss_chunk_tokens, cfg.gradient_checkpointing)
    optimizer = make_optimizer(module, cfg)
    engine = initialize_engine(module, optimizer, ds_config)
    elements_read = ranks.gather(source.reader.elements_read)  # per process: its stages only
    model_config, num_layers = source.config, source.config.num_hidden_layers
    source.release()
    if engine.module.parts != module_boundaries(num_layers, cfg.pipeline_stages):
        raise RuntimeError(f"DeepSpeed split the layers as {engine.module.parts}, not as the plan says")
    grid = engine.grid
    dp_rank, dp_group = grid.get_data_parallel_rank(), grid.get_data_parallel_group()
    dp_ranks = ranks.over_data_parallel_group(dp_group)  # sums of tokens and losses: one per pipeline
    clipper = None
    if cfg.max_grad_norm > 0 and engine.zero_optimization_stage() == 0:
        clipper = PipelineClipper(
            optimizer, module.parameters(), cfg.max_grad_norm, grid.get_pipe_parallel_group()
        )
    train_loader, eval_loader = shard_loaders(train_set, eval_set, cfg, tokenizer.pad_token_id, dp, dp_rank)

    # ---------------------------------------------------------------- plan and schedule
    plan = run.plan(
        train_set, len(train_loader), pipeline_stages=cfg.pipeline_stages, gradient_accumulation_steps=ga
    )
    view = pipeline_view(num_layers, cfg.pipeline_stages, dp, ga)
    scheduler = get_linear_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_optimizer_steps)

    def evaluate(step: int) -> None:
        if eval_loader is not None:
            run.records.log_eval(step, eval_loss_results(evaluate_loss(engine, eval_loader, dp_ranks)), log)

    # ---------------------------------------------------------------- train
    loop = run.training_loop(
        plan=plan,
        io=DeepSpeedEngineIO(engine, state.process_index),  # resumes layers, optimizer and RNG
        ranks=dp_ranks,
        scheduler=scheduler,
        evaluate=evaluate,
        plan_record={**plan.to_dict(), "pipeline": {**view, "weight_elements_read": elements_read}},
    )
    log("pipeline: " + "; ".join(view["layer_partition"]) + f"; bubble {view['bubble_fraction']:.1%}")
    if view["bubble_advice"]:
        log(f"note: {view['bubble_advice']}")
    with loop:
        for window in loop.windows(train_loader):
            window_tokens = dp_ranks.sum(sum(target_tokens(batch["labels"]) for batch in window))
            # A short last window of an epoch is an optimizer step of its own, as in recipes/sft.py.
            engine.set_train_batch_size(cfg.per_device_train_batch_size * len(window) * dp)
            scale = backward_scale(window_tokens, dp, len(window))
            loss = engine.train_batch(
                iter(pipe_batches(window, scale))
            ).item()  # forward, backward, clip, step
            window.grad_norm = clipper.last_norm if clipper else engine.get_global_grad_norm()
            scheduler.step()
            loop.step_done(window, count=window_tokens, loss=loss)

        # ------------------------------------------------------------ save
        final_dir = f"{cfg.output_dir}/final"
        export_pretrained(engine.module, dp_rank, model_config, tokenizer, final_dir)
        torch.distributed.barrier()
    log(f"fine-tuned model saved to {final_dir}; curves in {cfg.output_dir}/curves.png")
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


def shard_loaders(train_set, eval_set, cfg: SFTPipelineConfig, pad_token_id, dp: int, dp_rank: int) -> tuple:
    """Train and eval loaders of this data-parallel rank, sharded exactly as Accelerate shards
    recipes/sft.py's (same seeded sampler, same round-robin batches), so that both recipes see the same
    samples in the same steps. The eval loader is None without an eval split."""
    collate = PadCollator(pad_token_id)
    train_loader = prepare_data_loader(
        make_train_loader(train_set, cfg, collate),
        num_processes=dp,
        process_index=dp_rank,
        even_batches=True,
        use_seedable_sampler=True,
        data_seed=cfg.seed,
    )
    if eval_set is None:
        return train_loader, None
    eval_loader = prepare_data_loader(
        DataLoader(eval_set, batch_size=cfg.per_device_eval_batch_size, collate_fn=collate),
        num_processes=dp,
        process_index=dp_rank,
        even_batches=False,
    )
    return train_loader, eval_loader


@torch.no_grad()
def evaluate_loss(engine, loader, dp_ranks: Ranks) -> float:
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
    tokens = dp_ranks.sum(sum(target_tokens(b["labels"]) for b in batches))
    # eval_batch averages the micro-batch sums over micro-batches and data-parallel ranks.
    mean = engine.eval_batch(iter(pipe_batches(batches, scale=1.0)), num_micro_batches=int(count))
    return float(mean) * int(count) * engine.dp_world_size / tokens


RECIPE = Recipe(
    name="sft_pipeline",
    config_class=SFTPipelineConfig,
    script=__file__,
    plan_data=plan_data,  # recipes/sft.py's data
    unit="tokens",  # target tokens
    pipeline_view=plan_pipeline,
)

if __name__ == "__main__":
    run_recipe(main)
