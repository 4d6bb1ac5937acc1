"""The trained model of an Accelerate recipe as output_dir/final: a from_pretrained directory."""

from __future__ import annotations

from typing import Any

from recipes.core.distributed.fsdp import full_state_dict, is_sharded
from recipes.core.model import lora


def save_final_model(accelerator: Any, model: Any, tokenizer: Any, cfg: Any, task: str) -> str:
    """Write output_dir/final (the weights gathered from every rank, or the LoRA adapter, as safetensors,
    with the tokenizer), and with merge_adapter output_dir/merged. Every rank calls it."""
    final_dir = f"{cfg.output_dir}/final"
    accelerator.wait_for_everyone()
    state_dict = full_state_dict(accelerator, model)  # gathers ZeRO-3 partitions and FSDP2 shards
    if accelerator.is_main_process or not is_sharded(model):  # FSDP2 gathers on the main process only
        accelerator.unwrap_model(model).save_pretrained(
            final_dir,
            state_dict=state_dict,
            is_main_process=accelerator.is_main_process,
            save_function=accelerator.save,
            safe_serialization=True,
        )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(final_dir)
    lora.merge_in_fresh_process(accelerator, model, cfg, final_dir, task)  # merge_adapter: merged/
    accelerator.wait_for_everyone()
    return final_dir
