"""A model's shape (parameter counts, layers, widths) read from its config on the meta device: what the
plan's estimates (core/plan/) are computed from."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from recipes.core.plan.model_shape import ModelShape


def model_shape(model_name_or_path: str, trust_remote_code: bool = False) -> ModelShape:
    """Parameter counts of a Hub id or local model directory from its config alone."""
    config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    return shape_from_config(config, trust_remote_code)


def shape_from_config(config, trust_remote_code: bool = False) -> ModelShape:
    with torch.device("meta"):  # shapes only: no memory, no initialisation, no download
        archs = getattr(config, "architectures", None) or []
        # An encoder checkpoint (no *ForCausalLM architecture) is counted without an LM head it never had.
        causal = not archs or any(arch.endswith("ForCausalLM") for arch in archs)
        try:
            model = (AutoModelForCausalLM if causal else AutoModel).from_config(
                config, trust_remote_code=trust_remote_code
            )
        except ValueError:
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    params = {id(p): p for p in model.parameters()}
    embedding = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and id(head.weight) in params:
        embedding[id(head.weight)] = head.weight  # counted once when tied to the input embeddings
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelShape(
        total_params=sum(p.numel() for p in params.values()),
        embedding_params=sum(p.numel() for p in embedding.values()),
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        num_heads=heads,
        attention_dim=heads * head_dim,
        vocab_size=text.vocab_size,
        has_lm_head=head is not None,
        key_value_dim=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
    )
