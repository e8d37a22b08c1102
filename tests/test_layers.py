"""The layers written in pyproject.toml hold: import-linter checks every import of the five packages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent


def test_the_import_linter_contracts_are_kept(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_the_contracts_would_catch_a_phone_importing_the_servers_internals(tmp_path):
    # The same contracts over a copy whose fleet imports the round manager: they must break.
    contracts = (ROOT / "pyproject.toml").read_text()
    copy = tmp_path / "project"
    for package in ("fedkb", "web_demo", "device_sim", "aggregator", "keyboard_model"):
        for source in (ROOT / package).rglob("*.py"):
            target = copy / source.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(source.read_text())
    fleet = copy / "device_sim" / "fleet.py"
    fleet.write_text("from aggregator.rounds import RoundManager\n" + fleet.read_text())
    (copy / "pyproject.toml").write_text(contracts)
    # In a fresh interpreter, so that the copy's packages are the ones found, not those this one has imported.
    check = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports; "
                            "raise SystemExit(lint_imports(config_filename='pyproject.toml', no_cache=True))"],
                           cwd=copy, env={**os.environ, "PYTHONPATH": str(copy)}, capture_output=True, text=True)
    assert check.returncode == 1
    assert "device_sim.fleet -> aggregator.rounds" in check.stdout
