"""The doctor's findings: the problems a rule yields (core/config.py Problem) in one file, each pointing at
its key's line, and how they read. Config files load into findings too: a syntax error is one."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from recipes.core.config import ConfigFileError, ConfigProblems, Problem, describe_problem, read_mapping


@dataclass(frozen=True)
class Finding:
    file: str
    key: str
    problem: str
    fix: str
    line: int | None = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file

    def __str__(self) -> str:
        return describe_problem(self.where, self.key, self.problem, self.fix)


class DoctorError(ConfigProblems):
    """Configs that disagree, found by the doctor's checks at a recipe's start-up; the message lists every
    finding."""

    def __init__(self, found: list[Finding]) -> None:
        super().__init__([(f.where, f.key, f.problem, f.fix) for f in found])
        self.findings = found


def report(findings: list[Finding]) -> str:
    return "\n".join(str(f) for f in findings)


def findings(file: str, problems: Iterable[Problem]) -> list[Finding]:
    """The one way a Finding is made: a rule's problems in `file`, each pointing at its key's line."""
    return [Finding(file, key, problem, fix, key_line(file, key)) for key, problem, fix in problems]


def run_rules(file: str, rules: Iterable[Callable[[dict], Iterable[Problem]]], data: dict) -> list[Finding]:
    """Every rule over `data`, the config read from `file`, as findings."""
    return findings(file, (problem for rule in rules for problem in rule(data)))


def unknown_keys(data: dict, known: Collection[str], prefix: str = "") -> Iterator[Problem]:
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            yield prefix + str(key), "unknown key", f"did you mean {close[0]!r}?" if close else "remove it"


def load_config_file(path: str | Path) -> tuple[dict | None, list[Finding]]:
    """Parse a YAML or JSON file; a syntax error or non-mapping is a finding with its line number."""
    try:
        return read_mapping(path), []
    except ConfigFileError as err:
        return None, [Finding(str(path), "-", err.problem, err.fix, err.line)]


def key_line(path: str | Path, dotted_key: str) -> int | None:
    """Line of the last component of `dotted_key` in a YAML or JSON file, for pointing at it."""
    name = dotted_key.rsplit(".", 1)[-1]
    pattern = re.compile(rf"^\s*\"?{re.escape(name)}\"?\s*:")
    try:
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if pattern.match(line):
                return number
    except OSError:
        return None
    return None
