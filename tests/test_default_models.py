"""The default model is really SmolLM2-135M-Instruct after conversion, and preparing is idempotent."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipes.core.model.defaults import COMPLETE_MARKER, model_dir, prepare_model


def test_prepare_twice_reuses_the_converted_model():
    path = prepare_model("SmolLM2-135M-Instruct")
    weights = path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert prepare_model("SmolLM2-135M-Instruct") == path == model_dir("SmolLM2-135M-Instruct")
    assert weights.stat().st_mtime_ns == before
    assert (path / COMPLETE_MARKER).exists()


def test_converted_smollm2_answers_like_the_original():
    path = prepare_model("SmolLM2-135M-Instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip() == "The capital of France is Paris."


def test_minilm_is_a_plain_model_directory():
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(prepare_model("all-MiniLM-L6-v2"))
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 6, 384)
