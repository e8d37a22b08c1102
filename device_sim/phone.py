"""A simulated phone: its own typing history, and one round of on-device training.

What leaves the phone is built in `update_bytes`: one float32 delta tensor per model
parameter and the number of messages trained on. Nothing else: no text, no token
ids, no word counts, no training loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from device_sim.client import AggregatorClient
from device_sim.history import TypingHistory
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.train import LocalTrainConfig, TrainResult, train_local
from keyboard_model.weights import Tensors, model_from_bytes, write_tensors


@dataclass(frozen=True)
class LocalRound:
    """What the phone did in a round, seen from the simulator (only the update was uploaded)."""

    phone_id: str
    round: int
    base_version: int
    result: TrainResult
    update_size_bytes: int
    # This phone's update was the one that completed the round.
    closed_round: bool


def update_bytes(delta: Tensors, num_examples: int) -> bytes:
    """The upload: model delta and example count, nothing more."""
    return write_tensors(delta, {"num_examples": str(num_examples)})


class Phone:
    def __init__(self, phone_id: str, folder: Path) -> None:
        self.phone_id = phone_id
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.history = TypingHistory(folder / "history.sqlite")

    def train_round(
        self,
        client: AggregatorClient,
        round_number: int,
        upload_token: str,
        tokenizer: KeyboardTokenizer,
        config: LocalTrainConfig,
        seed: int,
    ) -> LocalRound | None:
        """Download the global model, fine-tune on this phone's training messages, upload the delta.

        Returns None when the phone has nothing to train on (it then uploads nothing).
        """
        train_texts, _ = self.history.split()
        model, version = model_from_bytes(client.model())
        start = {name: t.clone() for name, t in model.state_dict().items()}
        result = train_local(model, tokenizer.encode_batch(train_texts), config, seed=seed)
        if result.num_examples == 0:
            return None
        delta = {name: t - start[name] for name, t in model.state_dict().items()}
        upload = update_bytes(delta, result.num_examples)
        answer = client.upload(round_number, upload_token, upload)
        return LocalRound(self.phone_id, round_number, version, result, len(upload), answer.round_closed)

    def held_out(self, tokenizer: KeyboardTokenizer) -> list[list[int]]:
        """Encoded held-out messages, for evaluation on the phone."""
        _, held_out = self.history.split()
        return tokenizer.encode_batch(held_out) if held_out else []
