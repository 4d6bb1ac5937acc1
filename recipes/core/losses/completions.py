"""Token log-probabilities of sampled completions, as GRPO's loss and its reference need them.

A micro-batch is prompts left-padded and completions right-padded, end to end: every prompt ends where its
completion starts, as in generation, and the position ids count real tokens only (generation's positions,
so a completion's log-probabilities here are those it was sampled from). The model computes logits for the
completion positions only (`logits_to_keep`), divided by the sampling temperature as TRL does, so the
policy trained is the one sampled from.
"""

from __future__ import annotations

from typing import Any

import torch


def completion_inputs(
    prompts: list[list[int]], completions: list[list[int]], pad_token_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, position_ids of prompt + completion rows; completion_mask [rows,
    longest completion] is 1 on completion tokens."""
    width, length = max(map(len, prompts)), max(1, max(map(len, completions)))
    rows = len(prompts)
    input_ids = torch.full((rows, width + length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros((rows, length), dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        input_ids[row, width - len(prompt) : width] = torch.tensor(prompt)
        input_ids[row, width : width + len(completion)] = torch.tensor(completion, dtype=torch.long)
        attention_mask[row, width - len(prompt) : width + len(completion)] = 1
        completion_mask[row, : len(completion)] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    return {**{k: v.to(device) for k, v in inputs.items()}, "completion_mask": completion_mask.to(device)}


def token_logps(model: Any, inputs: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """log p(token) of each completion position [rows, longest completion] (differentiable when gradients
    are on; padding positions hold values of no meaning, masked by completion_mask)."""
    length = inputs["completion_mask"].shape[1]
    outputs = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        position_ids=inputs["position_ids"],
        logits_to_keep=length + 1,
    )
    logits = outputs.logits[:, :-1].float()
    if temperature > 0:
        logits = logits / temperature
    targets = inputs["input_ids"][:, -length:]
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)


def stored_logps(values: dict[int, torch.Tensor], completions: list[int], like: torch.Tensor) -> torch.Tensor:
    """Token log-probabilities kept per completion, as a [completions, positions] tensor like `like`."""
    out = torch.zeros_like(like, dtype=torch.float32)
    for row, c in enumerate(completions):
        out[row, : len(values[c])] = values[c].to(out.device)
    return out
