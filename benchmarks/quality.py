"""Gboard's comparison table on our own data, the recall-per-round plot, and the int8 artifact's recall.

The table (n-gram, server CIFG, federated CIFG, centralised oracle) is
`device_sim.comparison`, also `fedkb eval --table`; see there for what each row is.
This adds the int8 on-device artifact of the federated model as a row, and its size,
checks the issue's targets and draws federated recall per round (from the run's
metrics.jsonl) with the other rows as horizontal lines. `--beside-run` adds another
federated run on the same phones (e.g. `fedkb simulate --architecture transformer`),
with its own server, oracle and int8 rows, to the table. For every federated model it also
prints what it costs on the phone beside its recall: keystroke latency through the
suggester (`benchmarks/latency.py`'s measurement, one thread) and the int8 artifact's size.

    .venv/bin/python benchmarks/quality.py --federated-run runs/up [--beside-run runs/tr] [--out runs/quality]

The trained server and oracle models are cached in --out and reused.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from latency import KeystrokeLatency, keystroke_latency, typed_messages  # benchmarks/latency.py, beside this file

from device_sim.comparison import ComparisonConfig, TableRow, comparison_table, markdown_table
from device_sim.corpus import CorpusConfig, prepare
from device_sim.fleet import provisioned_phones
from fedkb.plot import plot_runs
from keyboard_model import artifact
from keyboard_model.architecture import NextWordModel
from keyboard_model.architecture import architecture as architecture_of
from keyboard_model.evaluate import evaluate
from keyboard_model.files import write_atomically
from keyboard_model.weights import model_from_bytes


@dataclass(frozen=True)
class OnPhone:
    """A federated model as the phone runs it: its int8 artifact (size, and recall as a table row), and the
    keystroke latency of its suggester."""

    int8: TableRow
    artifact_bytes: int
    latency: KeystrokeLatency

    def to_dict(self) -> dict:
        return {"model": self.int8.model, "artifact_bytes": self.artifact_bytes, "latency": asdict(self.latency)}


def on_phone_table(federated_rows: list[TableRow], on_phone: list[OnPhone]) -> str:
    """Each federated model's recall (float, and its int8 artifact's top-1) beside its cost on the phone."""
    lines = ["| model | top-1 recall | top-3 recall | int8 top-1 | keystroke p50 | keystroke p99 | p99 in CPU time "
             "| int8 artifact |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row, phone in zip(federated_rows, on_phone, strict=True):
        c, size, latency = row.counts, phone.artifact_bytes, phone.latency
        lines.append(f"| {row.model} | {100 * c.recall_at_1:.2f}% | {100 * c.recall_at_3:.2f}% "
                     f"| {100 * phone.int8.counts.recall_at_1:.2f}% | {latency.p50_ms:.3f} ms "
                     f"| {latency.p99_ms:.3f} ms "
                     f"| {latency.cpu_p99_ms:.3f} ms | {size:,} bytes ({size / 1e6:.2f} MB) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--federated-run", type=Path, default=Path("runs/up"))
    parser.add_argument("--beside-run", type=Path, action="append", default=[],
                        help="another federated run on the same phones, shown beside (may be repeated)")
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--server-epochs", type=int, default=ComparisonConfig(Path()).server_epochs)
    parser.add_argument("--oracle-epochs", type=int, default=ComparisonConfig(Path()).oracle_epochs)
    parser.add_argument("--keystrokes", type=int, default=5000, help="timed for each model's latency (default: "
                        "%(default)s)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    corpus = prepare(CorpusConfig(), log=lambda _: None)
    tokenizer = corpus.tokenizer()
    phones = provisioned_phones(args.federated_run / "phones")
    federated, version = model_from_bytes((args.federated_run / "model.safetensors").read_bytes())
    beside = [model_from_bytes((run / "model.safetensors").read_bytes()) for run in args.beside_run]
    config = ComparisonConfig(args.out, server_epochs=args.server_epochs, oracle_epochs=args.oracle_epochs)
    rows = comparison_table(federated, tokenizer, phones, corpus.proxy_lines(), config,
                            beside=[model for model, _ in beside])

    held_out = [m for phone in phones for m in phone.held_out(tokenizer)]
    typed = typed_messages(corpus)

    def on_the_phone(model: NextWordModel, model_version: int, path: Path) -> OnPhone:
        artifact.export(model, tokenizer, path, model_version)
        label = architecture_of(model.config.architecture).label
        print(f"int8 artifact of the federated {label}: {path} {path.stat().st_size:,} bytes")
        int8 = TableRow(f"federated {label}, int8 artifact", evaluate(artifact.load(path).model, tokenizer, held_out))
        return OnPhone(int8, path.stat().st_size, keystroke_latency(model, tokenizer, typed, args.keystrokes))

    on_device = args.out / "keyboard.fkb"
    on_phone = [on_the_phone(federated, version, on_device)]
    on_phone += [on_the_phone(model, v, args.out / f"beside-{n}.fkb") for n, (model, v) in enumerate(beside)]
    int8_rows = [phone.int8 for phone in on_phone]
    int8 = int8_rows[0]

    print(f"\nfederated model: version {version} of {args.federated_run}\n")
    print(markdown_table([*rows, *int8_rows]))
    # rows are the n-gram's, then the same rows for each federated model: server, federated, oracle and, on a sample
    # of phones, federated and personalised.
    per_model = (len(rows) - 1) // len(on_phone)
    print(f"\non the phone: latency over the same {on_phone[0].latency.keystrokes:,} held-out keystrokes, one thread\n")
    print(on_phone_table(rows[2::per_model], on_phone))
    ngram, server, fed, oracle = (r.counts.recall_at_1 for r in rows[:4])
    print(f"\nfederated / n-gram top-1: {fed / ngram:.3f} (target >= 1.2); federated > server: {fed > server}; "
          f"federated / oracle: {fed / oracle:.3f} (target >= 0.95)")
    int8_top1 = int8.counts.recall_at_1
    print(f"int8 artifact: {on_device.stat().st_size:,} bytes (target <= 1.6 MB); top-1 {int8_top1:.4f} "
          f"vs float {fed:.4f}: relative change {abs(int8_top1 - fed) / fed:.2%} (target <= 1%)")
    table = {"model_version": version, "rows": [r.to_dict() for r in [*rows, *int8_rows]],
             "on_phone": [phone.to_dict() for phone in on_phone]}
    write_atomically(args.out / "quality.json", json.dumps(table, indent=2).encode())
    ngram, server, _, oracle = rows[:4]
    plot_runs([args.federated_run], args.out / "recall_per_round.png",
              lines=[(row.model, row.counts.recall_at_1) for row in (ngram, server, oracle)])
    print(f"table: {args.out / 'quality.json'}; plot: {args.out / 'recall_per_round.png'}")


if __name__ == "__main__":
    main()
