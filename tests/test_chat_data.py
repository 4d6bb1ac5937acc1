"""Chat data: what the model is trained on, and what bad data is told."""

from __future__ import annotations

import copy
import filecmp
import json

import datasets
import pytest
import torch
from helpers import SFT_DATA, make_chat_tokenizer

from recipes.core.bundled_data import write_sft_dataset
from recipes.core.chat import IGNORE_INDEX, PadCollator, tokenize_conversation, tokenize_dataset
from recipes.core.data import DataError, load_split, require_columns

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And the capital of Peru?"},
    {"role": "assistant", "content": "The capital of Peru is Lima."},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_chat_tokenizer(tmp_path_factory.mktemp("tok"))


def test_only_assistant_replies_and_their_end_markers_are_targets(tokenizer):
    ids, labels, truncated = tokenize_conversation(tokenizer, CONVERSATION, 512)
    assert not truncated and len(ids) == len(labels)
    assert (
        ids
        == tokenizer(tokenizer.apply_chat_template(CONVERSATION, tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]
    )
    targets = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert targets == "2 + 2 = 4.<|im_end|>\nThe capital of Peru is Lima.<|im_end|>\n"
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))


def test_truncation_is_counted_and_samples_left_without_targets_are_dropped(tokenizer):
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    long_question = [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]
    data = datasets.Dataset.from_dict({"messages": [short, long_question, short]})
    tokenized, stats = tokenize_dataset(data, tokenizer, max_seq_length=20)
    assert (stats.samples, stats.truncated, stats.dropped_without_targets) == (3, 1, 1)
    assert len(tokenized) == 2
    assert all(len(ids) <= 20 for ids in tokenized["input_ids"])
    assert tokenized["num_targets"] == [
        sum(label != IGNORE_INDEX for label in labels[1:]) for labels in tokenized["labels"]
    ]


@pytest.mark.parametrize(
    "messages,message",
    [
        ("just text", "row 0: 'messages' must be a non-empty list"),
        ([{"role": "user", "text": "hi"}], "row 0: every message needs string 'role' and 'content' keys"),
        ([{"role": "user", "content": "hi"}], "row 0: the conversation has no assistant turn"),
    ],
)
def test_malformed_messages_are_rejected_with_the_row(tokenizer, messages, message):
    data = datasets.Dataset.from_dict({"messages": [messages]})
    with pytest.raises(DataError, match=message):
        tokenize_dataset(data, tokenizer, 64)


def test_tokenizer_without_chat_template_is_rejected(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = None
    data = datasets.Dataset.from_dict({"messages": [CONVERSATION]})
    with pytest.raises(DataError, match="the tokenizer has no chat template"):
        tokenize_dataset(data, tokenizer, 64)


def test_padding_is_never_a_target_and_never_attended():
    collate = PadCollator(pad_token_id=None)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def test_dataset_directory_file_and_missing_split_resolve_like_load_dataset(tmp_path):
    train = load_split(str(SFT_DATA), "train")
    assert len(train) == len((SFT_DATA / "train.jsonl").read_text().splitlines())
    single = load_split(str(SFT_DATA / "validation.jsonl"), "train")
    assert single[0] == json.loads((SFT_DATA / "validation.jsonl").read_text().splitlines()[0])
    with pytest.raises(DataError, match=r"has no split 'test'; it has \['train', 'validation'\]"):
        load_split(str(SFT_DATA), "test")
    with pytest.raises(DataError, match=r"has no column 'text'; its columns are \['messages'\]"):
        require_columns(train, ["text"], "split 'train'")
    (tmp_path / "data.xlsx").write_text("")
    with pytest.raises(
        DataError, match=r"cannot read .*data.xlsx: use one of .csv, .json, .jsonl, .parquet, .txt"
    ):
        load_split(str(tmp_path / "data.xlsx"), "train")


def test_bundled_sft_data_is_exactly_what_the_generator_writes(tmp_path):
    write_sft_dataset(tmp_path)
    for split in ("train", "validation"):
        assert filecmp.cmp(tmp_path / f"{split}.jsonl", SFT_DATA / f"{split}.jsonl", shallow=False)
