"""`recipes generate`: try what a run trained. Loads a model directory (a run's final/ or merged/, a
pretrained model, or a LoRA adapter, which loads on the base its adapter_config.json names), renders each
prompt with the tokenizer's chat template (text prompts become one user turn, unless --raw), samples with
the generation code GRPO uses (core/model/generation.py) and prints the completions or writes JSONL:
{"prompt", "generation", "completion", "tokens", "truncated"} per completion."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from recipes.core.config import ConfigError
from recipes.core.errors import DataError
from recipes.core.model.generation import Sampling, render_prompt, sample
from recipes.core.model.source import require_model


def read_prompts(args: argparse.Namespace) -> list[str | list[dict]]:
    """--prompt values, then the "prompt" of every line of --prompts."""
    prompts: list[str | list[dict]] = list(args.prompt or [])
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise DataError(
                f'--prompts {path}: no such file; pass a JSONL file with one {{"prompt": ...}} per line'
            )
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}, line {number}: not valid JSON ({err.msg}); write one JSON object per line"
                ) from None
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not isinstance(prompt, str | list) or not prompt:
                raise DataError(
                    f'{path}, line {number}: no "prompt" (text, or a list of chat turns); write e.g. '
                    '{"prompt": "What is 12 + 9?"}'
                )
            prompts.append(prompt)
    if not prompts:
        raise ConfigError(
            "no prompt to generate from; pass --prompt TEXT (repeatable) or --prompts FILE.jsonl"
        )
    return prompts


def load_model(directory: str) -> tuple[Any, Any]:
    """The model and tokenizer of a directory; a LoRA adapter loads on its base model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_config = Path(directory) / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftModel

        base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        require_model(base, field="the adapter's base_model_name_or_path")
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), directory
        )
    else:
        require_model(directory, field="--model")
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(directory)


def generate(args: argparse.Namespace) -> int:
    from accelerate.utils import set_seed

    prompts = read_prompts(args)
    model, tokenizer = load_model(args.model)
    chat = bool(getattr(tokenizer, "chat_template", None)) and not args.raw
    as_turns = [[{"role": "user", "content": p}] if chat and isinstance(p, str) else p for p in prompts]
    if not chat and any(isinstance(p, list) for p in prompts):
        raise DataError(
            f"the tokenizer of {args.model} has no chat template to render chat-turn prompts with"
        )
    sampling = Sampling(args.num_generations, args.max_new_tokens, args.temperature, args.top_p, args.top_k)
    set_seed(args.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    completions = sample(
        model, [render_prompt(tokenizer, p) for p in as_turns], sampling, pad, tokenizer.eos_token_id
    )
    rows = [
        {
            "prompt": prompts[k // sampling.num_generations],
            "generation": k % sampling.num_generations,
            "completion": tokenizer.decode(ids, skip_special_tokens=True),
            "tokens": len(ids),
            "truncated": truncated,
        }
        for k, (ids, truncated) in enumerate(zip(completions.ids, completions.truncated, strict=True))
    ]
    if args.output:
        Path(args.output).write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"{len(rows)} completions written to {args.output}", file=sys.stderr)
    else:
        for row in rows:
            print(row["completion"])
    return 0
