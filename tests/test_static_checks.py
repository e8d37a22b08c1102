"""The code's types and style, as pyproject.toml configures them, checked in the suite: mypy over the five packages,
ruff over everything. Where mypy does not yet hold is written down in pyproject.toml ([[tool.mypy.overrides]],
ignore_errors), module by module, so that the list can only shrink."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.mark.slow
def test_mypy_finds_nothing(tmp_path):
    # A cache of its own: a stale one from another checkout cannot hide an error.
    result = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy-cache")], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
