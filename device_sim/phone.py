"""A simulated phone: its own typing history, and one round of on-device work.

What leaves the phone in a round is built by its round session (device_sim/session.py),
and is two things:
- the update: the model delta, int8 with one scale per row by default (see
  keyboard_model/update_codec.py), and the number of messages trained on;
- the evaluation: how many next-word predictions of the downloaded model it scored on
  its held-out messages (at most EVAL_MESSAGES of them), and how many were right at
  top-1 and top-3.
Nothing else: no text, no token ids, no word counts, no training loss.
A phone that keeps a personal model (`personal.safetensors` in its folder: the global
model fine-tuned on its own messages, keyboard_model/personal.py) keeps it there: it is
never part of the upload. In a plain round it adds two counts to the evaluation: how many
of the same predictions the personal model got right at top-1 and top-3.
A phone whose local training diverged (`keyboard_model.train.train_local` says when)
sends neither: it tells the aggregator it aborted the round, as a phone whose
conditions changed does, so that no blown-up delta reaches the average and the round
does not wait for it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from aggregator.api.client import AggregatorRefusedError
from aggregator.api.protocol import Aggregator
from aggregator.api.schemas import CheckinResponse, SecAggState, UploadResponse
from device_sim.history import TypingHistory
from device_sim.secure_aggregation import SecAggPhone
from device_sim.session import Clipping, LocalWork, Personalisation, RoundInput, local_work, phone_mods
from keyboard_model.architecture import NextWordModel
from keyboard_model.errors import UserFacingError
from keyboard_model.files import write_atomically
from keyboard_model.personal import PersonalConfig
from keyboard_model.secagg import Directory, IdentityKey
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.train import LocalTrainConfig
from keyboard_model.weights import LatestModel, model_from_bytes, model_to_bytes

# Held-out messages a phone scores the downloaded model on, at most. Ten phones still score about a thousand
# predictions a round; scoring 100 messages cost a phone a quarter of its training time, 25 about a tenth; and
# a small count says little about how much the person types.
EVAL_MESSAGES = 25


class PhoneError(UserFacingError):
    """A phone folder is missing or damaged."""


class Phone:
    """A phone folder holding `history.sqlite` and, once enrolled, `device.json` (its credentials
    with the aggregator). The history is opened only while it is used."""

    def __init__(self, phone_id: str, folder: Path) -> None:
        self.phone_id = phone_id
        self.history_path = folder / "history.sqlite"
        self.credentials_path = folder / "device.json"
        self.personal_path = folder / "personal.safetensors"
        self._device_token: str | None = None

    def check_in(self, client: Aggregator) -> CheckinResponse:
        """Ask the aggregator whether to train now, enrolling first if it does not know this phone."""
        try:
            return client.checkin(self._token(client))
        except AggregatorRefusedError as refused:
            if refused.status_code != 401:
                raise
        # An aggregator with a new database has never seen us: enrol again.
        return client.checkin(self.enrol(client))

    def _token(self, client: Aggregator) -> str:
        if self._device_token is None:
            if self.credentials_path.exists():
                self._device_token = json.loads(self.credentials_path.read_text())["device_token"]
            else:
                self.enrol(client)
        assert self._device_token is not None  # enrol set it
        return self._device_token

    def device_id(self) -> str:
        """The id the aggregator gave this phone at its (latest) enrolment."""
        return json.loads(self.credentials_path.read_text())["device_id"]

    def identity(self) -> IdentityKey:
        """This phone's Ed25519 identity key, made once and kept in its folder (`identity.key`). Secure aggregation
        signs with it; its public half is what the phones' directory (`identity_directory`) holds."""
        path = self.credentials_path.parent / "identity.key"
        if not path.exists():
            write_atomically(path, IdentityKey.generate().private)
        return IdentityKey(path.read_bytes())

    def identity_directory(self) -> Directory:
        """The directory of identity keys the phones trust: in the simulation a folder beside the phones' folders
        (`identity-directory`), shared by the phones of one host and never by the aggregator, standing in for a
        PKI run by someone other than the aggregator (the phones' maker, say)."""
        return Directory(self.credentials_path.parent.parent / "identity-directory")

    def enrol(self, client: Aggregator) -> str:
        """Enrol with the aggregator now, replacing any credentials this phone had; returns the new device token.
        A phone enrols by itself at its first check-in, and again when the aggregator no longer knows it."""
        enrolment = client.enrol()
        write_atomically(self.credentials_path, enrolment.model_dump_json().encode())
        self._device_token = enrolment.device_token
        return self._device_token

    @classmethod
    def create(cls, phone_id: str, folder: Path, messages: list[tuple[float, str]]) -> Phone:
        """A new phone with these (timestamp, text) messages. The SQLite file is built beside its
        final place and renamed in, so a phone's history is whole or absent."""
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as staging:
            history = TypingHistory(Path(staging) / "history.sqlite")
            history.add(messages)
            history.db.disable_wal()
            history.close()
            os.replace(Path(staging) / "history.sqlite", folder / "history.sqlite")
        return cls(phone_id, folder)

    def messages(self, now: float | None = None) -> tuple[list[str], list[str]]:
        """(training messages typed by `now`, held-out messages) from the phone's history."""
        if not self.history_path.exists():
            raise PhoneError(f"phone {self.phone_id} has no history at {self.history_path}")
        history = TypingHistory(self.history_path)
        try:
            return history.split(now)
        finally:
            history.close()

    def can_train(self) -> bool:
        return bool(self.messages()[0])

    def local_work(
        self, model_bytes: bytes, tokenizer: KeyboardTokenizer, config: LocalTrainConfig, seed: int,
        compression: str = "int8", now: float | None = None, eval_messages: int = EVAL_MESSAGES,
        clipping: Clipping | None = None, secure: tuple[SecAggPhone, SecAggState] | None = None,
        evaluate: bool = True, models: LatestModel | None = None, personal: PersonalConfig | None = None,
    ) -> LocalWork:
        """Score the downloaded global model on held-out messages, then fine-tune it on the messages typed by
        `now`; with differential privacy on, the aggregator asks for the update clipped (`clipping`). In a
        secure round (`secure`: this phone's part and the round's state) the upload is the masked update with the
        evaluation counts inside it. If training diverged, or the delta holds any value that is not finite, there
        is no upload and no evaluation: nothing of the round is encoded. This is all the work that happens on the
        phone (device_sim/session.py); nothing here talks to the network. The phone scores the model only when the
        aggregator asked it to (`evaluate`: federated evaluation runs on a share of each round's phones). A worker
        that runs many phones passes its `models`, which decodes each downloaded model once, not once per phone.
        With `personal`, a phone asked to score the model also refreshes its personal model (`personalisation`)."""
        train_texts, held_out = self.messages(now)
        model, version = model_from_bytes(model_bytes) if models is None else models.fresh(model_bytes)
        return local_work(RoundInput(model, version, tokenizer, train_texts, held_out, config, seed),
                          phone_mods(compression, eval_messages if evaluate else 0, clipping, secure,
                                     self.personalisation(personal)))

    def personalisation(self, config: PersonalConfig | None) -> Personalisation | None:
        """How this phone keeps a personal model fine-tuned as `config` says (None: it keeps none)."""
        return None if config is None else Personalisation(config, self.keep_personal)

    def keep_personal(self, model: NextWordModel, global_version: int) -> None:
        """Keep `model` as this phone's personal model, recorded with the global version it was fine-tuned from; whole
        or not at all, as suggestions may read it at any time."""
        write_atomically(self.personal_path, model_to_bytes(model.state_dict(), global_version, model.config))

    def personal_model(self) -> tuple[NextWordModel, int] | None:
        """This phone's personal model and the global version it came from, for its own suggestions; None if it
        keeps none."""
        return model_from_bytes(self.personal_path.read_bytes()) if self.personal_path.exists() else None

    def send(
        self, client: Aggregator, round_number: int, upload_token: str, work: LocalWork
    ) -> UploadResponse | None:
        """Report the evaluation, then upload the update. The evaluation goes first: the update may close the round.

        If training diverged, tell the aggregator this phone aborted the round instead, and return None.
        """
        if work.upload is None:
            client.abort(round_number, upload_token)
            return None
        if work.evaluation is not None:
            client.report_evaluation(round_number, upload_token, work.evaluation)
        return client.upload(round_number, upload_token, work.upload)

    def held_out(self, tokenizer: KeyboardTokenizer) -> list[list[int]]:
        """Encoded held-out messages, for evaluation on the phone."""
        held_out = self.messages()[1]
        return tokenizer.encode_batch(held_out) if held_out else []
