"""Preference data for the DPO recipe: the three forms read into the same tokens, only completion tokens are
targets, truncation as documented, pairs with no preference dropped and counted, bad rows named; the
bundled preference dataset is what its generator writes; the per-pair log-probabilities the recipe trains
on are those of a direct computation."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
import torch
from helpers import EXAMPLES, REPO, float32_tolerance, forward_terms, read_jsonl, write_csv, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipes.core.config import parse_config
from recipes.core.data.chat import IGNORE_INDEX
from recipes.core.data.preferences import IMPLICIT, STANDARD, PairCollator, load_preference_data
from recipes.core.errors import DataError
from recipes.core.losses.causal_lm import CausalLMLoss
from recipes.core.losses.dpo import chosen_and_rejected
from recipes.core.losses.reference import sequence_logps
from recipes.data.generators.preferences import PREFERENCE_DIR, write_preference_dataset
from recipes.dpo import DPOConfig, plan_data

DPO_CONFIG = "recipes/configs/dpo_smollm2.yaml"


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def config(data: Path, *extra: str) -> DPOConfig:
    args = ["--config", DPO_CONFIG, "--dataset_name", str(data), "--eval_split", "null"]
    return parse_config(DPOConfig, [*args, "--max_train_samples", "1000", *extra])


def pairs(data: Path, tokenizer, *extra: str):
    train_set, _, report = load_preference_data(config(data, *extra), tokenizer)
    return train_set, report.train


def chat_text(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def expected_chat_pair(tokenizer, prompt: list[dict], reply: list[dict]) -> tuple[list[int], list[int]]:
    """A conversational sequence built by hand: the prompt rendered up to the assistant's generation prompt,
    then the rest of the conversation, all of it a target (one assistant turn)."""
    prompt_text = chat_text(tokenizer, prompt, generation_prompt=True)
    full = chat_text(tokenizer, prompt + reply)
    assert full.startswith(prompt_text)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(full[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    return prompt_ids + reply_ids, [IGNORE_INDEX] * len(prompt_ids) + reply_ids


def test_standard_pairs_share_the_prompt_tokens_and_train_on_the_completion_and_eos(tokenizer):
    train_set, part = pairs(EXAMPLES / "preference.jsonl", tokenizer)
    rows = read_jsonl(EXAMPLES / "preference.jsonl")
    assert (part.form, part.rows, part.pairs, part.truncated) == (STANDARD, len(rows), len(rows), 0)
    for row, pair in zip(rows, train_set, strict=True):
        prompt = tokenizer(row["prompt"])["input_ids"]
        for side in ("chosen", "rejected"):
            completion = [
                *tokenizer(row[side], add_special_tokens=False)["input_ids"],
                tokenizer.eos_token_id,
            ]
            assert pair[f"{side}_input_ids"] == prompt + completion
            assert pair[f"{side}_labels"] == [IGNORE_INDEX] * len(prompt) + completion
        assert pair["num_targets"] == len(pair["chosen_input_ids"]) + len(
            pair["rejected_input_ids"]
        ) - 2 * len(prompt)


def test_conversational_pairs_render_the_chat_template_and_train_on_the_reply_only(tokenizer):
    train_set, part = pairs(EXAMPLES / "preference_chat.jsonl", tokenizer)
    rows = read_jsonl(EXAMPLES / "preference_chat.jsonl")
    assert (part.form, part.pairs) == ("conversational", len(rows))
    for row, pair in zip(rows, train_set, strict=True):
        for side in ("chosen", "rejected"):
            ids, labels = expected_chat_pair(tokenizer, row["prompt"], row[side])
            assert (pair[f"{side}_input_ids"], pair[f"{side}_labels"]) == (ids, labels)


def test_implicit_prompt_is_the_turns_chosen_and_rejected_share(tokenizer, tmp_path):
    rows = read_jsonl(EXAMPLES / "preference_implicit.jsonl")
    explicit = []
    for row in rows:
        shared = len(row["chosen"]) - 1  # every example differs in its last reply only
        assert row["chosen"][:shared] == row["rejected"][:shared]
        explicit.append(
            {
                "prompt": row["chosen"][:shared],
                "chosen": row["chosen"][shared:],
                "rejected": row["rejected"][shared:],
            }
        )
    implicit_set, part = pairs(EXAMPLES / "preference_implicit.jsonl", tokenizer)
    explicit_set, _ = pairs(write_jsonl(tmp_path / "explicit.jsonl", explicit), tokenizer)
    assert part.form == IMPLICIT
    assert implicit_set.to_list() == explicit_set.to_list()
    # A reply of several turns: its assistant turns are targets, its user turn is not.
    prompt, reply = explicit[0]["prompt"], explicit[0]["chosen"]
    longer = [*reply, {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
    data = write_jsonl(
        tmp_path / "multi.jsonl", [{"chosen": prompt + longer, "rejected": prompt + explicit[0]["rejected"]}]
    )
    [pair], _ = pairs(data, tokenizer)
    first = chat_text(tokenizer, prompt + longer[:1])[len(chat_text(tokenizer, prompt, True)) :]
    second = chat_text(tokenizer, prompt + longer)[len(chat_text(tokenizer, prompt + longer[:2], True)) :]
    assert tokenizer.decode([t for t in pair["chosen_labels"] if t != IGNORE_INDEX]) == first + second


def test_dataset_columns_name_the_fields(tokenizer, tmp_path):
    rows = [
        {"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}
        for r in read_jsonl(EXAMPLES / "preference.jsonl")
    ]
    renamed, _ = pairs(
        write_jsonl(tmp_path / "renamed.jsonl", rows),
        tokenizer,
        "--dataset_columns",
        "{prompt: question, chosen: good, rejected: bad}",
    )
    original, _ = pairs(EXAMPLES / "preference.jsonl", tokenizer)
    assert renamed.to_list() == original.to_list()


def test_long_prompts_keep_their_end_and_long_completions_are_cut_at_max_length(tokenizer):
    full, _ = pairs(EXAMPLES / "preference.jsonl", tokenizer)
    cut, part = pairs(
        EXAMPLES / "preference.jsonl", tokenizer, "--max_prompt_length", "4", "--max_length", "9"
    )
    assert part.truncated == part.rows  # every prompt is longer than 4 tokens
    expected = []  # each pair cut by hand: the prompt's last 4 tokens, the completion's first 5
    for whole in full:
        prompt_length = whole["chosen_labels"].count(IGNORE_INDEX)  # standard form: the prompt's labels only
        pair = {}
        for side in ("chosen", "rejected"):
            ids, labels = whole[f"{side}_input_ids"], whole[f"{side}_labels"]
            pair[f"{side}_input_ids"] = ids[prompt_length - 4 : prompt_length] + ids[prompt_length:][:5]
            pair[f"{side}_labels"] = [IGNORE_INDEX] * 4 + labels[prompt_length:][:5]
        if pair["chosen_input_ids"] != pair["rejected_input_ids"]:  # else the cut made a tie: dropped
            expected.append(pair)
    assert part.dropped["truncated_tie"] == len(full) - len(expected)
    assert [{key: pair[key] for key in expected[0]} for pair in cut] == expected


def test_ties_and_empty_replies_are_dropped_and_counted(tokenizer, tmp_path):
    rows = read_jsonl(EXAMPLES / "preference.jsonl")
    rows[1]["rejected"] = rows[1]["chosen"]  # a tie
    rows[4]["chosen"] = "  "  # an empty reply
    train_set, part = pairs(write_jsonl(tmp_path / "data.jsonl", rows), tokenizer)
    dropped = {"tie": 1, "empty": 1, "truncated_tie": 0}
    assert (part.rows, part.pairs, part.dropped) == (len(rows), len(rows) - 2, dropped)
    assert len(train_set) == len(rows) - 2
    line = part.line("train", 512, 1024)
    assert f"{len(rows)} rows: {len(rows) - 2} kept, 0 truncated" in line
    assert "1 dropped (chosen identical to rejected), 1 dropped (empty chosen or rejected reply)" in line


def test_pairs_that_truncation_makes_identical_are_dropped_counted_and_recorded_in_the_plan(
    tokenizer, tmp_path
):
    """With 3 completion tokens left, replies that share their first words become the same tokens; replies
    that differ from their first word stay pairs."""
    prompt = "Question: " + "Please answer the question below in one short sentence. " * 3 + "\nAnswer:"
    same_start = {"chosen": " The capital of France is Paris.", "rejected": " The capital of France is Lyon."}
    different = {"chosen": " Yes, it is.", "rejected": " No, it is not."}
    rows = [{"prompt": prompt, **(same_start if i % 3 == 0 else different)} for i in range(8)]  # 3 same
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    lengths = ("--max_prompt_length", "15", "--max_length", "18")
    train_set, part = pairs(data, tokenizer, *lengths)
    assert (part.rows, part.pairs, part.truncated) == (8, 5, 8)
    assert part.dropped == {"tie": 0, "empty": 0, "truncated_tie": 3}
    assert all(pair["chosen_input_ids"] != pair["rejected_input_ids"] for pair in train_set)
    assert part.line("train", 15, 18).endswith(
        "8 rows: 5 kept, 8 truncated (prompt to 15, each sequence to 18 tokens), 0 dropped (chosen identical "
        "to rejected), 0 dropped (empty chosen or rejected reply), 3 dropped (chosen identical to rejected "
        "after truncation)"
    )
    _, record = plan_data(config(data, *lengths), lambda: tokenizer)  # what plan.json's data holds
    assert (record["train_pairs"], record["train"]["dropped"]["truncated_tie"]) == (5, 3)

    only_same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": prompt, **same_start}] * 4)
    with pytest.raises(DataError) as err:
        pairs(only_same, tokenizer, *lengths)
    assert str(err.value) == (
        f"none of the 4 rows of split 'train' of {only_same} is a usable preference pair (0 chosen identical to "
        "rejected, 0 empty chosen or rejected reply, 4 chosen identical to rejected after truncation); "
        "truncation to max_prompt_length 15 and max_length 18 cut every completion before chosen and rejected "
        "differ: raise max_length, or lower max_prompt_length, so that the completions keep more tokens"
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda rows: [{k: v for k, v in r.items() if k != "rejected"} for r in rows],
            r"has no column 'rejected'; its columns are \['prompt', 'chosen'\]\. Preference data needs chosen "
            r"and rejected .* name them with dataset_columns",
        ),
        (
            lambda rows: [{**r, "rejected": None} if i == 3 else r for i, r in enumerate(rows)],
            r"data.jsonl \(split 'train'\), line 4 \(row 3\), column 'rejected': must be a string like the first "
            r"row's prompt \(standard form\), got no value \(a missing key, a null or an empty cell\); write "
            r"prompt, chosen and rejected as strings",
        ),
        (
            lambda rows: [
                {k: v for k, v in r.items() if k != "rejected" or i != 3} for i, r in enumerate(rows)
            ],
            r"data.jsonl \(split 'train'\), line 4 \(row 3\), column 'rejected': must be a string like the first "
            r"row's prompt \(standard form\), got no value \(a missing key, a null or an empty cell\)",
        ),
        (
            lambda rows: [
                {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows
            ],
            r"has chosen and rejected texts but no column 'prompt': .* add a prompt column",
        ),
        (
            lambda rows: [{**r, "rejected": r["chosen"]} for r in rows],
            r"none of the 8 rows of split 'train' of .*data.jsonl is a usable preference pair \(8 chosen identical "
            r"to rejected, 0 empty chosen or rejected reply, 0 chosen identical to rejected after truncation\); "
            r"check the chosen and rejected columns$",
        ),
    ],
    ids=["missing column", "null", "missing key", "strings without prompt", "all ties"],
)
def test_bad_preference_data_is_an_error_naming_the_problem(tokenizer, tmp_path, change, message):
    data = write_jsonl(tmp_path / "data.jsonl", change(read_jsonl(EXAMPLES / "preference.jsonl")))
    with pytest.raises(DataError, match=message):
        pairs(data, tokenizer)


@pytest.mark.parametrize(
    "example, column", [("preference_chat", "prompt"), ("preference_implicit", "chosen")]
)
def test_message_lists_written_as_json_strings_in_a_csv_are_refused_as_sft_refuses_them(
    tokenizer, tmp_path, example, column
):
    data = write_csv(tmp_path / "pairs.csv", read_jsonl(EXAMPLES / f"{example}.jsonl"))
    with pytest.raises(DataError) as err:
        pairs(data, tokenizer)
    assert str(err.value) == (
        f"{data} (split 'train'), row 0, column '{column}': holds a message list written as a JSON string "
        "(as a CSV cell holds one), which would be read as text, not as messages; store message lists as "
        "lists: write the data as JSON Lines or Parquet"
    )
    # A later row too, where the first row is a plain string (standard form).
    rows = read_jsonl(EXAMPLES / "preference.jsonl")
    rows[5]["rejected"] = json.dumps([{"role": "assistant", "content": "No."}])
    with pytest.raises(DataError, match=r"line 6 \(row 5\), column 'rejected': holds a message list written"):
        pairs(write_jsonl(tmp_path / "standard.jsonl", rows), tokenizer)


def test_a_reply_that_does_not_begin_with_the_assistant_is_an_error_naming_the_row(tokenizer, tmp_path):
    rows = read_jsonl(EXAMPLES / "preference_chat.jsonl")
    rows[2]["chosen"] = [{"role": "user", "content": "again?"}, *rows[2]["chosen"]]
    with pytest.raises(
        DataError,
        match=r"line 3 \(row 2\), column 'chosen': the reply begins with a user turn; a completion is the "
        r"assistant's reply; begin it with an assistant turn \(the turns before it belong in prompt\)",
    ):
        pairs(write_jsonl(tmp_path / "data.jsonl", rows), tokenizer)
    rows = read_jsonl(EXAMPLES / "preference_implicit.jsonl")
    rows[0]["rejected"][1]["content"] = (
        "What is the capital of Spain?"  # the conversations differ at the user turn
    )
    with pytest.raises(
        DataError,
        match=r"line 1 \(row 0\), column 'chosen': chosen and rejected differ from turn 1 on, which is a user",
    ):
        pairs(write_jsonl(tmp_path / "data.jsonl", rows), tokenizer)


def test_bundled_preference_data_is_exactly_what_the_generator_writes(tmp_path):
    write_preference_dataset(tmp_path)
    for split in ("train", "validation"):
        assert filecmp.cmp(tmp_path / f"{split}.jsonl", PREFERENCE_DIR / f"{split}.jsonl", shallow=False)
        rows = read_jsonl(PREFERENCE_DIR / f"{split}.jsonl")
        sft = read_jsonl(REPO / "recipes" / "data" / "sft_instructions" / f"{split}.jsonl")
        assert [r["prompt"] + r["chosen"] for r in rows] == [s["messages"] for s in sft]
        assert all(r["chosen"] != r["rejected"] for r in rows)


@pytest.mark.parametrize("chunk_tokens", [0, 3])
@pytest.mark.parametrize("name", ["preference.jsonl", "preference_chat.jsonl"])
def test_pair_log_probabilities_are_the_summed_log_probabilities_of_the_completion_tokens(
    tiny_llama, tokenizer, name, chunk_tokens
):
    """Padded batches of pairs: each sequence's value equals a direct computation on that sequence alone
    (no padding), summing log-softmax over the completion tokens only, located independently."""
    rows = read_jsonl(EXAMPLES / name)[:3]
    train_set, _ = pairs(EXAMPLES / name, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    batch = PairCollator(tokenizer.pad_token_id)([train_set[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 6 and (batch["attention_mask"] == 0).any()  # padded
    with torch.no_grad():
        chosen, rejected = chosen_and_rejected(
            sequence_logps(model, CausalLMLoss(model, chunk_tokens), batch)
        )
    for i, row in enumerate(rows):
        for side, value in (("chosen", chosen[i]), ("rejected", rejected[i])):
            if isinstance(row["prompt"], str):
                prompt = tokenizer(row["prompt"])["input_ids"]
                completion = [
                    *tokenizer(row[side], add_special_tokens=False)["input_ids"],
                    tokenizer.eos_token_id,
                ]
            else:
                ids, labels = expected_chat_pair(tokenizer, row["prompt"], row[side])
                prompt, completion = ids[: labels.count(IGNORE_INDEX)], ids[labels.count(IGNORE_INDEX) :]
            ids = torch.tensor([prompt + completion])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0].float()
            log_probs = logits.log_softmax(-1)
            direct = sum(log_probs[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.shape[1]))
            # Padded, the forward adds in another order: each completion token's log-probability moves by
            # at most twice its logits' rounding plus that of the log-softmax's sum over the vocabulary, and
            # the sum over the tokens adds its own.
            terms = forward_terms(model.config, batch["input_ids"].shape[1])
            logits_rounding = float32_tolerance(terms, logits.abs().max().item())
            per_token = 2 * logits_rounding + float32_tolerance(model.config.vocab_size, 1.0)
            tokens = len(completion)
            tolerance = tokens * per_token + float32_tolerance(tokens, abs(direct))
            assert abs(value.item() - direct) <= tolerance, (side, i, value.item(), direct)


def test_precomputed_reference_values_travel_with_each_pair_in_batch_order():
    pairs_ = [
        {"chosen_input_ids": [1, 2], "chosen_labels": [-100, 2], "rejected_input_ids": [1, 3, 4],
         "rejected_labels": [-100, 3, 4], "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.5},
        {"chosen_input_ids": [5], "chosen_labels": [5], "rejected_input_ids": [6, 7],
         "rejected_labels": [-100, 7], "ref_chosen_logps": -3.25, "ref_rejected_logps": -4.0},
    ]  # fmt: skip
    batch = PairCollator(pad_token_id=0)(pairs_)
    assert batch["input_ids"].tolist() == [[1, 2, 0], [5, 0, 0], [1, 3, 4], [6, 7, 0]]
    assert batch["labels"].tolist() == [[-100, 2, -100], [5, -100, -100], [-100, 3, 4], [-100, 7, -100]]
    assert batch["ref_logps"].tolist() == [-1.5, -3.25, -2.5, -4.0]
    assert json.dumps(batch["attention_mask"].tolist()) == "[[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]"
