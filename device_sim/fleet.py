"""The fleet: provisioning phones from a corpus, and driving them through rounds.

Phones run one after another in this process and talk to the aggregator over HTTP,
exactly as separate devices would. The simulator also plays the researcher: it can
read every phone's held-out messages to score a model, which a real deployment
would do with federated evaluation; those scores never go to the aggregator.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from device_sim.client import AggregatorClient
from device_sim.corpus import PreparedCorpus
from device_sim.eligibility import EligibilityConfig, SimulatedClock
from device_sim.phone import LocalRound, Phone
from keyboard_model.errors import UserFacingError
from keyboard_model.evaluate import EvalCounts, evaluate
from keyboard_model.files import write_atomically
from keyboard_model.model import CIFGLSTM
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.train import LocalTrainConfig

FLEET_MANIFEST = "fleet.json"


class FleetError(UserFacingError):
    """The fleet cannot run as configured; the message says why."""


@dataclass(frozen=True)
class FleetConfig:
    phones_dir: Path
    # None provisions a phone for every user of the corpus.
    num_phones: int | None = None
    train: LocalTrainConfig = field(default_factory=LocalTrainConfig)
    eligibility: EligibilityConfig = field(default_factory=EligibilityConfig)
    # How updates travel: "int8" (a quarter of the bytes, unbiased rounding) or "none" (float32).
    update_compression: str = "int8"
    # Phones whose held-out messages score the model after every round (all of them at the end).
    eval_phones: int = 32
    # Simulated ticks to wait for a round to fill before giving up.
    max_ticks_per_round: int = 1_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_phones is not None and self.num_phones < 1:
            raise ValueError("num_phones must be at least 1")
        if self.eval_phones < 1:
            raise ValueError("eval_phones must be at least 1")


def provision(corpus: PreparedCorpus, phones_dir: Path, num_phones: int | None, seed: int, log=print) -> list[Phone]:
    """Give each chosen user a phone folder with its history.sqlite; reuse a matching earlier fleet.

    Phones get opaque ids (phone-00000): the aggregator never learns whose phone it is.
    """
    users = corpus.users()
    chosen = sorted(users)
    if num_phones is not None:
        if num_phones > len(chosen):
            raise FleetError(f"the corpus has {len(chosen)} users; cannot provision {num_phones} phones")
        chosen = sorted(random.Random(seed).sample(chosen, num_phones))
    wanted = {"corpus_sha256": corpus.manifest["sha256"]["messages.jsonl"], "users": chosen}
    manifest_path = phones_dir / FLEET_MANIFEST
    if manifest_path.exists():
        existing = json.loads(manifest_path.read_text())
        if {k: existing.get(k) for k in wanted} == wanted:
            return [Phone(pid, phones_dir / pid) for pid in existing["phone_ids"]]
        raise FleetError(f"{phones_dir} holds a different fleet; choose another --out or delete it")
    phones_dir.mkdir(parents=True, exist_ok=True)
    log(f"provisioning {len(chosen)} phones in {phones_dir}")
    phone_ids = [f"phone-{index:05d}" for index in range(len(chosen))]
    for phone_id, user in zip(phone_ids, chosen):
        Phone.create(phone_id, phones_dir / phone_id, [(m.ts, m.text) for m in users[user]])
    # Written last: a fleet without its manifest was interrupted and is provisioned again.
    write_atomically(manifest_path, json.dumps({**wanted, "phone_ids": phone_ids}, indent=1).encode())
    return [Phone(pid, phones_dir / pid) for pid in phone_ids]


def provisioned_phones(phones_dir: Path) -> list[Phone]:
    """The phones of a fleet `provision` made earlier, as listed in its manifest."""
    manifest = json.loads((phones_dir / FLEET_MANIFEST).read_text())
    return [Phone(pid, phones_dir / pid) for pid in manifest["phone_ids"]]


@dataclass(frozen=True)
class RoundReport:
    round: int
    participants: list[LocalRound]
    ticks: int

    @property
    def train_loss(self) -> float:
        losses = [p.result.mean_loss for p in self.participants]
        return sum(losses) / len(losses) if losses else float("nan")


class Fleet:
    """Phones, their simulated conditions, and the aggregator they talk to."""

    def __init__(self, phones: Sequence[Phone], config: FleetConfig, client: AggregatorClient) -> None:
        # A phone with nothing to train on never checks in: selected, it would hold a place it cannot fill.
        self.phones = [phone for phone in phones if phone.can_train()]
        if not self.phones:
            raise FleetError("no phone has any message to train on")
        self.config = config
        self.client = client
        self.clock = SimulatedClock(config.eligibility)
        self.tokenizer = KeyboardTokenizer.from_json(client.tokenizer_json())
        self._rng = random.Random(config.seed)
        self._early: list[LocalRound] = []

    def run_round(self) -> RoundReport:
        """Advance simulated time, letting eligible phones check in and train, until the round closes."""
        round_number = self.client.status().round
        # A phone selected for this round while the last one was closing trained already.
        participants, self._early = [p for p in self._early if p.round == round_number], []
        for ticks in range(1, self.config.max_ticks_per_round + 1):
            self.clock.advance()
            eligible = [p for p in self.phones if self.clock.conditions(p.phone_id).eligible]
            self._rng.shuffle(eligible)
            for phone in eligible:
                decision = phone.check_in(self.client)
                if decision.action != "train":
                    continue
                # A selected phone always trains: one that did not would hold a place in its round.
                local = phone.train_round(
                    self.client, decision.round, decision.upload_token, self.tokenizer, self.config.train,
                    seed=self._rng.randrange(2**31), compression=self.config.update_compression,
                )
                if local is None:
                    continue
                if decision.round != round_number:  # our round closed at its deadline meanwhile
                    self._early.append(local)
                    return RoundReport(round_number, participants, ticks)
                participants.append(local)
                if local.closed_round:
                    return RoundReport(round_number, participants, ticks)
            if self.client.status().round != round_number:
                return RoundReport(round_number, participants, ticks)
        raise FleetError(
            f"round {round_number} did not close within {self.config.max_ticks_per_round} simulated ticks: "
            f"too few eligible phones for the aggregator's goal of {self.client.status().goal} updates"
        )


def evaluate_phones(model: CIFGLSTM, tokenizer: KeyboardTokenizer, phones: Sequence[Phone]) -> EvalCounts:
    """Score a model on the held-out messages of `phones` (the researcher's view)."""
    held_out = [message for phone in phones for message in phone.held_out(tokenizer)]
    return evaluate(model, tokenizer, held_out)

