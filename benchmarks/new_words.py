"""New words: how well private discovery (TrieHH, aggregator/discovery.py) finds the words the phones type that the
vocabulary lacks, and what the keyboard gains once it knows them.

Part 1, discovery alone, on a finished run's phones. Each phone's words are those of its own training messages that
the run's tokenizer does not know (device_sim/word_votes.py, exactly what it votes on). For each epsilon, a whole
discovery is replayed over them with TrieHH's threshold and sampling for that (epsilon, --delta) (keyboard_model/
triehh.py; the same votes and trie the round protocol uses, without its HTTP), over --repeats seeds. It prints the
threshold, the sampling rate, the words found, and their precision and recall against the words at least k phones
truly typed (known only to the simulator), and how many found words fewer than the threshold of phones typed (0 is
the guarantee: a word one phone types is never found).

Part 2, with --discovered RUN2 (a run with `--discover-words`), the keyboard on every phone's held-out messages, each
run with its own tokenizer: the share of next-word positions whose word the vocabulary lacks (<unk>, always a miss),
top-1 and top-3 recall on all positions, and the words RUN2's discoveries added.

    .venv/bin/python -m fedkb simulate --in-process --no-progress --rounds 40 --out RUN
    .venv/bin/python -m fedkb simulate --in-process --no-progress --rounds 40 --discover-words --discover-every 10 \
        --discovery-theta 4 --discovery-sampling-rate 0.2 --out RUN2
    .venv/bin/python benchmarks/new_words.py RUN --discovered RUN2 [--epsilons 4 8 16 32] [--theta-rates 4:0.2]
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from pathlib import Path

from device_sim.fleet import provisioned_phones
from device_sim.phone import Phone
from device_sim.word_votes import unknown_words
from keyboard_model.evaluate import MAX_SCORED_TOKENS, evaluate
from keyboard_model.tokenizer import UNK_ID, KeyboardTokenizer
from keyboard_model.triehh import TrieHHConfig, discover, discovered, for_privacy, privacy
from keyboard_model.weights import model_from_bytes


def phones_words(phones: list[Phone], tokenizer: KeyboardTokenizer, max_length: int) -> dict[str, list[str]]:
    """Each phone's unknown words, once per time typed, from its training messages."""
    return {phone.phone_id: unknown_words(phone.messages()[0], tokenizer, max_length) for phone in phones}


def typed_by_at_least(words: dict[str, list[str]], k: int) -> set[str]:
    phones_typing = Counter(word for typed in words.values() for word in set(typed))
    return {word for word, count in phones_typing.items() if count >= k}


def discovery_table(words: dict[str, list[str]], configs: list[TrieHHConfig], ks: list[int],
                    repeats: int) -> list[str]:
    phones_typing = Counter(word for typed in words.values() for word in set(typed))
    truths = {k: typed_by_at_least(words, k) for k in ks}
    lines = [f"{len(words)} phones; unknown words typed by at least k phones: "
             + ", ".join(f"k={k}: {len(truth)}" for k, truth in truths.items())]
    header = (f"{'epsilon':>8} {'delta':>9} {'theta':>6} {'rate':>7} {'found':>6} "
              + " ".join(f"{f'prec k={k}':>10} {f'rec k={k}':>9}" for k in ks) + f" {'< theta phones':>15}")
    lines.append(header)
    for config in configs:
        spent = privacy(config)
        runs = [discovered(discover(words, config, seed)) for seed in range(repeats)]
        found = statistics.mean(len(run) for run in runs)
        cells = []
        for k in ks:
            precision = statistics.mean(len(run & truths[k]) / len(run) if run else 1.0 for run in runs)
            recall = statistics.mean(len(run & truths[k]) / len(truths[k]) if truths[k] else 1.0 for run in runs)
            cells.append(f"{precision:>10.2f} {recall:>9.2f}")
        rare = sum(phones_typing[word] < config.theta for run in runs for word in run)
        lines.append(f"{spent.epsilon:>8.2f} {spent.delta:>9.1e} {config.theta:>6} {config.sampling_rate:>7.4f} "
                     f"{found:>6.1f} " + " ".join(cells) + f" {rare:>15}")
    return lines


def keyboard_scores(run: Path, phones: list[Phone]) -> tuple[float, float, float, int]:
    """(<unk> share of next-word positions, top-1, top-3 recall on all positions, vocabulary size) of a run's final
    model on every phone's held-out messages, with the run's own tokenizer."""
    tokenizer = KeyboardTokenizer.from_file(run / "tokenizer.json")
    model, _ = model_from_bytes((run / "model.safetensors").read_bytes())
    held_out = [message for phone in phones for message in phone.held_out(tokenizer)]
    counts = evaluate(model, tokenizer, held_out)
    # Recall positions are word targets, <unk> among them (evaluate's rule): its share of them is the words lacking.
    unknown = sum(token == UNK_ID for message in held_out for token in message[1:MAX_SCORED_TOKENS + 1])
    return unknown / counts.positions, counts.recall_at_1, counts.recall_at_3, tokenizer.vocab_size


def theta_rate(spec: str) -> tuple[int, float]:
    try:
        theta, rate = spec.split(":")
        return int(theta), float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r} is not THETA:RATE, e.g. 4:0.2") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run folder (fedkb simulate --out RUN)")
    parser.add_argument("--discovered", type=Path, default=None,
                        help="a finished run of the same fleet with --discover-words, to compare with RUN")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[4.0, 8.0, 16.0, 32.0])
    parser.add_argument("--delta", type=float, default=1e-6)
    parser.add_argument("--theta-rates", type=theta_rate, nargs="*", default=[], metavar="THETA:RATE",
                        help="threshold and sampling rate pairs to replay besides the epsilons' (e.g. 4:0.2)")
    parser.add_argument("--max-word-length", type=int, default=12)
    parser.add_argument("--k", type=int, nargs="+", default=[10, 50], help="truth: words typed by at least k phones")
    parser.add_argument("--repeats", type=int, default=5, help="discoveries replayed per epsilon, one seed each")
    args = parser.parse_args()

    phones = provisioned_phones(args.run / "phones")
    tokenizer = KeyboardTokenizer.from_file(args.run / "tokenizer.json")
    words = phones_words(phones, tokenizer, args.max_word_length)
    print(f"\nDiscovery over the phones of {args.run} (words up to {args.max_word_length} characters, "
          f"{args.repeats} seeds each):")
    configs = [for_privacy(epsilon, args.delta, args.max_word_length) for epsilon in args.epsilons]
    configs += [TrieHHConfig(theta, rate, args.max_word_length) for theta, rate in args.theta_rates]
    print("\n".join(discovery_table(words, configs, args.k, args.repeats)))
    if args.discovered is None:
        return
    print(f"\nThe keyboard on every phone's held-out messages ({len(phones)} phones):")
    print(f"{'run':<40} {'vocabulary':>10} {'<unk> share':>12} {'top-1':>7} {'top-3':>7}")
    for run in (args.run, args.discovered):
        unknown, top1, top3, vocabulary = keyboard_scores(run, phones)
        print(f"{str(run):<40} {vocabulary:>10} {100 * unknown:>11.2f}% {100 * top1:>6.2f}% {100 * top3:>6.2f}%")


if __name__ == "__main__":
    main()
