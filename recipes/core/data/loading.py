"""Loading a dataset's splits the way `datasets.load_dataset` resolves a name, file or directory, with
every failure a DataError that names the file (and the line or row), the column and the fix.

`dataset_name` is a Hub id, one data file (its only split is "train"), a directory of split files
(train.jsonl, validation.jsonl, ...) or a directory written by `Dataset.save_to_disk` /
`DatasetDict.save_to_disk`. A split is named as in `datasets`: `train`, `train[:10%]`, `train[100:200]`,
`train+validation`. Every row keeps its place in the split it came from, so that a bad row inside a
slice, a sample or a mixture is reported where the user can find it: the file and the row (0-based, as
`dataset[row]` counts) and, in a JSON Lines file, the line.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader

from recipes.core.errors import DataError, RowError

_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".arrow": "arrow",
}
_TEXT_FILES = (".jsonl", ".json", ".csv", ".txt")  # checked for UTF-8 and content before loading
SPLIT_SYNTAX = "e.g. train, train[:10%], train[100:200] or train+validation"


@dataclasses.dataclass(frozen=True)
class SplitSlice:
    """Rows start..stop-1 of one split of a dataset as loaded, and the local files that split was read from."""

    split: str
    start: int
    stop: int
    files: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Split:
    """The rows a split spec names, and where each of them came from."""

    data: datasets.Dataset
    dataset: str  # dataset_name as configured
    spec: str  # the split as configured, e.g. "train[:10%]"
    slices: tuple[SplitSlice, ...]
    positions: np.ndarray | None = None  # each row's position among the slices' rows; None: all, in order

    @property
    def name(self) -> str:
        return f"split {self.spec!r} of {self.dataset}"

    def __len__(self) -> int:
        return len(self.data)

    def select(self, rows: Sequence[int]) -> Split:
        """These rows of the split, in this order."""
        rows = np.asarray(rows, dtype=np.int64)
        positions = rows if self.positions is None else self.positions[rows]
        return dataclasses.replace(self, data=self.data.select(rows), positions=positions)

    def first(self, n: int | None) -> Split:
        """The first n rows (all of them when n is None or the split is shorter)."""
        return self.select(range(n)) if n is not None and n < len(self) else self

    def with_data(self, data: datasets.Dataset) -> Split:
        """The same rows, converted by a row-for-row map."""
        assert len(data) == len(self.data)
        return dataclasses.replace(self, data=data)

    def locate(self, row: int) -> str:
        """Where row `row` of this split is: the file, the row of its split and, in JSON Lines, the line."""
        position = row if self.positions is None else int(self.positions[row])
        for piece in self.slices:
            if position < piece.stop - piece.start:
                return _describe_row(self, piece, piece.start + position)
            position -= piece.stop - piece.start
        raise IndexError(row)

    def row_error(self, err: RowError) -> DataError:
        return DataError(f"{self.locate(err.row)}, column {err.column!r}: {err.problem}; {err.fix}")


def _describe_row(split: Split, piece: SplitSlice, row: int) -> str:
    where = f"row {row} of split {piece.split!r} of {split.dataset}"
    if not piece.files:
        return where
    if all(file.endswith(".jsonl") for file in piece.files):
        found = _json_line(piece.files, row)
        if found:
            return f"{found[0]} (split {piece.split!r}), line {found[1]} (row {row})"
    if len(piece.files) == 1:
        return f"{piece.files[0]} (split {piece.split!r}), row {row}"
    return where


def _json_line(files: Sequence[str], row: int) -> tuple[str, int] | None:
    """The file and line of the row-th record of JSON Lines files read in order (blank lines hold none)."""
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as f:
            for line_number, line in enumerate(f, 1):
                if line.strip():
                    if row == 0:
                        return file, line_number
                    row -= 1
    return None


@dataclasses.dataclass(frozen=True)
class Loaded:
    """Every split of a dataset as loaded, and the local files each was read from (none for Hub data and
    save_to_disk directories)."""

    dataset: str
    splits: dict[str, datasets.Dataset]
    files: dict[str, list[str]]

    def has(self, spec: str) -> bool:
        return all(name in self.splits for name in _split_names(spec))

    def split(self, spec: str, field: str = "train_split") -> Split:
        """The rows of split spec `spec` (`train`, `train[:10%]`, `train[100:200]`, `a+b`); `field` names
        the config field it comes from, for the message when the dataset lacks it."""
        missing = [name for name in _split_names(spec) if name not in self.splits]
        if missing:
            raise DataError(
                f"dataset {self.dataset} has no split {missing[0]!r}; it has {sorted(self.splits)}. "
                f"Set {field} to one of them{_NO_SPLIT_FIX.get(field, '')}"
            )
        try:
            instructions = datasets.ReadInstruction.from_spec(spec).to_absolute(
                {name: len(data) for name, data in self.splits.items()}
            )
        except (ValueError, AssertionError) as err:
            raise DataError(
                f"{field} {spec!r} is not a split or a slice of one ({err}); {SPLIT_SYNTAX}"
            ) from None
        slices, selected = [], []
        for instruction in instructions:
            data, start = self.splits[instruction.splitname], instruction.from_
            stop = max(start, instruction.to)
            selected.append(data if (start, stop) == (0, len(data)) else data.select(range(start, stop)))
            files = tuple(self.files.get(instruction.splitname, ()))
            slices.append(SplitSlice(instruction.splitname, start, stop, files))
        data = selected[0] if len(selected) == 1 else datasets.concatenate_datasets(selected)
        if len(data) == 0:
            raise DataError(
                f"{field} {spec!r} of dataset {self.dataset} has no rows; it needs at least one sample"
            )
        return Split(data, self.dataset, spec, tuple(slices))


def load_split(
    dataset_name: str,
    split: str,
    config_name: str | None = None,
    *,
    field: str = "train_split",
    num_proc: int | None = None,
) -> Split:
    """The rows of split spec `split` of a dataset (see Loaded.split)."""
    return load(dataset_name, config_name, num_proc).split(split, field)


def load(
    dataset_name: str,
    config_name: str | None = None,
    num_proc: int | None = None,
    field: str = "dataset_name",
) -> Loaded:
    """Every split of a dataset: a Hub id, a data file, a directory of split files or of save_to_disk.
    `field` is how messages name the setting it comes from (e.g. a dataset_mixture entry's dataset)."""
    if not dataset_name:
        raise DataError(f"{field} is empty; set it to a Hub id, a data file or a directory of split files")
    splits, files = _read_splits(dataset_name, config_name, num_proc, field)
    return Loaded(dataset_name, splits, files)


def require_dataset_path(dataset_name: str, field: str = "dataset_name") -> None:
    """A dataset_name only a local path can be (a data file's suffix, or starting with ., / or ~) exists."""
    path = Path(dataset_name).expanduser()
    local = path.suffix.lower() in _BUILDERS or dataset_name.startswith((".", "/", "~"))
    if local and not path.exists():
        raise DataError(
            f"{field} {dataset_name}: no such file or directory; pass the path of a data file, a "
            "directory of split files or a save_to_disk directory (relative paths start where the run starts)"
        )


_NO_SPLIT_FIX = {
    "eval_split": " (eval_split: null turns evaluation off; eval_split_size holds out training rows instead)",
    "test_split": " (test_split: null skips the test)",
}


def _split_names(spec: str) -> list[str]:
    return [re.split(r"[\[(]", part, maxsplit=1)[0].strip() for part in spec.split("+")]


def _read_splits(
    dataset_name: str, config_name: str | None, num_proc: int | None, field: str
) -> tuple[dict[str, datasets.Dataset], dict[str, list[str]]]:
    """Every split of a dataset, and the local files each split was read from (none for Hub data and
    save_to_disk directories). Files are checked before `datasets` reads them; a failure to read names
    the file and what is wrong in it."""
    path = Path(dataset_name).expanduser()
    if path.is_file():
        files = {"train": [str(path)]}
        return _load_files(_builder(path), files, num_proc), files
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk
            return dict(datasets.load_from_disk(str(path))), {}
        if (path / "state.json").is_file():  # Dataset.save_to_disk: one split
            return {"train": datasets.load_from_disk(str(path))}, {}
        files = _split_files(path)
        for split_files in files.values():
            for file in split_files:
                check_file(Path(file))
        try:
            with _quiet_reader():
                loaded = datasets.load_dataset(str(path), config_name, num_proc=num_proc)
        except Exception as err:
            raise _unreadable(dataset_name, files, err) from None
        # A README.md may define configurations with data files of their own: then which file a row
        # came from is not known here, and rows are named by split and number only.
        return dict(loaded), {} if (path / "README.md").is_file() else files
    require_dataset_path(dataset_name, field)
    try:
        with _quiet_reader():
            return dict(datasets.load_dataset(dataset_name, config_name, num_proc=num_proc)), {}
    except Exception as err:
        raise DataError(
            f"{field} {dataset_name} is not a local file or directory and cannot be loaded from the Hub "
            f"({_root_cause(err)}); pass the path of a data file or directory, or a Hub id (offline, only "
            "datasets already in the cache), with dataset_config_name when it has several configurations"
        ) from None


def _builder(path: Path) -> str:
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"cannot read {path}: use one of {', '.join(sorted(_BUILDERS))}")
    return builder


def _split_files(directory: Path) -> dict[str, list[str]]:
    """The data files of each split of a directory, found by `datasets`' own naming rules."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        found = DataFilesDict.from_patterns(get_data_patterns(str(directory)), base_path=str(directory))
    except Exception as err:  # EmptyDatasetError and friends
        raise DataError(
            f"directory {directory} holds no data files ({_root_cause(err)}); put split files in it "
            f"(train.jsonl, validation.jsonl, ...; one of {', '.join(sorted(_BUILDERS))})"
        ) from None
    return {str(split): [str(file) for file in files] for split, files in found.items()}


def _load_files(
    builder: str, files: dict[str, list[str]], num_proc: int | None
) -> dict[str, datasets.Dataset]:
    for split_files in files.values():
        for file in split_files:
            check_file(Path(file))
    try:
        with _quiet_reader():
            return dict(datasets.load_dataset(builder, data_files=files, num_proc=num_proc))
    except Exception as err:
        raise _unreadable(next(iter(files.values()))[0], files, err) from None


@contextlib.contextmanager
def _quiet_reader() -> Iterator[None]:
    """`datasets` logs a reader's failure before raising it ("JSON parse error ... in row 4", counting
    rows from 0), and the DataError the recipe then raises names the file and line itself (_unreadable):
    the log would only contradict it, so `datasets` logs nothing below CRITICAL while it reads."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_file(path: Path) -> None:
    """A text data file is UTF-8 and holds something other than whitespace (one pass over its bytes)."""
    if path.suffix.lower() not in _TEXT_FILES:
        return
    decoder, line, content = codecs.getincrementaldecoder("utf-8")(), 1, False
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                before = chunk[: err.start]
                line += before.count(b"\n")
                column = err.start - (before.rfind(b"\n") + 1) + 1
                raise DataError(
                    f"{path}, line {line}: not UTF-8 (byte 0x{chunk[err.start]:02x} at column {column}); "
                    "save the file as UTF-8, e.g. iconv -f <its encoding> -t UTF-8"
                ) from None
            line += chunk.count(b"\n")
            content = content or bool(chunk.strip())
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(
            f"{path}, line {line}: ends inside a UTF-8 character (truncated file?); save the file as UTF-8"
        ) from None
    if not content:
        raise DataError(
            f"{path} is empty (no rows); write the data into it, or point dataset_name at another file"
        )


def _unreadable(dataset: str, files: dict[str, list[str]], err: Exception) -> DataError:
    """The DataError for files `datasets` could not read: the first bad line of a JSON file, or the
    reader's own reason."""
    for split_files in files.values():
        for file in split_files:
            if file.lower().endswith((".jsonl", ".json")):
                problem = _json_problem(Path(file))
                if problem:
                    return DataError(
                        f"{file}, {problem}; fix that line (JSON Lines: one JSON object per line) and run again"
                    )
    return DataError(
        f"cannot read dataset {dataset} ({_root_cause(err)}); check that every file is valid "
        f"{'/'.join(sorted({Path(f).suffix.lstrip('.') for fs in files.values() for f in fs}))} with the same "
        "columns, holding values of the same types, in every row and every file"
    )


def _json_problem(path: Path) -> str | None:
    """The first line of a JSON (Lines) file that is not a JSON object, described; None when all are."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json":
        try:
            json.loads(text)
            return None  # one JSON document: the reader's own reason applies
        except json.JSONDecodeError as err:
            first = next((line for line in text.splitlines() if line.strip()), "")
            if not _parses(first):  # not JSON Lines either
                return f"line {err.lineno}: {_invalid_json(err)}"
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {number}: {_invalid_json(err)}"
        if not isinstance(value, dict):
            return f"line {number}: a JSON {type(value).__name__}, not an object {{...}}"
    return None


def _invalid_json(err: json.JSONDecodeError) -> str:
    # Some of json's reasons end in "at" ("Unterminated string starting at"): the column completes them.
    where = "column" if err.msg.endswith(" at") else "at column"
    return f"not valid JSON ({err.msg} {where} {err.colno})"


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _root_cause(err: BaseException) -> str:
    """The innermost exception's message: `datasets` wraps the reader's error in its own."""
    while err.__cause__ is not None or (err.__context__ is not None and not str(err)):
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def require_columns(data: datasets.Dataset | Split, columns: list[str], where: str) -> None:
    names = data.data.column_names if isinstance(data, Split) else data.column_names
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(
            f"{where} has no column {', '.join(map(repr, missing))}; its columns are {names}. "
            f"Rename the column in the data or point the recipe at the right one"
        )


def hold_out(split: Split, size: float, seed: int, stream: int = 0) -> tuple[Split, Split]:
    """`split` without, and with only, the rows eval_split_size holds out: `size` rows (>= 1) or that
    fraction of them (< 1, rounded), drawn with the seed (and `stream`, e.g. a mixture entry's index);
    both keep the split's order."""
    held = int(size) if size >= 1 else round(size * len(split))
    if not 1 <= held < len(split):
        raise DataError(
            f"eval_split_size {size:g} holds out {held} of the {len(split)} rows of {split.name}; it must "
            "leave at least one row for evaluation and one for training"
        )
    order = np.random.default_rng([seed, stream]).permutation(len(split))
    return split.select(np.sort(order[held:])), split.select(np.sort(order[:held]))


def train_and_held_out(
    data: Loaded, train_split: str, eval_split: str | None, cfg: Any, stream: int = 0, mixture: bool = False
) -> tuple[Split, Split | None]:
    """A dataset's training rows and its evaluation rows: its `eval_split`, or rows held out of the
    training split by cfg.eval_split_size (drawn with the seed and `stream`), or none (also when
    cfg.eval_split is null: evaluation is off). `mixture`: the splits are a dataset_mixture entry's."""
    train = data.split(train_split, "split of a dataset_mixture entry" if mixture else "train_split")
    if cfg.eval_split is None:
        return train, None
    if eval_split and (data.has(eval_split) or not cfg.eval_split_size):
        field = "eval_split of a dataset_mixture entry" if mixture else "eval_split"
        return train, data.split(eval_split, field).first(None if mixture else cfg.max_eval_samples)
    if not cfg.eval_split_size:
        return train, None
    return hold_out(train, cfg.eval_split_size, cfg.seed, stream=stream)


def map_rows(split: Split, function: Callable, **kwargs: Any) -> Split:
    """`split.data.map(function, with_indices=True, **kwargs)`, a RowError raised for a row (in this
    process or a worker) turned into the DataError that says where that row is."""
    kwargs["new_fingerprint"] = map_fingerprint(split.data, function, with_indices=True, **kwargs)
    try:
        return split.with_data(split.data.map(function, with_indices=True, **kwargs))
    except RowError as err:
        raise split.row_error(err) from None


def _data_code() -> str:
    """A digest of this package's source: every function a map body calls lives in it."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


DATA_CODE = _data_code()


def map_fingerprint(data: datasets.Dataset, function: Callable, **kwargs: Any) -> str:
    """The fingerprint `data.map(function, **kwargs)` caches its result under, which also changes with the
    data code: `datasets` hashes the map body but not the functions it calls, so a cached result made by
    older code (another truncation rule, another drop) would otherwise be reused after an update."""
    from datasets.fingerprint import Hasher

    used = {k: v for k, v in kwargs.items() if k not in ("desc", "num_proc", "new_fingerprint")}
    return Hasher.hash([data._fingerprint, function, sorted(used.items()), DATA_CODE])


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
