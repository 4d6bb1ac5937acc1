"""Preference pairs for DPO: rows of a prompt, a chosen and a rejected completion in the forms TRL reads,
tokenised as two sequences that start with the same prompt tokens, with a report of what was read, kept,
truncated and dropped that the recipe prints and plan.json records.

    form             columns (other names: dataset_columns)              tokenised as
    standard         prompt, chosen, rejected: strings                   the prompt's tokens (with the
                                                                         tokenizer's own special tokens),
                                                                         then the completion's and EOS
    conversational   prompt: messages; chosen, rejected: messages        the chat template; the targets are
                     (the assistant's reply, one or more turns)          the completion's assistant turns
    implicit prompt  chosen, rejected: whole conversations that share    as conversational, the prompt being
                     their first turns (no prompt column)                the turns both share

The prompt is tokenised once per pair, so both sequences start with exactly the same tokens; only
completion tokens are targets (IGNORE_INDEX elsewhere). A prompt longer than max_prompt_length keeps its
last max_prompt_length tokens (those next to the reply), then each completion is cut where its sequence
reaches max_length; both are counted as truncated. As max_prompt_length is below max_length, every
completion keeps a token to train on.

A missing column or a value of the wrong shape is an error naming the file, row and column. Pairs that
state no preference are dropped and counted, as datasets hold some: chosen identical to rejected (a tie;
its loss is a constant with no gradient), an empty chosen or rejected reply (usually a failed
generation), and chosen and rejected that truncation left the same tokens (they differed only after the
cut: a tie too).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import datasets
import torch

from recipes.core.config import ConfigError
from recipes.core.data import chat, plain_text
from recipes.core.data.chat import IGNORE_INDEX, PadCollator
from recipes.core.data.formats import refuse_json_turns, turns
from recipes.core.data.loading import Split, load, map_rows, train_and_held_out
from recipes.core.errors import DataError, RowError, shown

FIELDS = ("prompt", "chosen", "rejected")
SIDES = ("chosen", "rejected")
STANDARD, CONVERSATIONAL, IMPLICIT = "standard", "conversational", "implicit prompt"
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # added when reference log-probs are precomputed
DROPPED = {  # why a pair is dropped -> how the report says it
    "tie": "chosen identical to rejected",
    "empty": "empty chosen or rejected reply",
    "truncated_tie": "chosen identical to rejected after truncation",
}


@dataclasses.dataclass
class PairSplitReport:
    """What became of the rows of one split."""

    dataset: str
    split: str
    form: str
    rows: int
    pairs: int = 0
    truncated: int = 0
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)

    def line(self, role: str, max_prompt_length: int, max_length: int) -> str:
        dropped = ", ".join(f"{self.dropped.get(why, 0)} dropped ({text})" for why, text in DROPPED.items())
        return (
            f"{role} data: split {self.split!r} of {self.dataset}: {self.form} preference pairs, {self.rows} "
            f"rows: {self.pairs} kept, {self.truncated} truncated (prompt to {max_prompt_length}, each "
            f"sequence to {max_length} tokens), {dropped}"
        )


@dataclasses.dataclass
class PairReport:
    """What the train and eval pairs are made of; `summary` is printed, `to_dict` goes into plan.json."""

    train: PairSplitReport
    eval: PairSplitReport | None

    def summary(self, max_prompt_length: int, max_length: int) -> str:
        roles = [("train", self.train), ("eval", self.eval)]
        return "\n".join(report.line(role, max_prompt_length, max_length) for role, report in roles if report)

    def to_dict(self) -> dict[str, Any]:
        return {
            "train_pairs": self.train.pairs,
            "eval_pairs": None if self.eval is None else self.eval.pairs,
            "train": dataclasses.asdict(self.train),
            "eval": None if self.eval is None else dataclasses.asdict(self.eval),
        }


def load_preference_data(
    cfg: Any, tokenizer: Any, numbers: tuple[str, ...] = ()
) -> tuple[datasets.Dataset, datasets.Dataset | None, PairReport]:
    """Tokenised train and eval pairs (eval None without evaluation) and the report of how they were made.
    Every check that reads the data happens here, before a model is loaded or output_dir is touched.
    `numbers`: columns of one number per pair kept with the pairs where a split has them (a reward model's
    margin)."""
    names = pair_columns(cfg.dataset_columns)
    loaded = load(cfg.dataset_name, cfg.dataset_config_name, cfg.dataset_num_proc)
    train, held_out = train_and_held_out(loaded, cfg.train_split, cfg.eval_split, cfg)
    train_set, train_report = tokenize_pairs(
        train.first(cfg.max_train_samples), names, tokenizer, cfg, numbers
    )
    eval_set = eval_report = None
    if held_out is not None:
        eval_set, eval_report = tokenize_pairs(
            held_out.first(cfg.max_eval_samples), names, tokenizer, cfg, numbers
        )
    return train_set, eval_set, PairReport(train_report, eval_report)


def check_lengths(max_prompt_length: int, max_length: int) -> None:
    """Refuse, before anything is loaded, length settings that leave a completion no token to train on."""
    if max_prompt_length >= max_length:
        raise ConfigError(
            f"max_prompt_length ({max_prompt_length}) leaves no room for a completion within max_length "
            f"({max_length}); make max_prompt_length smaller than max_length"
        )


def pair_columns(columns: dict[str, str]) -> dict[str, str]:
    """The dataset column of prompt, chosen and rejected: `columns` where it names one."""
    unknown = sorted(set(columns) - set(FIELDS))
    if unknown:
        raise ConfigError(
            f"dataset_columns names {', '.join(map(repr, unknown))}, which is not a field of preference data; "
            f"map the fields {', '.join(FIELDS)} to columns, e.g. {{chosen: preferred, rejected: other}}"
        )
    return {field: columns.get(field, field) for field in FIELDS}


def detect_form(split: Split, names: dict[str, str]) -> str:
    """The form of a split's rows, from its columns and the types in its first row."""
    present = split.data.column_names
    missing = [names[field] for field in SIDES if names[field] not in present]
    if missing:
        raise DataError(
            f"{split.name} has no column {', '.join(map(repr, missing))}; its columns are {present}. "
            "Preference data needs chosen and rejected (and usually prompt) columns: rename them, or name "
            "them with dataset_columns, e.g. {chosen: preferred, rejected: other}"
        )
    first = split.data[0]
    for column in (names[field] for field in FIELDS if names[field] in present):
        try:  # the form is told from the first row's types: none of them may be a list in a string
            refuse_json_turns(0, first[column], column)
        except RowError as err:
            raise split.row_error(err) from None
    if names["prompt"] in present:
        return CONVERSATIONAL if isinstance(first[names["prompt"]], list) else STANDARD
    if not isinstance(first[names["chosen"]], list):
        raise DataError(
            f"{split.name} has chosen and rejected texts but no column {names['prompt']!r}: without a prompt "
            "only conversations (message lists sharing their first turns) can be split into prompt and "
            "reply; add a prompt column, or name it with dataset_columns: {prompt: <column>}"
        )
    return IMPLICIT


def tokenize_pairs(
    split: Split, names: dict[str, str], tokenizer: Any, cfg: Any, numbers: tuple[str, ...] = ()
) -> tuple[datasets.Dataset, PairSplitReport]:
    """A split's rows read in their form and tokenised; the pairs kept (with the `numbers` columns the split
    has) and what became of the rows."""
    form = detect_form(split, names)
    if form == STANDARD:
        plain_text.require_eos(tokenizer)
    else:
        chat.require_chat_tokenizer(tokenizer)
    kwargs = {
        "tokenizer": tokenizer,
        "form": form,
        "names": names,
        "max_prompt_length": cfg.max_prompt_length,
        "max_length": cfg.max_length,
        "numbers": tuple(column for column in numbers if column in split.data.column_names),
    }
    tokenized = map_rows(
        split,
        tokenize_pair_batch,
        batched=True,
        remove_columns=split.data.column_names,
        fn_kwargs=kwargs,
        num_proc=cfg.dataset_num_proc,
        desc="Tokenizing pairs",
    ).data
    reasons = tokenized["dropped"]
    kept = tokenized.select([i for i, why in enumerate(reasons) if not why])
    report = PairSplitReport(
        split.dataset, split.spec, form, len(split), len(kept), sum(tokenized["truncated"])
    )
    report.dropped = {why: reasons.count(why) for why in DROPPED}
    if len(kept) == 0:
        counts = ", ".join(f"{report.dropped[why]} {text}" for why, text in DROPPED.items())
        fix = "check the chosen and rejected columns"
        if report.dropped["truncated_tie"]:
            fix = (
                f"truncation to max_prompt_length {cfg.max_prompt_length} and max_length {cfg.max_length} "
                "cut every completion before chosen and rejected differ: raise max_length, or lower "
                "max_prompt_length, so that the completions keep more tokens"
            )
        raise DataError(
            f"none of the {len(split)} rows of {split.name} is a usable preference pair ({counts}); {fix}"
        )
    return kept.remove_columns(["dropped", "truncated"]), report


def tokenize_pair_batch(
    batch: dict[str, list],
    indices: list[int],
    tokenizer: Any,
    form: str,
    names: dict[str, str],
    max_prompt_length: int,
    max_length: int,
    numbers: tuple[str, ...] = (),
) -> dict[str, list]:
    """datasets.map(batched=True) body: each row as a tokenised pair, or the reason it is dropped."""
    from jinja2 import TemplateError

    out: dict[str, list] = {}
    for i, row in enumerate(indices):
        values = {field: batch[column][i] for field, column in names.items() if column in batch}
        prompt, chosen, rejected = read_pair(row, values, form, names)
        for column in numbers:
            out.setdefault(column, []).append(_number(row, batch[column][i], column))
        fields = {**_NO_PAIR, "dropped": _dropped(chosen, rejected)}
        if not fields["dropped"]:
            try:
                fields.update(pair_tokens(tokenizer, prompt, chosen, rejected, max_prompt_length, max_length))
            except TemplateError as err:
                raise RowError(
                    row,
                    names["chosen"],
                    f"the tokenizer's chat template refused this conversation ({err})",
                    "give the conversation the turn order the template accepts, or use another template",
                ) from None
            # Identical tokens state no preference either; usually they differed after the cut.
            if fields["chosen_input_ids"] == fields["rejected_input_ids"]:
                why = "truncated_tie" if fields["truncated"] else "tie"
                fields = {**_NO_PAIR, "dropped": why, "truncated": fields["truncated"]}
        for key, value in fields.items():
            out.setdefault(key, []).append(value)
    return out


_NO_PAIR = {  # the columns of a dropped row
    **{f"{side}_{key}": [] for side in SIDES for key in ("input_ids", "labels")},
    "num_targets": 0,
    "truncated": False,
}


def read_pair(row: int, values: dict[str, Any], form: str, names: dict[str, str]) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of a row: strings, or {role, content} turns (implicit: the shared turns
    are the prompt)."""
    if form == STANDARD:
        return tuple(_string(row, values[field], names[field], form) for field in FIELDS)
    if form == CONVERSATIONAL:
        prompt = turns(row, values["prompt"], names["prompt"], allow_empty=True)
        chosen, rejected = (turns(row, values[side], names[side], allow_empty=True) for side in SIDES)
        for side, reply in (("chosen", chosen), ("rejected", rejected)):
            if reply and reply[0]["role"] != "assistant":
                raise RowError(
                    row,
                    names[side],
                    f"the reply begins with a {reply[0]['role']} turn; a completion is the assistant's reply",
                    f"begin it with an assistant turn (the turns before it belong in {names['prompt']})",
                )
        return prompt, chosen, rejected
    chosen, rejected = (turns(row, values[side], names[side], allow_empty=True) for side in SIDES)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    for side, reply in (("chosen", chosen[shared:]), ("rejected", rejected[shared:])):
        if reply and reply[0]["role"] != "assistant":
            raise RowError(
                row,
                names[side],
                f"chosen and rejected differ from turn {shared} on, which is a {reply[0]['role']} turn here",
                "both conversations must share every turn before the assistant replies that differ (the "
                "shared turns are the prompt), or give the prompt in a column of its own",
            )
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _string(row: int, value: Any, column: str, form: str) -> str:
    refuse_json_turns(row, value, column)
    if not isinstance(value, str):
        raise RowError(
            row,
            column,
            f"must be a string like the first row's prompt ({form} form), got {shown(value)}",
            "write prompt, chosen and rejected as strings in every row (or as message lists in every row)",
        )
    return value


def _number(row: int, value: Any, column: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RowError(row, column, f"{value!r} is not a number", f"give every row's {column} as a number")
    return float(value)


def _dropped(chosen: Any, rejected: Any) -> str:
    """Why a pair states no preference ("" when it does)."""
    if chosen == rejected:
        return "tie"
    if _empty(chosen) or _empty(rejected):
        return "empty"
    return ""


def _empty(reply: Any) -> bool:
    if isinstance(reply, str):
        return not reply.strip()
    return not any(turn["role"] == "assistant" and turn["content"].strip() for turn in reply)


def pair_tokens(
    tokenizer: Any, prompt: Any, chosen: Any, rejected: Any, max_prompt_length: int, max_length: int
) -> dict[str, Any]:
    """The two sequences of a pair, prompt tokens first, with their labels (targets: the completion's), the
    targets of both (num_targets) and whether either was truncated."""
    if isinstance(prompt, str):
        prompt_ids, completions = _standard(tokenizer, prompt, chosen, rejected)
    else:
        prompt_ids, completions = _conversational(tokenizer, prompt, chosen, rejected)
    truncated = len(prompt_ids) > max_prompt_length
    prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length :] if truncated else prompt_ids
    room = max_length - len(prompt_ids)
    fields: dict[str, Any] = {}
    targets = []  # at least one per sequence: the completion keeps max_length - max_prompt_length >= 1 tokens
    for side, (ids, labels) in zip(SIDES, completions, strict=True):
        truncated = truncated or len(ids) > room
        labels = [IGNORE_INDEX] * len(prompt_ids) + labels[:room]
        fields.update({f"{side}_input_ids": prompt_ids + ids[:room], f"{side}_labels": labels})
        targets.append(sum(label != IGNORE_INDEX for label in labels[1:]))
    return {**fields, "num_targets": sum(targets), "truncated": truncated}


def _standard(tokenizer: Any, prompt: str, *replies: str) -> tuple[list[int], list[tuple[list, list]]]:
    """Prompt tokens and each reply's tokens and labels, as core/data/plain_text.py tokenises prompt/completion."""
    completions = []
    for reply in replies:
        ids, labels = plain_text.completion_tokens(tokenizer, prompt, reply)
        start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        prompt_ids = ids[:start]
        completions.append((ids[start:], labels[start:]))
    return prompt_ids, completions


def _conversational(
    tokenizer: Any, prompt: list[dict], *replies: list[dict]
) -> tuple[list[int], list[tuple[list, list]]]:
    """Prompt tokens (the conversation through the assistant's generation prompt) and each reply's tokens,
    whose targets are the reply's assistant turns."""
    prompt_text, completions = None, []
    for reply in replies:
        text, spans = chat.assistant_spans(tokenizer, [*prompt, *reply], prompt_turns=len(prompt))
        cut = spans[0][0]
        if prompt_text is not None and text[:cut] != prompt_text:
            raise DataError(
                "the tokenizer's chat template renders a prompt differently before chosen and before rejected, "
                "so the pair cannot share its prompt tokens; use a template that renders turns incrementally"
            )
        prompt_text = text[:cut]
        encoded = tokenizer(text[cut:], add_special_tokens=False, return_offsets_mapping=True)
        labels = [
            token if any(start <= cut + first < end for start, end in spans) else IGNORE_INDEX
            for token, (first, _) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
        ]
        completions.append((encoded["input_ids"], labels))
    return tokenizer(prompt_text, add_special_tokens=False)["input_ids"], completions


class PairCollator:
    """A batch of pairs as one batch of sequences, the chosen ones first and then the rejected ones in the
    same order, right-padded (one forward for both); with the reference log-probabilities in that order
    where they were precomputed."""

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int | None = None):
        self.pad = PadCollator(pad_token_id, pad_to_multiple_of)

    def __call__(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [
            {"input_ids": pair[f"{side}_input_ids"], "labels": pair[f"{side}_labels"]}
            for side in SIDES
            for pair in pairs
        ]
        batch = self.pad(sequences)
        if "margin" in pairs[0]:  # a reward model's margin, one per pair
            batch["margin"] = torch.tensor([pair["margin"] for pair in pairs], dtype=torch.float32)
        if REF_COLUMNS[0] in pairs[0]:
            values = [pair[column] for column in REF_COLUMNS for pair in pairs]
            batch["ref_logps"] = torch.tensor(values, dtype=torch.float32)
        return batch
