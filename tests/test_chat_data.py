"""Chat data: what the model is trained on, and what bad data is told."""

from __future__ import annotations

import copy
import filecmp
import json

import pytest
import torch
from helpers import SFT_DATA, make_chat_tokenizer

from recipes.core.data.chat import IGNORE_INDEX, PadCollator, tokenize_conversation
from recipes.core.data.loading import load_split, require_columns
from recipes.core.data.sft import load_sft_data
from recipes.core.errors import DataError
from recipes.data.generators.sft_instructions import write_sft_dataset
from recipes.sft import SFTConfig

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


def write_rows(path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_truncation_is_counted_and_samples_left_without_targets_are_dropped(tokenizer, tmp_path):
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    long_question = [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]
    data = write_rows(tmp_path / "chat.jsonl", [{"messages": m} for m in (short, long_question, short)])
    cfg = SFTConfig(dataset_name=str(data), eval_split=None, max_seq_length=20)
    tokenized, _, report = load_sft_data(cfg, tokenizer)
    [part] = report.train
    assert (part.rows, part.truncated, part.no_targets, part.dropped, part.samples) == (3, 1, 1, 0, 2)
    assert report.train_samples == len(tokenized) == 2
    assert all(len(ids) <= 20 for ids in tokenized["input_ids"])
    assert tokenized["num_targets"] == [
        sum(label != IGNORE_INDEX for label in labels[1:]) for labels in tokenized["labels"]
    ]
    assert "train samples: 2 (1 truncated to 20 tokens, 1 dropped with nothing to train on)" in (
        report.summary(20)
    )


def test_tokenizer_without_chat_template_is_rejected(tokenizer, tmp_path):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = None
    data = write_rows(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(DataError, match="the tokenizer has no chat template"):
        load_sft_data(SFTConfig(dataset_name=str(data), eval_split=None), tokenizer)


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
    assert single.data[0] == json.loads((SFT_DATA / "validation.jsonl").read_text().splitlines()[0])
    with pytest.raises(DataError, match=r"has no split 'test'; it has \['train', 'validation'\]"):
        load_split(str(SFT_DATA), "test")
    with pytest.raises(DataError, match=r"has no column 'text'; its columns are \['messages'\]"):
        require_columns(train, ["text"], "split 'train'")
    (tmp_path / "data.xlsx").write_text("")
    with pytest.raises(
        DataError, match=r"cannot read .*data.xlsx: use one of .arrow, .csv, .json, .jsonl, .parquet, .txt"
    ):
        load_split(str(tmp_path / "data.xlsx"), "train")


def test_bundled_sft_data_is_exactly_what_the_generator_writes(tmp_path):
    write_sft_dataset(tmp_path)
    for split in ("train", "validation"):
        assert filecmp.cmp(tmp_path / f"{split}.jsonl", SFT_DATA / f"{split}.jsonl", shallow=False)
