"""LoRA adapters (peft): which layers get one, what trains, and what a LoRA run saves.

With `use_peft: true` the pretrained weights stay frozen and bit-identical; only the low-rank adapters
(and `modules_to_save`, e.g. a new classification head) train. The run saves the adapter in peft's format
to output_dir/final/ and, with `merge_adapter: true`, a plain merged model to output_dir/merged/ that
transformers loads without peft.

The merge runs in a fresh process that reads the pretrained model and the saved adapter: under ZeRO-3,
`from_pretrained` inside a training process enters `zero.Init`, a collective that hangs unless every rank
calls it, and the same path then serves every topology. An adapter trained on a quantised base (QLoRA) is
merged into the base loaded unquantised in the compute dtype (bnb_4bit_compute_dtype), as peft advises:
merged into the quantised layers it would be rounded to their 4 or 8 bits.

    python -m recipes.core.model.lora ADAPTER_DIR MERGED_DIR --base MODEL --task causal-lm [--dtype float32] \
        [--model-kwargs JSON]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from recipes.core.config import ConfigError

CAUSAL_LM, SEQUENCE_CLASSIFICATION = "causal-lm", "sequence-classification"

_DECODER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_BERT_LIKE = ["query", "key", "value", "dense"]  # attention, attention output, intermediate, output, pooler
# model_type -> Linear layer names that get an adapter: every projection of attention and MLP.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
}
# Top-level modules a sequence-classification model adds on top of the pretrained body: newly
# initialised, so they train in full (BERT: classifier; DistilBERT: pre_classifier too; decoders: score).
HEAD_MODULES = ("pre_classifier", "classifier", "score")


def target_modules(model_type: str, configured: list[str]) -> list[str]:
    """The configured lora_target_modules, else the default of the architecture."""
    if configured:
        return list(configured)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ConfigError(
            f"no default LoRA target modules for model type {model_type!r} (known: "
            f"{', '.join(sorted(DEFAULT_TARGET_MODULES))}); set lora_target_modules to the names of its "
            "Linear layers, e.g. [q_proj, v_proj]"
        )
    return list(DEFAULT_TARGET_MODULES[model_type])


def modules_to_save(model: torch.nn.Module, task: str, configured: list[str]) -> list[str]:
    """The configured modules_to_save, else the classification head of a sequence-classification model."""
    if configured or task != SEQUENCE_CLASSIFICATION:
        return list(configured)
    return [name for name, _ in model.named_children() if name in HEAD_MODULES]


def apply_lora(model: torch.nn.Module, cfg: Any, task: str) -> torch.nn.Module:
    """Wrap `model` in LoRA adapters when cfg.use_peft is set; otherwise return it unchanged."""
    if not cfg.use_peft:
        if cfg.merge_adapter:
            raise ConfigError("merge_adapter: true needs use_peft: true (there is no adapter to merge)")
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    lora_config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_modules(model.config.model_type, cfg.lora_target_modules),
        modules_to_save=modules_to_save(model, task, cfg.modules_to_save) or None,
        task_type=TaskType.CAUSAL_LM if task == CAUSAL_LM else TaskType.SEQ_CLS,
    )
    try:
        return get_peft_model(model, lora_config)
    except ValueError as err:  # peft names the target modules it could not find
        raise ConfigError(f"LoRA cannot be applied: {err}; fix lora_target_modules") from None


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; counted whole even when ZeRO-3 has already partitioned them, and a
    4-bit weight as the values it holds (it packs two or more into each element of its storage)."""
    trainable = total = 0
    for param in model.parameters():
        quant_state = getattr(param, "quant_state", None)
        numel = getattr(param, "ds_numel", None) or (
            math.prod(quant_state.shape) if quant_state is not None else param.numel()
        )
        total += numel
        trainable += numel if param.requires_grad else 0
    return trainable, total


def parameter_fields(model: torch.nn.Module, log: Any = print) -> dict[str, int]:
    """Print the trainable and total parameter counts; returns them as the plan's fields."""
    trainable, total = parameter_counts(model)
    log(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.4g}%)")
    return {"trainable_parameters": trainable, "total_parameters": total}


def planned_parameter_fields(cfg: Any, task: str, **model_kwargs: Any) -> dict[str, int]:
    """The counts a run of `cfg` will report (as plan fields), from the model config alone (weights are
    not read); empty when the model config cannot be read."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code, **model_kwargs
        )
    except (OSError, ValueError):
        return {}
    with torch.device("meta"):
        model = _auto_class(task).from_config(config, trust_remote_code=cfg.trust_remote_code)
        model = apply_lora(model, cfg, task)
    trainable, total = parameter_counts(model)
    return {"trainable_parameters": trainable, "total_parameters": total}


def merge_in_fresh_process(accelerator: Any, model: Any, cfg: Any, adapter_dir: str, task: str) -> str | None:
    """With merge_adapter, write output_dir/merged/ from the saved adapter; returns its path.

    Call after the adapter is saved, on every rank: the main process merges, the others wait.
    """
    if not (cfg.use_peft and cfg.merge_adapter):
        return None
    merged_dir = f"{cfg.output_dir}/merged"
    model_kwargs = {}
    if task == SEQUENCE_CLASSIFICATION:  # the trained head's classes, in the merged model's config too
        config = accelerator.unwrap_model(model).config
        model_kwargs = {"id2label": config.id2label, "label2id": config.label2id}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        cmd = [sys.executable, "-m", "recipes.core.model.lora", adapter_dir, merged_dir, "--task", task]
        cmd += ["--base", cfg.model_name_or_path, "--model-kwargs", json.dumps(model_kwargs)]
        cmd += ["--dtype", merge_dtype(cfg)]
        if cfg.trust_remote_code:
            cmd.append("--trust-remote-code")
        # A clean environment: nothing of the launcher's process group or DeepSpeed setup.
        launcher = ("ACCELERATE_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "LOCAL_WORLD_SIZE")
        env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"merging the adapter failed:\n{result.stdout}\n{result.stderr}")
    accelerator.wait_for_everyone()
    return merged_dir


def merge_dtype(cfg: Any) -> str:
    """The dtype the merged model is written in: the compute dtype of a 4-bit base, else fp32 (the masters'
    dtype; an 8-bit base computes in its inputs' dtype)."""
    return cfg.bnb_4bit_compute_dtype if cfg.load_in_4bit else "float32"


def merge_adapter(
    adapter_dir: str,
    merged_dir: str,
    base: str,
    task: str,
    model_kwargs: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    dtype: str = "float32",
) -> None:
    """Load the pretrained model (unquantised, in `dtype`) plus the adapter, fold the adapter in, save a
    plain model (+ tokenizer)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    model = _auto_class(task).from_pretrained(
        base,
        dtype=getattr(torch, dtype),
        trust_remote_code=trust_remote_code,
        **({"ignore_mismatched_sizes": True} if task == SEQUENCE_CLASSIFICATION else {}),
        **(model_kwargs or {}),
    )
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(merged_dir, safe_serialization=True)
    if (Path(adapter_dir) / "tokenizer_config.json").exists():
        AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code).save_pretrained(
            merged_dir
        )


def _auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == CAUSAL_LM else AutoModelForSequenceClassification


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="merge a saved LoRA adapter into its base model")
    parser.add_argument("adapter_dir")
    parser.add_argument("merged_dir")
    parser.add_argument("--base", required=True, help="the pretrained model the adapter was trained on")
    parser.add_argument("--task", choices=[CAUSAL_LM, SEQUENCE_CLASSIFICATION], default=CAUSAL_LM)
    parser.add_argument("--model-kwargs", default="{}", help="JSON: config values, e.g. num_labels")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    merge_adapter(
        args.adapter_dir,
        args.merged_dir,
        args.base,
        args.task,
        json.loads(args.model_kwargs),
        args.trust_remote_code,
        args.dtype,
    )


if __name__ == "__main__":
    main()
