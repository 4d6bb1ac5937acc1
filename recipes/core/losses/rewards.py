"""Reward functions named in a GRPO config, as TRL users write them.

`reward_funcs: [module:function, ...]` names Python functions, and an entry without a colon a reward
model (core/model/reward_model.py: a directory or Hub id of a one-output sequence classifier); each is called with keyword arguments,
`f(prompts=..., completions=..., completion_ids=..., **columns)` (every other column of the prompt data,
e.g. the reference answer), and returns one number per completion, or None where it does not apply (as
in TRL, that function then adds nothing to that completion's reward). `reward_weights` weigh them (default
1 each). They are imported before anything is loaded, so a name that does not import stops the run in
seconds; what one returns is checked on every call, and a wrong length, a non-number or NaN stops the run
naming the function and the completion, as does an exception the function raises.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from recipes.core.config import ConfigError
from recipes.core.errors import RunStopped


@dataclass(frozen=True)
class RewardFunction:
    name: str  # as the config names it, module:function
    function: Callable[..., Sequence[Any]]
    weight: float = 1.0


def load_reward_functions(
    names: Sequence[str], weights: Sequence[float] | None = None
) -> list[RewardFunction]:
    """Import every `module:function` of reward_funcs, with its weight."""
    if weights is not None and len(weights) != len(names):
        raise ConfigError(
            f"reward_weights has {len(weights)} values for {len(names)} reward_funcs; give one weight per "
            "function, or none for 1 each"
        )
    return [
        _load(name, 1.0 if weights is None else float(w))
        for name, w in zip(names, weights or names, strict=True)
    ]


def _load(name: str, weight: float) -> RewardFunction:
    module_name, colon, attribute = name.partition(":")
    if not colon:  # a reward model: a local directory or a Hub id
        from recipes.core.model.reward_model import RewardModel
        from recipes.core.model.source import require_model

        try:
            require_model(name, field="it")
        except ConfigError:
            raise ConfigError(
                f"reward_funcs entry {name!r} is not module:function, and as a reward model (an entry without "
                "a colon) it names no directory or Hub model that loads; write a function as e.g. "
                "my_rewards:exact_match, or name the directory of a reward model (recipes/reward.py's final/)"
            ) from None
        return RewardFunction(name, RewardModel(name), weight)
    if not module_name or not attribute:
        raise ConfigError(
            f"reward_funcs entry {name!r} is not module:function; write e.g. my_rewards:exact_match"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the user's module: any error it raises while importing is theirs to see
        raise ConfigError(
            f"reward_funcs entry {name!r}: importing {module_name} failed ({type(err).__name__}: {err}); put "
            "the module on PYTHONPATH (or in the directory the run starts in) and fix what its import raises"
        ) from None
    function = getattr(module, attribute, None)
    if not callable(function):
        found = (
            "has no attribute" if function is None else f"has a {type(function).__name__}, not a function,"
        )
        raise ConfigError(
            f"reward_funcs entry {name!r}: module {module_name} {found} named {attribute}; name a function "
            "defined there"
        )
    return RewardFunction(name, function, weight)


def score(
    functions: Sequence[RewardFunction],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]],
    columns: dict[str, Sequence[Any]],
) -> list[list[float | None]]:
    """Each function's rewards for the completions (one row per function; None where it does not apply)."""
    rows = []
    for reward in functions:
        try:
            values = reward.function(
                prompts=prompts, completions=completions, completion_ids=completion_ids, **columns
            )
        except Exception as err:  # the user's function: what it raises is theirs to see, in one line
            raise RunStopped(
                f"reward function {reward.name} raised {type(err).__name__}: {err}; it is called as "
                f"f(prompts, completions, completion_ids, {', '.join(columns) or '(no other columns)'}) with "
                f"one value per completion ({len(completions)} here): fix the function or the columns it reads"
            ) from None
        rows.append(_checked(reward.name, values, len(completions)))
    return rows


def total_rewards(functions: Sequence[RewardFunction], rows: Sequence[Sequence[float | None]]) -> list[float]:
    """The weighted sum over functions of each completion's rewards, a None adding nothing."""
    count = len(rows[0]) if rows else 0
    return [
        math.fsum(f.weight * row[i] for f, row in zip(functions, rows, strict=True) if row[i] is not None)
        for i in range(count)
    ]


def _checked(name: str, values: Any, expected: int) -> list[float | None]:
    try:
        values = list(values)
    except TypeError:
        raise RunStopped(
            f"reward function {name} returned a {type(values).__name__}; return a list with one number per "
            "completion (None where it does not apply)"
        ) from None
    if len(values) != expected:
        raise RunStopped(
            f"reward function {name} returned {len(values)} values for {expected} completions; return one "
            "number per completion (None where it does not apply)"
        )
    checked: list[float | None] = []
    for i, value in enumerate(values):
        if value is None:
            checked.append(None)
            continue
        if not isinstance(value, numbers.Real):  # bools count as 1 and 0, as they do in TRL
            raise RunStopped(
                f"reward function {name} returned {value!r} ({type(value).__name__}) for completion {i}; "
                "return a number (or None where it does not apply)"
            )
        if not math.isfinite(value):
            raise RunStopped(
                f"reward function {name} returned {value} for completion {i}; return a finite number (or None "
                "where it does not apply)"
            )
        checked.append(float(value))
    return checked
