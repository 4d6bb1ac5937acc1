"""The GRPO recipe's prompts: a `prompt` column holding a list of chat turns (rendered with the chat
template and its generation prompt) or a plain string (tokenised as it is), as the SFT and DPO recipes read
them; `dataset_columns: {prompt: question}` names another column. Every other column is kept as it is and
handed to the reward functions by its name (e.g. the reference answer). A prompt longer than
max_prompt_length keeps its last tokens (those next to the completion); such prompts are counted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import datasets

from recipes.core.data.chat import render_prompt, require_chat_tokenizer
from recipes.core.data.formats import refuse_json_turns, turns
from recipes.core.data.loading import Split, load, map_rows, require_columns, train_and_held_out
from recipes.core.errors import RowError, shown

IDS = "prompt_ids"  # the column of rendered prompt token ids the loader adds


@dataclasses.dataclass(frozen=True)
class PromptSplitReport:
    rows: int
    chat: bool  # chat turns (else plain strings)
    mean_tokens: float
    max_tokens: int
    truncated: int  # prompts cut to max_prompt_length

    def line(self, role: str, max_prompt_length: int) -> str:
        form = "chat prompts" if self.chat else "text prompts"
        cut = f", {self.truncated} cut to max_prompt_length {max_prompt_length}" if self.truncated else ""
        return f"{role}: {self.rows} {form}, {self.mean_tokens:.1f} tokens on average (max {self.max_tokens}){cut}"


@dataclasses.dataclass(frozen=True)
class PromptReport:
    train: PromptSplitReport
    eval: PromptSplitReport | None
    columns: list[str]  # handed to the reward functions

    def summary(self, max_prompt_length: int) -> str:
        lines = [self.train.line("train", max_prompt_length)]
        if self.eval is not None:
            lines.append(self.eval.line("eval", max_prompt_length))
        lines.append(f"columns for the reward functions: {', '.join(self.columns) or 'none'}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_prompt_data(
    cfg: Any, tokenizer: Any
) -> tuple[datasets.Dataset, datasets.Dataset | None, PromptReport]:
    """Train and eval prompts (eval None without evaluation) with their token ids in IDS, and the report."""
    column = cfg.dataset_columns.get("prompt", "prompt")
    data = load(cfg.dataset_name, cfg.dataset_config_name, cfg.dataset_num_proc)
    train, held_out = train_and_held_out(data, cfg.train_split, cfg.eval_split, cfg)
    train = train.first(cfg.max_train_samples)
    train_set, train_report = _tokenize(train, column, tokenizer, cfg.max_prompt_length)
    eval_set = eval_report = None
    if held_out is not None:
        eval_set, eval_report = _tokenize(held_out, column, tokenizer, cfg.max_prompt_length)
    columns = [name for name in train_set.column_names if name not in (column, IDS)]
    return train_set, eval_set, PromptReport(train_report, eval_report, columns)


def _tokenize(
    split: Split, column: str, tokenizer: Any, max_prompt_length: int
) -> tuple[datasets.Dataset, PromptSplitReport]:
    require_columns(split, [column], f"{split.name} (the GRPO recipe reads prompts from it)")
    chat = isinstance(split.data[0][column], list)
    if chat:
        require_chat_tokenizer(tokenizer)

    def render(row: dict, index: int) -> dict:
        ids = render_prompt(tokenizer, _prompt(index, row[column], column, chat))
        return {IDS: ids[-max_prompt_length:], "prompt_tokens": len(ids)}

    rendered = map_rows(split, render, desc="rendering prompts").data
    lengths = rendered["prompt_tokens"]
    report = PromptSplitReport(
        rows=len(rendered),
        chat=chat,
        mean_tokens=sum(lengths) / len(lengths),
        max_tokens=max(lengths),
        truncated=sum(length > max_prompt_length for length in lengths),
    )
    return rendered.remove_columns("prompt_tokens"), report


def _prompt(row: int, value: Any, column: str, chat: bool) -> str | list[dict]:
    if chat:
        return turns(row, value, column)
    refuse_json_turns(row, value, column)
    if not isinstance(value, str) or not value:
        raise RowError(
            row,
            column,
            f"must be a non-empty string or a list of chat turns, like the first row's, got {shown(value)}",
            "write every prompt in the same form: a string, or a list of {role, content} turns",
        )
    return value
