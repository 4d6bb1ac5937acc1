"""The code base stays ruff-clean (lint and format), as configured in pyproject.toml."""

import subprocess
import sys

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow  # ruff runs as a process


def test_ruff_check_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


def test_ruff_format_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "."], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout
