"""`recipes generate` and the sampling code GRPO shares: greedy decoding is the argmax loop over the
model's own forward (left padding and the end-of-sequence cut included), a seed fixes what is sampled, an
adapter directory loads on its base, and prompt files that cannot be read are named."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_tiny_decoder
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipes.cli import main as recipes
from recipes.core.model.generation import Sampling, render_prompt, sample

PROMPTS = ["What is 12 + 9?", "Name a colour."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_decoder(tmp_path_factory.mktemp("generate"), "llama")


def greedy_loop(model, prompt_ids: list[int], eos: int, steps: int) -> list[int]:
    """Argmax of the last position, appended, until the end-of-sequence token or `steps` tokens."""
    ids = list(prompt_ids)
    for _ in range(steps):
        with torch.no_grad():
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        if token == eos:
            break
    return ids[len(prompt_ids) :]


def test_greedy_completions_are_the_argmax_loop_and_the_command_writes_them(model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rendered = [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    assert len(rendered[0]) != len(rendered[1])  # left padding is exercised
    expected = [greedy_loop(model, ids, tokenizer.eos_token_id, 12) for ids in rendered]
    done = sample(
        model,
        rendered,
        Sampling(max_completion_length=12, temperature=0),
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
    )
    assert done.ids == expected
    assert done.truncated == [tokenizer.eos_token_id not in ids for ids in expected]
    # A completion ends with its first end-of-sequence token: here one the first completion reaches.
    stop = expected[0][4]
    cut = [greedy_loop(model, ids, stop, 12) for ids in rendered]
    done = sample(
        model, rendered, Sampling(max_completion_length=12, temperature=0), tokenizer.pad_token_id, stop
    )
    assert done.ids == cut and len(cut[0]) <= 5 and done.truncated[0] is False
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", str(model_dir), "--max-new-tokens", "12", "--output", str(out)]
    assert recipes([*args, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [
        {
            "prompt": prompt,
            "generation": 0,
            "completion": tokenizer.decode(ids, skip_special_tokens=True),
            "tokens": len(ids),
            "truncated": tokenizer.eos_token_id not in ids,
        }
        for prompt, ids in zip(PROMPTS, expected, strict=True)
    ]


def test_a_seed_fixes_the_samples_and_each_prompt_gets_its_generations_in_order(model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))

    def completions(seed: int) -> list[dict]:
        out = tmp_path / f"seed{seed}.jsonl"
        args = ["generate", "--model", str(model_dir), "--prompts", str(prompts), "--output", str(out)]
        assert (
            recipes(
                [
                    *args,
                    "--temperature",
                    "1",
                    "--num-generations",
                    "3",
                    "--max-new-tokens",
                    "8",
                    "--seed",
                    str(seed),
                ]
            )
            == 0
        )
        return [json.loads(line) for line in out.read_text().splitlines()]

    first = completions(1)
    assert [(r["prompt"], r["generation"]) for r in first] == [(p, k) for p in PROMPTS for k in range(3)]
    assert completions(1) == first
    assert completions(2) != first


def test_an_adapter_directory_generates_on_its_base(model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B != 0
    adapted = get_peft_model(base, config)
    adapter_dir = tmp_path / "adapter"
    adapted.save_pretrained(adapter_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = render_prompt(tokenizer, [{"role": "user", "content": PROMPTS[0]}])
    merged = adapted.merge_and_unload().eval()
    expected = tokenizer.decode(
        greedy_loop(merged, prompt_ids, tokenizer.eos_token_id, 10), skip_special_tokens=True
    )
    plain = tokenizer.decode(
        greedy_loop(
            AutoModelForCausalLM.from_pretrained(model_dir).eval(), prompt_ids, tokenizer.eos_token_id, 10
        ),
        skip_special_tokens=True,
    )
    assert expected != plain  # the adapter changes what is generated
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", str(adapter_dir), "--prompt", PROMPTS[0], "--max-new-tokens", "10"]
    assert recipes([*args, "--output", str(out)]) == 0
    assert json.loads(out.read_text())["completion"] == expected


@pytest.mark.parametrize(
    "lines, message",
    [
        (None, '--prompts {path}: no such file; pass a JSONL file with one {{"prompt": ...}} per line'),
        (
            ['{"prompt": "hi"}', "{oops"],
            "{path}, line 2: not valid JSON (Expecting property name enclosed in double quotes); write one JSON object per line",
        ),
        (
            ['{"question": "hi"}'],
            '{path}, line 1: no "prompt" (text, or a list of chat turns); write e.g. {{"prompt": "What is 12 + 9?"}}',
        ),
    ],
)
def test_a_prompt_file_that_cannot_be_read_is_named_with_its_line(
    model_dir, tmp_path, capsys, lines, message
):
    path = tmp_path / "prompts.jsonl"
    if lines is not None:
        path.write_text("\n".join(lines) + "\n")
    assert recipes(["generate", "--model", str(model_dir), "--prompts", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {message.format(path=path)}\n"
