"""Keystroke latency of the web demo as a person sees it: HTTP round trips on loopback.

Starts an aggregator (default corpus tokenizer, default-size model) and the web demo
(`python -m web_demo`), each its own process on loopback, then types held-out messages
of the default corpus one character at a time, asking the demo for suggestions after
every keystroke exactly as the page does (GET /api/suggest with the sentence before the
caret) over one kept-alive connection, as a browser would. Prints p50, p95, p99 and max.

    .venv/bin/python benchmarks/demo_latency.py [--keystrokes 3000]

Target: p95 <= 50 ms. A fresh model stands in for a trained one: a step costs the same.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from aggregator.process import LocalAggregator, free_port, local_aggregator_config
from device_sim.corpus import CorpusConfig, prepare
from keyboard_model.model import ModelConfig

TARGET_P95_MS = 50.0
# As web_demo/static/app.js's currentMessage: the model reads the sentence being typed.
SENTENCE_END = re.compile(r"[.!?]\s+")


def current_message(text: str) -> str:
    ends = [match.end() for match in SENTENCE_END.finditer(text)]
    return text[ends[-1] if ends else 0 :]


def wait_for_model(client: httpx.Client, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.get("/api/model").json().get("model_version") is not None:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("the web demo did not load a model in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keystrokes", type=int, default=3000)
    args = parser.parse_args()

    corpus = prepare(CorpusConfig(), log=lambda _: None)
    held_out = corpus.held_out_texts()
    random.Random(0).shuffle(held_out)
    with tempfile.TemporaryDirectory() as workdir:
        config = local_aggregator_config(Path(workdir), corpus.tokenizer_path,
                                         model=ModelConfig(vocab_size=corpus.tokenizer().vocab_size))
        with LocalAggregator(config) as aggregator:
            port = free_port()
            demo = subprocess.Popen([sys.executable, "-m", "web_demo", "--aggregator", aggregator.url,
                                     "--port", str(port)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            try:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10.0) as client:
                    wait_for_model(client)
                    timings = type_messages(client, held_out, args.keystrokes)
            finally:
                demo.terminate()
                demo.wait(timeout=10)
    timings_ms = sorted(t * 1000 for t in timings)
    # p[k] is the k-th percentile (p[0] pads the list so the index reads as the percentile).
    p = [timings_ms[0], *statistics.quantiles(timings_ms, n=100, method="inclusive")]
    print(f"{len(timings_ms)} keystrokes through the web demo's HTTP API on loopback (default-size model)")
    print(f"latency per keystroke: p50 {p[50]:.1f} ms  p95 {p[95]:.1f} ms  p99 {p[99]:.1f} ms  "
          f"max {timings_ms[-1]:.1f} ms  mean {statistics.fmean(timings_ms):.1f} ms")
    print(f"target: p95 <= {TARGET_P95_MS:.0f} ms -> {'met' if p[95] <= TARGET_P95_MS else 'NOT met'}")


def type_messages(client: httpx.Client, messages: list[str], keystrokes: int) -> list[float]:
    """Seconds from request to parsed answer, one per keystroke; each message is a new text box."""
    timings = []
    for message in messages:
        for end in range(1, len(message) + 1):
            started = time.perf_counter()
            response = client.get("/api/suggest", params={"text": current_message(message[:end])})
            response.raise_for_status()
            response.json()
            timings.append(time.perf_counter() - started)
        if len(timings) >= keystrokes:
            break
    return timings


if __name__ == "__main__":
    main()
