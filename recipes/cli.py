"""`recipes` command: plan a run before launching it, and prepare the default models.

recipes plan --config recipes/configs/sft_smollm2.yaml --num-processes 16 [--num-samples N] [--json]
recipes plan ... [--accelerate-config A] [--deepspeed-config D] [--gpu H100-SXM] [--calibrate K]
recipes doctor --accelerate-config A [--deepspeed-config D] [--config R] [--hostfile H]
recipes prepare [--model NAME]
recipes generate --model DIR (--prompt TEXT | --prompts FILE.jsonl) [--output FILE.jsonl] [--temperature T]
recipes launch [accelerate launch arguments]   # accelerate launch, exiting with the recipe's status
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from recipes.core.config import ConfigError, parse_config
from recipes.core.errors import DataError
from recipes.core.plan.steps import plan_for_config

if TYPE_CHECKING:  # a recipe module and its description import torch: only when a command needs one
    from recipes.core.train.recipe import Recipe

# recipe name -> the module that describes it (its RECIPE), imported only when asked for
RECIPES = {
    "sft": "recipes.sft",
    "classify": "recipes.classify",
    "sft_pipeline": "recipes.sft_pipeline",
    "dpo": "recipes.dpo",
    "grpo": "recipes.grpo",
    "reward": "recipes.reward",
}


def recipe_of_config(path: str, name: str | None = None) -> Recipe:
    """The description of recipe `name`, by default of the one the config file's name starts with."""
    return importlib.import_module(RECIPES[name or _recipe_from_filename(path)]).RECIPE


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:  # every other argument is accelerate launch's
        from recipes.core.exit_status import launch

        return launch(argv[1:])
    parser = argparse.ArgumentParser(
        prog="recipes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="print the step, batch and schedule plan of a recipe config")
    plan.add_argument("--config", required=True, help="recipe YAML")
    plan.add_argument(
        "--recipe", choices=sorted(RECIPES), help="recipe the config is for (default: from the file name)"
    )
    plan.add_argument(
        "--num-processes", type=int, help="world size (default: from --accelerate-config, else 1)"
    )
    plan.add_argument(
        "--num-samples", type=int, help="plan for this many training samples instead of reading the data"
    )
    plan.add_argument(
        "--tokens-per-sample", type=float, help="mean target tokens per sample, with --num-samples"
    )
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.add_argument("--accelerate-config", help="accelerate YAML: world size, machines, DeepSpeed config")
    plan.add_argument(
        "--deepspeed-config", help="DeepSpeed JSON (default: the one the accelerate config names)"
    )
    plan.add_argument(
        "--gpu", help="accelerator for wall clock and memory fit, e.g. H100-SXM, A100-80GB, CPU"
    )
    plan.add_argument("--utilization", type=float, help="fraction of dense peak FLOP/s reached (default 0.4)")
    plan.add_argument(
        "--seq-len",
        type=float,
        help="mean tokens per sequence processed (default: max_seq_length); GRPO: per prompt",
    )
    plan.add_argument(
        "--completion-len",
        type=float,
        help="GRPO: mean tokens per completion (default: max_completion_length, an upper bound)",
    )
    plan.add_argument("--calibrate", type=int, metavar="K", help="time K real steps here and extrapolate")
    plan.add_argument("--plot", metavar="FILE", help="also draw the LR schedule of the plan into FILE (PNG)")

    doctor = commands.add_parser("doctor", help="check that accelerate, DeepSpeed and recipe configs agree")
    doctor.add_argument("--accelerate-config", required=True, help="accelerate YAML")
    doctor.add_argument(
        "--deepspeed-config", help="DeepSpeed JSON (default: the one the accelerate config names)"
    )
    doctor.add_argument("--config", help="recipe YAML")
    doctor.add_argument(
        "--recipe", choices=sorted(RECIPES), help="recipe the config is for (default: from the file name)"
    )
    doctor.add_argument("--hostfile", help="DeepSpeed hostfile (hostname slots=N per line)")
    doctor.add_argument("--gpu", help="accelerator the run targets, to check its precision support")
    doctor.add_argument(
        "--num-samples", type=int, help="training samples, for the checks that need the epoch length"
    )

    commands.add_parser(
        "launch",
        add_help=False,
        help="accelerate launch with the same arguments, exiting with the recipe's status: 0, 2 on bad input, "
        "75 when a signal stopped it after a checkpoint",
    )
    generate = commands.add_parser("generate", help="sample completions from a trained or pretrained model")
    generate.add_argument(
        "--model",
        required=True,
        help="a model directory (a run's final/ or merged/; an adapter loads on its base)",
    )
    generate.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    generate.add_argument("--prompts", help='JSONL, one {"prompt": text or chat turns} per line')
    generate.add_argument("--output", help="write JSONL here (default: print the completions)")
    generate.add_argument("--num-generations", type=int, default=1, help="completions per prompt")
    generate.add_argument("--max-new-tokens", type=int, default=256)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0, help="0: off")
    generate.add_argument("--seed", type=int, default=42)
    generate.add_argument(
        "--raw", action="store_true", help="text prompts as they are, without the chat template"
    )
    prepare = commands.add_parser("prepare", help="fetch and convert the default models into .cache/models")
    prepare.add_argument("--model", action="append", help="model name (repeatable); default: all")
    prepare.add_argument("--force", action="store_true", help="rebuild even if already prepared")

    args, overrides = parser.parse_known_args(argv)
    try:
        if args.command == "plan":
            return _plan(args, overrides)
        if args.command == "doctor" and not overrides:
            return _doctor(args)
        if overrides:
            parser.error(f"unrecognized arguments: {' '.join(overrides)}")
        if args.command == "generate":
            from recipes.core.launch.generate import generate

            return generate(args)
        return _prepare(args)
    except (ConfigError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _plan(args: argparse.Namespace, overrides: list[str]) -> int:
    recipe = recipe_of_config(args.config, args.recipe)
    cfg = parse_config(recipe.config_class, ["--config", args.config, *overrides])
    from recipes.core.train.recipe import planning_tokenizer

    tokenizer = planning_tokenizer(cfg)
    data = None
    if recipe.step_plan is not None:
        return _own_plan(args, cfg, recipe, tokenizer, overrides)
    if args.num_samples is not None:
        num_samples, tokens_per_sample = args.num_samples, args.tokens_per_sample
    else:  # the samples, tokens and data record exactly as the run will count them
        train_set, data = recipe.plan_data(cfg, tokenizer)
        num_samples, tokens_per_sample = len(train_set), recipe.tokens_per_sample(train_set)
    from recipes.core.doctor.topology import read_topology

    topology = read_topology(args.accelerate_config, args.deepspeed_config)
    parameters = recipe.planned_parameters(cfg, tokenizer)
    plan = plan_for_config(
        cfg,
        num_samples=num_samples,
        world_size=args.num_processes or topology.world_size,
        pipeline_stages=getattr(cfg, "pipeline_stages", topology.pipeline_stages),
        tokens_per_sample=tokens_per_sample,
        **parameters,
    )
    estimate = _estimate(args, cfg, recipe, plan.to_dict(), topology, overrides)
    # A pipeline recipe adds its stage layout and bubble.
    pipeline = recipe.pipeline_view(cfg, plan) if recipe.pipeline_view else None
    if args.json:
        extras = {"data": data, "pipeline": pipeline, "estimate": estimate}
        print(json.dumps({**plan.to_dict(), **{key: value for key, value in extras.items() if value}}))
    else:
        print(plan_table(plan.to_dict()))
        if pipeline:
            print("\n" + plan_table(pipeline))
        if estimate:
            from recipes.core.plan.estimate import estimate_table

            print("\n" + estimate_table(estimate))
    if args.plot:
        from recipes.core.output.plots import write_schedule_plot

        print(f"LR schedule drawn in {write_schedule_plot(plan.to_dict(), args.plot)}", file=sys.stderr)
    return 0


def _own_plan(args: argparse.Namespace, cfg, recipe: Recipe, tokenizer, overrides: list[str]) -> int:
    """The plan of a recipe that plans its own steps (GRPO), with its estimate of how a step splits
    between sampling and training."""
    from recipes.core.data.prompts import IDS
    from recipes.core.doctor.topology import read_topology

    topology = read_topology(args.accelerate_config, args.deepspeed_config)
    data = prompt_len = None
    if args.num_samples is not None:
        num_samples = args.num_samples
    else:
        train_set, data = recipe.plan_data(cfg, tokenizer)
        num_samples = len(train_set)
        prompt_len = sum(map(len, train_set[IDS])) / num_samples  # as kept: max_prompt_length's last tokens
    plan = recipe.step_plan(cfg, num_samples, args.num_processes or topology.world_size)
    estimate = None
    settings = _estimate_settings(args, cfg, topology)
    if settings is not None:
        from recipes.core.plan.estimate import estimate_grpo_run

        prompt_source = "the data's mean"
        if prompt_len is None or args.seq_len:
            prompt_len = args.seq_len or cfg.max_prompt_length
            prompt_source = "--seq-len" if args.seq_len else "max_prompt_length, an upper bound (--seq-len)"
        estimate = estimate_grpo_run(
            {**plan.to_dict(), **recipe.planned_parameters(cfg, tokenizer)},  # LoRA: trainable adapters only
            prompt_len=prompt_len,
            completion_len=args.completion_len or cfg.max_completion_length,
            old_logps=plan.needs_old_logps,
            reference=recipe.workload(cfg).reference,
            **settings,
        )
        estimate["prompt_len_source"] = prompt_source
        estimate["completion_len_source"] = (
            "--completion-len"
            if args.completion_len
            else "max_completion_length, an upper bound (--completion-len)"
        )
        if args.calibrate:
            from recipes.core.launch.calibrate import calibrate_grpo

            estimate.update(
                calibrate_grpo(
                    recipe.script,
                    args.config,
                    overrides,
                    args.calibrate,
                    plan.to_dict(),
                    accelerate_config=args.accelerate_config,
                )
            )
    if args.json:
        extras = {"data": data, "estimate": estimate}
        print(json.dumps({**plan.to_dict(), **{key: value for key, value in extras.items() if value}}))
    else:
        print(plan.summary() + "\n\n" + plan_table(plan.to_dict()))
        if estimate:
            from recipes.core.plan.estimate import grpo_estimate_table

            print("\n" + grpo_estimate_table(estimate))
    return 0


def _estimate_settings(args: argparse.Namespace, cfg, topology) -> dict | None:
    """The model's shape and what the topology and levers give every estimate (estimate_run's keywords);
    None, with a note, when the model config cannot be read and nothing asked for the estimate."""
    from recipes.core.model.optimizer import EIGHT_BIT
    from recipes.core.model.shape import model_shape
    from recipes.core.plan.activations import Levers
    from recipes.core.plan.hardware import get_device
    from recipes.core.plan.model_states import FSDP2Layout, Quantization
    from recipes.core.plan.wall_clock import DEFAULT_UTILIZATION

    asked = args.gpu or args.accelerate_config or args.deepspeed_config or args.calibrate
    try:
        shape = model_shape(cfg.model_name_or_path, cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        if asked:
            raise ConfigError(f"cannot read the model config of {cfg.model_name_or_path!r}: {err}") from None
        print(
            f"note: no compute/memory estimate, cannot read the model config of {cfg.model_name_or_path!r}",
            file=sys.stderr,
        )
        return None
    fsdp = topology.fsdp_shard_size
    return {
        "shape": shape,
        "precision": topology.deepspeed_precision
        or {"no": "fp32"}.get(cfg.mixed_precision, cfg.mixed_precision),
        "zero_stage": topology.zero_stage,
        "offload_optimizer": topology.offload_optimizer,
        "offload_param": topology.offload_param,
        "device": get_device(args.gpu) if args.gpu else None,
        "utilization": args.utilization or DEFAULT_UTILIZATION,
        "levers": Levers(cfg.gradient_checkpointing, getattr(cfg, "loss_chunk_tokens", 0)),
        "autocast": topology.deepspeed_config is None and topology.zero_stage == 0 and fsdp is None,
        "fsdp": None
        if fsdp is None
        else FSDP2Layout(fsdp, topology.fsdp_offload, topology.fsdp_reshard_after_forward),
        "quantization": Quantization.of_config(vars(cfg)),
        "eight_bit_states": cfg.optim in EIGHT_BIT,
    }


def _estimate(args, cfg, recipe: Recipe, plan: dict, topology, overrides: list[str]) -> dict | None:
    """Compute, time and memory estimate; skipped with a note when the model config cannot be read."""
    from recipes.core.launch.calibrate import calibrate
    from recipes.core.model.lora import SEQUENCE_CLASSIFICATION
    from recipes.core.plan.estimate import estimate_run

    settings = _estimate_settings(args, cfg, topology)
    if settings is None:
        return None
    if recipe.lora_task == SEQUENCE_CLASSIFICATION:  # a decoder under a classification head: no logits
        settings["shape"] = dataclasses.replace(settings["shape"], has_lm_head=False)
    seq_len = args.seq_len or getattr(cfg, recipe.length_field)
    if not seq_len:
        raise ConfigError("pass --seq-len (mean tokens per sequence) for the compute estimate")
    # Preference tuning trains two sequences per pair and runs a reference model.
    estimate = estimate_run(plan, seq_len=seq_len, workload=recipe.workload(cfg), **settings)
    estimate["seq_len_source"] = (
        "--seq-len" if args.seq_len else f"{recipe.length_field}, an upper bound (--seq-len for the mean)"
    )
    if args.calibrate:
        estimate.update(
            calibrate(
                recipe.script,
                args.config,
                overrides,
                args.calibrate,
                plan,
                accelerate_config=args.accelerate_config,
            )
        )
    return estimate


def _doctor(args: argparse.Namespace) -> int:
    import dataclasses

    from recipes.core.doctor.diagnose import diagnose
    from recipes.core.doctor.findings import report

    fields = defaults = None
    if args.config:
        config_class = recipe_of_config(args.config, args.recipe).config_class
        fields = {f.name for f in dataclasses.fields(config_class)}
        defaults = dataclasses.asdict(config_class())
    findings = diagnose(
        args.accelerate_config,
        args.deepspeed_config,
        args.config,
        fields,
        defaults,
        args.hostfile,
        args.gpu,
        args.num_samples,
    )
    print(report(findings) if findings else "doctor: no problems found")
    return 1 if findings else 0


def plan_table(plan: dict) -> str:
    width = max(map(len, plan))
    rows = [f"{key:<{width}}  {_fmt(value)}" for key, value in plan.items()]
    return "\n".join(rows)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.6g}" if value < 1 else f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _recipe_from_filename(path: str) -> str:
    stem = Path(path).stem
    for name in sorted(RECIPES, key=len, reverse=True):
        if stem == name or stem.startswith(name + "_"):
            return name
    raise ConfigError(
        f"cannot tell which recipe {path} is for from its name; pass --recipe {{{','.join(RECIPES)}}}"
    )


def _prepare(args: argparse.Namespace) -> int:
    from recipes.core.model.defaults import DEFAULT_MODELS, prepare_model

    for name in args.model or sorted(DEFAULT_MODELS):
        print(f"{name}: {prepare_model(name, force=args.force)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
