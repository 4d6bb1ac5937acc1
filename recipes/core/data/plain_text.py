"""Causal-LM data without a chat template: prompt/completion strings and plain text.

Prompt/completion (TRL's standard form): the prompt's tokens (with the tokenizer's own special tokens),
then the completion's, then EOS; the loss is on the completion and its EOS only. Prompt and completion are
tokenised separately, so the boundary between them is exact whatever the tokenizer merges.

Plain text (continued pre-training): every document is tokenised with EOS after it, and the documents go
end to end into blocks of max_seq_length tokens (those of each group of PACK_GROUP documents, so that
the work can be spread over processes and cached; the last block of a group is shorter). A block records
where its documents start (`segments`), so that collators restart position ids there and attention stays
within each document; every token is a target except the first of each document piece in a block, which
has nothing of its own document before it.
"""

from __future__ import annotations

from typing import Any

from recipes.core.data.chat import IGNORE_INDEX, sample_fields
from recipes.core.errors import DataError

PACK_GROUP = 1000  # documents packed together; a block never spans two groups


def require_eos(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(
            "the tokenizer has no EOS token, which ends every completion and separates packed documents; "
            "use a tokenizer that has one, or set tokenizer.eos_token before saving it"
        )
    return tokenizer.eos_token_id


def completion_tokens(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """input_ids and labels of one prompt/completion pair (before truncation)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = [*tokenizer(completion, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def tokenize_completion_batch(
    batch: dict[str, list], indices: list[int], tokenizer: Any, max_seq_length: int
) -> dict[str, list]:
    """datasets.map(batched=True) body for prompt/completion rows."""
    out: dict[str, list] = {}
    for prompt, completion in zip(batch["prompt"], batch["completion"], strict=True):
        ids, labels = completion_tokens(tokenizer, prompt, completion)
        truncated = len(ids) > max_seq_length
        for key, value in sample_fields(ids[:max_seq_length], labels[:max_seq_length], truncated).items():
            out.setdefault(key, []).append(value)
    return out


def tokenize_text_batch(batch: dict[str, list], indices: list[int], tokenizer: Any) -> dict[str, list]:
    """datasets.map(batched=True) body: each document's tokens, EOS last."""
    encoded = tokenizer(batch["text"])["input_ids"]
    return {"document": [[*ids, tokenizer.eos_token_id] for ids in encoded]}


def pack_batch(batch: dict[str, list], block: int) -> dict[str, list]:
    """datasets.map(batched=True, batch_size=PACK_GROUP) body: the documents of a group end to end in
    blocks of `block` tokens, with their labels and where each document piece starts."""
    stream, starts = [], []
    for document in batch["document"]:
        starts.append(len(stream))
        stream.extend(document)
    starts.append(len(stream))
    out: dict[str, list] = {}
    for begin in range(0, len(stream), block):
        end = min(begin + block, len(stream))
        cuts = sorted({begin, *(s for s in starts if begin < s < end)})
        segments = [b - a for a, b in zip(cuts, [*cuts[1:], end], strict=True)]
        ids = stream[begin:end]
        labels = list(ids)
        for cut in cuts:
            labels[cut - begin] = IGNORE_INDEX
        for key, value in sample_fields(ids, labels, False, segments).items():
            out.setdefault(key, []).append(value)
    return out
