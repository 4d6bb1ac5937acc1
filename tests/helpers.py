"""Tiny models, tokenizers and a launcher for the tests: everything built locally, nothing downloaded."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from recipes.core.launching import free_port, launch_command

REPO = Path(__file__).resolve().parent.parent
SFT_DATA = REPO / "recipes" / "data" / "sft_instructions"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Small configs of each decoder family the recipes support; sizes keep a CPU step in milliseconds.
TINY_DECODERS = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "llama_tied": dict(model_type="llama", tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False),
}


def make_chat_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the bundled SFT data, with a ChatML template."""
    texts = []
    for line in (SFT_DATA / "train.jsonl").read_text().splitlines():
        for turn in json.loads(line)["messages"]:
            texts.append(turn["content"])
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = __import__("tokenizers").decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    return fast


def make_tiny_decoder(
    directory: Path, family: str = "llama", seed: int = 0, num_layers: int = 2, attention_dropout: float = 0.0
) -> Path:
    """A randomly initialised decoder of `family` plus the test tokenizer, saved as a model directory."""
    directory = Path(directory)
    tokenizer = make_chat_tokenizer(directory)
    spec = dict(TINY_DECODERS[family])
    config = AutoConfig.for_model(
        spec.pop("model_type"),
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        attention_dropout=attention_dropout,
        **spec,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def launch(
    accelerate_config: str | None,
    script: str,
    args: list[str],
    num_processes: int | None = None,
    env: dict | None = None,
    timeout: int = 900,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run a recipe through the real `accelerate launch` (or plain python when no config is given)."""
    config = None if accelerate_config is None else str(REPO / accelerate_config)
    # A port of its own: tests may run next to other launches.
    cmd = launch_command(str(REPO / script), args, config, num_processes, port=free_port())
    full_env = {**os.environ, **offline_env(), **(env or {})}
    result = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result


def offline_env() -> dict:
    return {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def train_records(output_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(Path(output_dir) / "metrics.jsonl") if "loss" in r]


def eval_records(output_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(Path(output_dir) / "metrics.jsonl") if "eval_loss" in r]


def load_plan(output_dir: Path) -> dict:
    return json.loads((Path(output_dir) / "plan.json").read_text())


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), a.keys() ^ b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
