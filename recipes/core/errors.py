"""How a recipe stops on bad input: one paragraph naming the problem and the fix, no library traceback,
exit status 2; and how each process records its exit status for `recipes launch` (core/exit_status.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from recipes.core import exit_status
from recipes.core.config import ConfigError
from recipes.core.exit_status import EXIT_USER_ERROR


class DataError(ValueError):
    """The dataset cannot be used as configured; the message names the split or column and the fix."""


class RowError(DataError):
    """A problem with one row, raised where the row is read (possibly in a `datasets.map` worker, hence
    the plain constructor arguments, which pickle). The Split the row belongs to turns it into the
    DataError a user reads (Split.row_error), naming the file, the row and the column."""

    def __init__(self, row: int, column: str, problem: str, fix: str) -> None:
        super().__init__(row, column, problem, fix)
        self.row, self.column, self.problem, self.fix = row, column, problem, fix

    def __str__(self) -> str:
        return f"row {self.row}, column {self.column!r}: {self.problem}; {self.fix}"


# A value that is None was absent from its row or null: once loaded, `datasets` holds both (and an empty
# CSV cell) as None, so a message names all of them rather than calling a missing key "null".
MISSING = "a missing key, a null or an empty cell"


def shown(value: Any) -> str:
    """A row's value as a message shows it: its type and the start of its repr."""
    if value is None:
        return f"no value ({MISSING})"
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


class RunStopped(ConfigError):
    """Training stopped at a step on a problem the message explains; reported like a config error."""


class StoppedWithMainProcess(ConfigError):
    """The main process stopped on bad input and printed why; another process stops with it, silently
    (so that a launch of N processes prints the message once, and none waits for a process that is gone)."""


USER_ERRORS = (ConfigError, DataError)


def run_recipe(main: Callable[[], None]) -> None:
    """Call a recipe's main; configuration and data errors exit with status 2 and their message. How the
    process ends is recorded for `recipes launch`."""
    try:
        main()
    except USER_ERRORS as err:
        if not isinstance(err, StoppedWithMainProcess):
            print(f"error: {err}", file=sys.stderr)
        exit_status.record(EXIT_USER_ERROR, str(err))
        raise SystemExit(EXIT_USER_ERROR) from None
    except SystemExit as stop:  # 75 after a signal and a checkpoint; --help
        exit_status.record(stop.code if isinstance(stop.code, int) else exit_status.EXIT_CRASH)
        raise
    except BaseException as err:
        exit_status.record(exit_status.EXIT_CRASH, f"{type(err).__name__}: {err}")
        raise
    exit_status.record(exit_status.EXIT_OK)
