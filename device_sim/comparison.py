"""Gboard's comparison table (Hard et al. 2018) on our own fleet: n-gram, server model, federated, oracle;
and personalised models (Wang et al. 2019).

Every row but the two of the personal sample (5.) is scored on the same positions: the
held-out messages (each phone's newest 20%, never trained on) of every phone of the fleet,
counted as `keyboard_model.evaluate` describes.
1. n-gram: interpolated Kneser-Ney trigram on the public proxy split (server-side data).
2. server CIFG: the federated model's network, trained centrally on the proxy split only.
3. federated CIFG: the model a federated run produced.
4. centralised oracle: the same network trained centrally on all phones' training
   messages pooled, the privacy-free upper bound.
5. personalised (Wang et al. 2019): on a sample of the phones (`ComparisonConfig.personal_phones`,
   drawn with a fixed seed), each phone's personal copy of the federated model, fine-tuned on
   its own training messages (keyboard_model/personal.py) and scored on its own held-out
   messages only, as on the phone; pooled over the sample, beside the federated model's row on
   the same phones' positions. These two rows alone score the sample's positions, not every
   phone's.
Rows 2-5 are named after the federated model's architecture, and repeat for each
federated model shown beside it (e.g. a Transformer run on the same phones). A federated
model whose vocabulary grew beyond the corpus's tokenizer (word discovery) says by how many
words in its row.
The two central baselines start from the same initialisation as a federated run
(`build_model(config, seed=0)`) and train with the phones' optimiser, but for several
passes with a decaying learning rate, so they converge. They are cached by content.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch.optim.optimizer import register_optimizer_step_post_hook
from tqdm import tqdm

from device_sim.phone import Phone
from keyboard_model.architecture import NextWordModel, architecture, build_model
from keyboard_model.evaluate import EvalCounts, evaluate, evaluate_fixed_suggestions, most_frequent_words
from keyboard_model.files import write_atomically
from keyboard_model.ngram import KneserNeyTrigram
from keyboard_model.personal import PersonalConfig, score_personalised
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.train import LocalTrainConfig, TrainResult, pack_sequences, train_centrally
from keyboard_model.weights import model_from_bytes, model_to_bytes

# `fedkb eval RUN --table` writes the table here in the run folder: `fedkb plot` and the dashboard draw its rows.
TABLE_FILE = "table.json"
NGRAM_ROW = "n-gram (KN trigram, proxy)"
# Gboard's table (Hard et al. 2018, Table 2), for scale: its n-gram's and its federated CIFG's top-1 and top-3 recall.
GBOARD_NGRAM = (0.130, 0.221)
GBOARD_FEDERATED = (0.164, 0.270)
# The federated model beats the n-gram as Gboard's did when its top-1 is this many times the n-gram's (16.4 / 13.0).
TARGET_RATIO = 1.2


@dataclass(frozen=True)
class ComparisonConfig:
    # Where the trained server and oracle models are cached.
    baselines_dir: Path
    # 20 passes: the oracle gained 0.41 points of top-1 over 10 passes (12.81% against 12.40%).
    server_epochs: int = 20
    oracle_epochs: int = 20
    train: LocalTrainConfig = field(default_factory=LocalTrainConfig)
    # Phones whose personal models are scored (0: no personalised rows), drawn with `personal_seed`; fine-tuning costs
    # about 0.4 s a phone on 2 cores for the default model, so 100 phones take under a minute.
    personal_phones: int = 100
    personal_seed: int = 0
    personal: PersonalConfig = field(default_factory=PersonalConfig)

    def __post_init__(self) -> None:
        if self.server_epochs < 1 or self.oracle_epochs < 1:
            raise ValueError("server_epochs and oracle_epochs must be at least 1")
        if self.personal_phones < 0:
            raise ValueError("personal_phones must be at least 0")


@dataclass(frozen=True)
class TableRow:
    model: str
    counts: EvalCounts

    def to_dict(self) -> dict:
        return {"model": self.model, **self.counts.metrics(), "positions": self.counts.positions}


def comparison_table(
    federated: NextWordModel,
    tokenizer: KeyboardTokenizer,
    phones: Sequence[Phone],
    proxy_lines: Sequence[str],
    config: ComparisonConfig,
    log: Callable[[str], None] = tqdm.write,  # prints around the progress bars
    beside: Sequence[NextWordModel] = (),
    corpus_vocab_size: int | None = None,
) -> list[TableRow]:
    """The n-gram's row; then for `federated` and each model `beside`, the server, federated and oracle rows (the
    paper's order) and the federated and personalised rows on the sample of phones (`personal_sample`).
    `corpus_vocab_size`, the vocabulary of the corpus's tokenizer the run started from, tells how many words a
    model's vocabulary gained by discovery."""
    train_texts, held_out_texts = [], []
    for phone in phones:
        train, held = phone.messages()
        train_texts += train
        held_out_texts += held
    held_out = tokenizer.encode_batch(held_out_texts)
    proxy = tokenizer.encode_batch(list(proxy_lines))
    log(f"scoring on {len(held_out):,} held-out messages of {len(phones)} phones; "
        f"{len(proxy):,} proxy lines, {len(train_texts):,} phone training messages")

    pooled = tokenizer.encode_batch(train_texts)
    rows = cheap_rows(tokenizer, proxy, held_out, config.baselines_dir, log)[:1]
    sample = personal_sample(phones, config)
    for model in (federated, *beside):
        label = architecture(model.config.architecture).label
        discovered = model.config.vocab_size - (corpus_vocab_size or model.config.vocab_size)
        grown = f" (vocabulary + {discovered} discovered words)" if discovered > 0 else ""
        server = _trained_centrally("server", model, proxy, config.server_epochs, config, log)
        oracle = _trained_centrally("oracle", model, pooled, config.oracle_epochs, config, log)
        rows += [
            TableRow(f"server {label} (proxy)", evaluate(server, tokenizer, held_out)),
            TableRow(f"federated {label}{grown}", evaluate(model, tokenizer, held_out)),
            TableRow(f"centralised oracle ({label})", evaluate(oracle, tokenizer, held_out)),
        ]
        if sample:
            shared, personal = personalised_counts(model, tokenizer, sample, config, log)
            rows += [TableRow(f"federated {label}{grown}, same {len(sample)} phones", shared),
                     TableRow(f"personalised {label}, {len(sample)} phones (each on its own messages)", personal)]
    return rows


def personal_sample(phones: Sequence[Phone], config: ComparisonConfig) -> list[Phone]:
    """The phones whose personal models the table scores: `config.personal_phones` of them, drawn with its seed."""
    if config.personal_phones >= len(phones):
        return list(phones)
    return random.Random(config.personal_seed).sample(list(phones), config.personal_phones)


def personalised_counts(
    model: NextWordModel,
    tokenizer: KeyboardTokenizer,
    sample: Sequence[Phone],
    config: ComparisonConfig,
    log: Callable[[str], None] = tqdm.write,
    show_progress: bool = True,
) -> tuple[EvalCounts, EvalCounts]:
    """`model`'s and the phones' personal copies' counts on the `sample` phones' held-out messages, pooled: each
    phone's copy fine-tuned on its own training messages and scored on its own held-out messages only."""
    shared, personal = EvalCounts(), EvalCounts()
    for index, phone in enumerate(tqdm(sample, desc="personalising on each sampled phone", unit="phone",
                                       disable=not show_progress, dynamic_ncols=True)):
        train, held = phone.messages()
        score = score_personalised(model, tokenizer, tokenizer.encode_batch(train), tokenizer.encode_batch(held),
                                   config.personal, seed=config.personal_seed + index)
        shared, personal = shared + score.shared, personal + score.personal
    log(f"personal models: {len(sample)} phones, {shared.positions:,} held-out positions")
    return shared, personal


def cheap_rows(
    tokenizer: KeyboardTokenizer,
    proxy: Sequence[Sequence[int]],
    held_out: Sequence[Sequence[int]],
    cache_dir: Path,
    log: Callable[[str], None] = tqdm.write,  # prints around the progress bars
    show_progress: bool = True,
) -> list[TableRow]:
    """The rows that need no training, the n-gram's and the most frequent words', on the encoded `held_out`
    messages: computed once for a corpus's tokenizer, proxy text and held-out messages, then read from `cache_dir`
    (the n-gram scores the default corpus's 131k positions in about a minute of CPU). A cache file that cannot be
    read is computed again."""
    key = hashlib.sha256(json.dumps([tokenizer.to_json(), proxy, held_out]).encode()).hexdigest()[:16]
    path = cache_dir / f"cheap-rows-{key}.json"
    try:
        return [TableRow(row["model"], EvalCounts(**row["counts"])) for row in json.loads(path.read_text())]
    except FileNotFoundError:
        pass
    except (OSError, ValueError, TypeError, KeyError) as error:
        log(f"{path} is damaged ({type(error).__name__}); scoring the n-gram again")
    frequent = most_frequent_words(tokenizer, proxy)
    with tqdm(desc="scoring the n-gram on every phone's held-out messages (once per corpus)", unit="message",
              disable=not show_progress, dynamic_ncols=True) as progress:

        def advance(done: int, total: int) -> None:
            progress.total = total
            progress.update(done - progress.n)

        ngram = KneserNeyTrigram(proxy, tokenizer.vocab_size).evaluate(tokenizer, held_out, progress=advance)
    rows = [
        TableRow(NGRAM_ROW, ngram),
        TableRow(f"most frequent ({', '.join(tokenizer.id_to_token[i] for i in frequent)})",
                 evaluate_fixed_suggestions(tokenizer, held_out, frequent)),
    ]
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps([{"model": row.model, "counts": asdict(row.counts)} for row in rows]).encode())
    return rows


def markdown_table(rows: Sequence[TableRow]) -> str:
    lines = ["| model | top-1 recall | top-3 recall | perplexity |", "| --- | --- | --- | --- |"]
    for row in rows:
        c = row.counts
        lines.append(f"| {row.model} | {100 * c.recall_at_1:.2f}% | {100 * c.recall_at_3:.2f}% | {c.perplexity:.1f} |")
    return "\n".join(lines)


def _trained_centrally(
    name: str,
    like: NextWordModel,
    messages: list[list[int]],
    epochs: int,
    config: ComparisonConfig,
    log: Callable[[str], None],
    show_progress: bool = True,
) -> NextWordModel:
    """`like`'s network trained from seed 0 on pooled `messages`; reused from the cache when the same."""
    # FedProx's mu is no part of what central training does (train_centrally leaves the term out); leaving it out
    # here keeps the keys of the baselines cached before it existed.
    train = {option: value for option, value in asdict(config.train).items() if option != "proximal_mu"}
    key = hashlib.sha256(json.dumps([name, epochs, like.config.to_dict(), train, messages]).encode()).hexdigest()[:16]
    path = config.baselines_dir / f"{name}-{key}.safetensors"
    if path.exists():
        log(f"{name} model: cached {path}")
        return model_from_bytes(path.read_bytes())[0]
    model = build_model(like.config, seed=0)
    steps = epochs * math.ceil(len(pack_sequences(messages, config.train.sequence_length)) / config.train.batch_size)
    with tqdm(total=steps, desc=f"training the {name} model ({epochs} passes)", unit="step", dynamic_ncols=True,
              disable=not show_progress) as progress, _counting_steps(progress):

        def report(epoch: int, result: TrainResult) -> None:
            log(f"{name} model: epoch {epoch + 1}/{epochs}, mean training loss {result.mean_loss:.3f}")

        train_centrally(model, messages, config.train, epochs, report)
    config.baselines_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(path, model_to_bytes(model.state_dict(), 0, like.config))
    return model


@contextmanager
def _counting_steps(progress: tqdm) -> Iterator[None]:
    """Advance `progress` by one at each optimiser step taken meanwhile: central training takes minutes an epoch,
    and its bar, with tqdm's estimate of the time left, moves within the epoch. The hook sees every optimiser of the
    process; nothing else trains while a baseline does."""
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: progress.update())
    try:
        yield
    finally:
        handle.remove()
