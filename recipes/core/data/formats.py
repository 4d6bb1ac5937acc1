"""The shapes SFT datasets come in, recognised from their columns and turned into one of three kinds of row.

    format             columns (other names: dataset_columns)        becomes
    messages           messages: [{role, content}]                   chat: every assistant turn is trained
    sharegpt           conversations: [{from, value}], [system]      chat (human -> user, gpt -> assistant, ...)
    alpaca             instruction, [input], output, [system]        chat: one user turn, one assistant turn
    prompt_completion  prompt, completion: strings                   completion: prompt + completion tokens,
                                                                     no chat template, loss on the completion
                       prompt, completion: message lists             chat: loss on the completion turns only
    text               text (dataset_text_field)                     text: continued pre-training

A chat row is {"messages": [{"role", "content"}], "prompt_turns": n}: assistant turns before turn n are
context, the others are trained. A turn's `content` may be a string or a list of text parts
({"type": "text", "text": ...}, joined as they are); turns may use ShareGPT's keys (from/value) in any
chat column. Rows with nothing to train (a conversation without an assistant turn after its prompt, an
empty text) are dropped and counted; a row of the wrong shape is an error naming it. A message list
written as a JSON string (the only way a CSV cell holds one) is refused wherever messages may stand, in
every recipe: read as text, its brackets and quotes would be trained on.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from recipes.core.data.loading import Split, map_rows
from recipes.core.errors import DataError, RowError, shown

CHAT, COMPLETION, TEXT = "chat", "completion", "text"  # the kinds of row the formats become


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    required: tuple[str, ...]  # the fields (default column names) that identify it
    optional: tuple[str, ...] = ()


FORMATS = {
    "messages": Format("messages", ("messages",)),
    "sharegpt": Format("sharegpt", ("conversations",), ("system",)),
    "alpaca": Format("alpaca", ("instruction", "output"), ("input", "system")),
    "prompt_completion": Format("prompt_completion", ("prompt", "completion")),
    "text": Format("text", ("text",)),
}
AUTO = "auto"
ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
DROPPED_WHY = {CHAT: "no assistant turn to train on", COMPLETION: "", TEXT: "empty text"}


def format_columns(format_name: str, columns: dict[str, str]) -> dict[str, str]:
    """The dataset column of each field of a format: `columns` where it names one, else the field's name."""
    fmt = FORMATS[format_name]
    return {name: columns.get(name, name) for name in (*fmt.required, *fmt.optional)}


def detect(split: Split, requested: str, columns: dict[str, str]) -> str:
    """The format of a split: `requested` unless it is "auto", else the one format its columns fit."""
    present = split.data.column_names
    if requested != AUTO:
        if requested not in FORMATS:
            raise DataError(
                f"dataset_format {requested!r} is not one of {AUTO}, {', '.join(FORMATS)}; use one of them"
            )
        missing = [column for column in _required(requested, columns) if column not in present]
        if missing:
            raise DataError(
                f"{split.name} has no column {', '.join(map(repr, missing))} for dataset_format {requested}; "
                f"its columns are {present}. Map the format's fields to its columns with dataset_columns "
                f"(e.g. {{{FORMATS[requested].required[0]}: <column>}}) or choose another dataset_format"
            )
        return requested
    fitting = [name for name in FORMATS if all(c in present for c in _required(name, columns))]
    if len(fitting) == 1:
        return fitting[0]
    if fitting:
        raise DataError(
            f"{split.name} has columns {present}, which fit the formats {', '.join(fitting)}; set "
            f"dataset_format to the one it is (e.g. dataset_format: {fitting[0]})"
        )
    known = "; ".join(f"{name}: {', '.join(_required(name, columns))}" for name in FORMATS)
    raise DataError(
        f"{split.name} has columns {present}, which fit no format the recipe reads ({known}); rename its "
        "columns, or name them with dataset_columns (e.g. {prompt: question, completion: answer}) or "
        "messages_column / dataset_text_field"
    )


def _required(format_name: str, columns: dict[str, str]) -> list[str]:
    return [columns.get(name, name) for name in FORMATS[format_name].required]


def kind_of(split: Split, format_name: str, columns: dict[str, str]) -> str:
    """The kind of row a format becomes; prompt/completion is chat when its first row holds messages."""
    if format_name == "text":
        return TEXT
    if format_name != "prompt_completion":
        return CHAT
    prompt = split.data[0][format_columns(format_name, columns)["prompt"]]
    return CHAT if isinstance(prompt, list) else COMPLETION


@dataclasses.dataclass
class Normalized:
    """A split's rows as one kind of row, and how many were dropped (with nothing to train)."""

    split: Split
    format: str
    kind: str
    rows: int
    dropped: int

    @property
    def dropped_why(self) -> str:
        return DROPPED_WHY[self.kind]


def normalize(
    split: Split, format_name: str, columns: dict[str, str], num_proc: int | None = None
) -> Normalized:
    """The rows of `split` (in `format_name`) as rows of their kind; rows with nothing to train dropped.

    Every row is checked; a malformed one stops the run with the file, row and column. When every row is
    dropped, that is an error too."""
    kind = kind_of(split, format_name, columns)
    names = format_columns(format_name, columns)
    converted = map_rows(
        split,
        _convert_batch,
        batched=True,
        remove_columns=split.data.column_names,
        fn_kwargs={"format_name": format_name, "kind": kind, "names": names},
        num_proc=num_proc,
        desc=f"Reading {format_name} rows",
    )
    keep = converted.data["keep"]
    kept = converted.select([i for i, k in enumerate(keep) if k])
    kept = kept.with_data(kept.data.remove_columns("keep"))
    if len(kept) == 0:
        raise DataError(
            f"none of the {len(split)} rows of {split.name} has anything to train on "
            f"({DROPPED_WHY[kind]} in every row); check the roles and the {format_name} columns "
            f"{sorted(set(names.values()) & set(split.data.column_names))}"
        )
    return Normalized(kept, format_name, kind, len(split), len(split) - len(kept))


def _convert_batch(
    batch: dict[str, list], indices: list[int], format_name: str, kind: str, names: dict[str, str]
) -> dict[str, list]:
    """datasets.map(batched=True) body: the rows of one batch as rows of `kind`, and whether to keep each."""
    rows = [
        {field: batch[column][i] for field, column in names.items() if column in batch}
        for i in range(len(indices))
    ]
    out: dict[str, list] = {"keep": []}
    for row, values in zip(indices, rows, strict=True):
        converted = CONVERTERS[format_name](row, values, names, kind)
        for key, value in converted.items():
            out.setdefault(key, []).append(value)
    return out


def _messages_row(row: int, values: dict, names: dict, kind: str) -> dict:
    messages = turns(row, values["messages"], names["messages"])
    return _chat(messages, prompt_turns=0)


def _sharegpt_row(row: int, values: dict, names: dict, kind: str) -> dict:
    messages = turns(row, values["conversations"], names["conversations"])
    system = _optional_text(row, values.get("system"), names["system"])
    if system and not any(turn["role"] == "system" for turn in messages):
        messages = [{"role": "system", "content": system}, *messages]
    return _chat(messages, prompt_turns=0)


def _alpaca_row(row: int, values: dict, names: dict, kind: str) -> dict:
    instruction = _text(row, values["instruction"], names["instruction"])
    extra = _optional_text(row, values.get("input"), names["input"])
    output = _text(row, values["output"], names["output"])
    system = _optional_text(row, values.get("system"), names["system"])
    messages = [{"role": "system", "content": system}] if system else []
    messages += [
        {"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction},
        {"role": "assistant", "content": output},
    ]
    return _chat(messages, prompt_turns=0)


def _prompt_completion_row(row: int, values: dict, names: dict, kind: str) -> dict:
    prompt, completion = values["prompt"], values["completion"]
    if kind == COMPLETION:
        refuse_json_turns(row, prompt, names["prompt"])
        refuse_json_turns(row, completion, names["completion"])
        if not isinstance(completion, str):
            raise RowError(
                row,
                names["completion"],
                f"the prompt of the first row is a string but this completion holds {shown(completion)}",
                "write prompt and completion as strings in every row (or as message lists in every row)",
            )
        return {"prompt": _text(row, prompt, names["prompt"]), "completion": completion, "keep": True}
    if not isinstance(prompt, list) or not isinstance(completion, list):
        column = names["prompt"] if not isinstance(prompt, list) else names["completion"]
        raise RowError(
            row,
            column,
            f"the first row holds message lists but this row holds {shown(prompt if column == names['prompt'] else completion)}",
            "write prompt and completion as message lists in every row (or as strings in every row)",
        )
    before = turns(row, prompt, names["prompt"], allow_empty=True)
    return _chat([*before, *turns(row, completion, names["completion"])], prompt_turns=len(before))


def _text_row(row: int, values: dict, names: dict, kind: str) -> dict:
    text = _text(row, values["text"], names["text"])
    return {"text": text, "keep": bool(text.strip())}


CONVERTERS = {
    "messages": _messages_row,
    "sharegpt": _sharegpt_row,
    "alpaca": _alpaca_row,
    "prompt_completion": _prompt_completion_row,
    "text": _text_row,
}


def _chat(messages: list[dict], prompt_turns: int) -> dict:
    trained = any(turn["role"] == "assistant" for turn in messages[prompt_turns:])
    return {"messages": messages, "prompt_turns": prompt_turns, "keep": trained}


def turns(row: int, value: Any, column: str, allow_empty: bool = False) -> list[dict[str, str]]:
    """A conversation as {role, content} string turns: roles mapped to user/assistant/system/tool (ShareGPT's
    from/value keys and role names accepted), text parts joined."""
    refuse_json_turns(row, value, column)
    if not isinstance(value, list) or not (value or allow_empty):
        raise RowError(
            row,
            column,
            f"must be a non-empty list of turns, got {shown(value)}",
            'write it as a JSON list such as [{"role": "user", "content": "..."}, {"role": "assistant", '
            '"content": "..."}]',
        )
    out = []
    for number, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RowError(
                row, column, f"turn {number} is {shown(turn)}, not a {{role, content}} object", _TURN_FIX
            )
        role = turn.get("role") if turn.get("role") is not None else turn.get("from")
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        if not isinstance(role, str):
            raise RowError(row, column, f"turn {number} has no role (got {shown(turn)})", _TURN_FIX)
        if role.lower() not in ROLES:
            raise RowError(
                row,
                column,
                f"turn {number} has the unknown role {role!r}",
                f"use one of {', '.join(ROLES)} (mapped to user, assistant, system and tool)",
            )
        out.append({"role": ROLES[role.lower()], "content": _content(row, column, number, content)})
    return out


def refuse_json_turns(row: int, value: Any, column: str) -> None:
    """A RowError when `value` is a message list written as a JSON string: the same rule for every column
    that may hold messages (SFT's messages, conversations, prompt and completion; DPO's prompt, chosen and
    rejected), so that no recipe trains on one as text."""
    if not (isinstance(value, str) and value.lstrip().startswith("[")):
        return
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return
    if (
        isinstance(parsed, list)
        and parsed
        and all(isinstance(turn, dict) and ("role" in turn or "from" in turn) for turn in parsed)
    ):
        raise RowError(
            row,
            column,
            "holds a message list written as a JSON string (as a CSV cell holds one), which would be read "
            "as text, not as messages",
            "store message lists as lists: write the data as JSON Lines or Parquet",
        )


_TURN_FIX = 'write each turn as {"role": "user" | "assistant" | "system", "content": "..."} (or ShareGPT\'s {"from", "value"})'


def _content(row: int, column: str, number: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise RowError(
                    row,
                    column,
                    f"turn {number} has a content part {shown(part)}; only text parts are read",
                    'write content as a string or as text parts [{"type": "text", "text": "..."}]',
                )
            texts.append(part["text"])
        return "".join(texts)
    raise RowError(
        row,
        column,
        f"turn {number} has no content (a missing key or a null)"
        if content is None
        else f"turn {number} has content {shown(content)}",
        'give every turn its text as a string (an empty reply is "", not null)',
    )


def _text(row: int, value: Any, column: str) -> str:
    if not isinstance(value, str):
        raise RowError(
            row, column, f"must be a string, got {shown(value)}", "write the text as a string in every row"
        )
    return value


def _optional_text(row: int, value: Any, column: str) -> str:
    return "" if value is None else _text(row, value, column)
