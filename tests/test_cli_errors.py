"""`recipes plan` and `recipes doctor` on bad input: the recipe's own one-paragraph message, never a
traceback. `plan` stops with it and exit status 2, as the recipe does; `doctor` reports it as a finding of
the config file (problem and fix, exit status 1, as for every problem it finds)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from helpers import SFT_DATA, in_process

from recipes.cli import main as recipes
from recipes.core.errors import USER_ERRORS


def bad_config(kind: str, model: Path, directory: Path) -> Path:
    """A recipe config (named so that the CLI tells its recipe) with one kind of bad input."""
    fields = {"model_name_or_path": str(model), "dataset_name": str(SFT_DATA), "max_train_samples": 8}
    path = directory / "sft_bad.yaml"
    if kind == "malformed config":
        path.write_text(yaml.safe_dump(fields) + "per_device_train_batch_size: [2\n")
        return path
    if kind == "missing model":
        fields["model_name_or_path"] = str(directory / "no_such_model")
    elif kind == "missing dataset":
        fields["dataset_name"] = str(directory / "no_such_data.jsonl")
    path.write_text(yaml.safe_dump(fields))
    return path


def recipe_message(config: Path, output_dir: Path) -> str:
    """What the recipe itself stops with (launched: `error: <message>`, exit status 2)."""
    with pytest.raises(USER_ERRORS) as err:
        in_process("sft", ["--config", str(config), "--output_dir", str(output_dir), "--report_to", "none"])
    return str(err.value)


KINDS = ["missing model", "missing dataset", "malformed config"]


@pytest.mark.parametrize("kind", KINDS)
def test_plan_stops_with_the_recipes_message_and_exit_2(kind, tiny_llama, tmp_path, capsys):
    config = bad_config(kind, tiny_llama, tmp_path)
    expected = recipe_message(config, tmp_path / "out")
    capsys.readouterr()
    assert recipes(["plan", "--config", str(config)]) == 2
    assert recipes(["plan", "--config", str(config), "--json"]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n" * 2


@pytest.mark.parametrize("kind", KINDS)
def test_doctor_reports_the_recipes_message_as_a_finding(kind, tiny_llama, tmp_path, capsys):
    config = bad_config(kind, tiny_llama, tmp_path)
    expected = recipe_message(config, tmp_path / "out")
    capsys.readouterr()
    status = recipes(
        ["doctor", "--accelerate-config", "accelerate_configs/cpu_2proc.yaml", "--config", str(config)]
    )
    output = capsys.readouterr()
    assert (status, output.err) == (1, "")
    location, key_problem = output.out.split(": ", 1)
    key = {"missing model": "model_name_or_path", "missing dataset": "dataset_name"}.get(kind)
    if key is None:  # a syntax error: the line the parser names, its problem and the fix
        line, column = re.search(r"at line (\d+), column (\d+)", expected).groups()
        assert location == f"{config}:{line}"
        problem, fix = key_problem.removeprefix("-: invalid YAML: ").split("\n    fix: ")
        assert (
            expected
            == f"{config} is not valid YAML at line {line}, column {column}: {problem}; {fix.strip()}"
        )
    else:
        line = next(n for n, text in enumerate(config.read_text().splitlines(), 1) if text.startswith(key))
        assert location == f"{config}:{line}"
        problem, fix = key_problem.removeprefix(f"{key}: ").split("\n    fix: ")
        assert expected == f"{key} {problem}; {fix.strip()}"


def test_prepare_names_the_default_models_it_knows(capsys):
    assert recipes(["prepare", "--model", "no_such_model"]) == 2
    assert capsys.readouterr().err == (
        "error: unknown default model 'no_such_model'; choose one of ['SmolLM2-135M-Instruct', "
        "'all-MiniLM-L6-v2']\n"
    )


def test_doctor_checks_the_reference_model_and_every_mixture_dataset(tiny_llama, tmp_path):
    from recipes.core.doctor.sources import check_sources

    recipe = {
        "model_name_or_path": str(tiny_llama),
        "ref_model_name_or_path": str(tmp_path / "no_ref"),
        "dataset_name": "",
        "dataset_mixture": [{"dataset": str(SFT_DATA)}, {"dataset": str(tmp_path / "gone.jsonl")}],
    }
    found = [(f.key, f.problem) for f in check_sources(recipe, "dpo.yaml")]
    assert found == [
        (
            "ref_model_name_or_path",
            f"{tmp_path / 'no_ref'}: no such directory (relative paths start where the run starts)",
        ),
        ("dataset_mixture entry 1", f"{tmp_path / 'gone.jsonl'}: no such file or directory"),
    ]
