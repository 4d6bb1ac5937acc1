"""Classification data: label ids from names or integers, the splits tokenised with their labels checked,
and what plan.json records of them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets

from recipes.core.config import ConfigError
from recipes.core.data.loading import Split, hold_out, load, map_rows, require_columns
from recipes.core.errors import DataError, RowError

NON_MODEL_KEYS = ("labels", "idx", "num_tokens")


def label_mapping(
    train: datasets.Dataset, label_column: str, label_names: list[str]
) -> tuple[list[str], Callable[[Any], int | None]]:
    """Class names and a function turning a label value into a class id.

    Names come from `label_names`, else the column's ClassLabel names, else the train split's sorted
    distinct values. Integer labels with known names are ids; anything else is looked up by name.
    Labels are checked first (check_labels): sorting them must not meet a null.
    """
    feature = train.features[label_column]
    names = list(label_names) or (feature.names if isinstance(feature, datasets.ClassLabel) else [])
    ids_are_given = bool(names) and str(getattr(feature, "dtype", "")).startswith("int")
    if not names:
        # Numbers in numeric order, then names (check_labels let only these two kinds through).
        names = [str(v) for v in sorted(set(train[label_column]), key=lambda v: (isinstance(v, str), v))]
    if len(names) < 2:
        raise DataError(f"classification needs at least 2 classes, found {names} in column {label_column!r}")
    index = {name: i for i, name in enumerate(names)}

    def to_id(value: Any) -> int | None:
        """The class id of a label, None when it is none of the classes."""
        label = value if ids_are_given else index.get(str(value))
        return label if label is not None and 0 <= label < len(names) else None

    return names, to_id


def check_labels(split: Split, column: str) -> None:
    """Every label is a class name (string) or a class id (integer): the first that is not (null, a
    float, a list) stops the run with its row."""
    for row, value in enumerate(split.data[column]):
        if isinstance(value, (str, int)):  # bool is an int: True/False are class names
            continue
        if value is None:
            problem, fix = "the label is null", "give every row a label, or remove the rows without one"
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


def load_classification_data(cfg, tokenizer) -> tuple[list[str], dict[str, datasets.Dataset]]:
    """Class names and the tokenised splits of a ClassifyConfig: "train", eval_split and test_split (when
    set). Without an eval_split in the dataset, eval_split_size holds rows out of the train split.

    Each sample keeps its position in its split ("idx"), so that a test can check that it is scored once.
    """
    loaded = load(cfg.dataset_name, cfg.dataset_config_name, cfg.dataset_num_proc)
    train = loaded.split(cfg.train_split, "train_split")
    raw = {}
    if cfg.eval_split:
        if loaded.has(cfg.eval_split) or not cfg.eval_split_size:
            raw[cfg.eval_split] = loaded.split(cfg.eval_split, "eval_split").first(cfg.max_eval_samples)
        else:
            train, held_out = hold_out(train, cfg.eval_split_size, cfg.seed)
            raw[cfg.eval_split] = held_out.first(cfg.max_eval_samples)
    if cfg.test_split:
        raw[cfg.test_split] = loaded.split(cfg.test_split, "test_split")
    raw = {"train": train.first(cfg.max_train_samples), **raw}
    columns = [cfg.text_column, cfg.label_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    for split in raw.values():
        require_columns(split, columns, split.name)
        check_labels(split, cfg.label_column)
    label_names, to_id = label_mapping(raw["train"].data, cfg.label_column, cfg.label_names)
    texts = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])

    def encode(batch: dict, indices: list[int]) -> dict:
        for column in texts:
            for row, text in zip(indices, batch[column], strict=True):
                if not isinstance(text, str):
                    shown = "null" if text is None else f"{type(text).__name__} {text!r:.60}"
                    raise RowError(row, column, f"the text is {shown}", "give every row its text as a string")
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
        return out

    splits = {
        key: map_rows(
            split,
            encode,
            batched=True,
            remove_columns=split.data.column_names,
            num_proc=cfg.dataset_num_proc,
        ).data
        for key, split in raw.items()
    }
    return label_names, splits


def data_record(label_names: list[str], splits: dict[str, datasets.Dataset]) -> dict[str, Any]:
    """What plan.json records of a classification run's data: the classes and the samples of each split."""
    return {"classes": label_names, "samples": {name: len(data) for name, data in splits.items()}}


def classifier_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
