"""Loading a pretrained model for training, with the attention kernel and activation checkpointing the
recipe config asks for.

Weights load in fp32 whatever the checkpoint's dtype: they are the master weights, which mixed precision
(autocast, or DeepSpeed's bf16 optimizer) keeps in fp32 next to the low-precision compute. With
load_in_4bit / load_in_8bit the linear layers load quantised instead (core/model/quantization.py).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from recipes.core.config import ConfigError
from recipes.core.model import quantization

# attn_implementation -> (the package its kernel needs, or None; whether it can train on a CPU)
ATTENTION = {
    "eager": (None, True),
    "sdpa": (None, True),
    "flex_attention": (None, False),  # torch implements its backward on GPUs only
    "flash_attention_2": ("flash_attn", False),
    "flash_attention_3": ("flash_attn_interface", False),
}
PACKAGES = {"flash_attn": "flash-attn", "flash_attn_interface": "flash-attn-3 (flash_attn_interface)"}


def check_attention(name: str, on_gpu: bool) -> None:
    """Refuse an attention implementation this machine cannot train with, naming what is missing."""
    if name not in ATTENTION:
        raise ConfigError(f"attn_implementation {name!r} is not one of {', '.join(ATTENTION)}")
    package, trains_on_cpu = ATTENTION[name]
    if package is not None and importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"attn_implementation {name} needs the package {PACKAGES[package]}, which is not installed; "
            "install it (on a GPU machine) or use attn_implementation: sdpa"
        )
    if not (trains_on_cpu or on_gpu):
        raise ConfigError(
            f"attn_implementation {name} cannot train on a CPU (its backward needs a GPU); use sdpa or eager"
        )


def load_pretrained(
    auto_class: Any,
    cfg: Any,
    *,
    on_loaded: Callable[[], None] | None = None,
    new_modules: tuple[str, ...] = (),
    **kwargs: Any,
) -> torch.nn.Module:
    """`auto_class.from_pretrained` of the run's model in fp32 with its attention kernel and, with
    gradient_checkpointing, non-reentrant activation checkpointing of every layer (its dropout masks
    are replayed in the recomputation, so the result does not change). `on_loaded()` runs right after
    from_pretrained, before anything else is done to the model (the memory census counts what loading
    left there). `new_modules`: modules the checkpoint does not hold (a new head), never quantised."""
    check_attention(cfg.attn_implementation, torch.cuda.is_available())
    quantization_config = quantization.bits_and_bytes_config(cfg, new_modules)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        if torch.cuda.is_available():  # quantised where it trains: a quantised model cannot move devices
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = auto_class.from_pretrained(
        cfg.model_name_or_path,
        dtype=torch.float32,
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
        **kwargs,
    )
    if on_loaded is not None:
        on_loaded()
    if quantization_config is not None:
        if not torch.cuda.is_available():
            quantization.release_checkpoint_map(model)
        model = quantization.prepare_quantized(model)
    if cfg.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ConfigError(
                f"gradient_checkpointing: {type(model).__name__} does not support it; set it to false"
            )
        enable_activation_checkpointing(model)
    if cfg.torch_compile:
        compile_model(model, cfg.gradient_checkpointing)
    return model


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing of every layer, under the name the installed transformers gives it."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_model(model: torch.nn.Module, checkpointed: bool) -> None:
    """Compile the model in place with torch.compile (inductor); parameter names do not change (nothing
    is wrapped), so checkpoints and the final model are those of an uncompiled run.

    Without activation checkpointing the repeated layer class (the one transformers never splits across
    devices) is compiled once and every layer reuses it, so the compile time does not grow with depth.
    torch.compile does not compile code running inside a non-reentrant checkpoint, which each layer is
    when checkpointed, so then the model's body (the layers and what joins them) is compiled as one
    region with the checkpoints inside it. The head and the loss run as they are in both cases."""
    if checkpointed:
        model.base_model.compile(backend="inductor")
        return
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ConfigError(
            f"torch_compile: {type(model).__name__} names no repeated layer class (_no_split_modules); "
            "set torch_compile: false"
        )
    for layer in layers:
        layer.compile(backend="inductor")
