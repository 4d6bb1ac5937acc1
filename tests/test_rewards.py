"""Reward functions named in a GRPO config: imported as TRL users write them, weighted, and every way one
can fail is a message naming the function and the fix (the run stops with exit status 2)."""

from __future__ import annotations

import textwrap

import pytest

from recipes.core.config import ConfigError
from recipes.core.errors import RunStopped
from recipes.core.losses.rewards import load_reward_functions, score, total_rewards

MODULE = """
import math

def exact(prompts, completions, answer, **kwargs):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]

def short(completions, **kwargs):
    return [None if not c else -len(c) / 10 for c in completions]

def as_bools(completions, **kwargs):
    return [c.strip() == "21" for c in completions]

def too_few(completions, **kwargs):
    return [1.0]

def text(completions, **kwargs):
    return ["high" for _ in completions]

def nan(completions, **kwargs):
    return [math.nan for _ in completions]

not_a_function = 3
"""


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(MODULE))
    (tmp_path / "broken_rewards.py").write_text("import no_such_package_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


PROMPTS = ["What is 12 + 9?", "What is 12 + 9?", "What is 2 + 2?"]
COMPLETIONS = [" 21", "22", ""]
IDS = [[1], [2], []]
COLUMNS = {"answer": ["21", "21", "4"]}


def test_functions_get_prompts_completions_and_columns_and_their_weighted_sum_is_the_reward(rewards_module):
    functions = load_reward_functions(
        ["my_rewards:exact", "my_rewards:short", "my_rewards:as_bools"], [2.0, 1.0, 0.5]
    )
    rows = score(functions, PROMPTS, COMPLETIONS, IDS, COLUMNS)
    assert rows == [[1.0, 0.0, 0.0], [-0.3, -0.2, None], [1.0, 0.0, 0.0]]
    # A None adds nothing: the third completion's reward is 2 x 0 + 0.5 x 0.
    assert total_rewards(functions, rows) == [2.0 - 0.3 + 0.5, -0.2, 0.0]


@pytest.mark.parametrize(
    "names, weights, message",
    [
        (  # a path: a bare name would be asked of the Hub first
            ["./my_rewards"],
            None,
            "reward_funcs entry './my_rewards' is not module:function, and as a reward model (an entry without a "
            "colon) it names no directory or Hub model that loads; write a function as e.g. my_rewards:exact_match, "
            "or name the directory of a reward model (recipes/reward.py's final/)",
        ),
        (
            ["broken_rewards:f"],
            None,
            "reward_funcs entry 'broken_rewards:f': importing broken_rewards failed (ModuleNotFoundError: No module "
            "named 'no_such_package_here'); put the module on PYTHONPATH (or in the directory the run starts in) "
            "and fix what its import raises",
        ),
        (
            ["my_rewards:missing"],
            None,
            "reward_funcs entry 'my_rewards:missing': module my_rewards has no attribute named missing; name a "
            "function defined there",
        ),
        (
            ["my_rewards:not_a_function"],
            None,
            "reward_funcs entry 'my_rewards:not_a_function': module my_rewards has a int, not a function, named "
            "not_a_function; name a function defined there",
        ),
        (
            ["my_rewards:exact"],
            [1.0, 2.0],
            "reward_weights has 2 values for 1 reward_funcs; give one weight per function, or none for 1 each",
        ),
    ],
)
def test_a_reward_function_that_cannot_be_loaded_stops_the_run_before_anything_loads(
    rewards_module, names, weights, message
):
    with pytest.raises(ConfigError) as err:
        load_reward_functions(names, weights)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "too_few",
            "reward function my_rewards:too_few returned 1 values for 3 completions; return one number per "
            "completion (None where it does not apply)",
        ),
        (
            "text",
            "reward function my_rewards:text returned 'high' (str) for completion 0; return a number (or None "
            "where it does not apply)",
        ),
        (
            "nan",
            "reward function my_rewards:nan returned nan for completion 0; return a finite number (or None where "
            "it does not apply)",
        ),
    ],
)
def test_what_a_reward_function_returns_is_checked_on_every_call(rewards_module, name, message):
    [function] = load_reward_functions([f"my_rewards:{name}"])
    with pytest.raises(RunStopped) as err:
        score([function], PROMPTS, COMPLETIONS, IDS, COLUMNS)
    assert str(err.value) == message
