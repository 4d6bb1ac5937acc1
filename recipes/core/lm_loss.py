"""A causal LM's next-token loss from its last hidden states, through the LM head a chunk of tokens at a time.

The logits of a batch are micro batch x sequence x vocabulary: at 8 x 2,048 tokens and a 151,936-token
vocabulary, 10 GB in fp32, and as much again for their gradient, whatever the model's size. Here the
model returns its last hidden states instead (`logits_to_keep` selects no position, so the model computes
no logits), only the positions that are targets are kept, and the LM head and the cross-entropy run on
`chunk_tokens` of them at a time inside a non-reentrant activation checkpoint: the forward keeps no chunk's
logits, and the backward recomputes one chunk's logits at a time. The LM head is called as the module it
is, so DDP, ZeRO-3 (which gathers a partitioned head on each call), tied embeddings and LoRA see an
ordinary forward. The result is the same summed loss as cross-entropy over all logits, up to the order in
which float sums are added.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from recipes.core.accumulation import per_sample_token_loss, summed_token_loss
from recipes.core.chat import IGNORE_INDEX
from recipes.core.config import ConfigError


class CausalLMLoss:
    """`model(**inputs, **loss.model_kwargs)` is the forward; `loss(outputs, labels)` its summed token loss."""

    def __init__(
        self,
        model: Any,
        chunk_tokens: int,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        """`model`: the unwrapped causal LM (before accelerator.prepare); `chunk_tokens` 0 computes every
        logit at once; `autocast`: the precision context the model's forward runs in, for the head."""
        if chunk_tokens < 0:
            raise ConfigError(
                f"loss_chunk_tokens is {chunk_tokens}; use a positive number, or 0 for all logits"
            )
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a LoRA wrapper
        if chunk_tokens and "logits_to_keep" not in inspect.signature(base.forward).parameters:
            raise ConfigError(
                f"loss_chunk_tokens: {type(base).__name__}.forward takes no logits_to_keep, so it cannot "
                "return hidden states without logits; set loss_chunk_tokens: 0"
            )
        self.head = model.get_output_embeddings() if chunk_tokens else None
        self.chunk_tokens = chunk_tokens
        self.autocast = autocast

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """Forward arguments: the last hidden states and no logits when chunked."""
        if not self.chunk_tokens:
            return {}
        return {"output_hidden_states": True, "logits_to_keep": torch.empty(0, dtype=torch.long)}

    def __call__(self, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy summed over the target tokens of the batch."""
        if not self.chunk_tokens:
            return summed_token_loss(outputs.logits, labels)[0]
        return chunked_token_loss(outputs.hidden_states[-1], labels, self._head, self.chunk_tokens)

    @torch.no_grad()
    def per_sample(self, outputs: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row summed token loss and target-token count (evaluation, gathered across ranks)."""
        if not self.chunk_tokens:
            return per_sample_token_loss(outputs.logits, labels)
        targets_mask = labels[:, 1:] != IGNORE_INDEX
        hidden, targets = outputs.hidden_states[-1][:, :-1, :][targets_mask], labels[:, 1:][targets_mask]
        rows = targets_mask.nonzero()[:, 0]
        losses = torch.zeros(labels.shape[0], device=hidden.device)
        for start in range(0, len(targets), self.chunk_tokens):
            stop = start + self.chunk_tokens
            logits = self._head(hidden[start:stop]).float()
            losses.index_add_(
                0, rows[start:stop], F.cross_entropy(logits, targets[start:stop], reduction="none")
            )
        return losses, targets_mask.sum(dim=1)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.head(hidden)


def chunked_token_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    chunk_tokens: int,
) -> torch.Tensor:
    """Next-token cross-entropy summed over the target tokens, from the last hidden states (batch x
    sequence x width) and `head` (hidden -> logits), `chunk_tokens` target tokens at a time."""
    hidden, targets = _targets(hidden, labels)
    total = torch.zeros((), device=hidden.device)
    for start in range(0, len(targets), chunk_tokens):
        stop = start + chunk_tokens
        # preserve_rng_state off: neither the head nor the cross-entropy draws random numbers
        total = total + checkpoint(
            _chunk_loss, head, hidden[start:stop], targets[start:stop], use_reentrant=False,
            preserve_rng_state=False,
        )  # fmt: skip
    return total


def _chunk_loss(head: Callable, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _targets(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states that predict a target token (position t predicts label t + 1), and those labels.

    A batch without a target keeps one position with an ignored label, so the loss is 0 and still
    reaches the head's parameters (data parallelism waits for every parameter's gradient)."""
    shift_hidden, shift_labels = hidden[:, :-1, :], labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    if not mask.any():
        return shift_hidden.reshape(-1, hidden.shape[-1])[:1], torch.full(
            (1,), IGNORE_INDEX, device=labels.device
        )
    return shift_hidden[mask], shift_labels[mask]
