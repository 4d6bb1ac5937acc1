"""The bundled preference dataset, built deterministically from the bundled instruction data.

`python -m recipes.data.generators.preferences` rewrites recipes/data/preferences/ byte for byte from
recipes/data/sft_instructions/ (a test checks the committed files). Every conversation of a split becomes
one pair in TRL's conversational form: the prompt is the conversation up to its last user turn, chosen is
the instruction data's own last reply, and rejected a fluent but wrong reply to the same question (a sum
off by a few, another country's capital, the words not reversed, a miscount, the numbers sorted the wrong
way, a wrong opposite, a wrong conversion factor, lower case asked in capitals). A model that learns the
difference prefers correct answers. The validation pairs come from the instruction data's validation
split: the same templates, so some questions also occur in train, each with a wrong reply of its own.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

from recipes.data.generators.sft_instructions import ANTONYMS, CAPITALS, DATA_DIR, SFT_DIR, UNITS

PREFERENCE_DIR = DATA_DIR / "preferences"
SPLITS = ("train", "validation")


def _nonzero(rng: random.Random, low: int, high: int) -> int:
    return rng.choice([d for d in range(low, high + 1) if d])


def _sum(match: re.Match, rng: random.Random) -> str:
    a, b = int(match[1]), int(match[2])
    return f"{a} + {b} = {a + b + _nonzero(rng, -9, 9)}."


def _capital(match: re.Match, rng: random.Random) -> str:
    country = match[1]
    wrong = rng.choice(sorted(city for name, city in CAPITALS.items() if name != country))
    return f"The capital of {country} is {wrong}."


def _reverse(match: re.Match, rng: random.Random) -> str:
    return f"{match[1]}."  # the words as they were given


def _letters(match: re.Match, rng: random.Random) -> str:
    word = match[1]
    return f"The word '{word}' has {len(word) + _nonzero(rng, -2, 3)} letters."


def _sort(match: re.Match, rng: random.Random) -> str:
    numbers = sorted((int(n) for n in match[1].split(", ")), reverse=True)
    return ", ".join(map(str, numbers)) + "."


def _opposite(match: re.Match, rng: random.Random) -> str:
    word = match[1]
    wrong = rng.choice(sorted(other for key, other in ANTONYMS.items() if key != word))
    return f"The opposite of '{word}' is '{wrong}'."


def _convert(match: re.Match, rng: random.Random) -> str:
    n, big, small = int(match[1]), match[2], match[3]
    factor = next(f for b, s, f in UNITS if (b, s) == (big, small))
    return f"{n} {big} is {n * rng.choice([factor // 10, factor * 10])} {small}."


def _capitals(match: re.Match, rng: random.Random) -> str:
    return match[1] + "."  # not in capital letters


# The questions of recipes/data/generators/sft_instructions.py's tasks, and a wrong reply to each.
WRONG_REPLIES: list[tuple[re.Pattern, Callable[[re.Match, random.Random], str]]] = [
    (re.compile(r"What is (\d+) \+ (\d+)\?"), _sum),
    (re.compile(r"What is the capital of (.+)\?"), _capital),
    (re.compile(r"Reverse the order of these words: (.+)\."), _reverse),
    (re.compile(r"How many letters are in the word '(\w+)'\?"), _letters),
    (re.compile(r"Sort from smallest to largest: (.+)\."), _sort),
    (re.compile(r"What is the opposite of '(\w+)'\?"), _opposite),
    (re.compile(r"Convert (\d+) (\w+) to (\w+)\."), _convert),
    (re.compile(r"Write '(.+)' in capital letters\."), _capitals),
]


def wrong_reply(question: str, rng: random.Random) -> str:
    for pattern, reply in WRONG_REPLIES:
        match = pattern.fullmatch(question)
        if match:
            return reply(match, rng)
    raise ValueError(f"no wrong reply for the question {question!r}")


def preference_pair(conversation: dict, rng: random.Random) -> dict:
    """A conversation of the instruction data as a pair: its last reply chosen, a wrong one rejected."""
    messages = conversation["messages"]
    question, answer = messages[-2]["content"], messages[-1]["content"]
    return {
        "prompt": messages[:-1],
        "chosen": [{"role": "assistant", "content": answer}],
        "rejected": [{"role": "assistant", "content": wrong_reply(question, rng)}],
    }


def write_preference_dataset(directory: Path = PREFERENCE_DIR, source: Path = SFT_DIR, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        rng = random.Random(f"{seed}-{split}")
        rows = [json.loads(line) for line in (source / f"{split}.jsonl").read_text().splitlines()]
        lines = [json.dumps(preference_pair(row, rng), ensure_ascii=False) for row in rows]
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return directory


if __name__ == "__main__":
    print(f"wrote {write_preference_dataset()}")
