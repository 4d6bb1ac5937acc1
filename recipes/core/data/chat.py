"""Chat data for causal-LM fine-tuning: render with the tokenizer's chat template, train on assistant tokens.

Batches are padded (PadCollator) or padding-free (PackedCollator: the micro-batch's samples end to end in
one row, position ids restarting at each sample, which transformers turns into attention that stays
within each sample).

Assistant spans are found by rendering the conversation up to each assistant turn, so any chat template
works without `{% generation %}` markers; tokens are marked as targets through the tokenizer's character
offsets, never by comparing token ids with pad or eos.
"""

from __future__ import annotations

from typing import Any

import torch

from recipes.core.errors import DataError, RowError

IGNORE_INDEX = -100


def sample_fields(
    ids: list[int], labels: list[int], truncated: bool, segments: list[int] | None = None
) -> dict[str, Any]:
    """A tokenised training sample as every kind of SFT data stores it: `num_targets` counts the labels the
    next-token loss uses, `segments` the lengths of the documents it holds end to end (one, but for packed
    plain text), `truncated` whether max_seq_length cut it."""
    return {
        "input_ids": ids,
        "labels": labels,
        "num_targets": sum(label != IGNORE_INDEX for label in labels[1:]),
        "segments": segments or [len(ids)],
        "truncated": truncated,
    }


def render_prompt(tokenizer: Any, prompt: str | list[dict]) -> list[int]:
    """A prompt's token ids: a list of chat turns through the chat template with its generation prompt
    (the assistant's turn opened), a string as it is."""
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]


def require_chat_tokenizer(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template, so chat data cannot be rendered; use an instruct/chat "
            "checkpoint or set tokenizer.chat_template before saving the tokenizer (plain text and "
            "prompt/completion strings need none)"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            "a fast tokenizer is needed to locate assistant tokens (offset mapping); load one with use_fast=True"
        )


def assistant_spans(
    tokenizer: Any, messages: list[dict], prompt_turns: int = 0
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant replies trained on: those from
    turn `prompt_turns` on (the earlier ones are the prompt's context)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant" or i < prompt_turns:
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
    tokenizer: Any, messages: list[dict], max_seq_length: int, prompt_turns: int = 0
) -> tuple[list[int], list[int], bool]:
    """input_ids, labels (IGNORE_INDEX outside the trained assistant replies) and whether truncation happened."""
    text, spans = assistant_spans(tokenizer, messages, prompt_turns)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [
        token if any(start <= first < end for start, end in spans) else IGNORE_INDEX
        for token, (first, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    truncated = len(ids) > max_seq_length
    return ids[:max_seq_length], labels[:max_seq_length], truncated


def tokenize_chat_batch(
    batch: dict[str, list], indices: list[int], tokenizer: Any, max_seq_length: int
) -> dict[str, list]:
    """datasets.map(batched=True) body over chat rows (core/data/formats.py): the fields of sample_fields."""
    from jinja2 import TemplateError

    out: dict[str, list] = {}
    prompt_turns = batch.get("prompt_turns") or [0] * len(indices)
    for row, messages, context in zip(indices, batch["messages"], prompt_turns, strict=True):
        try:
            ids, labels, truncated = tokenize_conversation(tokenizer, messages, max_seq_length, context)
        except TemplateError as err:  # e.g. a template that insists on alternating user/assistant turns
            raise RowError(
                row,
                "messages",
                f"the tokenizer's chat template refused this conversation ({err})",
                "give the conversation the turn order the template accepts, or use another template",
            ) from None
        for key, value in sample_fields(ids, labels, truncated).items():
            out.setdefault(key, []).append(value)
    return out


def positions(sample: dict) -> list[int]:
    """Position ids of a sample: restarting at 0 at each of its segments (documents packed end to end)."""
    return [p for length in sample.get("segments") or [len(sample["input_ids"])] for p in range(length)]


def _round_up(length: int, multiple: int | None) -> int:
    return length if not multiple else -(-length // multiple) * multiple


class PadCollator:
    """Right-pads a list of tokenised samples to the longest one (rounded up to a multiple of
    `pad_to_multiple_of`, so that shapes repeat); padding is never a target.

    A batch holding packed documents (samples of several segments) also gets position ids that restart at
    every document and in the padding, which causal_lm_inputs passes instead of the attention mask, so that
    attention stays within each document (the padding, a segment of its own, is attended by nothing else).
    """

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
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if any(len(s.get("segments") or ()) > 1 for s in samples):
            rows = [positions(s) + list(range(width - len(s["input_ids"]))) for s in samples]
            batch["position_ids"] = torch.tensor(rows, dtype=torch.long)
        return batch


class PackedCollator:
    """Puts a list of tokenised samples end to end in one row, with no padding.

    Position ids restart at 0 for every sample (and every document of packed plain text); with no
    attention mask, transformers reads the restarts as sample boundaries and lets each token attend only
    within its own sample, so every token sees what it would see padded. The first label of each sample is
    never a target, as in a row of its own: no sample learns to predict the start of the next one.
    """

    def __init__(self, pad_token_id: int | None = None, pad_to_multiple_of: int | None = None):
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, labels, position_ids = [], [], []
        for s in samples:
            input_ids.extend(s["input_ids"])
            labels.extend([IGNORE_INDEX, *s["labels"][1:]])
            position_ids.extend(positions(s))
        # Padding up to the multiple is one more sample of its own: never a target, attended by nothing else.
        padding = _round_up(len(input_ids), self.pad_to_multiple_of) - len(input_ids)
        input_ids.extend([self.pad_token_id] * padding)
        labels.extend([IGNORE_INDEX] * padding)
        position_ids.extend(range(padding))
        return {
            "input_ids": torch.tensor([input_ids]),
            "position_ids": torch.tensor([position_ids]),
            "labels": torch.tensor([labels]),
        }


def make_collator(
    packing: bool, pad_token_id: int | None, pad_to_multiple_of: int | None = None
) -> PadCollator | PackedCollator:
    collator = PackedCollator if packing else PadCollator
    return collator(pad_token_id, pad_to_multiple_of)


def causal_lm_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The model's keyword arguments for a batch of either collator. No KV cache is built in training;
    a cache would also stop transformers from reading packed position ids as sample boundaries. Position
    ids, where a batch has them, replace the attention mask: transformers reads sample boundaries from
    them only without a mask."""
    dropped = {"labels", "attention_mask"} if "position_ids" in batch else {"labels"}
    return {**{k: v for k, v in batch.items() if k not in dropped}, "use_cache": False}
