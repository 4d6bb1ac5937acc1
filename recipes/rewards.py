"""Reward functions of the bundled arithmetic task (recipes/data/arithmetic), written as TRL users write
them: f(prompts, completions, **columns) -> one number per completion. A completion is a list holding one
assistant turn for chat prompts, a string for text prompts. Name them in a GRPO config as
`recipes.rewards:correct_answer` and `recipes.rewards:number_only`.
"""

from __future__ import annotations

import re
from typing import Any

_INTEGER = re.compile(r"-?\d+")


def _text(completion: Any) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def correct_answer(prompts: list, completions: list, answer: list[str], **_: Any) -> list[float]:
    """1 where the completion's last integer is the answer ("12 + 9 = 21" counts), else 0."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        found = _INTEGER.findall(_text(completion))
        rewards.append(float(bool(found) and found[-1] == expected))
    return rewards


def number_only(prompts: list, completions: list, **_: Any) -> list[float]:
    """1 where the completion is a single integer (surrounding space and a final full stop allowed), else 0:
    the form the prompts ask for."""
    return [float(re.fullmatch(r"\s*-?\d+\.?\s*", _text(c)) is not None) for c in completions]
