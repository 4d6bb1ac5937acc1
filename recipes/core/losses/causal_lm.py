"""A causal LM's next-token loss from its last hidden states, through the LM head a chunk of tokens at a time.

The logits of a batch are micro batch x sequence x vocabulary: at 8 x 2,048 tokens and a 151,936-token
vocabulary, 10 GB in fp32, and as much again for their gradient, whatever the model's size. Here the
model returns its last hidden states instead (`logits_to_keep` selects no position, so the model computes
no logits), only the positions that are targets are kept, and the LM head and the cross-entropy run on
`chunk_tokens` of them at a time inside a non-reentrant activation checkpoint: the forward keeps no chunk's
logits, and the backward recomputes one chunk's logits at a time. A trainable LM head is called as the
module it is, so DDP, ZeRO-3 (which gathers a partitioned head on each call), tied embeddings and LoRA
adapters on the head see an ordinary forward. A frozen head (LoRA elsewhere) needs no weight gradient:
each chunk's gradient with respect to its hidden states is computed with its loss, so the backward
neither recomputes nor needs the head's weight (which ZeRO-3 leaves partitioned there). The result is the
same summed loss as cross-entropy over all logits, up to the order in which float sums are added.

Under ZeRO-3 every call of the head is a collective gather, so every rank runs as many chunks as the
rank with the most target tokens, padding with empty ones.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from recipes.core.config import ConfigError
from recipes.core.data.chat import IGNORE_INDEX
from recipes.core.losses.accumulation import per_sample_token_loss, summed_token_loss


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
        return self.sequence_losses(outputs, labels)[0].sum()

    def sequence_losses(self, outputs: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: the next-token cross-entropy summed over its target tokens (minus the log-likelihood
        of its targets; differentiable), and its number of target tokens."""
        counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
        if not self.chunk_tokens:
            return per_sample_token_loss(outputs.logits, labels)[0], counts
        hidden = outputs.hidden_states[-1]
        if torch.is_grad_enabled() and not any(p.requires_grad for p in self.head.parameters()):
            losses = frozen_head_sequence_losses(hidden, labels, self.head, self.chunk_tokens, self.autocast)
        else:
            losses = chunked_sequence_losses(
                hidden, labels, self._head, self.chunk_tokens, across_ranks=_partitioned(self.head)
            )
        return losses, counts

    @torch.no_grad()
    def per_sample(self, outputs: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row summed token loss and target-token count (evaluation, gathered across ranks)."""
        return self.sequence_losses(outputs, labels)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            if _fsdp_linear(self.head):
                return F.linear(hidden, *_unsharded(self.head))
            return self.head(hidden)


def chunked_token_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    chunk_tokens: int,
    across_ranks: bool = False,
) -> torch.Tensor:
    """Next-token cross-entropy summed over the target tokens, from the last hidden states (batch x
    sequence x width) and `head` (hidden -> logits), `chunk_tokens` target tokens at a time; with
    `across_ranks`, as many chunks on every rank (a head that gathers its parameters on each call)."""
    return chunked_sequence_losses(hidden, labels, head, chunk_tokens, across_ranks).sum()


def chunked_sequence_losses(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    chunk_tokens: int,
    across_ranks: bool = False,
) -> torch.Tensor:
    """chunked_token_loss of each row of the batch. With gradients, each chunk runs inside a
    non-reentrant checkpoint, so that no chunk's logits are kept for the backward."""
    hidden, targets, rows = _targets(hidden, labels)
    total = torch.zeros(labels.shape[0], device=hidden.device)
    for start in _chunk_starts(len(targets), chunk_tokens, across_ranks, hidden.device):
        chunk = slice(start, start + chunk_tokens)
        inputs = (head, hidden[chunk], targets[chunk], rows[chunk], labels.shape[0])
        if torch.is_grad_enabled():
            # preserve_rng_state off: neither the head nor the cross-entropy draws random numbers
            total = total + checkpoint(_chunk_losses, *inputs, use_reentrant=False, preserve_rng_state=False)
        else:
            total = total + _chunk_losses(*inputs)
    return total


def frozen_head_token_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: torch.nn.Module,
    chunk_tokens: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """chunked_token_loss for a linear head that is not trained: its gradient reaches the hidden states
    only, and is computed chunk by chunk in the forward, with the head's parameters gathered once."""
    return frozen_head_sequence_losses(hidden, labels, head, chunk_tokens, autocast).sum()


def frozen_head_sequence_losses(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: torch.nn.Module,
    chunk_tokens: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """frozen_head_token_loss of each row of the batch."""
    hidden, targets, rows = _targets(hidden, labels)
    params = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
    gathered = contextlib.nullcontext()
    if _partitioned(head):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gathered:
        return _FrozenHeadLoss.apply(
            hidden, targets, rows, labels.shape[0], head.weight, head.bias, chunk_tokens, autocast
        )


class _FrozenHeadLoss(torch.autograd.Function):
    """Per row, the summed cross-entropy of F.linear(hidden, weight, bias) against targets; the gradient of a
    target row's loss with respect to its hidden state is (softmax(logits) - one_hot(target)) @ weight (0 for
    ignored rows), scaled in the backward by the gradient of its batch row."""

    @staticmethod
    def forward(ctx, hidden, targets, rows, num_rows, weight, bias, chunk_tokens, autocast):
        losses = torch.zeros(num_rows, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        for start in range(0, len(targets), chunk_tokens):
            chunk = slice(start, start + chunk_tokens)
            with autocast():
                logits = F.linear(hidden[chunk], weight, bias).float()
            chunk_targets = targets[chunk]
            losses.index_add_(
                0,
                rows[chunk],
                F.cross_entropy(logits, chunk_targets, ignore_index=IGNORE_INDEX, reduction="none"),
            )
            grad_logits = logits.softmax(dim=-1)
            kept = chunk_targets != IGNORE_INDEX
            grad_logits[kept, chunk_targets[kept]] -= 1
            grad_logits[~kept] = 0
            with autocast():  # the matmul in the precision autograd would use for the head's backward
                grad_hidden[chunk] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            del logits, grad_logits
        ctx.save_for_backward(grad_hidden, rows)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        grad_hidden, rows = ctx.saved_tensors
        return grad_hidden * grad_losses[rows].unsqueeze(-1), None, None, None, None, None, None, None


def _fsdp_linear(head: torch.nn.Module) -> bool:
    """Whether the head is a linear layer FSDP2 shards. Its FSDP unit (the final norm and the head) runs
    its hooks for the calls inside the model's forward only: a call of the module from outside (a chunk,
    or a chunk's recomputation in backward) is not one FSDP2 prepares for backward, and crashed the
    process (torch 2.13). The head is called as the function it is instead, on the gathered weight that
    the model's forward left (the unit is not resharded after forward), whose gradient FSDP2
    reduce-scatters with the unit's in backward."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(head, FSDPModule) and isinstance(head, torch.nn.Linear)


def _unsharded(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The FSDP2 head's gathered weight and bias (gathered now if a forward left them sharded)."""
    from torch.distributed.tensor import DTensor

    if isinstance(head.weight, DTensor):
        head.unshard()
    return head.weight, head.bias


def _partitioned(head: torch.nn.Module) -> bool:
    """Whether ZeRO-3 holds the head's parameters partitioned (each call of it gathers them)."""
    return any(hasattr(p, "ds_id") for p in head.parameters())


def _chunk_starts(tokens: int, chunk_tokens: int, across_ranks: bool, device: torch.device) -> list[int]:
    """Where each chunk of `tokens` rows starts; with `across_ranks`, padded with empty chunks (starting at
    `tokens`) to the most chunks any rank has."""
    starts = list(range(0, tokens, chunk_tokens))
    if across_ranks and dist.is_initialized():
        most = torch.tensor(len(starts), device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        starts += [tokens] * (int(most) - len(starts))
    return starts


def _chunk_losses(
    head: Callable, hidden: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, num_rows: int
) -> torch.Tensor:
    """A chunk's cross-entropy summed into the batch row of each of its targets."""
    losses = F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return torch.zeros(num_rows, device=hidden.device).index_add(0, rows, losses)


def _targets(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hidden states that predict a target token (position t predicts label t + 1), those labels, and
    the batch row of each.

    A batch without a target keeps one position with an ignored label, so the loss is 0 and still
    reaches the head's parameters (data parallelism waits for every parameter's gradient)."""
    shift_hidden, shift_labels = hidden[:, :-1, :], labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    if not mask.any():
        return (
            shift_hidden.reshape(-1, hidden.shape[-1])[:1],
            torch.full((1,), IGNORE_INDEX, device=labels.device),
            torch.zeros(1, dtype=torch.long, device=labels.device),
        )
    return shift_hidden[mask], shift_labels[mask], mask.nonzero()[:, 0]
