"""Activation memory per device, and the levers that change it.

activations = n_layer x s x b x h x (34 + 5 x a x s / h) bytes for 16-bit activations, x2 for fp32
(Korthikanti et al. 2022, no recomputation). With activation checkpointing only each layer's input is kept
(2 x s x b x h bytes, x2 in fp32) plus one layer's activations while it is recomputed. Logits: fp32 logits
of every token and their gradient, 8 x s x b x V bytes; with the chunked loss only one chunk's,
8 x min(chunk, s x b) x V.
"""

from __future__ import annotations

from dataclasses import dataclass

from recipes.core.plan.model_shape import ModelShape

ACTIVATION_FORMULA = (
    "layers x s x b x h x (34 + 5 a s / h) bytes (x2 in fp32); checkpointed: layers x 2 s b h + one layer's; "
    "+ 8 x tokens x V for fp32 logits and their gradient (tokens = s b, or one chunk with the chunked loss)"
)


@dataclass(frozen=True)
class Levers:
    """The memory levers of a run that change its activations (precision is passed on its own)."""

    gradient_checkpointing: bool = False
    loss_chunk_tokens: int = 0  # 0: logits of every token at once

    def describe(self) -> str:
        on = []
        if self.gradient_checkpointing:
            on.append("activation checkpointing")
        if self.loss_chunk_tokens:
            on.append(f"chunked loss ({self.loss_chunk_tokens} tokens)")
        return ", ".join(on) or "none"


def activation_bytes(
    shape: ModelShape, micro_batch_size: int, seq_len: float, precision: str, levers: Levers = Levers()
) -> float:
    """Bytes of a micro-batch of `micro_batch_size` sequences of `seq_len` tokens (module docstring)."""
    s, b, h, a = seq_len, micro_batch_size, shape.hidden_size, shape.num_heads
    width = 2 if precision == "fp32" else 1  # fp32 activations take twice the 16-bit bytes
    per_layer = s * b * h * (34 + 5 * a * s / h) * width
    if levers.gradient_checkpointing:  # the layers' inputs, and one layer at a time recomputed
        layers = shape.num_layers * 2 * s * b * h * width + per_layer
    else:
        layers = shape.num_layers * per_layer
    tokens = min(levers.loss_chunk_tokens, s * b) if levers.loss_chunk_tokens else s * b
    logits = 8 * tokens * shape.vocab_size if shape.has_lm_head else 0
    return layers + logits
