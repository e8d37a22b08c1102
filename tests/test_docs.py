"""The documentation holds: the site builds strictly, the README stays a short front door whose links resolve, the
HTTP API page names every route the aggregator serves, and the tutorials' small commands run as written."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from keyboard_model.model import ModelConfig
from tests.conftest import SMALL_TEXT

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TUTORIALS = sorted((DOCS / "tutorials").glob("*.md"))
README_MAX_LINES = 250
README_START = """# fedkeyboard

```bash
bash dev.sh up     # set up .venv, prepare the Shakespeare corpus, train ~10 min with a simulated phone fleet, \
serve the keyboard
bash dev.sh test   # set up .venv (and Debian's headless Chromium) and run the whole test suite
```
"""
# Fenced blocks: the language after the opening fence, and the block's text.
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
# A tutorial's blocks: `bash` ones are small and run by this test; `console` ones are full size and are not run;
# the rest are code to read.
TUTORIAL_FENCES = {"bash", "console", "python", "toml", "text"}


@pytest.mark.timeout(120)
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """`mkdocs build --strict`: a broken link, a missing image or a page left out of the nav fails it."""
    site = tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], check=False,
                           cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stdout + built.stderr
    assert (site / "index.html").is_file()
    assert (site / "api" / "index.html").is_file()


def test_the_readme_is_a_short_front_door_that_starts_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    assert text.startswith(README_START)
    # fedkb up compares its run with the README's (fedkb/up.py, README_ROUNDS): that run stays in its table.
    from fedkb.up import README_ROUNDS

    assert f"federated CIFG-LSTM after {README_ROUNDS} rounds" in text


def test_every_relative_link_in_the_readme_points_to_a_file() -> None:
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert relative, "the README links to the docs"
    missing = [t for t in relative if not (ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_the_api_page_names_every_route_of_the_aggregator(tmp_path: Path, small_tokenizer_path: Path,
                                                         small_model_config: ModelConfig) -> None:
    from aggregator.app import create_app
    from aggregator.process import local_aggregator_config

    config = local_aggregator_config(tmp_path, small_tokenizer_path, model=small_model_config)
    routes = {(method.upper(), path) for path, operations in create_app(config).openapi()["paths"].items()
              for method in operations}
    assert ("POST", "/checkin") in routes
    # The page's table names each as a code span: `METHOD /path`, perhaps followed by a query or a body.
    named = set(re.findall(r"`([A-Z]+) (/[^`\s?]*)", (DOCS / "api.md").read_text()))
    undocumented = sorted(routes - named)
    assert not undocumented, f"docs/api.md does not name these routes: {undocumented}"


def commands(page: Path) -> list[list[str]]:
    """The commands of a page's ```bash blocks, one argv each (continuation lines joined, comments dropped)."""
    found = []
    for language, block in FENCE.findall(page.read_text()):
        if language != "bash":
            continue
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                found.append(argv)
    return found


def test_tutorials_fence_their_commands_as_bash_to_run_or_console_not_to_run() -> None:
    """Every tutorial block says what it is, and every `bash` command is one this test can run: `fedkb` or
    `python`. So a full-size command is marked `console`, and none is left out by accident."""
    runnable = 0
    for page in TUTORIALS:
        languages = {language for language, _ in FENCE.findall(page.read_text())}
        assert languages <= TUTORIAL_FENCES, f"{page.name}: fences {languages - TUTORIAL_FENCES}"
        for argv in commands(page):
            assert argv[0] in ("fedkb", "python"), f"{page.name}: {shlex.join(argv)}"
            runnable += 1
    assert runnable >= 5


def write_own_corpus(folder: Path) -> dict[str, str]:
    """Stand-ins for the reader's `my-messages.jsonl` and `public.txt`; prepared corpora go to the test's folder."""
    (folder / "my-messages.jsonl").write_text("".join(
        json.dumps({"user": f"user-{u}", "text": SMALL_TEXT[(u + n) % len(SMALL_TEXT)], "ts": n}) + "\n"
        for u in range(8) for n in range(10)
    ))
    (folder / "public.txt").write_text("\n".join(SMALL_TEXT) + "\n")
    return {"FEDKB_DATA_DIR": str(folder / "data")}


# What a page's commands expect to find in the folder they run in, written before them (the environment they add).
SETUP: dict[str, Callable[[Path], dict[str, str]]] = {"own-corpus.md": write_own_corpus}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("page", [p for p in TUTORIALS if commands(p)], ids=lambda p: p.stem)
def test_a_tutorials_commands_run_as_written(page: Path, tmp_path: Path, shakespeare) -> None:
    """Each `bash` command of the page, in order, in a fresh folder (so `runs/...` lands there), on the Shakespeare
    corpus the fixture has prepared (nothing is downloaded)."""
    env = {**os.environ, **SETUP.get(page.name, lambda _: {})(tmp_path)}
    for argv in commands(page):
        program = [sys.executable, "-m", "fedkb"] if argv[0] == "fedkb" else [sys.executable]
        ran = subprocess.run([*program, *argv[1:]], check=False, cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
        assert ran.returncode == 0, f"{shlex.join(argv)}\n{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}"
