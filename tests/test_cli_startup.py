"""Every command line answers `--help`, `--version` and a refused option without importing torch, the web stack or
the secure-aggregation graph: those take seconds, and are imported by the command that runs (issue 25)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HEAVY = ("torch", "fastapi", "uvicorn", "cryptography", "scipy", "keyboard_model.secagg", "aggregator.app",
         "device_sim.simulation", "device_sim.fleet")

# (the module whose main() parses, its arguments), each answered without running anything.
ANSWERED_AT_ONCE = [
    ("fedkb.cli", ["--help"]),
    ("fedkb.cli", ["--version"]),
    ("fedkb.cli", ["simulate", "--help"]),
    ("fedkb.cli", ["simulate", "--rounds", "-3"]),
    ("fedkb.cli", ["up", "--help"]),
    ("fedkb.cli", ["up", "--time-budget", "-5"]),
    ("fedkb.cli", ["eval", "--help"]),
    ("fedkb.cli", ["aggregator", "--help"]),
    ("fedkb.cli", ["demo", "--help"]),
    ("fedkb.cli", ["plot", "--help"]),
    ("fedkb.cli", ["audit", "--help"]),
    ("fedkb.cli", ["simulate", "--canaries", "0"]),
    ("fedkb.cli", ["data", "--help"]),
    ("device_sim.cli", ["simulate", "--help"]),
    ("device_sim.cli", ["eval", "--server-epochs", "0"]),
    ("aggregator.cli", ["--help"]),
    ("aggregator.cli", ["--port", "70000"]),
    ("keyboard_model.cli", ["suggest", "--help"]),
    ("web_demo.cli", ["--help"]),
]

PROBE = """
import importlib, sys
for module, argv in {cases!r}:
    try:
        code = importlib.import_module(module).main(argv)
    except SystemExit as done:
        code = done.code
    assert code in (0, 2, None), (module, argv, code)
    loaded = [name for name in {heavy!r} if name in sys.modules]
    assert not loaded, f"{{module}} {{argv}} imported {{loaded}}"
"""


def test_help_version_and_a_refused_option_import_nothing_heavy():
    probe = PROBE.format(cases=ANSWERED_AT_ONCE, heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: fedkb simulate" in result.stdout
    assert "argument --rounds: must be at least 1, got -3" in result.stderr
