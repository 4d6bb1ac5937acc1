"""A quantised pretrained model (bitsandbytes), the base of QLoRA: the recipe fields as transformers'
BitsAndBytesConfig names them, the rules a quantised run must follow, and the model made ready to train.

The quantised linear layers hold integers that no optimizer can update, so a quantised base always trains
LoRA adapters (use_peft); their frozen weights are dequantised to `bnb_4bit_compute_dtype` for each product.
The rules are plain functions of the recipe's fields (no torch import): `recipes doctor` reports them and a
recipe's start-up (the doctor's preflight) stops on them, with the same words.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

from recipes.core.config import Problem

QUANT_TYPES = ("nf4", "fp4")
DTYPES = ("float32", "bfloat16", "float16")
STORAGE_DTYPES = ("uint8", *DTYPES)


def quantized(recipe: Mapping[str, Any]) -> bool:
    """Whether the recipe loads its base quantised (a config's fields by name)."""
    return bool(recipe.get("load_in_4bit") or recipe.get("load_in_8bit"))


def problems(recipe: Mapping[str, Any]) -> Iterator[Problem]:
    """What a recipe config may not say about quantised loading (keys of the recipe config)."""
    if recipe.get("bnb_4bit_quant_type", "nf4") not in QUANT_TYPES:
        problem = f"{recipe['bnb_4bit_quant_type']!r} is not a 4-bit data type bitsandbytes has"
        yield "bnb_4bit_quant_type", problem, "use nf4 (NormalFloat, for normally distributed weights) or fp4"
    for key, allowed in (("bnb_4bit_compute_dtype", DTYPES), ("bnb_4bit_quant_storage", STORAGE_DTYPES)):
        if recipe.get(key, allowed[0]) not in allowed:
            yield (
                key,
                f"{recipe[key]!r} is not one of {', '.join(allowed)}",
                f"use one of {', '.join(allowed)}",
            )
    if not quantized(recipe):
        return
    if recipe.get("load_in_4bit") and recipe.get("load_in_8bit"):
        problem = "load_in_4bit and load_in_8bit are both true: a model is quantised one way"
        yield "load_in_8bit", problem, "keep one of them (4-bit takes half the memory of 8-bit)"
    bits = "load_in_4bit" if recipe.get("load_in_4bit") else "load_in_8bit"
    if "pipeline_stages" in recipe:  # recipes/sft_pipeline.py
        problem = "the pipeline recipe builds its stages from the plain weights and trains no LoRA adapters"
        yield bits, problem, f"set {bits}: false, or train QLoRA with recipes/sft.py (1 process or DDP)"
        return
    if not recipe.get("use_peft"):
        problem = "full fine-tuning of a quantised base: its weights are integers that no optimizer can "
        problem += "update (bitsandbytes trains adapters on a quantised model, never the model itself)"
        fix = "set use_peft: true (QLoRA: LoRA adapters on the frozen quantised base), or load the model "
        fix += f"unquantised ({bits}: false) to train every weight"
        yield "use_peft", problem, fix
    if recipe.get("torch_compile"):
        problem = "torch_compile over bitsandbytes' quantised layers is not covered by the recipes' tests"
        yield "torch_compile", problem, f"set torch_compile: false, or {bits}: false"


def is_quantized_model(model: Any) -> bool:
    """Whether a loaded model (or the model inside a LoRA or Accelerate wrapper) has a quantised base."""
    inner = getattr(model, "module", model)  # DDP
    return bool(getattr(inner, "is_loaded_in_4bit", False) or getattr(inner, "is_loaded_in_8bit", False))


def bits_and_bytes_config(cfg: Any, new_modules: tuple[str, ...] = ()) -> Any:
    """The transformers BitsAndBytesConfig of the run's fields; None when the model loads unquantised.
    `new_modules`: modules the checkpoint does not hold (a new classification head), left unquantised: a
    layer quantised before its weights exist has no quantisation state, and the head trains in full."""
    if not quantized(vars(cfg)):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    skip = {"llm_int8_skip_modules": list(new_modules)} if new_modules else {}
    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        **skip,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, cfg.bnb_4bit_compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, cfg.bnb_4bit_quant_storage),
    )


def prepare_quantized(model: Any) -> Any:
    """A loaded quantised model made ready for adapters: peft's k-bit preparation (every weight frozen,
    16-bit weights that are not quantised cast up to fp32) without its activation checkpointing, which is
    reentrant and would need the inputs to require gradients; the recipes checkpoint non-reentrantly
    (core/model/pretrained.py).

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weight the first time it runs in eval
    mode without gradients (an inference kernel), rounding the blocks' scales to bf16 in place: evaluation
    would change the frozen base that training then uses (and the repacking fails on layers narrower than
    a quantisation block). Every 4-bit layer is kept on the kernel training uses.

    An 8-bit layer casts a product's float32 inputs to float16 to quantise them (LLM.int8), which
    bitsandbytes logs at every forward of every layer; the README says it once instead."""
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_without_int8_cast_notice)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def release_checkpoint_map(model: Any) -> None:
    """Give the weights that stay unquantised (embeddings, norms, a tied head) memory of their own, once
    a quantised model has loaded on a CPU. There they are views of the memory-mapped checkpoint, and the
    map keeps every page of it that quantisation read resident as long as one view lives: the full-
    precision matrices, 4 bytes per quantised weight in an fp32 checkpoint, counted in the process's
    resident set for the whole run. On a GPU the weights are copied to the device while loading."""
    import bitsandbytes as bnb
    import torch

    quantised = (bnb.nn.Params4bit, bnb.nn.Int8Params)
    with torch.no_grad():
        for param in model.parameters():  # a tied weight once
            if not isinstance(param, quantised):
                param.data = param.data.clone()
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.clone()


def _without_int8_cast_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")
