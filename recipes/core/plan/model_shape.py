"""A model's shape as the estimates count it (core/model/shape.py reads it from the model's config)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    total_params: int
    embedding_params: int  # token and position embeddings, plus the output head when it is not tied
    num_layers: int
    hidden_size: int
    num_heads: int
    attention_dim: int  # query heads x head dim
    vocab_size: int
    has_lm_head: bool = True  # False for encoders: no vocabulary-sized logits to keep
    key_value_dim: int | None = None  # key/value heads x head dim (grouped-query); None: attention_dim

    @property
    def kv_dim(self) -> int:
        return self.attention_dim if self.key_value_dim is None else self.key_value_dim

    @property
    def non_embedding_params(self) -> int:
        return self.total_params - self.embedding_params
