"""The library's subpackages are layers: a module imports only from its own layer and the ones below it,
and the plan layer imports no torch, accelerate or deepspeed (so `recipes plan` and the doctor are fast
and the arithmetic is testable on its own). Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "recipes" / "core"

# Lowest first. The base modules at the package root are one layer.
LAYERS = [
    "base",
    "plan",
    "data",
    "model",
    "losses",
    "evaluation",
    "distributed",
    "output",
    "train",
    "doctor",
    "launch",
]
BASE = {"config", "errors", "exit_status"}
HEAVY = ("torch", "accelerate", "deepspeed", "transformers", "peft", "datasets")


def layer_of(module: str) -> str:
    """'recipes.core.train.loop' -> 'train'; a base module -> 'base'."""
    part = module.split(".")[2]
    return "base" if part in BASE else part


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import in the file, relative ones resolved."""
    package = ".".join(path.relative_to(CORE.parent.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            if module == "recipes.core":  # from recipes.core import a_subpackage
                found += [(node.lineno, f"recipes.core.{alias.name}") for alias in node.names]
    return found


MODULES = sorted(CORE.rglob("*.py"))


def test_every_module_sits_in_a_known_layer():
    for path in MODULES:
        parts = path.relative_to(CORE).with_suffix("").parts
        if parts == ("__init__",):
            continue
        assert layer_of("recipes.core." + ".".join(parts)) in LAYERS, path


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(CORE)))
def test_no_module_imports_a_higher_layer_or_a_recipe(path):
    parts = path.relative_to(CORE).with_suffix("").parts
    if parts == ("__init__",):
        return
    own = LAYERS.index(layer_of("recipes.core." + ".".join(parts)))
    wrong = []
    for line, module in imports(path):
        if module.startswith("recipes.core."):
            if LAYERS.index(layer_of(module)) > own:
                wrong.append(f"line {line}: {module} ({layer_of(module)} is above {LAYERS[own]})")
        elif module.startswith("recipes") and module != "recipes.core":
            wrong.append(f"line {line}: {module} (the library never imports a recipe or the CLI)")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", sorted((CORE / "plan").glob("*.py")), ids=lambda p: p.name)
def test_the_plan_layer_imports_no_training_library(path):
    heavy = [(line, m) for line, m in imports(path) if m.split(".")[0] in HEAVY]
    assert not heavy, heavy
