"""The doctor's check that a recipe config names models and local datasets that are there: what a recipe
checks before it loads anything, in the recipe's words."""

from __future__ import annotations

from recipes.core.config import ConfigError
from recipes.core.doctor.findings import Finding, findings
from recipes.core.errors import DataError

MODEL_FIELDS = ("model_name_or_path", "ref_model_name_or_path")


def check_sources(recipe: dict, file: str) -> list[Finding]:
    # Imported here: importing the doctor must not load torch, transformers or datasets.
    from recipes.core.data.loading import require_dataset_path
    from recipes.core.model.source import require_model

    problems = []
    for key in MODEL_FIELDS:
        if key not in recipe or (key != MODEL_FIELDS[0] and not recipe[key]):  # no separate reference
            continue
        try:
            require_model(recipe[key], recipe.get("trust_remote_code", False), field=key)
        except ConfigError as err:
            problem, _, fix = str(err).removeprefix(f"{key} ").partition("; ")
            problems.append((key, problem, fix))
    datasets = [("dataset_name", recipe.get("dataset_name"))]
    for index, entry in enumerate(recipe.get("dataset_mixture") or []):
        if isinstance(entry, dict):  # other shapes are the recipe's own error, reported when it starts
            datasets.append((f"dataset_mixture entry {index}: dataset", entry.get("dataset")))
    for key, name in datasets:
        try:
            if name:
                require_dataset_path(name, key)
        except DataError as err:
            problem, _, fix = str(err).removeprefix(f"{key} ").partition("; ")
            problems.append((key.split(":")[0], problem, fix))
    return findings(file, problems)
