"""Chat data for causal-LM fine-tuning: render with the tokenizer's chat template, train on assistant tokens.

Batches are padded (PadCollator) or padding-free (PackedCollator: the micro-batch's samples end to end in
one row, position ids restarting at each sample, which transformers turns into attention that stays
within each sample).

Assistant spans are found by rendering the conversation up to each assistant turn, so any chat template
works without `{% generation %}` markers; tokens are marked as targets through the tokenizer's character
offsets, never by comparing token ids with pad or eos.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from recipes.core.data import DataError

IGNORE_INDEX = -100


@dataclass
class TokenizeStats:
    samples: int = 0
    truncated: int = 0
    dropped_without_targets: int = 0

    def summary(self, max_seq_length: int) -> str:
        kept = self.samples - self.dropped_without_targets
        return (
            f"train samples: {kept} ({self.truncated} truncated to {max_seq_length} tokens, "
            f"{self.dropped_without_targets} dropped with no assistant token left)"
        )


def check_messages(messages: Any, row: int) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"row {row}: 'messages' must be a non-empty list of {{role, content}} dicts, got {messages!r:.120}"
        )
    for turn in messages:
        if not (
            isinstance(turn, dict)
            and isinstance(turn.get("role"), str)
            and isinstance(turn.get("content"), str)
        ):
            raise DataError(
                f"row {row}: every message needs string 'role' and 'content' keys, got {turn!r:.120}; "
                'format each turn as {"role": "user" | "assistant" | "system", "content": "..."}'
            )
    if not any(turn["role"] == "assistant" for turn in messages):
        raise DataError(f"row {row}: the conversation has no assistant turn, so there is nothing to train on")


def assistant_spans(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of every assistant reply in it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = (
            tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if i
            else ""
        )
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError(
                "the tokenizer's chat template renders a conversation differently from its prefixes, so the "
                "assistant tokens cannot be located; use a template that renders turns incrementally"
            )
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_conversation(
    tokenizer: Any, messages: list[dict], max_seq_length: int
) -> tuple[list[int], list[int], bool]:
    """input_ids, labels (IGNORE_INDEX outside assistant replies) and whether truncation happened."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [
        token if any(start <= first < end for start, end in spans) else IGNORE_INDEX
        for token, (first, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    truncated = len(ids) > max_seq_length
    return ids[:max_seq_length], labels[:max_seq_length], truncated


def tokenize_batch(
    batch: dict[str, list], indices: list[int], tokenizer: Any, max_seq_length: int, column: str
) -> dict:
    """datasets.map(batched=True) body: adds input_ids, labels, num_targets, truncated."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "num_targets": [], "truncated": []}
    for row, messages in zip(indices, batch[column], strict=True):
        check_messages(messages, row)
        ids, labels, truncated = tokenize_conversation(tokenizer, messages, max_seq_length)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["num_targets"].append(sum(label != IGNORE_INDEX for label in labels[1:]))
        out["truncated"].append(truncated)
    return out


def tokenize_dataset(
    data: Any, tokenizer: Any, max_seq_length: int, column: str = "messages"
) -> tuple[Any, TokenizeStats]:
    """Tokenise a split; samples whose targets were all truncated away are dropped and counted."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template, so chat data cannot be rendered; use an instruct/chat "
            "checkpoint or set tokenizer.chat_template before saving the tokenizer"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            "a fast tokenizer is needed to locate assistant tokens (offset mapping); load one with use_fast=True"
        )
    tokenized = data.map(
        tokenize_batch,
        batched=True,
        with_indices=True,
        remove_columns=data.column_names,
        fn_kwargs={"tokenizer": tokenizer, "max_seq_length": max_seq_length, "column": column},
        desc="Tokenizing",
    )
    stats = TokenizeStats(samples=len(tokenized), truncated=sum(tokenized["truncated"]))
    kept = tokenized.filter(lambda n: n > 0, input_columns="num_targets")
    stats.dropped_without_targets = len(tokenized) - len(kept)
    return kept.remove_columns("truncated"), stats


def _round_up(length: int, multiple: int | None) -> int:
    return length if not multiple else -(-length // multiple) * multiple


class PadCollator:
    """Right-pads a list of tokenised samples to the longest one (rounded up to a multiple of
    `pad_to_multiple_of`, so that shapes repeat); padding is never a target."""

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int | None = None):
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        width = _round_up(max(len(s["input_ids"]) for s in samples), self.pad_to_multiple_of)
        input_ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[i, :n] = torch.tensor(s["input_ids"])
            labels[i, :n] = torch.tensor(s["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PackedCollator:
    """Puts a list of tokenised samples end to end in one row, with no padding.

    Position ids restart at 0 for every sample; with no attention mask, transformers reads the restarts
    as sample boundaries and lets each token attend only within its own sample, so every token sees what
    it would see padded. The first label of each sample is never a target, as in a row of its own: no
    sample learns to predict the start of the next one.
    """

    def __init__(self, pad_token_id: int | None = None, pad_to_multiple_of: int | None = None):
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, labels, positions = [], [], []
        for s in samples:
            n = len(s["input_ids"])
            input_ids.extend(s["input_ids"])
            labels.extend([IGNORE_INDEX, *s["labels"][1:]])
            positions.extend(range(n))
        # Padding up to the multiple is one more sample of its own: never a target, attended by nothing else.
        padding = _round_up(len(input_ids), self.pad_to_multiple_of) - len(input_ids)
        input_ids.extend([self.pad_token_id] * padding)
        labels.extend([IGNORE_INDEX] * padding)
        positions.extend(range(padding))
        return {
            "input_ids": torch.tensor([input_ids]),
            "position_ids": torch.tensor([positions]),
            "labels": torch.tensor([labels]),
        }


def make_collator(
    packing: bool, pad_token_id: int | None, pad_to_multiple_of: int | None = None
) -> PadCollator | PackedCollator:
    collator = PackedCollator if packing else PadCollator
    return collator(pad_token_id, pad_to_multiple_of)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The model's keyword arguments for a batch of either collator. No KV cache is built in training;
    a cache would also stop transformers from reading packed position ids as sample boundaries."""
    return {**{k: v for k, v in batch.items() if k != "labels"}, "use_cache": False}
