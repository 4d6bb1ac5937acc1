"""How a recipe stops on bad input: one paragraph naming the problem and the fix, no library traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from recipes.core.config import ConfigError
from recipes.core.data import DataError

EXIT_USER_ERROR = 2


class RunStopped(ConfigError):
    """Training stopped at a step on a problem the message explains; reported like a config error."""


USER_ERRORS = (ConfigError, DataError)


def run_recipe(main: Callable[[], None]) -> None:
    """Call a recipe's main; configuration and data errors exit with status 2 and their message."""
    try:
        main()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
