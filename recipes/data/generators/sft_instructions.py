"""The small datasets the project ships, generated deterministically.

`python -m recipes.data.generators.sft_instructions` rewrites recipes/data/ byte for byte; a test checks that the
committed files are exactly what this module produces. Each dataset is a directory of split files
that `datasets.load_dataset(<dir>)` reads like any user's JSON Lines data.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent
SFT_DIR = DATA_DIR / "sft_instructions"
SYSTEM_PROMPT = "You are a concise assistant. Answer in one short sentence."

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "India": "New Delhi",
    "China": "Beijing",
    "Mexico": "Mexico City",
    "Chile": "Santiago",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Morocco": "Rabat",
    "Ghana": "Accra",
}
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "garden",
    "pencil",
    "window",
    "planet",
    "forest",
    "candle",
    "bridge",
    "castle",
    "orange",
    "silver",
    "harbor",
    "meadow",
    "rocket",
    "violin",
    "desert",
    "lantern",
]
ANTONYMS = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "early": "late",
    "light": "dark",
    "open": "closed",
    "strong": "weak",
    "high": "low",
    "full": "empty",
    "rich": "poor",
    "young": "old",
}
UNITS = [
    ("kilometres", "metres", 1000),
    ("metres", "centimetres", 100),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("litres", "millilitres", 1000),
]


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."


def _capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(CAPITALS))
    return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return f"Reverse the order of these words: {', '.join(words)}.", ", ".join(reversed(words)) + "."


def _letters(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"How many letters are in the word '{word}'?", f"The word '{word}' has {len(word)} letters."


def _sort(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1, 60), rng.randint(3, 6))
    listed = ", ".join(map(str, numbers))
    return f"Sort from smallest to largest: {listed}.", ", ".join(map(str, sorted(numbers))) + "."


def _antonym(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(sorted(ANTONYMS))
    return f"What is the opposite of '{word}'?", f"The opposite of '{word}' is '{ANTONYMS[word]}'."


def _convert(rng: random.Random) -> tuple[str, str]:
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 12)
    return f"Convert {n} {big} to {small}.", f"{n} {big} is {n * factor} {small}."


def _uppercase(rng: random.Random) -> tuple[str, str]:
    words = " ".join(rng.sample(WORDS, 2))
    return f"Write '{words}' in capital letters.", words.upper() + "."


_TASKS: list[Callable[[random.Random], tuple[str, str]]] = [
    _addition,
    _capital,
    _reverse,
    _letters,
    _sort,
    _antonym,
    _convert,
    _uppercase,
]


def sft_conversation(rng: random.Random) -> dict:
    """One chat sample: a system prompt and one or two user/assistant turns."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for _ in range(1 if rng.random() < 0.8 else 2):
        question, answer = rng.choice(_TASKS)(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def write_sft_dataset(
    directory: Path = SFT_DIR, train_size: int = 480, eval_size: int = 64, seed: int = 0
) -> Path:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", train_size), ("validation", eval_size)):
        lines = [json.dumps(sft_conversation(rng), ensure_ascii=False) for _ in range(size)]
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return directory


if __name__ == "__main__":
    print(f"wrote {write_sft_dataset()}")
