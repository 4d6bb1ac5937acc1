"""Training FLOPs of a dense model.

training FLOPs = 6 x N x D + 12 x n_layer x d_attn x seq_len x D  (N non-embedding parameters, D processed
tokens; the second term is attention scores and their use, forward + backward, as in PaLM, Chowdhery et
al. 2022, appendix B). A forward alone (a reference model's) is a third of that.
"""

from __future__ import annotations

from recipes.core.plan.model_shape import ModelShape

FLOPS_FORMULA = "6 x non-embedding params x tokens + 12 x layers x attention dim x seq len x tokens"
REFERENCE_FLOPS = "; + a third of that (a forward) over the reference's tokens"


def training_flops(shape: ModelShape, tokens: float, seq_len: float) -> float:
    """FLOPs of forward + backward over `tokens` processed tokens in sequences of `seq_len`."""
    return (
        6 * shape.non_embedding_params * tokens
        + 12 * shape.num_layers * shape.attention_dim * seq_len * tokens
    )
