"""Sampling completions of prompts, the one generation code of GRPO and `recipes generate`.

Prompts are token ids (a chat prompt rendered with the tokenizer's chat template and its generation
prompt, or a plain string's tokens). Each is repeated `num_generations` times, left-padded into one batch
and sampled with transformers' `generate` (`temperature` 0 for greedy decoding), from the global torch RNG, so that the run's seed and a checkpoint's RNG states decide them. A completion is its tokens up to and
including the first end-of-sequence token; one that reaches `max_completion_length` without it is
truncated. The caller makes the whole weights available while this runs (ZeRO-3 and FSDP2 gather them
once per generation batch, core/distributed/gather.py), so generating token by token gathers nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Sampling:
    """TRL's GRPOConfig names: completions per prompt, their length, temperature (0: greedy), top_p, top_k
    (0: off)."""

    num_generations: int = 1
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass(frozen=True)
class Completions:
    """Completion k is generation k % num_generations of prompt k // num_generations."""

    ids: list[list[int]]
    truncated: list[bool]

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.ids]


def render_prompt(tokenizer: Any, prompt: str | list[dict]) -> list[int]:
    """A prompt's token ids: a list of chat turns through the chat template with its generation prompt
    (the assistant's turn opened), a string as it is."""
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]


@torch.no_grad()
def sample(
    model: Any, prompt_ids: list[list[int]], sampling: Sampling, pad_token_id: int, eos_token_id: int
) -> Completions:
    """`sampling.num_generations` completions of every prompt, in prompt order. The settings are exactly
    `sampling`'s: nothing comes from the model's own generation_config (a checkpoint's default temperature
    or top_k would change what is sampled)."""
    from transformers import GenerationConfig

    prompt_ids = [ids for ids in prompt_ids for _ in range(sampling.num_generations)]
    device = next(model.parameters()).device
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompt_ids):  # left padding: every prompt ends where generation starts
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    greedy = sampling.temperature == 0
    config = GenerationConfig(
        do_sample=not greedy,
        max_new_tokens=sampling.max_completion_length,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        **(
            {}
            if greedy
            else {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k}
        ),
    )
    was_training = model.training
    model.eval()
    try:
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
        )
    finally:
        model.train(was_training)
    ids, truncated = [], []
    for row in output[:, width:].tolist():
        end = row.index(eos_token_id) + 1 if eos_token_id in row else len(row)
        ids.append(row[:end])
        truncated.append(eos_token_id not in row)
    return Completions(ids, truncated)
