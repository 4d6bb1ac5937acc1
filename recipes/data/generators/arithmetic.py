"""The bundled task with verifiable answers for the GRPO recipe: small sums and differences.

`python -m recipes.data.generators.arithmetic` rewrites recipes/data/arithmetic/ byte for byte (a test
checks the committed files). Each row is a chat prompt, "What is 12 + 9? Answer with the number only.",
and its `answer` ("21"), the column the reward functions of recipes/rewards.py read. The validation
prompts are held out: no question of train occurs in validation.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from recipes.data.generators.sft_instructions import DATA_DIR

ARITHMETIC_DIR = DATA_DIR / "arithmetic"
SPLIT_SIZES = {"train": 512, "validation": 64}
SYSTEM_PROMPT = "You are a concise assistant."


def questions(seed: int = 0) -> list[tuple[str, str]]:
    """Every (question, answer) of the task in a seeded order: a + b and a - b (a >= b) for a, b in 1..20."""
    pairs = [(a, b, op) for a in range(1, 21) for b in range(1, 21) for op in "+-" if op == "+" or a >= b]
    random.Random(seed).shuffle(pairs)
    return [(f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b)) for a, b, op in pairs]


def row(question: str, answer: str) -> dict:
    prompt = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"{question} Answer with the number only."},
    ]
    return {"prompt": prompt, "answer": answer}


def write_arithmetic_dataset(directory: Path = ARITHMETIC_DIR) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    every = questions()
    start = 0
    for split, size in SPLIT_SIZES.items():
        lines = [json.dumps(row(q, a)) for q, a in every[start : start + size]]
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        start += size
    return directory


if __name__ == "__main__":
    print(f"wrote {write_arithmetic_dataset()}")
