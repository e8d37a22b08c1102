"""Canary phrases, the Secret Sharer way (Carlini et al. 2019; Ramaswamy et al. 2020 measured Gboard so): random
secrets typed into some phones' histories, to measure after training how much the model has memorised them.

`plant_canaries` draws `count` secrets of a `CanaryFormat` ("my secret number is" and five number words) and as many
held-out secrets that no phone ever types, gives each planted secret a number of repetitions (cycling through
`repetitions`, so each level has about as many canaries) and `phones_per_canary` phones of the fleet, chosen at
random, and adds the phrase that many times to each of those phones' `history.sqlite`. The phones are real phones of
the fleet: selection, secure aggregation, clipping and differential privacy treat them as any other, and the phrases
are training messages like the rest of their history, so nothing new leaves a phone.

The researcher's record is `canaries.json` in the run folder, beside the phones' folders, never in them: the secrets,
how often and by which phones each was typed, and the held-out secrets. The aggregator never reads it. It is written
before any phone is touched and marked `planted` once every phone holds its copies, so a run stopped while planting
plants the rest when it resumes, and a resumed run plants nothing twice; one resumed with other canary options, or
with canaries where it began without, is refused.

The phrases are typed one second before the simulation starts (`PLANTED_AT`): the oldest messages of their phone, so
phones train on them from the first round and never hold them out. A phone's held-out messages are its newest 20%,
counted over the whole history, so adding k phrases to a phone of n messages also holds out its
ceil(0.2 (n + k)) - ceil(0.2 n) newest training messages (those it held out before stay held out). Phones are chosen
among those that then train on every copy: the copies are training messages and the phone's training messages fit
`--max-messages` (a phone trains on its newest that many; the oldest would be left out).

`canary_report` scores a model: each secret's exposure (`keyboard_model/exposure.py`), whether the keyboard's
suggestion strip would offer it after its prefix, a table by repetitions with the held-out secrets as the baseline,
and a lower bound on epsilon from the exposures of planted against held-out secrets.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import random
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from device_sim.history import TypingHistory, split_held_out
from device_sim.phone import Phone
from device_sim.run_log import METRICS_FILE, read_lines
from keyboard_model.architecture import NextWordModel
from keyboard_model.errors import UserFacingError
from keyboard_model.exposure import CanaryFormat, Secret, alphabet_ids, estimated_exposures, exposures
from keyboard_model.files import write_atomically
from keyboard_model.suggest import Suggester
from keyboard_model.tokenizer import KeyboardTokenizer

CANARIES_FILE = "canaries.json"
# When planted phrases were typed, in simulated seconds: before every message of a history (typing starts at 0).
PLANTED_AT = -1.0
# The largest space of secrets scored whole. Scoring the default format's 10^5 secrets on the default model took 29 s
# and 2.8 GB on two cores; the skew-normal estimate from ESTIMATE_SAMPLES sampled secrets, 1.4 s.
EXACT_SPACE = 10_000
ESTIMATE_SAMPLES = 4096
# The one-run lower bound on epsilon holds with probability 1 - SIGNIFICANCE.
SIGNIFICANCE = 0.05


class CanaryError(UserFacingError):
    """Canary phrases cannot be planted or scored as asked; the message says why."""


@dataclass(frozen=True)
class CanaryConfig:
    # Secrets planted; as many more are held out.
    count: int
    # How many times a planted secret is typed, by each of its phones; the canaries cycle through these.
    repetitions: tuple[int, ...] = (1, 4, 16)
    phones_per_canary: int = 1
    seed: int = 0
    format: CanaryFormat = field(default_factory=CanaryFormat)

    def __post_init__(self) -> None:
        if self.count < 1 or self.phones_per_canary < 1:
            raise ValueError(f"a canary config needs at least one canary and one phone per canary: {self}")
        if not self.repetitions or min(self.repetitions) < 1:
            raise ValueError(f"each repetition level must be at least 1: {self.repetitions}")
        if 2 * self.count > self.format.space:
            raise ValueError(f"{self.count} planted and {self.count} held-out secrets need {2 * self.count} distinct "
                             f"secrets; the format has {self.format.space}")

    def to_dict(self) -> dict:
        return {"count": self.count, "repetitions": list(self.repetitions),
                "phones_per_canary": self.phones_per_canary, "seed": self.seed,
                "format": {"prefix": self.format.prefix, "alphabet": list(self.format.alphabet),
                           "length": self.format.length}}

    @classmethod
    def from_dict(cls, record: dict) -> CanaryConfig:
        shape = record["format"]
        return cls(count=record["count"], repetitions=tuple(record["repetitions"]),
                   phones_per_canary=record["phones_per_canary"], seed=record["seed"],
                   format=CanaryFormat(shape["prefix"], tuple(shape["alphabet"]), shape["length"]))


@dataclass(frozen=True)
class PlantedCanary:
    secret: Secret
    # Times each of its phones typed it.
    repetitions: int
    phones: tuple[str, ...]


@dataclass(frozen=True)
class Canaries:
    """A run's canaries, as `canaries.json` records them."""

    config: CanaryConfig
    planted: tuple[PlantedCanary, ...]
    held_out: tuple[Secret, ...]
    # Every phone holds its copies.
    complete: bool = False

    def to_json(self) -> bytes:
        record = {
            "config": self.config.to_dict(),
            "planted": [{"secret": list(c.secret), "phrase": self.config.format.phrase(c.secret),
                         "repetitions": c.repetitions, "phones": list(c.phones)} for c in self.planted],
            "held_out": [list(secret) for secret in self.held_out],
            "complete": self.complete,
        }
        return (json.dumps(record, indent=1) + "\n").encode()

    @classmethod
    def read(cls, run_dir: Path) -> Canaries | None:
        """The run's canaries, or None if it has none."""
        path = run_dir / CANARIES_FILE
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text())
            return cls(config=CanaryConfig.from_dict(record["config"]),
                       planted=tuple(PlantedCanary(tuple(c["secret"]), c["repetitions"], tuple(c["phones"]))
                                     for c in record["planted"]),
                       held_out=tuple(tuple(secret) for secret in record["held_out"]), complete=record["complete"])
        except (ValueError, KeyError, TypeError) as error:
            raise CanaryError(f"{path} is damaged ({error!r}); it is the only record of the run's secrets") from None


def plant_canaries(run_dir: Path, phones: list[Phone], config: CanaryConfig | None, tokenizer: KeyboardTokenizer,
                   max_messages: int) -> Canaries | None:
    """Plant the canaries `config` asks for in `phones` (those of the run in `run_dir`), or finish planting them in a
    resumed run; None for a run without canaries."""
    recorded = Canaries.read(run_dir)
    if recorded is not None and recorded.config != config:
        raise CanaryError(f"the run in {run_dir} planted canaries with {_options(recorded.config)}; resume it with "
                          "the same options, or choose another --out")
    if config is None:
        return None
    if recorded is None and (run_dir / METRICS_FILE).exists():
        raise CanaryError(f"the run in {run_dir} began without canaries: planting them now would train on them only "
                          "from here on; choose another --out")
    try:
        alphabet_ids(tokenizer, config.format)
    except ValueError as error:
        raise CanaryError(f"the canaries' words must be in the run's vocabulary: {error}") from None
    by_id = {phone.phone_id: phone for phone in phones}
    canaries = recorded or draw_canaries(config, list(by_id), functools.cache(lambda p: _history_size(by_id[p])),
                                         max_messages)
    if recorded is None:
        write_atomically(run_dir / CANARIES_FILE, canaries.to_json())
    for canary in canaries.planted:
        for phone_id in canary.phones:
            _plant(by_id[phone_id], config.format.phrase(canary.secret), canary.repetitions)
    if not canaries.complete:
        canaries = Canaries(config, canaries.planted, canaries.held_out, complete=True)
        write_atomically(run_dir / CANARIES_FILE, canaries.to_json())
    return canaries


def draw_canaries(config: CanaryConfig, phone_ids: list[str], history_size: Callable[[str], int],
                  max_messages: int) -> Canaries:
    """The secrets, their repetitions and their phones, drawn from `config.seed` (`history_size`: a phone's number of
    messages, asked only of the phones drawn, so that a fleet of 100,000 is not read whole). Each phone holds at most
    one canary, so that what a phone's update carries is one secret's."""
    needed = config.count * config.phones_per_canary
    if needed > len(phone_ids):
        raise CanaryError(f"{config.count} canaries on {config.phones_per_canary} phone(s) each need {needed} phones, "
                          f"each holding one canary; the fleet has {len(phone_ids)}: plant fewer (--canaries), "
                          "on fewer phones each (--canary-phones), or provision more (--phones)")
    rng = random.Random(config.seed)
    drawn = [config.format.secret(index) for index in rng.sample(range(config.format.space), 2 * config.count)]
    levels = [config.repetitions[index % len(config.repetitions)] for index in range(config.count)]
    free = rng.sample(sorted(phone_ids), len(phone_ids))
    phones_of: dict[int, tuple[str, ...]] = {}
    # The most repeated first: a phone that trains on every copy of a canary typed often does so of one typed less.
    for index in sorted(range(config.count), key=lambda i: -levels[i]):
        fitting = list(itertools.islice(
            (p for p in free if _trains_on_every_copy(history_size(p), levels[index], max_messages)),
            config.phones_per_canary))
        if len(fitting) < config.phones_per_canary:
            raise CanaryError(
                f"too few phones train on every copy of a canary typed {levels[index]} times: a phone trains on its "
                f"newest --max-messages {max_messages} training messages, and holds out its newest 20%; plant fewer "
                "canaries, fewer times (--canary-repeats), or raise --max-messages")
        phones_of[index] = tuple(sorted(fitting))
        free = [p for p in free if p not in phones_of[index]]
    planted = tuple(PlantedCanary(drawn[i], levels[i], phones_of[i]) for i in range(config.count))
    return Canaries(config, planted, tuple(drawn[config.count:]))


def _planted_phrases(phone: Phone) -> Counter[str]:
    """How many times the phone's history holds each planted phrase."""
    history = TypingHistory(phone.history_path)
    try:
        return Counter(text for ts, text in history.rows() if ts == PLANTED_AT)
    finally:
        history.close()


def _plant(phone: Phone, phrase: str, repetitions: int) -> None:
    """Add the copies to the phone's history, in one transaction: a phone holds all of them or none."""
    found = _planted_phrases(phone)
    if found == Counter({phrase: repetitions}):
        return  # planted before the run was stopped
    if found:
        raise CanaryError(f"phone {phone.phone_id} holds planted phrases other than canaries.json says "
                          f"({dict(found)}); choose another --out")
    history = TypingHistory(phone.history_path)
    try:
        history.add([(PLANTED_AT, phrase)] * repetitions)
    finally:
        history.close()


def _history_size(phone: Phone) -> int:
    history = TypingHistory(phone.history_path)
    try:
        return len(history)
    finally:
        history.close()


def _trains_on_every_copy(messages: int, copies: int, max_messages: int) -> bool:
    """Whether a phone of `messages` messages, given `copies` typed before all of them, trains on every copy: none is
    among its held-out newest, and its training messages fit the newest `max_messages` it trains on."""
    training, _ = split_held_out(list(range(messages + copies)))
    return copies <= len(training) <= max_messages


def _options(config: CanaryConfig) -> str:
    return (f"--canaries {config.count} --canary-repeats {' '.join(map(str, config.repetitions))} "
            f"--canary-phones {config.phones_per_canary} --canary-length {config.format.length} --seed {config.seed}")


def audit_delta(run_dir: Path) -> float:
    """The delta the run's accountant reports epsilon at (its last line's), else the canary clients' (the
    aggregator's --dp-delta, which a run without differential privacy may set), else 1 / its phones, as its default."""
    lines = read_lines(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).exists() else []
    delta = next((line[key] for key in ("dp_delta", "audit_delta") for line in reversed(lines)
                  if line.get(key) is not None), None)
    if delta is not None:
        return delta
    return 1 / len(json.loads((run_dir / "phones" / "fleet.json").read_text())["phone_ids"])


def canary_report(model: NextWordModel, tokenizer: KeyboardTokenizer, canaries: Canaries, delta: float) -> dict:
    """How much `model` has memorised the canaries: per secret, planted and held out, its exposure and what the
    suggestion strip offers after its prefix; a table by repetitions; and a lower bound on epsilon at `delta`."""
    shape = canaries.config.format
    secrets = [*(canary.secret for canary in canaries.planted), *canaries.held_out]
    if shape.space <= EXACT_SPACE:
        scores = exposures(model, tokenizer, shape, secrets)
        method = f"exact: ranked among all {shape.space:,} secrets"
    else:
        scores = estimated_exposures(model, tokenizer, shape, secrets, samples=ESTIMATE_SAMPLES,
                                     seed=canaries.config.seed)
        method = f"estimated from {ESTIMATE_SAMPLES:,} sampled secrets (skew-normal, Carlini et al. 2019)"
    suggester = Suggester(model, tokenizer)
    rows = [{"secret": list(secret), "exposure": score, **_suggested(suggester, shape, secret)}
            for secret, score in zip(secrets, scores)]
    planted = [{**row, "repetitions": canary.repetitions, "phones": list(canary.phones)}
               for row, canary in zip(rows, canaries.planted)]
    held_out = rows[len(planted):]
    levels = sorted(set(canaries.config.repetitions))
    table = [_level(f"typed {level}x", [row for row in planted if row["repetitions"] == level]) for level in levels]
    return {
        "format": canaries.config.to_dict()["format"],
        "space": shape.space,
        "most_exposure": math.log2(shape.space),
        "exposure_method": method,
        "phones_per_canary": canaries.config.phones_per_canary,
        "by_repetitions": [*table, _level("held out (never typed)", held_out)],
        "epsilon_lower_bound": _epsilon_lower_bound([r["exposure"] for r in planted],
                                                    [r["exposure"] for r in held_out], delta),
        "planted": planted,
        "held_out": held_out,
    }


def _suggested(suggester: Suggester, shape: CanaryFormat, secret: Secret) -> dict:
    """What the strip offers after the prefix and the secret's earlier words, word by word: whether each word is its
    first suggestion and among its three; the whole secret is offered if every word is first."""
    strips = [suggester.suggest(" ".join((shape.prefix, *secret[:index])) + " ") for index in range(len(secret))]
    top1 = [bool(strip) and strip[0] == word for strip, word in zip(strips, secret)]
    return {"word_top1": top1, "word_top3": [word in strip for strip, word in zip(strips, secret)],
            "secret_top1": all(top1)}


def _level(name: str, rows: list[dict]) -> dict:
    top1 = [hit for row in rows for hit in row["word_top1"]]
    top3 = [hit for row in rows for hit in row["word_top3"]]
    return {
        "canaries": name,
        "count": len(rows),
        "mean_exposure": statistics.fmean(row["exposure"] for row in rows) if rows else None,
        "max_exposure": max((row["exposure"] for row in rows), default=None),
        "word_top1_rate": statistics.fmean(top1) if top1 else None,
        "word_top3_rate": statistics.fmean(top3) if top3 else None,
        "secret_top1_rate": statistics.fmean(row["secret_top1"] for row in rows) if rows else None,
    }


def _epsilon_lower_bound(planted: list[float], held_out: list[float], delta: float) -> dict:
    """Steinke et al. 2023's one-run lower bound on epsilon (jax-privacy's CanaryScoreAuditor), reading each secret's
    exposure as the score of a membership guess: planted secrets should score higher. It bounds this one attack
    on these few canaries, not what the model can leak; with P phones a canary it is about groups of P phones."""
    from jax_privacy.auditing import CanaryScoreAuditor  # imports JAX: only when scoring

    epsilon = CanaryScoreAuditor(planted, held_out).epsilon_one_run(significance=SIGNIFICANCE, delta=delta)
    return {"epsilon": float(epsilon), "delta": delta, "confidence": 1 - SIGNIFICANCE,
            "method": "one-run lower bound (Steinke et al. 2023) from planted against held-out exposures"}


def report_lines(report: dict) -> list[str]:
    """The report as a table for the terminal: one row per repetition level and the held-out baseline."""
    lines = [f"canary phrases, exposure in bits ({report['exposure_method']}; the most is "
             f"{report['most_exposure']:.1f}, a secret never typed has 1.4 on average):",
             f"  {'canaries':<24} {'n':>3}  {'mean exp.':>9}  {'max exp.':>8}  {'word top-1':>10}  {'top-3':>7}  "
             f"{'whole secret':>12}"]
    for row in report["by_repetitions"]:
        lines.append(f"  {row['canaries']:<24} {row['count']:>3}  {_bits(row['mean_exposure']):>9}  "
                     f"{_bits(row['max_exposure']):>8}  {_rate(row['word_top1_rate']):>10}  "
                     f"{_rate(row['word_top3_rate']):>7}  {_rate(row['secret_top1_rate']):>12}")
    bound = report["epsilon_lower_bound"]
    lines.append(f"  epsilon >= {bound['epsilon']:.3g} at delta {bound['delta']:.1e} with {bound['confidence']:.0%} "
                 f"confidence: {bound['method']};\n  a lower bound for this attack, not a guarantee")
    return lines


def canary_client_lines(line: dict) -> list[str]:
    """The canary clients' empirical epsilon of an audited round's line (its `audit_*` keys, any of which an older
    run may lack), beside the accountant's."""
    delta = "" if line.get("audit_delta") is None else f" at delta {line['audit_delta']:.1e}"
    said = [f"canary clients, round {line['round']} ({_number(line.get('audit_canaries'))} inserted, as many held "
            "out):",
            f"  empirical epsilon {_number(line['audit_epsilon'])}{delta}, 95% interval "
            f"{_number(line.get('audit_epsilon_low'))} to {_number(line.get('audit_epsilon_high'))} "
            "(one-shot Gaussian fit, Andrew et al. 2024)"]
    if line.get("audit_epsilon_lower_bound") is not None:
        said.append(f"  epsilon >= {_number(line['audit_epsilon_lower_bound'])} with 95% confidence "
                    "(one run, Steinke et al. 2023: jax-privacy's CanaryScoreAuditor)")
    if line.get("audit_score_in") is not None:
        said.append(f"  mean cosine with the model's movement: inserted {line['audit_score_in']:.4f}, held out "
                    f"{_number(line.get('audit_score_out'), '.4f')}")
    if line.get("epsilon") is None:
        said.append("  accountant: no DP, so no proven bound")
    else:
        rho = "" if line.get("rho") is None else f" (rho-zCDP {line['rho']:.4g})"
        accountant_delta = "" if line.get("dp_delta") is None else f" at delta {line['dp_delta']:.1e}"
        said.append(f"  accountant: epsilon {line['epsilon']:,.4g}{accountant_delta}{rho}, a proven bound")
    said.append("  an empirical epsilon is what this attack achieved: a lower bound, not a guarantee")
    return said


def _number(value: float | None, shape: str = ".3g") -> str:
    return "-" if value is None else format(value, shape)


def _bits(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"
