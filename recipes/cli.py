"""`recipes` command: plan a run before launching it, and prepare the default models.

    recipes plan --config recipes/configs/sft_smollm2.yaml --num-processes 16 [--num-samples N] [--json]
    recipes prepare [--model NAME]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from recipes.core.config import ConfigError, parse_config
from recipes.core.data import DataError
from recipes.core.steps import make_plan

# recipe name -> (module, config class); the module exposes plan_inputs(cfg) -> (samples, tokens/sample)
RECIPES = {"sft": ("recipes.sft", "SFTConfig")}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="recipes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="print the step, batch and schedule plan of a recipe config")
    plan.add_argument("--config", required=True, help="recipe YAML")
    plan.add_argument("--recipe", choices=sorted(RECIPES), help="recipe the config is for (default: from the file name)")
    plan.add_argument("--num-processes", type=int, default=1, help="world size (total processes over all machines)")
    plan.add_argument("--num-samples", type=int, help="plan for this many training samples instead of reading the data")
    plan.add_argument("--tokens-per-sample", type=float, help="mean target tokens per sample, with --num-samples")
    plan.add_argument("--json", action="store_true", help="print one JSON object")

    prepare = commands.add_parser("prepare", help="fetch and convert the default models into .cache/models")
    prepare.add_argument("--model", action="append", help="model name (repeatable); default: all")
    prepare.add_argument("--force", action="store_true", help="rebuild even if already prepared")

    args, overrides = parser.parse_known_args(argv)
    try:
        if args.command == "plan":
            return _plan(args, overrides)
        if overrides:
            parser.error(f"unrecognized arguments: {' '.join(overrides)}")
        return _prepare(args)
    except (ConfigError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _plan(args: argparse.Namespace, overrides: list[str]) -> int:
    recipe = args.recipe or _recipe_from_filename(args.config)
    module_name, class_name = RECIPES[recipe]
    module = importlib.import_module(module_name)
    cfg = parse_config(getattr(module, class_name), ["--config", args.config, *overrides])
    if args.num_samples is not None:
        num_samples, tokens_per_sample = args.num_samples, args.tokens_per_sample
    else:
        num_samples, tokens_per_sample = module.plan_inputs(cfg)
    plan = make_plan(
        num_samples=num_samples, world_size=args.num_processes, micro_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, global_batch_size=cfg.global_batch_size,
        num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps,
        warmup_ratio=cfg.warmup_ratio, learning_rate=cfg.learning_rate, drop_last=cfg.dataloader_drop_last,
        tokens_per_sample=tokens_per_sample,
    )
    if args.json:
        print(json.dumps(plan.to_dict()))
    else:
        print(plan_table(plan.to_dict()))
    return 0


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
    raise ConfigError(f"cannot tell which recipe {path} is for from its name; pass --recipe {{{','.join(RECIPES)}}}")


def _prepare(args: argparse.Namespace) -> int:
    from recipes.core.default_models import DEFAULT_MODELS, prepare_model

    for name in args.model or sorted(DEFAULT_MODELS):
        print(f"{name}: {prepare_model(name, force=args.force)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
