"""Loading a dataset's splits the way `datasets.load_dataset` resolves a name, file or directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


class DataError(ValueError):
    """The dataset cannot be used as configured; the message names the split or column and the fix."""


def load_split(dataset_name: str, split: str, config_name: str | None = None) -> datasets.Dataset:
    """One split of a Hub dataset, a local directory of split files, or a single data file.

    A single file has only a "train" split. Missing splits are an error that lists the ones present.
    """
    if not dataset_name:
        raise DataError(
            "dataset_name is empty; set it to a Hub id, a data file or a directory of split files"
        )
    path = Path(dataset_name)
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"cannot read {path}: use one of {', '.join(sorted(_BUILDERS))}")
        splits = datasets.load_dataset(builder, data_files={"train": str(path)})
    else:
        splits = datasets.load_dataset(dataset_name, config_name)
    if split not in splits:
        raise DataError(
            f"dataset {dataset_name} has no split {split!r}; it has {sorted(splits)}. "
            f"Set train_split / eval_split to one of them (eval_split: null turns evaluation off)"
        )
    data = splits[split]
    if len(data) == 0:
        raise DataError(f"split {split!r} of dataset {dataset_name} is empty; it needs at least one sample")
    return data


def require_columns(data: datasets.Dataset, columns: list[str], where: str) -> None:
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise DataError(
            f"{where} has no column {', '.join(map(repr, missing))}; its columns are {data.column_names}. "
            f"Rename the column in the data or point the recipe at the right one"
        )


def first_n(data: datasets.Dataset, n: int | None) -> datasets.Dataset:
    return data.select(range(min(n, len(data)))) if n else data


def make_train_loader(data: datasets.Dataset, cfg: Any, collate_fn: Callable) -> DataLoader:
    """The shuffled training DataLoader of a recipe, before Accelerate shards it.

    It has a generator of its own: starting an iteration draws a seed from the loader's generator, and
    from the global RNG without one, which would make a resumed run's dropout masks differ from an
    uninterrupted run's (the resumed run starts its iteration after restoring the RNG, not before).
    The order itself is set by Accelerate's seedable sampler from (seed, epoch).
    """
    return DataLoader(
        data,
        batch_size=cfg.per_device_train_batch_size,
        shuffle=True,
        collate_fn=collate_fn,
        drop_last=cfg.dataloader_drop_last,
        num_workers=cfg.dataloader_num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
