"""Every shipped YAML parses against the code it belongs to; bad keys and values fail with the key named."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from helpers import REPO

from recipes.cli import RECIPES, recipe_of_config
from recipes.core.config import ConfigError, TrainingConfig, parse_config
from recipes.sft import SFTConfig

RECIPE_YAMLS = sorted((REPO / "recipes" / "configs").glob("*.yaml"))
ACCELERATE_YAMLS = sorted((REPO / "accelerate_configs").glob("*.yaml"))


def recipe_config_class(path: Path) -> type:
    return recipe_of_config(str(path)).config_class


def test_shipped_config_folders_are_not_empty():
    assert RECIPE_YAMLS and ACCELERATE_YAMLS


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_module_describes_itself_under_its_own_name(name):
    recipe = recipe_of_config("any.yaml", name)
    assert recipe.name == name and Path(recipe.script) == REPO / "recipes" / f"{name}.py"
    assert issubclass(recipe.config_class, TrainingConfig)


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


# ---------------------------------------------------------------------- values on the command line
def test_list_and_mapping_fields_on_the_command_line_are_yaml_flow_values_or_comma_lists():
    from recipes.classify import ClassifyConfig

    cfg = parse_config(
        ClassifyConfig,
        [
            "--config",
            str(REPO / "recipes/configs/classify_minilm.yaml"),
            "--label_names",
            "[business,science,sports,travel]",
            "--metrics",
            "[accuracy, f1]",
            "--metric_kwargs",
            "{f1: {average: micro}}",
            "--lora_target_modules",
            "query,value",
        ],
    )
    assert cfg.label_names == ["business", "science", "sports", "travel"]
    assert cfg.metrics == ["accuracy", "f1"]
    assert cfg.metric_kwargs == {"f1": {"average": "micro"}}
    assert cfg.lora_target_modules == ["query", "value"]
    assert parse_config(ClassifyConfig, ["--metrics", "accuracy"]).metrics == ["accuracy"]


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--label_names", "[a, b"],
            "--label_names '[a, b' on the command line is not a valid value (expected ',' or ']', but got "
            "'<stream end>'); write lists as [a, b] or a,b and mappings as {key: value}, quoted for the shell",
        ),
        (
            ["--metric_kwargs", "[1]"],
            "metric_kwargs in the command line must be a mapping such as {name: value}, got [1]",
        ),
        (
            ["--label_names", "[yes, no]"],
            "label_names in the command line must be a string, got True (quote it: YAML reads unquoted "
            "no/yes/on/off as booleans)",
        ),
    ],
)
def test_malformed_list_and_mapping_values_are_refused_with_the_key(args, message):
    from recipes.classify import ClassifyConfig

    with pytest.raises(ConfigError) as err:
        parse_config(ClassifyConfig, args)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--per_device_train_batch_size", "0"],
            "per_device_train_batch_size in {where} must be >= 1, got 0",
        ),
        (["--max_steps", "0"], "max_steps in {where} must be >= 1, or -1 (not set), got 0"),
        (["--max_steps", "-5"], "max_steps in {where} must be >= 1, or -1 (not set), got -5"),
        (["--max_seq_length", "0"], "max_seq_length in {where} must be >= 1, got 0"),
        (["--warmup_ratio", "1.5"], "warmup_ratio in {where} must be >= 0 and <= 1, got 1.5"),
        (["--dataset_num_proc", "0"], "dataset_num_proc in {where} must be >= 1, got 0"),
        (["--logging_steps", "0"], "logging_steps in {where} must be >= 1, got 0"),
        (
            ["--num_train_epochs", "0"],
            "num_train_epochs in {where} is 0 and max_steps is not set, so the run would train no step; "
            "set num_train_epochs above 0 or max_steps to the number of optimizer steps",
        ),
    ],
)
def test_numbers_out_of_their_range_are_refused_where_they_were_set(tmp_path, args, message):
    yaml_file = tmp_path / "sft_c.yaml"
    yaml_file.write_text("".join(f"{args[0][2:]}: {args[1]}\n"))
    for argv, where in (([*args], "the command line"), (["--config", str(yaml_file)], str(yaml_file))):
        with pytest.raises(ConfigError) as err:
            parse_config(SFTConfig, argv)
        assert str(err.value) == message.format(where=where)
    # The values that mean "not set" or that another field overrides stay valid.
    assert parse_config(SFTConfig, ["--max_steps", "-1"]).max_steps == -1
    assert parse_config(SFTConfig, ["--num_train_epochs", "0", "--max_steps", "3"]).max_steps == 3


def test_a_bad_command_line_value_blames_the_command_line_not_the_yaml_file(tmp_path):
    path = tmp_path / "sft_c.yaml"
    path.write_text("max_steps: 4\nseed: 3\n")
    with pytest.raises(ConfigError) as err:
        parse_config(SFTConfig, ["--config", str(path), "--seed", "three"])
    assert str(err.value) == "seed in the command line must be an integer, got 'three'"
    path.write_text("max_steps: four\n")
    with pytest.raises(ConfigError) as err:
        parse_config(SFTConfig, ["--config", str(path), "--seed", "3"])
    assert str(err.value) == f"max_steps in {path} must be an integer, got 'four'"


def test_label_names_from_the_command_line_are_the_class_names_the_model_and_predictions_carry(
    encoder, news_data, tmp_path
):
    from helpers import classify_args, in_process, read_jsonl

    names = ["business", "science", "sports", "travel"]
    out = tmp_path / "out"
    args = classify_args(encoder, news_data, out, max_steps=1, eval_steps=0, metric_for_best_model="loss")
    in_process(
        "classify", [*args, "--label_names", "[business,science,sports,travel]", "--report_to", "none"]
    )
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(names)}
    predictions = read_jsonl(out / "test_predictions.jsonl")
    expected = [json.loads(line)["label"] for line in (news_data / "test.jsonl").read_text().splitlines()]
    assert [row["label"] for row in predictions] == expected
    assert {row["prediction"] for row in predictions} <= set(names)
