"""The SFT recipes' data: one dataset, or several mixed by weight, in any format core/data/formats.py reads,
as tokenised train and eval samples, with a report of what was read, kept, truncated and dropped that the
recipe prints and plan.json records.

A mixture (`dataset_mixture`) is a list of sources, each {dataset, [config], [split], [eval_split],
[format], [columns]} with at most one of:

    samples: N     N rows of that source (more than it has: it is repeated, the remainder drawn)
    fraction: f    round(f x its rows) rows, 0 < f <= 1
    weight: w      a share of the mixture: the sources with a weight get rows in the ratio of their
                   weights, as many as possible without using any row twice
    (none)         every row

Rows are drawn with the seed (without replacement), the sources' samples are then shuffled together with
the seed, and max_train_samples keeps the first of them. Evaluation rows come from each source's
eval_split, or, where a source (or a single dataset) has none, are held out of its training rows by
eval_split_size, drawn with the seed: they are never trained on.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from fractions import Fraction
from typing import Any

import datasets
import numpy as np

from recipes.core.config import ConfigError
from recipes.core.data import chat, formats, plain_text
from recipes.core.data.loading import Split, load, map_fingerprint, map_rows, train_and_held_out
from recipes.core.errors import DataError

SOURCE_KEYS = (
    "dataset",
    "config",
    "split",
    "eval_split",
    "format",
    "columns",
    "weight",
    "samples",
    "fraction",
)
SHARES = ("weight", "samples", "fraction")
_DRAW, _SHUFFLE = 1, 2  # what a random stream is for, next to the seed (hold_out draws from [seed, source])


@dataclasses.dataclass(frozen=True)
class Source:
    """One dataset of the run and how much of it to use."""

    dataset: str
    config: str | None
    split: str
    eval_split: str | None
    format: str
    columns: dict[str, str]
    share: tuple[str, float] | None = None  # (weight | samples | fraction, value); None: every row


@dataclasses.dataclass
class SourceReport:
    """What became of one source's rows in one role (train or eval)."""

    dataset: str
    split: str
    format: str
    detected: bool
    rows: int
    dropped: int
    dropped_why: str
    truncated: int = 0
    no_targets: int = 0
    samples: int = 0
    tokens: int = 0  # plain text: tokens packed into the samples
    share: dict[str, float] | None = None

    def line(self, role: str, max_seq_length: int) -> str:
        how = "detected from the columns" if self.detected else "dataset_format"
        text = f"{role} data: split {self.split!r} of {self.dataset}: format {self.format} ({how}), {self.rows} rows"
        if self.share:
            text += f" ({', '.join(f'{k} {v:g}' for k, v in self.share.items())})"
        kept = self.rows - self.dropped
        if self.format == "text":
            text += f": {kept} documents kept, {self.dropped} dropped ({self.dropped_why})"
            return (
                text + f"; {self.tokens} tokens packed into {self.samples} blocks of up to {max_seq_length}"
            )
        text += f": {kept} kept, {self.truncated} truncated to {max_seq_length} tokens, "
        if self.dropped_why:  # prompt/completion rows always have a completion to train on
            text += f"{self.dropped} dropped ({self.dropped_why}), "
        return text + f"{self.no_targets} dropped with no target token left after truncation"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class DataReport:
    """What the train and eval data are made of; `summary` is printed, `to_dict` goes into plan.json."""

    train: list[SourceReport]
    eval: list[SourceReport]
    train_samples: int
    eval_samples: int | None
    mixture: bool

    def summary(self, max_seq_length: int) -> str:
        lines = [source.line("train", max_seq_length) for source in self.train]
        lines += [source.line("eval", max_seq_length) for source in self.eval]
        truncated = sum(source.truncated for source in self.train)
        dropped = sum(source.dropped + source.no_targets for source in self.train)
        lines.append(
            f"train samples: {self.train_samples} ({truncated} truncated to {max_seq_length} tokens, "
            f"{dropped} dropped with nothing to train on)"
            + ("" if self.eval_samples is None else f"; eval samples: {self.eval_samples}")
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "train_samples": self.train_samples,
            "eval_samples": self.eval_samples,
            "mixture": self.mixture,
            "train": [source.to_dict() for source in self.train],
            "eval": [source.to_dict() for source in self.eval],
        }


def sources(cfg: Any) -> list[Source]:
    """The datasets of a config: dataset_name, or the entries of dataset_mixture (checked here)."""
    columns = {"messages": cfg.messages_column, "text": cfg.dataset_text_field, **cfg.dataset_columns}
    if not cfg.dataset_mixture:
        return [
            Source(
                cfg.dataset_name,
                cfg.dataset_config_name,
                cfg.train_split,
                cfg.eval_split,
                cfg.dataset_format,
                columns,
            )
        ]
    if cfg.dataset_name:
        raise ConfigError(
            f"both dataset_name ({cfg.dataset_name}) and dataset_mixture are set; use one: put the dataset "
            "into the mixture, or pass --dataset_name '' to train on the mixture"
        )
    return [_source(i, entry, cfg, columns) for i, entry in enumerate(cfg.dataset_mixture)]


def _source(index: int, entry: Any, cfg: Any, columns: dict[str, str]) -> Source:
    where = f"dataset_mixture entry {index}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a mapping such as {{dataset: path, weight: 1}}, got {entry!r}")
    for key in entry:
        if key not in SOURCE_KEYS:
            close = difflib.get_close_matches(str(key), SOURCE_KEYS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the keys are {', '.join(SOURCE_KEYS)}"
            raise ConfigError(f"{where} has the unknown key {key!r}; {hint}")
    if not isinstance(entry.get("dataset"), str) or not entry["dataset"]:
        raise ConfigError(f"{where} needs dataset: a Hub id, a data file or a directory")
    shares = [key for key in SHARES if entry.get(key) is not None]
    if len(shares) > 1:
        raise ConfigError(f"{where} gives {' and '.join(shares)}; give one of weight, samples or fraction")
    share = None
    if shares:
        key, value = shares[0], entry[shares[0]]
        valid = {
            "weight": isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
            "samples": isinstance(value, int) and not isinstance(value, bool) and value >= 1,
            "fraction": isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1,
        }[key]
        if not valid:
            need = {"weight": "a number > 0", "samples": "an integer >= 1", "fraction": "a number in (0, 1]"}
            raise ConfigError(f"{where}: {key} must be {need[key]}, got {value!r}")
        share = (key, value)
    own = entry.get("columns") or {}
    if not isinstance(own, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in own.items()
    ):
        raise ConfigError(
            f"{where}: columns must map format fields to column names, e.g. {{prompt: question}}"
        )
    for key in ("config", "split", "eval_split", "format"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise ConfigError(f"{where}: {key} must be a string, got {entry[key]!r}")
    return Source(
        dataset=entry["dataset"],
        config=entry.get("config"),
        split=entry.get("split") or cfg.train_split,
        eval_split=entry.get("eval_split"),
        format=entry.get("format") or cfg.dataset_format,
        columns={**columns, **own},
        share=share,
    )


def load_sft_data(cfg: Any, tokenizer: Any) -> tuple[datasets.Dataset, datasets.Dataset | None, DataReport]:
    """Tokenised train and eval samples (eval None when there is none) and the report of how they were made.

    Every check that reads the data happens here, before a model is loaded or output_dir is touched:
    a run that stops on bad data leaves nothing behind."""
    chosen = sources(cfg)
    mixture = bool(cfg.dataset_mixture)
    fields = [
        f"dataset_mixture entry {i}: dataset" if mixture else "dataset_name" for i in range(len(chosen))
    ]
    loaded = [
        load(source.dataset, source.config, cfg.dataset_num_proc, field)
        for source, field in zip(chosen, fields, strict=True)
    ]
    train_splits, eval_splits = [], []
    for index, (source, data) in enumerate(zip(chosen, loaded, strict=True)):
        train, held_out = train_and_held_out(
            data, source.split, source.eval_split, cfg, stream=index, mixture=mixture
        )
        train_splits.append(train)
        eval_splits.append(held_out)
    counts = _counts(chosen, [len(split) for split in train_splits])
    train_reports, eval_reports, train_sets, eval_sets = [], [], [], []
    for index, (source, split) in enumerate(zip(chosen, train_splits, strict=True)):
        split = (
            _draw(split, counts[index], cfg.seed, index) if mixture else split.first(cfg.max_train_samples)
        )
        tokenized, source_report = _tokenize_source(split, source, tokenizer, cfg)
        source_report.share = dict([source.share]) if source.share else None
        train_sets.append(tokenized)
        train_reports.append(source_report)
    for source, split in zip(chosen, eval_splits, strict=True):
        if split is not None:
            tokenized, source_report = _tokenize_source(split, source, tokenizer, cfg)
            eval_sets.append(tokenized)
            eval_reports.append(source_report)
    train_set = _mix(train_sets, cfg.seed, len(chosen)) if mixture else train_sets[0]
    if mixture and cfg.max_train_samples is not None and cfg.max_train_samples < len(train_set):
        train_set = train_set.select(range(cfg.max_train_samples))
    eval_set = datasets.concatenate_datasets(eval_sets) if eval_sets else None
    if eval_set is not None and cfg.max_eval_samples is not None and cfg.max_eval_samples < len(eval_set):
        eval_set = eval_set.select(range(cfg.max_eval_samples))
    report = DataReport(
        train_reports, eval_reports, len(train_set), None if eval_set is None else len(eval_set), mixture
    )
    return train_set, eval_set, report


def _counts(chosen: list[Source], rows: list[int]) -> list[int]:
    """How many training rows each source gives the mixture (see the module docstring)."""
    weighted = [(i, Fraction(s.share[1])) for i, s in enumerate(chosen) if s.share and s.share[0] == "weight"]
    scale = min((Fraction(rows[i]) / w for i, w in weighted), default=None)
    counts = []
    for i, source in enumerate(chosen):
        kind, value = source.share or ("fraction", 1)
        if kind == "samples":
            counts.append(int(value))
        elif kind == "fraction":
            counts.append(round(value * rows[i]))
        else:
            counts.append(math.floor(scale * Fraction(value)))
        if counts[-1] < 1:
            raise DataError(
                f"dataset_mixture entry {i} ({source.dataset}) would give no row ({kind} {value:g} of its "
                f"{rows[i]} rows); raise its {kind}"
            )
    return counts


def _draw(split: Split, count: int, seed: int, index: int) -> Split:
    """`count` rows of a source, drawn with the seed: every row as often as the count allows, the
    remainder without replacement; in the source's order."""
    rng = np.random.default_rng([seed, _DRAW, index])
    repeats, remainder = divmod(count, len(split))
    drawn = np.sort(rng.choice(len(split), size=remainder, replace=False))
    rows = np.sort(np.concatenate([np.tile(np.arange(len(split)), repeats), drawn]))
    return split.select(rows)


def _mix(sets: list[datasets.Dataset], seed: int, num_sources: int) -> datasets.Dataset:
    mixed = datasets.concatenate_datasets(sets)
    order = np.random.default_rng([seed, _SHUFFLE, num_sources]).permutation(len(mixed))
    return mixed.select(order)


def _tokenize_source(
    split: Split, source: Source, tokenizer: Any, cfg: Any
) -> tuple[datasets.Dataset, SourceReport]:
    """A split's rows read in their format and tokenised, and what became of them."""
    format_name = formats.detect(split, source.format, source.columns)
    rows = formats.normalize(split, format_name, source.columns, cfg.dataset_num_proc)
    report = SourceReport(
        dataset=split.dataset,
        split=split.spec,
        format=format_name,
        detected=source.format == formats.AUTO,
        rows=rows.rows,
        dropped=rows.dropped,
        dropped_why=rows.dropped_why,
    )
    common = {
        "batched": True,
        "num_proc": cfg.dataset_num_proc,
        "remove_columns": rows.split.data.column_names,
    }
    if rows.kind == formats.TEXT:
        plain_text.require_eos(tokenizer)
        documents = map_rows(
            rows.split,
            plain_text.tokenize_text_batch,
            fn_kwargs={"tokenizer": tokenizer},
            desc="Tokenizing",
            **common,
        ).data
        report.tokens = sum(len(document) for document in documents["document"])
        # One process: where blocks start must not depend on how many processes tokenised.
        packing = {
            "batched": True,
            "batch_size": plain_text.PACK_GROUP,
            "remove_columns": ["document"],
            "fn_kwargs": {"block": cfg.max_seq_length},
        }
        fingerprint = map_fingerprint(documents, plain_text.pack_batch, **packing)
        tokenized = documents.map(
            plain_text.pack_batch, **packing, new_fingerprint=fingerprint, desc="Packing"
        )
    else:
        if rows.kind == formats.CHAT:
            chat.require_chat_tokenizer(tokenizer)
            body = chat.tokenize_chat_batch
        else:
            plain_text.require_eos(tokenizer)
            body = plain_text.tokenize_completion_batch
        fn_kwargs = {"tokenizer": tokenizer, "max_seq_length": cfg.max_seq_length}
        tokenized = map_rows(rows.split, body, fn_kwargs=fn_kwargs, desc="Tokenizing", **common).data
    report.truncated = sum(tokenized["truncated"])
    targets = tokenized["num_targets"]
    kept = tokenized.select([i for i, n in enumerate(targets) if n > 0]).remove_columns("truncated")
    report.no_targets = len(tokenized) - len(kept)
    report.samples = len(kept)
    if len(kept) == 0:
        raise DataError(
            f"no sample of {split.name} has a token left to train on: all {len(tokenized)} lost their "
            f"targets to truncation at max_seq_length {cfg.max_seq_length}; raise max_seq_length or "
            "shorten the prompts"
        )
    return kept, report
