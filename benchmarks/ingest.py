"""How fast the aggregator alone accepts updates, and whether its memory grows with a round's size.

Starts the real service (`python -m aggregator`) on loopback with the default model, and
from a separate process enrols devices, checks them in, and posts int8-compressed
updates of the default model concurrently. Prints accepted updates per second and the
service's peak memory (VmHWM) for two round sizes: with a streaming sum, a round of
four times as many updates should need no more memory.

    .venv/bin/python benchmarks/ingest.py [--updates 400] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import torch

from aggregator.process import LocalAggregator, local_aggregator_config
from device_sim.corpus import CorpusConfig, prepare
from device_sim.session import update_bytes
from keyboard_model.architecture import build_model
from keyboard_model.model import ModelConfig

TARGET_PER_S = 100


def post_updates(url: str, count: int, concurrency: int, vocab_size: int, results) -> None:
    """The load: `count` devices enrol and check in, then all post an update at once. Runs in its own process."""
    torch.set_num_threads(1)
    state = build_model(ModelConfig(vocab_size=vocab_size)).state_dict()
    generator = torch.Generator().manual_seed(0)
    # An honest-sized update: small random changes, well inside the norm bound.
    update = update_bytes({n: 1e-3 * torch.randn(t.shape, generator=generator) for n, t in state.items()}, 50)
    with httpx.Client(base_url=url, timeout=120) as client:
        tokens = [client.post("/devices").json()["device_token"] for _ in range(count)]
        selections = [client.post("/checkin", headers={"Authorization": f"Bearer {t}"}).json() for t in tokens]
    assert all(s["action"] == "train" for s in selections), "every device should be selected"

    # The standard library's client, one keep-alive connection per thread: httpx spent more CPU
    # sending 1.4 MB bodies than the aggregator spent receiving them, on the same two cores.
    connections = threading.local()
    address = urlsplit(url)

    def post(selection: dict) -> int:
        if not hasattr(connections, "http"):
            connections.http = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
        connections.http.request("POST", f"/rounds/{selection['round']}/updates", body=update,
                                 headers={"Authorization": f"Bearer {selection['upload_token']}",
                                          "Content-Type": "application/octet-stream"})
        response = connections.http.getresponse()
        response.read()
        return response.status

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        codes = list(pool.map(post, selections))
    results.put((codes.count(200), time.perf_counter() - started, len(update)))


def peak_memory_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc")


def one_round(tokenizer_path: Path, vocab_size: int, updates: int, concurrency: int) -> tuple[int, float, int, float]:
    with tempfile.TemporaryDirectory() as workdir:
        # First come, first served (no selection window): every device is selected at its first check-in, so the
        # load is all uploads, and no device waits out a window that measures nothing of ingest.
        config = local_aggregator_config(Path(workdir), tokenizer_path, model=ModelConfig(vocab_size=vocab_size),
                                         clients_per_round=updates, over_selection=1.0, round_deadline_s=3600.0,
                                         selection_window_s=0.0)
        with LocalAggregator(config) as aggregator:
            spawn = multiprocessing.get_context("spawn")
            results = spawn.Queue()
            loader = spawn.Process(target=post_updates,
                                   args=(aggregator.url, updates, concurrency, vocab_size, results))
            loader.start()
            loader.join()  # its result is a small tuple: the queue never holds it up
            if loader.exitcode != 0:  # rather than wait for a result that never comes
                raise RuntimeError(f"the process posting updates failed (exit code {loader.exitcode})")
            accepted, seconds, size = results.get()
            status = httpx.get(f"{aggregator.url}/status", timeout=10).json()
            assert status["model_version"] == 1, f"the round did not close: {status}"
            return accepted, seconds, size, peak_memory_mb(aggregator.process.pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=400, help="updates in the large round (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8, help="uploads in flight at once (default: %(default)s)")
    args = parser.parse_args()

    corpus = prepare(CorpusConfig(), log=lambda _: None)
    vocab_size = corpus.tokenizer().vocab_size
    small = one_round(corpus.tokenizer_path, vocab_size, args.updates // 4, args.concurrency)
    large = one_round(corpus.tokenizer_path, vocab_size, args.updates, args.concurrency)
    for label, (accepted, seconds, size, memory) in (("small round", small), ("large round", large)):
        print(f"{label}: {accepted} updates of {size:,} bytes accepted in {seconds:.2f} s = "
              f"{accepted / seconds:.0f} updates/s; aggregator peak memory {memory:.0f} MB")
    rate = large[0] / large[1]
    print(f"target: >= {TARGET_PER_S} updates/s -> {'met' if rate >= TARGET_PER_S else 'NOT met'}; "
          f"memory {large[3] - small[3]:+.0f} MB for {args.updates - args.updates // 4} more updates")


if __name__ == "__main__":
    main()
