"""Classification data: label ids from names or integers, the splits tokenised with their labels checked,
rows with an empty text dropped and counted, and what the recipe prints and plan.json records of them.

Integer labels are class ids 0..N-1. Without label_names, the classes are the ids 0 to the train split's
largest, each of which must occur there: an id skipped (labels 0-3 and 7) would make classes with no
example, so it is an error naming the row. With label_names, the names say how many classes there are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import datasets

from recipes.core.config import ConfigError
from recipes.core.data.loading import Split, hold_out, load, map_rows, require_columns
from recipes.core.errors import MISSING, DataError, RowError, shown

NON_MODEL_KEYS = ("labels", "idx", "num_tokens")
DROPPED_WHY = "empty text"  # why a row is dropped: nothing to classify


def label_mapping(
    train: Split, label_column: str, label_names: list[str]
) -> tuple[list[str], Callable[[Any], int | None]]:
    """Class names and a function turning a label value into a class id.

    Names come from `label_names`, else the column's ClassLabel names, else, for integer labels, the ids
    0 to the largest (class_ids), else the train split's sorted distinct names. Integer labels are ids;
    names are looked up. Labels are checked first (check_labels): sorting them must not meet a null.
    """
    feature = train.data.features[label_column]
    ids_are_given = str(getattr(feature, "dtype", "")).startswith("int")
    names = list(label_names) or (feature.names if isinstance(feature, datasets.ClassLabel) else [])
    if not names:
        names = (
            class_ids(train, label_column)
            if ids_are_given
            else [str(v) for v in sorted(set(train.data[label_column]))]
        )
    if len(names) < 2:
        where, fix = (
            ("in label_names", "list every class in label_names, in id order")
            if label_names
            else (
                f"in column {label_column!r} of {train.name}",
                "check that label_column names the labels and that the split holds examples of every class",
            )
        )
        raise DataError(f"classification needs at least 2 classes, found {names} {where}; {fix}")
    index = {name: i for i, name in enumerate(names)}

    def to_id(value: Any) -> int | None:
        """The class id of a label, None when it is none of the classes."""
        if not ids_are_given:
            return index.get(str(value))
        is_id = isinstance(value, int) and 0 <= value < len(names)  # a name in another split is no id
        return value if is_id else None

    return names, to_id


def class_ids(train: Split, column: str) -> list[str]:
    """The classes of integer labels without names: "0" to the largest id, every one of them a label in
    the train split; a negative or a skipped id is an error naming the row."""
    values = train.data[column]
    for row, value in enumerate(values):
        if value < 0:
            problem = f"the label {value} is a negative integer; integer labels are class ids 0 to N-1"
            fix = "renumber the labels 0 to N-1, or remove the rows without a class (-1 often marks them)"
            raise train.row_error(RowError(row, column, problem, fix))
    missing = sorted(set(range(max(values) + 1)) - set(values))
    if missing:
        row = next(row for row, value in enumerate(values) if value > missing[0])
        shown = ", ".join(map(str, missing[:5])) + (f", ... ({len(missing)} ids)" if len(missing) > 5 else "")
        problem = (
            f"the label {values[row]} skips the class id{'s' if len(missing) > 1 else ''} {shown}, which no "
            "row has; integer labels are class ids 0 to N-1"
        )
        fix = "renumber the labels 0 to N-1, or name every class in label_names, in id order"
        raise train.row_error(RowError(row, column, problem, fix))
    return [str(i) for i in range(len(set(values)))]


def check_labels(split: Split, column: str) -> None:
    """Every label is a class name (string) or a class id (integer): the first that is not (null, a
    float, a list) stops the run with its row."""
    for row, value in enumerate(split.data[column]):
        if isinstance(value, (str, int)):  # bool is an int: True/False are class names
            continue
        if value is None:
            problem = f"the row has no label ({MISSING})"
            fix = "give every row a label, or remove the rows without one"
        elif isinstance(value, float):
            problem = f"the label is the float {value!r}; labels are class names or integer class ids"
            fix = "write ids as integers (1, not 1.0); a CSV column with an empty cell is read as floats"
        else:
            problem, fix = f"the label is {type(value).__name__} {value!r:.60}", "give one class per row"
        raise split.row_error(RowError(row, column, problem, fix))


def check_metric_config(cfg) -> None:
    """The metric fields of a ClassifyConfig agree with each other."""
    if not isinstance(cfg.metric_kwargs, dict) or not all(
        isinstance(v, dict) for v in cfg.metric_kwargs.values()
    ):
        raise ConfigError(
            f"metric_kwargs must map metric names to argument mappings, got {cfg.metric_kwargs!r}"
        )
    unused = sorted(set(cfg.metric_kwargs) - set(cfg.metrics))
    if unused:
        raise ConfigError(f"metric_kwargs has arguments for {unused}, which are not in metrics {cfg.metrics}")
    if cfg.metric_for_best_model and not cfg.eval_split:
        raise ConfigError(
            "metric_for_best_model needs an eval_split; set one or set metric_for_best_model: null"
        )


@dataclasses.dataclass
class SplitReport:
    """What became of the rows of one split, in one role (train, eval or test)."""

    role: str
    dataset: str
    split: str
    rows: int
    samples: int
    dropped: int  # rows with an empty text

    def line(self) -> str:
        return (
            f"{self.role} data: split {self.split!r} of {self.dataset}: {self.rows} rows: {self.samples} kept, "
            f"{self.dropped} dropped ({DROPPED_WHY})"
        )


@dataclasses.dataclass
class ClassificationData:
    """The class names, the tokenised splits ("train", then eval_split and test_split when set) and what
    became of their rows (under the same keys); `summary` is printed, `to_dict` goes into plan.json."""

    label_names: list[str]
    splits: dict[str, datasets.Dataset]
    reports: dict[str, SplitReport]

    def summary(self) -> str:
        lines = [report.line() for report in self.reports.values()]
        return "\n".join([*lines, f"train samples: {len(self.splits['train'])}, classes: {self.label_names}"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": self.label_names,
            "samples": {name: len(data) for name, data in self.splits.items()},
            "splits": {name: dataclasses.asdict(report) for name, report in self.reports.items()},
        }


def load_classification_data(cfg, tokenizer) -> ClassificationData:
    """Class names and the tokenised splits of a ClassifyConfig: "train", eval_split and test_split (when
    set). Without an eval_split in the dataset, eval_split_size holds rows out of the train split. A row
    whose text (or text pair) is empty is dropped and counted, in every split.

    Each sample keeps its position in its split ("idx"), so that a test can check that it is scored once.
    """
    loaded = load(cfg.dataset_name, cfg.dataset_config_name, cfg.dataset_num_proc)
    train = loaded.split(cfg.train_split, "train_split")
    raw, roles = {}, {"train": "train"}
    if cfg.eval_split:
        roles[cfg.eval_split] = "eval"
        if loaded.has(cfg.eval_split) or not cfg.eval_split_size:
            raw[cfg.eval_split] = loaded.split(cfg.eval_split, "eval_split").first(cfg.max_eval_samples)
        else:
            train, held_out = hold_out(train, cfg.eval_split_size, cfg.seed)
            raw[cfg.eval_split] = held_out.first(cfg.max_eval_samples)
    if cfg.test_split:
        roles[cfg.test_split] = "test"
        raw[cfg.test_split] = loaded.split(cfg.test_split, "test_split")
    raw = {"train": train.first(cfg.max_train_samples), **raw}
    columns = [cfg.text_column, cfg.label_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    for split in raw.values():
        require_columns(split, columns, split.name)
        check_labels(split, cfg.label_column)
    label_names, to_id = label_mapping(raw["train"], cfg.label_column, cfg.label_names)
    texts = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])

    def encode(batch: dict, indices: list[int]) -> dict:
        for column in texts:
            for row, text in zip(indices, batch[column], strict=True):
                if not isinstance(text, str):
                    problem = (
                        f"the row has no text ({MISSING})" if text is None else f"the text is {shown(text)}"
                    )
                    raise RowError(row, column, problem, "give every row its text as a string")
        pair = batch[cfg.text_pair_column] if cfg.text_pair_column else None
        out = tokenizer(batch[cfg.text_column], pair, truncation=True, max_length=cfg.max_seq_length)
        labels = []
        for row, value in zip(indices, batch[cfg.label_column], strict=True):
            label = to_id(value)
            if label is None:
                raise RowError(
                    row,
                    cfg.label_column,
                    f"the label {value!r} is not one of the classes {label_names}",
                    "list every class in label_names (in id order)"
                    if not cfg.label_names
                    else "add it to label_names, or correct the label",
                )
            labels.append(label)
        out["labels"] = labels
        out["idx"] = indices
        out["num_tokens"] = [len(ids) for ids in out["input_ids"]]
        out["keep"] = [all(batch[column][i].strip() for column in texts) for i in range(len(indices))]
        return out

    splits, reports = {}, {}
    for key, split in raw.items():
        encoded = map_rows(
            split,
            encode,
            batched=True,
            remove_columns=split.data.column_names,
            num_proc=cfg.dataset_num_proc,
        ).data
        kept = encoded.select([i for i, keep in enumerate(encoded["keep"]) if keep]).remove_columns("keep")
        if len(kept) == 0:
            raise DataError(
                f"none of the {len(split)} rows of {split.name} has a text to classify ({DROPPED_WHY} in "
                f"every row); check text_column {cfg.text_column!r}"
                + (f" and text_pair_column {cfg.text_pair_column!r}" if cfg.text_pair_column else "")
            )
        splits[key] = kept
        reports[key] = SplitReport(
            roles[key], split.dataset, split.spec, len(split), len(kept), len(split) - len(kept)
        )
    return ClassificationData(label_names, splits, reports)


def classifier_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
