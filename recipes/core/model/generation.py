"""Sampling completions of prompts, the one generation code of GRPO and `recipes generate`.

Prompts are token ids (a chat prompt rendered with the tokenizer's chat template and its generation
prompt, or a plain string's tokens). Each is repeated `num_generations` times, left-padded into one batch
and sampled with transformers' `generate` (`temperature` 0 for greedy decoding). What decides the samples:
by default the global torch RNG, so that the run's seed and a checkpoint's RNG states decide them; with
`seeds`, one per completion, each completion draws from a generator of its own (Gumbel-max: the argmax of
the tempered, top-k/top-p filtered logits plus Gumbel noise from that generator is a sample of their
softmax), so that a completion depends on its seed, its prompt and the weights only, not on which other
prompts share its batch, on the number of processes or on the global RNG. A completion is its tokens up to
and including the first end-of-sequence token; one that reaches `max_completion_length` without it is
truncated. The caller makes the whole weights available while this runs (ZeRO-3 and FSDP2 gather them
once per generation batch, core/distributed/gather.py), so generating token by token gathers nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from recipes.core.data.chat import render_prompt  # noqa: F401 - the prompt rendering this module samples from


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


@torch.no_grad()
def sample(
    model: Any,
    prompt_ids: list[list[int]],
    sampling: Sampling,
    pad_token_id: int,
    eos_token_id: int,
    seeds: list[int] | None = None,
) -> Completions:
    """`sampling.num_generations` completions of every prompt, in prompt order. The settings are exactly
    `sampling`'s: nothing comes from the model's own generation_config (a checkpoint's default temperature
    or top_k would change what is sampled). `seeds`: one per completion (module docstring)."""
    from transformers import GenerationConfig, LogitsProcessorList

    prompt_ids = [ids for ids in prompt_ids for _ in range(sampling.num_generations)]
    if seeds is not None and len(seeds) != len(prompt_ids):
        raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} completions")
    device = next(model.parameters()).device
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompt_ids):  # left padding: every prompt ends where generation starts
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    greedy = sampling.temperature == 0
    processors = LogitsProcessorList()
    if seeds is not None and not greedy:
        processors.append(_SeededNoise(sampling, seeds, device))
        greedy = True  # the argmax of the noised scores is the sample
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
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            logits_processor=processors,
            # The weights are whole here: no rank waits for another's forwards (transformers would keep every
            # rank stepping until all finish under ZeRO-3 and FSDP, which hangs when they sample different counts).
            synced_gpus=False,
        )
    finally:
        model.train(was_training)
    ids, truncated = [], []
    for row in output[:, width:].tolist():
        end = row.index(eos_token_id) + 1 if eos_token_id in row else len(row)
        ids.append(row[:end])
        truncated.append(eos_token_id not in row)
    return Completions(ids, truncated)


class _SeededNoise:
    """A logits processor: temperature, top-k and top-p as generate's sampling applies them, then Gumbel
    noise drawn for each row from its own generator, so that the argmax is that row's sample."""

    def __init__(self, sampling: Sampling, seeds: list[int], device: torch.device):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.warpers = [TemperatureLogitsWarper(sampling.temperature)]
        if sampling.top_k:
            self.warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        uniform = torch.stack(
            [
                torch.rand(scores.shape[1], generator=generator, device=scores.device, dtype=torch.float64)
                for generator in self.generators
            ]
        )
        tiny = torch.finfo(torch.float64).tiny  # keeps log(0) out: a draw of exactly 0 or 1
        gumbel = -torch.log(-torch.log(uniform.clamp(tiny, 1 - 2**-53)))
        return (scores.double() + gumbel).to(scores.dtype)
