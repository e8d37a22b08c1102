"""Gboard's comparison table on our own data: n-gram, server CIFG, federated CIFG, centralised oracle.

Every row is scored on the same positions: the held-out messages (each phone's newest
20%, never trained on) of every phone of the default corpus.
1. n-gram: interpolated Kneser-Ney trigram on the public proxy split (server-side data).
2. server CIFG: the default CIFG-LSTM trained centrally on the proxy split only.
3. federated CIFG: the model of a federated run (`--federated-run DIR`, from `fedkb simulate`
   or `fedkb up`), with its metrics.jsonl for the recall-per-round plot.
4. oracle: the same network trained centrally on all phones' training messages pooled.
It also exports the federated model as the int8 on-device artifact and scores that.

    .venv/bin/python benchmarks/quality.py --federated-run runs/up [--out runs/quality]

Trained server and oracle models are cached in --out and reused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from device_sim.corpus import CorpusConfig, prepare
from device_sim.history import split_held_out
from keyboard_model import artifact
from keyboard_model.evaluate import EvalCounts, evaluate
from keyboard_model.files import write_atomically
from keyboard_model.model import ModelConfig, build_model
from keyboard_model.ngram import KneserNeyTrigram
from keyboard_model.train import LocalTrainConfig, train_local
from keyboard_model.weights import model_from_bytes, model_to_bytes


def train_centrally(name: str, messages: list[list[int]], vocab_size: int, epochs: int, out: Path):
    """The default network trained on pooled messages with the phones' optimiser; cached in `out`."""
    path = out / f"{name}.safetensors"
    if path.exists():
        return model_from_bytes(path.read_bytes())[0]
    config = ModelConfig(vocab_size=vocab_size)
    model = build_model(config, seed=0)
    train = LocalTrainConfig(epochs=1, max_messages=len(messages))
    for epoch in tqdm(range(epochs), desc=f"training the {name} model", unit="epoch"):
        train_local(model, messages, train, seed=epoch)
    write_atomically(path, model_to_bytes(model.state_dict(), 0, config))
    return model


def row(name: str, counts: EvalCounts) -> dict:
    return {"model": name, **counts.metrics(), "positions": counts.positions}


def plot(metrics_path: Path, rows: list[dict], png: Path) -> None:
    import matplotlib  # noqa: PLC0415  (only the benchmark draws)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    lines = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=120)
    axis.plot([m["round"] for m in lines], [100 * m["recall_at_1"] for m in lines], label="federated CIFG (sample)")
    others = [r for r in rows if r["model"] != "federated CIFG"]
    for other, style in zip(others, (":", "--", "-."), strict=True):
        axis.axhline(100 * other["recall_at_1"], linestyle=style, color="grey", label=other["model"])
    axis.set_xlabel("round")
    axis.set_ylabel("top-1 recall (%)")
    axis.set_title("Held-out top-1 recall per federated round")
    axis.legend()
    figure.tight_layout()
    figure.savefig(png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--federated-run", type=Path, default=Path("runs/up"))
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--server-epochs", type=int, default=5)
    parser.add_argument("--oracle-epochs", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    corpus = prepare(CorpusConfig(), log=lambda _: None)
    tokenizer = corpus.tokenizer()
    train_texts, held_out_texts = [], []
    for messages in corpus.users().values():
        train, held_out = split_held_out([m.text for m in messages])
        train_texts += train
        held_out_texts += held_out
    held_out = tokenizer.encode_batch(held_out_texts)
    proxy = tokenizer.encode_batch(corpus.proxy_lines())
    print(f"{len(held_out):,} held-out messages of {len(corpus.users())} phones; {len(proxy):,} proxy lines; "
          f"{len(train_texts):,} phone training messages")

    rows = [row("n-gram (KN trigram, proxy)", KneserNeyTrigram(proxy, tokenizer.vocab_size).evaluate(tokenizer, held_out))]
    server = train_centrally("server", proxy, tokenizer.vocab_size, args.server_epochs, args.out)
    rows.append(row("server CIFG (proxy)", evaluate(server, tokenizer, held_out)))
    federated_path = args.federated_run / "model.safetensors"
    federated, version = model_from_bytes(federated_path.read_bytes())
    rows.append(row("federated CIFG", evaluate(federated, tokenizer, held_out)) | {"model_version": version})
    oracle = train_centrally("oracle", tokenizer.encode_batch(train_texts), tokenizer.vocab_size, args.oracle_epochs,
                             args.out)
    rows.append(row("centralised oracle", evaluate(oracle, tokenizer, held_out)))

    on_device = args.out / "keyboard.fkb"
    artifact.export(federated, tokenizer, on_device, version)
    int8 = artifact.load(on_device).model
    int8_row = row("federated CIFG, int8 artifact", evaluate(int8, tokenizer, held_out))

    print("\n| model | top-1 recall | top-3 recall | perplexity |\n| --- | --- | --- | --- |")
    for r in [*rows, int8_row]:
        print(f"| {r['model']} | {100 * r['recall_at_1']:.2f}% | {100 * r['recall_at_3']:.2f}% | {r['perplexity']:.1f} |")
    ngram, server_row, fed, oracle_row = (r["recall_at_1"] for r in rows)
    print(f"\nfederated / n-gram top-1: {fed / ngram:.2f} (target >= 1.2); federated > server: {fed > server_row}; "
          f"federated / oracle: {fed / oracle_row:.3f} (target >= 0.95)")
    print(f"int8 artifact: {on_device.stat().st_size:,} bytes (target <= 1.6 MB); top-1 {int8_row['recall_at_1']:.4f} "
          f"vs float {fed:.4f}: relative change {abs(int8_row['recall_at_1'] - fed) / fed:.2%} (target <= 1%)")
    write_atomically(args.out / "quality.json", json.dumps([*rows, int8_row], indent=2).encode())
    plot(args.federated_run / "metrics.jsonl", rows, args.out / "recall_per_round.png")
    print(f"table: {args.out / 'quality.json'}; plot: {args.out / 'recall_per_round.png'}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
