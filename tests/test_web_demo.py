"""The web demo end to end: a real aggregator, the demo as a real HTTP server, a real browser."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from starlette.testclient import TestClient

from aggregator.api.client import AggregatorClient
from aggregator.api.schemas import EvaluationReport, Vote
from aggregator.config import AggregatorConfig
from aggregator.process import LocalAggregator, free_port, local_aggregator_config
from device_sim.fleet import Fleet
from device_sim.participation import Participant
from device_sim.phone import Phone
from device_sim.session import update_bytes
from keyboard_model import casing
from keyboard_model.model import ModelConfig
from keyboard_model.suggest import Suggester
from keyboard_model.tokenizer import SPECIAL_TOKENS, KeyboardTokenizer
from keyboard_model.train import LocalTrainConfig
from keyboard_model.weights import model_from_bytes, parameter_shapes
from tests.conftest import SMALL_TEXT
from tests.helpers import DemoServer, fleet_config, make_phones, wait_for
from web_demo.app import MAX_BODY_BYTES, create_app
from web_demo.cli import add_arguments, config_from_args, main
from web_demo.config import DemoConfig

pytestmark = pytest.mark.timeout(120)

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
SCREENSHOT = SCREENSHOTS / "keyboard.png"
LINES = [
    "To be, or not to be, that is the question.",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "Then there was the thing that they thought through thoroughly.",
    "All the world's a stage, and all the men and women merely players.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
]
# A suggestible word as the tokenizer splits them: no punctuation, no special tokens.
WORD = re.compile(r"\w+(?:'\w+)*")


@pytest.fixture
def tokenizer() -> KeyboardTokenizer:
    return KeyboardTokenizer.train(LINES, vocab_size=200)


def small_aggregator_config(tmp_path: Path, tokenizer: KeyboardTokenizer, model: ModelConfig | None = None,
                            **settings) -> AggregatorConfig:
    """An aggregator of a small model (or `model`) on `tokenizer`, in `tmp_path`, closing a round at each update."""
    tokenizer_path = tmp_path / "tokenizer.json"
    tokenizer.save(tokenizer_path)
    model = model or ModelConfig(vocab_size=tokenizer.vocab_size, embedding_dim=16, hidden_dim=32, projection_dim=16)
    # The browser phone is selected at its first check-in: these tests are about the page, not selection.
    settings.setdefault("selection_window_s", 0.0)
    settings.setdefault("clients_per_round", 1)
    return local_aggregator_config(tmp_path, tokenizer_path, model=model, **settings)


@pytest.fixture
def aggregator(tmp_path: Path, tokenizer: KeyboardTokenizer) -> Iterator[LocalAggregator]:
    # publish_new_version uploads a deliberately large delta, beyond the default norm bound.
    with LocalAggregator(small_aggregator_config(tmp_path, tokenizer, max_update_norm=1_000.0)) as running:
        yield running


def aggregator_suggester(aggregator: LocalAggregator, tokenizer: KeyboardTokenizer) -> tuple[Suggester, int]:
    """The aggregator's current model, loaded here, to compare the demo's suggestions with."""
    model, version = model_from_bytes(httpx.get(f"{aggregator.url}/model", timeout=10.0).content)
    return Suggester(model, tokenizer), version


def publish_new_version(aggregator: LocalAggregator) -> int:
    """Play one phone through a round (one client closes it), so the aggregator makes a new model."""
    with httpx.Client(base_url=aggregator.url, timeout=10.0) as client:
        device_token = client.post("/devices").json()["device_token"]
        checkin = client.post("/checkin", headers={"Authorization": f"Bearer {device_token}"}).json()
        assert checkin["action"] == "train", checkin
        # A large random delta, so the new model's suggestions differ from the old one's.
        generator = torch.Generator().manual_seed(1)
        state = model_from_bytes(client.get("/model").content)[0].state_dict()
        delta = {name: torch.randn(shape, generator=generator) for name, shape in parameter_shapes(state).items()}
        upload = client.post(
            f"/rounds/{checkin['round']}/updates", content=update_bytes(delta, 5),
            headers={"Authorization": f"Bearer {checkin['upload_token']}"},
        )
        assert upload.status_code == 200, upload.text
        return client.get("/status").json()["model_version"]


def assert_suggestible(words: list[str], tokenizer: KeyboardTokenizer) -> None:
    assert len(set(words)) == len(words), words
    for word in words:
        assert word in tokenizer.token_to_id and WORD.fullmatch(word) and word not in SPECIAL_TOKENS, words


@pytest.mark.parametrize(("text", "words", "shown"), [
    # The first word of a sentence: at the start, after ., ! or ? and a space, on a new line.
    ("", ["the", "i", "and"], ["The", "I", "And"]),
    ("To be. ", ["the", "what"], ["The", "What"]),
    ("Who? ", ["i'm"], ["I'm"]),
    ("Stop!\n", ["now"], ["Now"]),
    ("a line\n", ["then"], ["Then"]),
    # Elsewhere only "i" and its contractions are capitalised; a stop with no space after it ends no sentence.
    ("shall ", ["i", "we", "i'll", "it"], ["I", "we", "I'll", "it"]),
    ("it costs 3.", ["the"], ["the"]),
    # A completion follows what was typed of the word: a capital, caps lock, small letters, a curly apostrophe.
    ("Good Mor", ["morrow", "more"], ["Morrow", "More"]),
    ("MOR", ["morrow"], ["MORROW"]),
    ("good mor", ["morrow"], ["morrow"]),
    ("To be. th", ["the"], ["the"]),
    ("i", ["i'm", "in", "it"], ["I'm", "in", "it"]),
    ("I", ["i'm", "in"], ["I'm", "In"]),
    ("O\u2019e", ["o'er"], ["O'er"]),
])
def test_suggestions_are_cased_as_a_keyboard_shows_them(text: str, words: list[str], shown: list[str]) -> None:
    assert casing.shown_words(text, words) == shown


@pytest.mark.slow
def test_suggests_words_from_the_aggregators_model(aggregator: LocalAggregator, tokenizer: KeyboardTokenizer) -> None:
    with DemoServer(aggregator.url) as demo:
        info = demo.wait_for_model()
        assert f"demo: open {demo.url}" in demo.output()
        expected, version = aggregator_suggester(aggregator, tokenizer)
        assert info == {"model_version": version, "aggregator": aggregator.url, "error": None, "refresh_seconds": 0.3,
                        "differential_privacy": False, "epsilon": None, "dp_delta": None,
                        "score": None}  # no round yet, and no run folder: nothing has scored the model
        assert version == httpx.get(f"{aggregator.url}/status").json()["model_version"]

        for text in ["", "to be ", "To be, or not to be, that is the question. "]:
            response = demo.suggest(text)
            assert response.status_code == 200, response.text
            body = response.json()
            assert len(body["suggestions"]) == 3, body
            assert_suggestible([word.lower() for word in body["suggestions"]], tokenizer)
            assert body == {"suggestions": casing.shown_words(text, expected.suggest(text)), "model": "global",
                            "model_version": version, "personal_messages": None}
        # The first word of a sentence is capitalised.
        for text in ["", "To be, or not to be, that is the question. "]:
            assert all(word[0].isupper() for word in demo.suggest(text).json()["suggestions"])

        th_words = {word for word in tokenizer.token_to_id if word.startswith("th")}
        assert len(th_words) > 3  # so the test can tell a ranking from "all of them"
        completions = demo.suggest("to be or not to be, th").json()["suggestions"]
        assert len(completions) == 3 and set(completions) <= th_words, completions
        assert_suggestible(completions, tokenizer)
        # A completion follows the case of what was typed of the word.
        assert demo.suggest("to be or not to be, Th").json()["suggestions"] == [w.capitalize() for w in completions]
        assert demo.suggest("compare thee to a summer's da").json()["suggestions"] == ["day"]
        assert demo.suggest("to be qx").json()["suggestions"] == []


def test_reports_an_aggregator_that_is_not_reachable() -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    with DemoServer(nowhere) as demo:
        info = wait_for(lambda: (i := demo.model_info())["error"] and i, 10, lambda: str(demo.model_info()))
        assert info["model_version"] is None and nowhere in info["error"]

        response = demo.suggest("to be ")
        assert response.status_code == 503
        detail = response.json()["detail"]
        assert f"the aggregator at {nowhere} is not reachable" in detail, detail
        assert "Traceback" not in detail and "Traceback" not in demo.output()


@pytest.mark.slow
def test_picks_up_a_newly_published_model(aggregator: LocalAggregator, tokenizer: KeyboardTokenizer) -> None:
    texts = ["", "to be ", "the ", "shall i compare thee to a ", "all the world's a "]
    with DemoServer(aggregator.url, refresh_seconds=0.3) as demo:
        demo.wait_for_model(version=0)
        old = [demo.suggest(text).json()["suggestions"] for text in texts]

        new_version = publish_new_version(aggregator)
        assert new_version == 1
        demo.wait_for_model(version=new_version)

        expected, _ = aggregator_suggester(aggregator, tokenizer)
        new = [demo.suggest(text).json() for text in texts]
        assert all(body["model_version"] == new_version for body in new)
        assert [body["suggestions"] for body in new] == [casing.shown_words(t, expected.suggest(t)) for t in texts]
        assert [body["suggestions"] for body in new] != old, "the new model should suggest differently"


@contextmanager
def chromium(profile: Path) -> Iterator[webdriver.Chrome]:
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not binary.exists():
            pytest.fail(f"{binary} is missing: run `bash dev.sh test`, "
                        "which installs Debian's chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=480,640"):
        options.add_argument(flag)
    # An explicit driver path keeps selenium-manager from downloading anything.
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield browser
    finally:
        browser.quit()


def shown_words(browser: webdriver.Chrome) -> list[str] | None:
    """The strip's words, best first, once it has its answer for the current text (None while it waits)."""
    busy, words = browser.execute_script(
        "const strip = document.getElementById('suggestions');"
        "return [strip.getAttribute('aria-busy'), [...strip.querySelectorAll('button')]"
        "  .filter(b => !b.disabled).sort((a, b) => a.dataset.rank - b.dataset.rank).map(b => b.textContent)];"
    )
    return words if busy == "false" else None


def button_of_rank(browser: webdriver.Chrome, rank: int):
    return browser.find_element(By.CSS_SELECTOR, f'#suggestions button[data-rank="{rank}"]')


def assert_gboard_layout(browser: webdriver.Chrome) -> None:
    """Three buttons in one row across the text box: the second best left, the best in the middle, the third right;
    and nothing wider than the window."""
    second, best, third = (button_of_rank(browser, rank).rect for rank in (1, 0, 2))
    box = browser.find_element(By.ID, "message").rect
    assert second["y"] == best["y"] == third["y"]
    assert box["x"] <= second["x"] < best["x"] < third["x"]
    assert third["x"] + third["width"] <= box["x"] + box["width"] + 1  # sub-pixel layout
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")


@pytest.mark.browser
def test_typing_and_tapping_suggestions_in_a_browser(
    aggregator: LocalAggregator, tokenizer: KeyboardTokenizer, tmp_path: Path
) -> None:
    with DemoServer(aggregator.url) as demo, chromium(tmp_path / "chromium-profile") as browser:
        demo.wait_for_model()
        browser.get(demo.url)
        box = browser.find_element(By.ID, "message")
        wait = WebDriverWait(browser, 10)
        # An empty box is the start of a sentence: its words are capitalised.
        first = wait.until(lambda b: (w := shown_words(b)) and len(w) == 3 and w)
        assert first == demo.suggest("").json()["suggestions"] and all(word[0].isupper() for word in first)

        # The answer for "to be " arrives last, after the answers for the longer text typed
        # since: the strip must not show it.
        slow, typed = "to be ", "to be or not to be, that is the "
        assert demo.suggest(slow).json() != demo.suggest(typed).json()
        browser.execute_script(
            "const fetchNow = window.fetch;"
            "window.fetch = (url, ...rest) => url.endsWith('text=' + encodeURIComponent(arguments[0]))"
            "  ? new Promise(wait => setTimeout(wait, 1000)).then(() => fetchNow(url, ...rest))"
            "      .finally(() => setTimeout(() => { window.slowAnswerArrived = true; }))"
            "  : fetchNow(url, ...rest);",
            slow,
        )
        box.send_keys(typed)
        wait.until(lambda b: b.execute_script("return window.slowAnswerArrived === true"))
        words = wait.until(lambda b: (w := shown_words(b)) and len(w) == 3 and w)
        assert words == demo.suggest(typed).json()["suggestions"]
        assert browser.find_element(By.ID, "model-version").text == "model v0"
        assert_gboard_layout(browser)

        button_of_rank(browser, 1).click()
        assert box.get_attribute("value") == typed + words[1] + " "

        # Inside a word the strip completes it, and a tap replaces what was typed of it.
        before = box.get_attribute("value")
        box.send_keys("Th")
        completions = wait.until(lambda b: (w := shown_words(b)) and w[0].startswith("Th") and w)
        assert all(word.startswith("Th") for word in completions) and len(completions) == 3
        button_of_rank(browser, 0).click()
        assert box.get_attribute("value") == before + completions[0] + " "

        # Tab takes the best word, the one in the middle.
        before = box.get_attribute("value")
        best = wait.until(lambda b: (w := shown_words(b)) and len(w) == 3 and w)[0]
        box.send_keys(Keys.TAB)
        assert box.get_attribute("value") == before + best + " "
        assert browser.switch_to.active_element == box

        # After a full stop a new sentence starts: capitalised words again, which a tap inserts as shown.
        box.send_keys("and so. ")
        words = wait.until(lambda b: (w := shown_words(b)) and len(w) == 3 and w[0][0].isupper() and w)
        assert words == first
        assert [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"] == []
        ActionChains(browser).move_to_element(box).perform()  # no hover highlight in the picture
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(SCREENSHOT))
        before = box.get_attribute("value")
        button_of_rank(browser, 0).click()
        assert box.get_attribute("value") == before + first[0] + " "
        # The same strip on a small phone and on a desktop screen.
        for width, height in ((360, 640), (1280, 800)):
            browser.set_window_size(width, height)
            assert_gboard_layout(browser)


# JSON that Python's json module reads but a JSON response cannot hold: it echoed them into the 422's body, which
# then failed to serialise (a 500, or a dropped connection).
UNWRITABLE_JSON = [
    b'{"text": NaN}', b'{"text": Infinity}', b'{"text": -Infinity}', b"NaN", b'{"text": "hi", "to": [NaN]}',
    b'{"text": 1e999}', b'{"text": "\\ud800"}', b'{"\\udc00": "hi"}', b'{"text": "a\\ud800b"}',
]


def test_the_phone_api_answers_unwritable_json_with_422_and_oversized_bodies_with_413(tmp_path: Path) -> None:
    with DemoServer(f"http://127.0.0.1:{free_port()}", phone_dir=tmp_path / "phone") as demo, \
            httpx.Client(base_url=demo.url, timeout=5) as client:
        assert client.put("/api/phone", json={"enabled": True}).json()["enabled"] is True
        json_type = {"content-type": "application/json"}
        for body in UNWRITABLE_JSON:
            for method, path in (("POST", "/api/phone/messages"), ("PUT", "/api/phone")):
                response = client.request(method, path, content=body, headers=json_type)
                assert response.status_code == 422, (method, path, body, response.text)
                detail = response.json()["detail"]
                assert detail and all(set(error) == {"loc", "msg", "type"} for error in detail), detail
        # Checks still say where and why, but do not quote what the person typed.
        overlong = client.post("/api/phone/messages", json={"text": "secret " * 200})
        assert overlong.status_code == 422 and "secret" not in overlong.text
        assert overlong.json()["detail"] == [{"loc": ["body", "text"], "type": "string_too_long",
                                              "msg": "String should have at most 1000 characters"}]
        assert client.get("/api/phone").json()["messages"] == 0  # and nothing was kept

        # The longest message the page can send, written as JSON escapes, fits the body limit; one byte more does not.
        longest = json.dumps({"text": "\N{GRINNING FACE}" * 1000}).encode()
        assert client.post("/api/phone/messages", content=longest, headers=json_type).status_code == 201
        padded = longest[:-1] + b" " * (MAX_BODY_BYTES - len(longest) + 1) + b"}"
        assert client.post("/api/phone/messages", content=padded, headers=json_type).status_code == 413
        # Without a Content-Length (chunked), the limit is on the bytes that arrive.
        chunks = iter([b'{"text": "', b"a" * MAX_BODY_BYTES, b'"}'])
        assert client.post("/api/phone/messages", content=chunks, headers=json_type).status_code == 413
        assert client.put("/api/phone", content=b" " * 10**6, headers=json_type).status_code == 413
        assert client.get("/api/phone").json()["messages"] == 1


def test_command_line_help_and_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--aggregator", "--host", "--port", "--refresh-seconds"):
        assert option in help_text

    assert main(["--refresh-seconds", "0"]) == 2
    assert "refresh_seconds must be positive" in capsys.readouterr().err
    # A wait that long would overflow the clock it is added to, and stop the demo's refreshes.
    assert main(["--refresh-seconds", "1e308"]) == 2
    assert "refresh_seconds must be positive and at most 604800 s" in capsys.readouterr().err


def demo_client(**settings) -> TestClient:
    """The demo's app in this process, its aggregator nowhere: for what does not need a model."""
    config = DemoConfig(aggregator_url=f"http://127.0.0.1:{free_port()}", **settings)
    return TestClient(create_app(config), base_url="http://127.0.0.1")


NO_RUN = {"finished": False, "rounds": [], "n_gram": None, "oracle": None, "final": None}
ROUND_FIELDS = dict.fromkeys(("model_version", "train_loss", "recall_at_1", "recall_at_3", "eligible", "sim_hour_utc"))


def test_the_run_endpoint_reads_what_it_can_of_the_run_folder(tmp_path: Path) -> None:
    with demo_client(phone_dir=tmp_path / "phone") as client:
        assert client.get("/api/run").json() == {"run_dir": None, **NO_RUN}

    run = tmp_path / "run"
    with demo_client(run_dir=run, phone_dir=tmp_path / "phone") as client:
        def read() -> dict:
            response = client.get("/api/run")
            assert response.status_code == 200, response.text
            return response.json()

        # A folder the simulation has not made yet.
        assert read() == {"run_dir": str(run), **NO_RUN}
        run.mkdir()
        (run / "metrics.jsonl").write_bytes(b"\n".join([
            b'{"round": 0, "model_version": 0, "train_loss": null, "recall_at_1": 0.0625, "recall_at_3": 0.125, '
            b'"eligible": 0, "sim_hour_utc": 0, "perplexity": 900.5}',
            b'{"round": 1, "model_version": 1, "train_loss": 6.5, "recall_at_1": null, "eligible": 40}',
            b"not JSON", b"[1, 2]", b"\xff\xfe", b'{"round": "2", "train_loss": 5.0}', b'{"model_version": 2}',
            # Not finite: null, as JSON has it.
            b'{"round": 2, "model_version": 2, "train_loss": NaN, "recall_at_1": Infinity, "sim_hour_utc": 1e999}',
            # A run restarted into the same folder: a round's last line counts.
            b'{"round": 1, "model_version": 1, "train_loss": 6.25, "eligible": 41, "sim_hour_utc": 0.5}',
            # Still being written.
            b'{"round": 3, "model_version": 3, "train_loss": 5',
        ]))
        rounds = [{**ROUND_FIELDS, "round": 0, "model_version": 0, "recall_at_1": 0.0625, "recall_at_3": 0.125,
                   "eligible": 0, "sim_hour_utc": 0.0},
                  {**ROUND_FIELDS, "round": 1, "model_version": 1, "train_loss": 6.25, "eligible": 41,
                   "sim_hour_utc": 0.5},
                  {**ROUND_FIELDS, "round": 2, "model_version": 2}]
        assert read() == {"run_dir": str(run), **NO_RUN, "rounds": rounds}

        n_gram = {"model": "n-gram: KN trigram", "recall_at_1": 0.09, "recall_at_3": 0.18}
        oracle = {"model": "centralised oracle: all phones pooled", "recall_at_1": 0.125, "recall_at_3": 0.25}
        rows = [{"model": "n-gram, unreadable", "recall_at_1": "high"}, {**n_gram, "perplexity": 228.0, "positions": 9},
                {"model": "server CIFG", "recall_at_1": 0.1, "recall_at_3": 0.2},
                {"model": "federated CIFG", "recall_at_1": 0.12, "recall_at_3": 0.22}, oracle,
                {**oracle, "model": "centralised oracle, a second row"}]
        (run / "table.json").write_text(json.dumps({"rows": rows}))
        (run / "summary.json").write_text("{}")
        assert read() == {"run_dir": str(run), "finished": True, "rounds": rounds, "n_gram": n_gram, "oracle": oracle,
                          "final": None}
        # The run's own end, as `fedkb up` writes it: the final model's score on every phone, and the n-gram's row
        # where no table gives one (a table's row wins); an unreadable score is left out.
        ended = {"model_version": 7, "final": {"recall_at_1": 0.11, "recall_at_3": 0.21, "perplexity": 90.0},
                 "baselines": [{"model": "n-gram (KN trigram, proxy)", "recall_at_1": 0.08, "recall_at_3": 0.16}]}
        (run / "summary.json").write_text(json.dumps(ended))
        assert read()["n_gram"] == n_gram
        (run / "table.json").unlink()
        assert read() == {"run_dir": str(run), "finished": True, "rounds": rounds, "oracle": None,
                          "n_gram": {"model": "n-gram (KN trigram, proxy)", "recall_at_1": 0.08, "recall_at_3": 0.16},
                          "final": {"recall_at_1": 0.11, "recall_at_3": 0.21, "model_version": 7,
                                    "scored_on": "every phone's"}}
        (run / "summary.json").write_text(json.dumps({**ended, "final": {"recall_at_1": "high"}}))
        assert read()["final"] is None
        (run / "summary.json").write_text("{}")

        # An unreadable table and an unreadable metrics file leave the rest.
        for table in ('{"rows": ', '{"rows": 5}', "[]", "[" * 100_000):
            (run / "table.json").write_text(table)
            assert read() == {"run_dir": str(run), "finished": True, "rounds": rounds, "n_gram": None, "oracle": None,
                              "final": None}
        (run / "metrics.jsonl").unlink()
        (run / "metrics.jsonl").mkdir()
        (run / "summary.json").unlink()  # the run started again
        assert read() == {"run_dir": str(run), **NO_RUN}


def test_the_run_endpoint_never_waits_on_a_file_that_is_not_a_regular_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    fifos = [run / "metrics.jsonl", run / "table.json"]  # opening one for reading waits for a writer
    for fifo in fifos:
        os.mkfifo(fifo)
    (run / "summary.json").write_text("{}")
    finished = {"run_dir": str(run), **NO_RUN, "finished": True}
    with demo_client(run_dir=run, phone_dir=tmp_path / "phone") as client, ThreadPoolExecutor(1) as asking:
        answer = asking.submit(client.get, "/api/run")
        try:
            assert answer.result(timeout=10).json() == finished
        finally:
            while not answer.done():  # a reader stuck in open() goes once a writer comes and goes
                for fifo in fifos:
                    with contextlib.suppress(OSError):
                        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                time.sleep(0.05)
        # Nor on a device that never ends.
        fifos[1].unlink()
        fifos[1].symlink_to("/dev/zero")
        assert client.get("/api/run").json() == finished


def test_the_browser_phone_keeps_its_history_in_the_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def config(*argv: str) -> DemoConfig:
        return config_from_args(parser.parse_args(argv))

    run = tmp_path / "run"
    assert (config().run_dir, config().phone_dir) == (None, Path("runs") / "browser-phone")
    assert (config("--run", str(run)).run_dir, config("--run", str(run)).phone_dir) == (run, run / "browser-phone")
    assert config("--run", str(run), "--phone-dir", str(tmp_path / "mine")).phone_dir == tmp_path / "mine"
    with demo_client(run_dir=run) as client:  # as `fedkb up --out RUN` makes it
        history = client.get("/api/phone").json()["history_path"]
        assert history == str(run.resolve() / "browser-phone" / "history.sqlite")

    (tmp_path / "a-file").write_text("")
    assert main(["--run", str(tmp_path / "a-file")]) == 2
    assert "run_dir must be a run's folder" in capsys.readouterr().err


@pytest.mark.browser
def test_the_page_shows_the_privacy_spent_when_the_aggregator_trains_with_differential_privacy(
    tmp_path: Path, tokenizer: KeyboardTokenizer
) -> None:
    # DP-FTRL, which reports rho beside epsilon (DP-FedAvg's epsilon takes the same path to the page), with a BLT for
    # two releases, quick to optimise, and a phone allowed in every one; and the canary clients' audit of every round.
    # One browser run: the suite is near its limit.
    config = small_aggregator_config(tmp_path, tokenizer, max_update_norm=1_000.0, noise_multiplier=1.0, population=50,
                                     dp_mechanism="ftrl", min_separation=1, dp_rounds=2, canary_clients=4,
                                     audit_every=1)
    with LocalAggregator(config) as aggregator, DemoServer(aggregator.url) as demo, \
            chromium(tmp_path / "chromium-profile") as browser:
        demo.wait_for_model(version=0)
        assert demo.model_info()["differential_privacy"] and demo.model_info()["epsilon"] is None
        publish_new_version(aggregator)
        status = httpx.get(f"{aggregator.url}/status", timeout=5).json()
        spent, zcdp, empirical = status["epsilon"], status["rho"], status["audit_epsilon"]
        assert spent > 0 and zcdp > 0 and empirical is not None
        info = demo.wait_for_model(version=1)
        assert (info["epsilon"], info["dp_delta"]) == (spent, 1 / 50)
        browser.get(demo.url)
        badge = WebDriverWait(browser, 10).until(
            lambda b: (e := b.find_element(By.ID, "privacy")).is_displayed() and e.text.startswith("ε") and e)
        symbol, shown, at, delta_symbol, delta = badge.text.split()
        assert (symbol, at, delta_symbol, delta) == ("ε", "at", "δ", "2.0e-2")
        assert float(shown) == pytest.approx(spent, rel=5e-3)  # three significant digits
        # The dashboard plots the budget spent by round (it has no such chart without differential privacy).
        browser.get(f"{demo.url}/dashboard")
        traces = WebDriverWait(browser, 10).until(lambda b: b.execute_script(
            "const chart = document.getElementById('chart-epsilon');"
            "return chart.offsetParent !== null && chart.data ? chart.data.map(t => [t.name, t.x, t.y]) : null;"))
        # DP-FTRL's rho-zCDP beside epsilon, and the audit's empirical epsilon, on the chart and in the summary line.
        assert traces == [["epsilon", [1], [pytest.approx(spent)]], ["ρ-zCDP", [1], [pytest.approx(zcdp)]],
                          ["empirical ε (canary clients, 95% interval)", [1], [pytest.approx(empirical)]],
                          ["its 95% lower bound", [1], [pytest.approx(status["audit_epsilon_lower_bound"])]]]
        summary = re.search(r"ε spent: ([-+.\de]+?), ρ-zCDP ([-+.\de]+?)\. Empirical ε \(canary clients\): "
                            r"([-+.\de]+?) \(", browser.find_element(By.ID, "summary").text)
        assert float(summary[1]) == pytest.approx(spent, rel=5e-3)
        assert float(summary[2]) == pytest.approx(zcdp, rel=5e-3)
        assert float(summary[3]) == pytest.approx(empirical, rel=5e-3, abs=1e-3)
        # A round on the wall clock is drawn at the hour (UTC) it opened at.
        opened = AggregatorClient(aggregator.url).status().recent_rounds[0].started_at
        hours = browser.execute_script("return document.getElementById('chart-asking').data[0].x")
        assert hours == [pytest.approx(hour_of_day(opened))]
        assert asking_title(browser) == "Phones asking to train by hour (UTC)"


@pytest.mark.browser
def test_the_dashboard_shows_personal_models_and_word_discovery_by_round_in_counts_only(
        tmp_path: Path, tokenizer: KeyboardTokenizer) -> None:
    # Round 1 trains: its one phone scores its personal model beside the global one. Round 2 is a discovery (one
    # every training round) whose two phones vote for the same letter (θ = 2), so it gains one prefix.
    config = small_aggregator_config(tmp_path, tokenizer, eval_share=1.0, max_update_norm=1_000.0, population=2,
                                     discover_every=1, discovery_theta=2, discovery_sampling_rate=1.0)
    with LocalAggregator(config) as aggregator, DemoServer(aggregator.url) as demo, \
            chromium(tmp_path / "chromium-profile") as browser:
        client = AggregatorClient(aggregator.url)
        trains = client.checkin(client.enrol().device_token)
        assert trains.action == "train" and trains.evaluate
        client.report_evaluation(trains.round, trains.upload_token, EvaluationReport(
            model_version=0, positions=40, hits_at_1=4, hits_at_3=9, personal_hits_at_1=6, personal_hits_at_3=11))
        shapes = parameter_shapes(model_from_bytes(client.model())[0].state_dict())
        client.upload(trains.round, trains.upload_token,
                      update_bytes({name: torch.zeros(shape) for name, shape in shapes.items()}, 5))
        for _ in range(2):
            votes = client.checkin(client.enrol().device_token)
            assert votes.action == "vote"
            client.vote(votes.round, votes.upload_token, Vote(prefix="q"))
        browser.get(f"{demo.url}/dashboard")

        def chart(name: str) -> dict[str, dict]:
            return by_name(WebDriverWait(browser, 20).until(lambda b: b.execute_script(
                "const chart = document.getElementById(arguments[0]);"
                "return chart.offsetParent !== null && chart.data ?"
                " chart.data.map(t => ({name: t.name, x: t.x, y: t.y})) : null;", name)))

        # One phone, helped: 6 of 40 against 4 of 40 at top-1, five points.
        personal = chart("chart-personal")
        assert personal["phones helped"][trains.round] == 100 and personal["phones hurt"][trains.round] == 0
        assert personal["median gain (points)"][trains.round] == pytest.approx(5.0)
        words = chart("chart-words")
        assert words["prefixes added"][votes.round] == 1 and words["words discovered"][votes.round] == 0
        summary = browser.find_element(By.ID, "summary").text
        assert "Words discovered: 0" in summary and "q" not in summary.split("Words discovered")[1]


def assert_inside_the_screen(browser: webdriver.Chrome, card: str) -> None:
    """The card (a CSS selector) keeps at least 8 px from both edges of the window, and nothing is wider than the
    window, once the page has laid itself out again (plotly redraws its charts a moment after a resize)."""

    def measured(b: webdriver.Chrome) -> tuple[float, float, float, float]:
        return tuple(b.execute_script(
            "const box = document.querySelector(arguments[0]).getBoundingClientRect();"
            "return [box.left, box.right, document.documentElement.clientWidth, document.documentElement.scrollWidth];",
            card))

    def fits(sizes: tuple[float, float, float, float]) -> bool:
        left, right, inner, scroll = sizes
        return left >= 8 and right <= inner - 8 and scroll <= inner

    with contextlib.suppress(TimeoutException):
        WebDriverWait(browser, 10).until(lambda b: fits(measured(b)))
    assert fits(measured(browser)), measured(browser)


def dashboard_state(browser: webdriver.Chrome) -> dict:
    return browser.execute_script(
        "const traces = id => (document.getElementById(id).data || []).map(t => ({name: t.name, x: t.x, y: t.y}));"
        "const text = id => document.getElementById(id).hidden ? '' : document.getElementById(id).textContent;"
        "return {state: text('state'), summary: text('summary'), charts: !document.getElementById('charts').hidden,"
        "  loss_shown: !document.getElementById('loss-figure').hidden,"
        "  recall: traces('chart-recall'), loss: traces('chart-loss'), participants: traces('chart-participants'),"
        "  asking: traces('chart-asking'), bytes: traces('chart-bytes')};"
    )


def by_name(traces: list[dict]) -> dict[str, dict]:
    """Each trace's points as {x: y}."""
    return {t["name"]: dict(zip(t["x"], t["y"])) for t in traces}


def hour_of_day(seconds: float) -> float:
    return seconds / 3600 % 24


def asking_title(browser: webdriver.Chrome) -> str:
    return browser.execute_script("return document.getElementById('chart-asking').layout.title.text")


def assert_points(trace: dict, expected: list[tuple[float, int]]) -> None:
    """The trace's points, in any order, are `expected` (x to within rounding)."""
    shown, expected = sorted(zip(trace["x"], trace["y"])), sorted(expected)
    assert [y for _, y in shown] == [y for _, y in expected]
    assert [x for x, _ in shown] == pytest.approx([x for x, _ in expected])


@pytest.mark.browser
def test_the_dashboard_plots_a_real_short_run_and_shows_a_rounds_details(tmp_path: Path) -> None:
    tokenizer_path = tmp_path / "tokenizer.json"
    KeyboardTokenizer.train(SMALL_TEXT, vocab_size=200).save(tokenizer_path)
    model = ModelConfig(vocab_size=KeyboardTokenizer.from_file(tokenizer_path).vocab_size, embedding_dim=8,
                        hidden_dim=16, projection_dim=8)
    config = local_aggregator_config(tmp_path, tokenizer_path, model=model, clients_per_round=3, simulated_clock=True,
                                     round_deadline_s=3600.0)
    run = tmp_path / "run"
    run.mkdir()
    with LocalAggregator(config) as aggregator, DemoServer(aggregator.url, options=["--run", str(run)]) as demo, \
            chromium(tmp_path / "chromium-profile") as browser:
        browser.set_window_size(1100, 1400)
        browser.get(f"{demo.url}/dashboard")
        wait = WebDriverWait(browser, 20)
        # Before any round: the empty state, no charts.
        wait.until(lambda b: "No rounds yet" in dashboard_state(b)["state"])
        assert not dashboard_state(browser)["charts"]
        assert dashboard_state(browser)["summary"] == "Round 1 is open: no phone has joined it yet."

        fleet = Fleet(make_phones(tmp_path / "phones", 12), fleet_config(tmp_path / "phones"),
                      AggregatorClient(aggregator.url, operator_token=config.operator_token))
        try:
            reports = [fleet.run_round() for _ in range(3)]
        finally:
            fleet.close()
        rounds = AggregatorClient(aggregator.url).status().recent_rounds
        assert len(rounds) == 3
        by_round = {r.round: r for r in rounds}
        # The run's own record of its rounds, as the simulation writes it: it scored the initial and the last model
        # centrally, and knows how many phones were eligible.
        central = {0: (0.0625, 0.125), 3: (0.25, 0.5)}
        (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in [
            {"round": 0, "model_version": 0, "train_loss": None, "eligible": 0, "sim_hour_utc": 0,
             "recall_at_1": central[0][0], "recall_at_3": central[0][1]},
            *({"round": report.round, "model_version": by_round[report.round].new_version,
               "train_loss": report.train_loss, "eligible": report.eligible_at_start, "sim_hour_utc": report.hour_utc,
               "recall_at_1": central.get(report.round, (None, None))[0],
               "recall_at_3": central.get(report.round, (None, None))[1]} for report in reports),
        ]))

        # The charts fill in while the page stays open, with the aggregator's own figures. A phone that uploads
        # after its round closed turns a drop-out into a late one, so the page may first draw a round's counts as
        # they were at its close; it must come round to the record as it stands.
        def shows_the_record(state: dict) -> bool:
            bars = by_name(state["participants"])
            return all(bars[name].get(n) == getattr(r, name) for name in ("reported", "dropped")
                       for n, r in by_round.items())

        shown = wait.until(lambda b: (d := dashboard_state(b))["charts"] and len(d["participants"][0]["x"]) == 3
                           and shows_the_record(d) and d["loss_shown"] and d)
        assert shown["state"] == ""
        # ...and, before the run has ended, the phones' own score of the newest global model they scored, as the
        # keyboard page words it.
        newest = max((r for r in rounds if r.recall_at_1 is not None), key=lambda r: r.round)
        browser.get(demo.url)
        score = wait.until(lambda b: (e := b.find_element(By.ID, "score")).is_displayed() and e.text)
        assert score == (f"Model v{newest.base_version}'s first suggestion was the next word "
                         f"{100 * newest.recall_at_1:.1f}% of the time, "
                         f"one of its three {100 * newest.recall_at_3:.1f}%,"
                         f" on {newest.eval_devices} phones' own held-out messages.")
        browser.get(f"{demo.url}/dashboard")
        shown = wait.until(lambda b: (d := dashboard_state(b))["charts"] and shows_the_record(d) and d)
        # Training goes on as far as the page can tell: the aggregator's round 4 is open.
        assert shown["summary"].startswith("Round 4 is open: ")
        assert not browser.find_element(By.ID, "privacy-figure").is_displayed()  # no differential privacy here
        recall = by_name(shown["recall"])
        for number, summary in by_round.items():
            assert recall["top-1 on phones"][number] == pytest.approx(100 * summary.recall_at_1)
            assert recall["top-3 on phones"][number] == pytest.approx(100 * summary.recall_at_3)
        # The central score of a round's model is drawn at the round that starts from that model.
        assert recall["top-1 central"] == pytest.approx({1: 6.25, 4: 25.0})
        assert recall["top-3 central"] == pytest.approx({1: 12.5, 4: 50.0})
        assert by_name(shown["loss"])["loss"] == pytest.approx({r.round: r.train_loss for r in reports})
        # Phones asking to train (the aggregator's count), and eligible (the simulation's), by simulated hour.
        asking = {t["name"]: t for t in shown["asking"]}
        assert_points(asking["asked to train"], [(hour_of_day(r.clock_started_s), r.checked_in) for r in rounds])
        assert_points(asking["eligible at the round's start"], [(r.hour_utc, r.eligible_at_start) for r in reports])
        assert all(r.checked_in >= r.selected > 0 for r in rounds)
        assert sum(len(report.participants) for report in reports) == sum(r.reported for r in rounds)
        up = by_name(shown["bytes"])["up"]
        assert {n: up[n] for n in by_round} == pytest.approx({n: r.bytes_up / 1e6 for n, r in by_round.items()})

        # The run ends (summary.json) with its comparison table: the page says so, and draws the n-gram's and the
        # oracle's recall across the rounds.
        references = {"n-gram": (0.09, 0.18), "oracle": (0.375, 0.625)}
        (run / "table.json").write_text(json.dumps({"rows": [
            {"model": "n-gram: KN trigram", "recall_at_1": 0.09, "recall_at_3": 0.18, "perplexity": 200.0,
             "positions": 50},
            {"model": "federated CIFG", "recall_at_1": 0.25, "recall_at_3": 0.5, "perplexity": 150.0, "positions": 50},
            {"model": "centralised oracle: all phones pooled", "recall_at_1": 0.375, "recall_at_3": 0.625,
             "perplexity": 100.0, "positions": 50},
        ]}))
        (run / "summary.json").write_text("{}")
        finished = f"Training finished after 3 rounds, with model v{by_round[3].new_version}."
        shown = wait.until(lambda b: (d := dashboard_state(b))["summary"] == finished and len(d["recall"]) == 8 and d)
        recall = by_name(shown["recall"])
        for name, (top1, top3) in references.items():
            assert recall[f"{name} top-1"] == pytest.approx({1: 100 * top1, 4: 100 * top1})
            assert recall[f"{name} top-3"] == pytest.approx({1: 100 * top3, 4: 100 * top3})
        # Every axis says what it counts.
        assert browser.execute_script(
            "return ['chart-recall', 'chart-loss', 'chart-participants', 'chart-asking', 'chart-bytes']"
            ".map(id => document.getElementById(id).layout.xaxis.title.text)"
        ) == ["round"] * 3 + ["simulated hour (UTC)", "round"]

        # A run that ends as `fedkb up` ends it, without a comparison table: its summary.json holds the final model's
        # score on every phone's held-out messages and the n-gram's beside it, which the page draws and says.
        (run / "table.json").unlink()
        (run / "summary.json").write_text(json.dumps({
            "model_version": 3, "final": {"recall_at_1": 0.125, "recall_at_3": 0.25, "perplexity": 90.0},
            "baselines": [
                {"model": "n-gram (KN trigram, proxy)", "recall_at_1": 0.1, "recall_at_3": 0.2, "perplexity": None,
                 "positions": 50},
                {"model": "most frequent (the, and, to)", "recall_at_1": 0.05, "recall_at_3": 0.1, "perplexity": None,
                 "positions": 50},
            ]}))
        ended = (f"{finished} On every phone's held-out messages it suggests the next word first 12.50% of the time "
                 "(the n-gram: 10.00%).")
        shown = wait.until(lambda b: (d := dashboard_state(b))["summary"] == ended and d)
        # The keyboard says how good its model is: the run's final score on every phone...
        assert httpx.get(f"{demo.url}/api/model", timeout=5).json()["score"] == {
            "recall_at_1": 0.125, "recall_at_3": 0.25, "model_version": 3, "scored_on": "every phone's"}
        recall = by_name(shown["recall"])
        assert recall["top-1 final, every phone"] == pytest.approx({4: 12.5})
        assert recall["top-3 final, every phone"] == pytest.approx({4: 25.0})
        assert recall["n-gram top-1"] == pytest.approx({1: 10.0, 4: 10.0})
        assert "oracle top-1" not in recall

        # A click on round 2's bar shows its details.
        browser.execute_script(
            "const chart = document.getElementById('chart-participants');"
            "chart.emit('plotly_click', {points: [{x: 2, data: chart.data[0]}]});"
        )
        details = browser.find_element(By.ID, "round-details")
        wait.until(lambda b: details.is_displayed())
        field = {e.get_attribute("data-field"): e.text for e in details.find_elements(By.CSS_SELECTOR, "[data-field]")}
        second = by_round[2]
        assert field == {
            "round": "2", "status": second.status, "selected": str(second.selected), "reported": str(second.reported),
            "dropped": str(second.dropped), "aborted": str(second.aborted), "late": str(second.late),
            "duration": f"{second.duration_s:.1f} s", "failure": "none",
        }
        assert [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"] == []
        assert browser.save_screenshot(str(SCREENSHOTS / "dashboard.png"))
        # On a phone's screen the card keeps a margin on both sides and nothing scrolls sideways.
        browser.set_window_size(360, 640)
        assert_inside_the_screen(browser, ".dashboard")
        browser.set_window_size(1100, 1400)

        # The aggregator goes away: the dashboard keeps the last rounds and says why they do not change.
        aggregator.stop()
        wait.until(lambda b: "not reachable" in dashboard_state(b)["state"])
        assert dashboard_state(browser)["charts"]

        # Its database served again, on the wall clock: the rounds keep the hours of the simulated day they ran at.
        port = int(aggregator.url.rsplit(":", 1)[1])
        with LocalAggregator(replace(config, simulated_clock=False, port=port)) as again:
            assert AggregatorClient(again.url).status().clock == "wall"
            browser.refresh()
            shown = wait.until(lambda b: (d := dashboard_state(b))["charts"] and d["state"] == "" and d)
            asking = {t["name"]: t for t in shown["asking"]}
            assert_points(asking["asked to train"], [(hour_of_day(r.clock_started_s), r.checked_in) for r in rounds])
            assert asking_title(browser) == "Phones asking to train by simulated hour (UTC)"


@pytest.mark.browser
def test_the_dashboard_says_when_the_aggregator_was_never_reached(tmp_path: Path) -> None:
    with DemoServer(f"http://127.0.0.1:{free_port()}") as demo, chromium(tmp_path / "chromium-profile") as browser:
        browser.get(f"{demo.url}/dashboard")
        WebDriverWait(browser, 20).until(lambda b: "not reachable" in dashboard_state(b)["state"])
        assert not dashboard_state(browser)["charts"]


@pytest.mark.browser
def test_this_browser_is_a_phone_keeps_sent_text_only_in_its_own_sqlite_file_and_joins_rounds(
    tmp_path: Path, tokenizer: KeyboardTokenizer
) -> None:
    config = small_aggregator_config(tmp_path, tokenizer)
    phone_dir = tmp_path / "browser-phone"
    secret = "my bank pin is 4711 and my cat is called Wittgenstein"
    with LocalAggregator(config) as aggregator, DemoServer(aggregator.url, phone_dir=phone_dir) as demo, \
            chromium(tmp_path / "chromium-profile") as browser:
        demo.wait_for_model(version=0)
        browser.set_window_size(480, 1000)  # room for the whole page in the screenshot
        browser.get(demo.url)
        box = browser.find_element(By.ID, "message")
        wait = WebDriverWait(browser, 20)
        switch = browser.find_element(By.ID, "phone-enabled")
        assert not switch.is_selected() and not browser.find_element(By.ID, "send").is_displayed()
        note = browser.find_element(By.CSS_SELECTOR, ".phone-switch .note")
        assert note.text == "What leaves this phone: a model update and three counts, never your text."
        whole = " ".join(note.get_attribute("textContent").split())
        assert "never sent to the aggregator" in whole and "plain or secure" in whole
        # On a 360 x 640 phone the privacy note takes at most a fifth of the screen, and the page fits its width.
        browser.set_window_size(360, 640)
        assert note.rect["height"] <= 640 / 5, note.rect
        assert_inside_the_screen(browser, ".phone")
        browser.set_window_size(480, 1000)

        # Switched off, nothing is kept: the API refuses and no history file appears.
        refused = httpx.post(f"{demo.url}/api/phone/messages", json={"text": secret}, timeout=5)
        assert refused.status_code == 409 and not (phone_dir / "history.sqlite").exists()
        # Settings and messages are checked: no unknown field, no empty or overlong message.
        assert httpx.put(f"{demo.url}/api/phone", json={"enabled": True, "gps": True}, timeout=5).status_code == 422
        for bad in ({"text": ""}, {"text": "x" * 1001}, {"text": "hi", "to": "aggregator"}):
            assert httpx.post(f"{demo.url}/api/phone/messages", json=bad, timeout=5).status_code == 422

        switch.click()
        send = wait.until(lambda b: (e := b.find_element(By.ID, "send")).is_displayed() and e)
        sent = [secret, *LINES]
        for text in sent:
            box.send_keys(text)
            send.click()
            wait.until(lambda b: box.get_attribute("value") == "")
        history = sqlite3.connect(phone_dir / "history.sqlite")
        assert [row[0] for row in history.execute("select text from messages order by id")] == sent
        history.close()
        status = browser.find_element(By.ID, "phone-status")
        assert f"{len(sent)} messages" in status.text and "not eligible" in status.text

        # Charging, idle and on Wi-Fi, the phone joins a round (a goal of one: its update closes it).
        for condition in ("phone-charging", "phone-idle", "phone-wifi"):
            browser.find_element(By.ID, condition).click()
        wait.until(lambda b: "Joined " in status.text)
        summary = {r.round: r for r in AggregatorClient(aggregator.url).status().recent_rounds}[1]
        assert (summary.status, summary.reported, summary.new_version) == ("closed", 1, 1)
        assert summary.eval_positions > 0  # it scored the model on its own held-out messages
        assert httpx.get(f"{demo.url}/api/phone", timeout=5).json()["eligible"] is True
        box.send_keys("to be or not to ")
        wait.until(lambda b: (w := shown_words(b)) and len(w) == 3)
        assert browser.save_screenshot(str(SCREENSHOTS / "browser-phone.png"))

        # The words stayed on this machine: the aggregator's database (every update and evaluation it received,
        # every model it made) holds none of them.
        aggregator.stop()
        stored = b"".join(path.read_bytes() for path in tmp_path.glob("aggregator.sqlite*"))
        for word in ("4711", "Wittgenstein", "bank", "temperate"):
            assert word.encode() not in stored


def simulated_phone_takes_part(phone: Phone, url: str, tokenizer: KeyboardTokenizer, seed: int) -> str | None:
    """A simulated phone checks in until it is selected, then takes its round's steps as every phone does."""
    with closing(AggregatorClient(url, timeout_s=30.0)) as client:
        for _ in range(200):
            decision = phone.check_in(client)
            if decision.action == "train":
                return Participant(phone, client, decision).run(
                    lambda secure: phone.local_work(client.model(), tokenizer, LocalTrainConfig(), seed, secure=secure,
                                                    evaluate=decision.evaluate),  # noqa: B023 (run at once)
                    lambda seconds: time.sleep(seconds) is None)
            time.sleep(0.2)
    return None


@pytest.mark.browser
def test_this_browser_is_a_phone_joins_a_secure_round_beside_simulated_phones(
    tmp_path: Path, tokenizer: KeyboardTokenizer
) -> None:
    # A cohort of three (secure aggregation's smallest): the browser phone and two simulated phones.
    config = small_aggregator_config(tmp_path, tokenizer, clients_per_round=3, over_selection=1.0,
                                     secure_aggregation=True, eval_share=1.0)  # all three score the model
    others = [Phone.create(f"phone-{i}", tmp_path / f"phone-{i}", [(float(t), text) for t, text in enumerate(LINES)])
              for i in range(2)]
    with LocalAggregator(config) as aggregator, \
            DemoServer(aggregator.url, phone_dir=tmp_path / "browser-phone") as demo, \
            chromium(tmp_path / "chromium-profile") as browser, ThreadPoolExecutor(2) as pool:
        demo.wait_for_model(version=0)
        outcomes = [pool.submit(simulated_phone_takes_part, phone, aggregator.url, tokenizer, seed)
                    for seed, phone in enumerate(others)]
        browser.get(demo.url)
        wait = WebDriverWait(browser, 60)
        browser.find_element(By.ID, "phone-enabled").click()
        send, box = wait.until(lambda b: (e := b.find_element(By.ID, "send")).is_displayed() and e), \
            browser.find_element(By.ID, "message")
        for text in LINES:
            box.send_keys(text)
            send.click()
            wait.until(lambda b: box.get_attribute("value") == "")
        for condition in ("phone-charging", "phone-idle", "phone-wifi"):
            browser.find_element(By.ID, condition).click()
        status = browser.find_element(By.ID, "phone-status")
        # (The page's last activity moves on at once: the phone, still eligible, checks in for round 2.)
        wait.until(lambda b: "Joined 1 round, the latest round 1" in status.text)
        assert [outcome.result(timeout=60) for outcome in outcomes] == ["reported", "reported"]
        summary = {r.round: r for r in AggregatorClient(aggregator.url).status().recent_rounds}[1]
        assert (summary.status, summary.reported, summary.new_version) == ("closed", 3, 1)
        # The three phones' evaluation counts travelled inside their masked inputs; only the sum was seen.
        assert summary.eval_devices == 3 and summary.eval_positions > 0


@pytest.fixture
def full_width_aggregator(tmp_path: Path, tokenizer: KeyboardTokenizer) -> Iterator[LocalAggregator]:
    """An aggregator of a model of Gboard's widths on the small vocabulary, for personal models. The small model's
    scores are so even that the personal fine-tuning every phone does (a few steps) raised its best word's probability
    over the runner-up's by about a percent; this one's nearly doubles it (measured), a margin no rounding turns."""
    config = small_aggregator_config(tmp_path, tokenizer, model=ModelConfig(vocab_size=tokenizer.vocab_size),
                                     max_update_norm=10_000.0)  # publish_new_version's delta, on a larger model
    with LocalAggregator(config) as running:
        yield running


# What the person keeps typing, sent TIMES times (the newest fifth is held out, so four are trained on), and the word
# that follows CONTEXT in it: the personal model's best word there, which the global model does not suggest at all.
OWN_PHRASE, TIMES, CONTEXT, OWN_NEXT = "winter of york", 5, "winter ", "of"


@pytest.mark.slow  # an aggregator of its own: about 3.5 s
def test_personal_suggestions_learn_the_phones_own_messages_on_this_machine_only_while_it_is_a_phone(
    full_width_aggregator: LocalAggregator, tmp_path: Path
) -> None:
    phone_dir = tmp_path / "browser-phone"
    config = DemoConfig(aggregator_url=full_width_aggregator.url, refresh_seconds=0.3, phone_dir=phone_dir)
    with TestClient(create_app(config), base_url="http://127.0.0.1") as client:
        def suggest(personal: bool) -> httpx.Response:
            return client.get("/api/suggest", params={"text": CONTEXT, "personal": personal})

        def send(times: int) -> None:
            for _ in range(times):
                assert client.post("/api/phone/messages", json={"text": OWN_PHRASE}).status_code == 201

        wait_for(lambda: suggest(False).status_code == 200, 20, lambda: suggest(False).text)
        # Switched off, the phone has no personal model: refused, saying why.
        refused = suggest(True)
        assert refused.status_code == 409, refused.text
        assert refused.json() == {"detail": "this browser is not a phone: switch it on to suggest from your personal "
                                            "model"}
        assert client.put("/api/phone", json={"enabled": True}).status_code == 200
        refused = suggest(True)  # nor before anything was sent to learn from
        assert refused.status_code == 409 and refused.json()["detail"].startswith("no personal model yet: ")

        send(TIMES)
        kept = sorted(path.name for path in phone_dir.iterdir())
        shared, mine = suggest(False).json(), suggest(True).json()
        assert shared["model"] == "global" and shared["personal_messages"] is None and len(shared["suggestions"]) == 3
        assert OWN_NEXT not in shared["suggestions"], shared
        assert mine["suggestions"][0] == OWN_NEXT, mine
        assert (mine["model"], mine["model_version"], mine["personal_messages"]) == ("personal", 0, TIMES - 1)
        # Kept in memory, not in a file (nothing new in the phone's folder), and built once, not at every keystroke.
        assert sorted(path.name for path in phone_dir.iterdir()) == kept
        phone, (base, _) = client.app.state.phone, client.app.state.model_source.state()
        assert phone.personal_model(base) is phone.personal_model(base)

        # Built again when the history grows (seven messages, two held out)...
        send(2)
        assert suggest(True).json()["personal_messages"] == 5
        # ...and when the aggregator publishes a new global model.
        version = publish_new_version(full_width_aggregator)
        wait_for(lambda: suggest(False).json()["model_version"] == version, 20, lambda: suggest(False).text)
        assert (suggest(True).json()["model_version"], version) == (1, 1)

        # Switched off again, it is gone.
        assert client.put("/api/phone", json={"enabled": False}).status_code == 200
        assert suggest(True).status_code == 409


@pytest.mark.browser
def test_the_browser_phone_suggests_from_its_personal_model_and_says_so(
    full_width_aggregator: LocalAggregator, tmp_path: Path
) -> None:
    with DemoServer(full_width_aggregator.url, phone_dir=tmp_path / "browser-phone") as demo, \
            chromium(tmp_path / "chromium-profile") as browser:
        demo.wait_for_model(version=0)
        browser.get(demo.url)
        wait = WebDriverWait(browser, 20)
        choice, line = browser.find_element(By.ID, "phone-personal"), browser.find_element(By.ID, "personal-line")
        assert not choice.is_displayed()  # only with "This browser is a phone" on
        browser.find_element(By.ID, "phone-enabled").click()
        wait.until(lambda b: choice.is_displayed())
        choice.click()
        # Nothing sent yet, so nothing to learn from: the page says so.
        wait.until(lambda b: line.is_displayed() and line.text.startswith("no personal model yet: "))

        box, send = browser.find_element(By.ID, "message"), browser.find_element(By.ID, "send")
        for _ in range(TIMES):
            box.send_keys(OWN_PHRASE)
            send.click()
            wait.until(lambda b: box.get_attribute("value") == "")
        box.send_keys(CONTEXT)
        wait.until(lambda b: (w := shown_words(b)) and w[0] == OWN_NEXT)
        assert line.text == ("Suggestions from your personal model: model v0 fine-tuned on this machine on "
                             f"{TIMES - 1} of your messages. It is built here from your own history, which never "
                             "leaves this machine.")

        # Back to the global model: its words, and no personal line.
        choice.click()
        shared = wait.until(lambda b: not line.is_displayed() and shown_words(b))
        assert shared == demo.suggest(CONTEXT).json()["suggestions"] and OWN_NEXT not in shared
