"""Every shipped YAML parses against the code it belongs to; bad keys and values fail with the key named."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from helpers import REPO

from recipes.cli import RECIPES, _recipe_from_filename
from recipes.core.config import ConfigError, TrainingConfig, parse_config
from recipes.sft import SFTConfig

RECIPE_YAMLS = sorted((REPO / "recipes" / "configs").glob("*.yaml"))
ACCELERATE_YAMLS = sorted((REPO / "accelerate_configs").glob("*.yaml"))


def recipe_config_class(path: Path) -> type:
    module_name, class_name = RECIPES[_recipe_from_filename(str(path))]
    return getattr(importlib.import_module(module_name), class_name)


def test_shipped_config_folders_are_not_empty():
    assert RECIPE_YAMLS and ACCELERATE_YAMLS


@pytest.mark.parametrize("path", RECIPE_YAMLS, ids=lambda p: p.name)
def test_every_recipe_yaml_parses_into_its_recipe_config(path):
    cls = recipe_config_class(path)
    cfg = parse_config(cls, ["--config", str(path)])
    assert isinstance(cfg, cls)
    assert cfg.model_name_or_path and cfg.dataset_name and cfg.output_dir
    header = path.read_text().splitlines()[:6]
    assert any("accelerate launch" in line or "recipes " in line for line in header), (
        "header shows the command"
    )


@pytest.mark.parametrize("path", ACCELERATE_YAMLS, ids=lambda p: p.name)
def test_every_accelerate_yaml_loads_with_accelerates_own_loader(path):
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.num_machines >= 1
    assert config.num_processes % config.num_machines == 0


def test_unknown_key_in_yaml_is_an_error_naming_it_and_the_closest_field(tmp_path):
    bad = tmp_path / "sft_typo.yaml"
    bad.write_text("model_name_or_path: m\nlearning_rat: 0.1\n")
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'learning_rat' in .*sft_typo.yaml; did you mean 'learning_rate'\?",
    ):
        parse_config(SFTConfig, ["--config", str(bad)])


def test_unknown_override_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"unknown config key 'no_such_field' in the command line"):
        parse_config(SFTConfig, ["--no_such_field", "3"])


def test_overrides_win_over_yaml_and_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text('learning_rate: 1.0e-4\nmixed_precision: "bf16"\nmax_steps: 10\n')
    cfg = parse_config(
        SFTConfig,
        [
            "--config",
            str(path),
            "--learning_rate",
            "3e-5",
            "--max_steps=7",
            "--mixed_precision",
            "no",
            "--dataloader_drop_last",
            "true",
            "--eval_split",
            "null",
            "--num_train_epochs",
            "2",
        ],
    )
    assert cfg.learning_rate == 3e-5 and cfg.max_steps == 7 and cfg.mixed_precision == "no"
    assert cfg.dataloader_drop_last is True and cfg.eval_split is None and cfg.num_train_epochs == 2.0


@pytest.mark.parametrize(
    "yaml_text,message",
    [
        ("max_steps: ten\n", "max_steps in .* must be an integer, got 'ten'"),
        ("mixed_precision: no\n", "must be a string, got False \\(quote it"),
        ("dataloader_drop_last: 3\n", "dataloader_drop_last in .* must be true or false"),
        ("- a list\n", "must hold a mapping"),
        (
            "seed: 1\nmax_steps: 2: 3\n",
            "is not valid YAML at line 2, column 13: mapping values are not allowed",
        ),
    ],
)
def test_bad_values_name_the_key_and_the_expected_type(tmp_path, yaml_text, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        parse_config(SFTConfig, ["--config", str(path)])


def test_resolved_config_round_trips_through_config_yaml(tmp_path):
    from recipes.core.config import save_config

    cfg = parse_config(SFTConfig, ["--config", str(REPO / "recipes/configs/sft_smollm2.yaml"), "--seed", "7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert parse_config(SFTConfig, ["--config", str(tmp_path / "config.yaml")]) == cfg


def test_training_config_uses_training_arguments_field_names():
    from transformers import TrainingArguments

    ours = {f.name for f in dataclasses.fields(TrainingConfig)}
    theirs = {f.name for f in dataclasses.fields(TrainingArguments)}
    shared = {
        "output_dir",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "max_steps",
        "learning_rate",
        "weight_decay",
        "warmup_steps",
        "max_grad_norm",
        "seed",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "dataloader_drop_last",
        "adam_beta1",
        "adam_beta2",
        "optim",
    }
    assert shared <= ours & theirs


def test_help_lists_every_field_with_its_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(SFTConfig, ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(SFTConfig):
        assert f"--{f.name} " in out
    assert "Tokens per sample after the chat template" in out
