""""This browser is a phone": the person typing on the page becomes one more phone of the fleet.

The machine that serves the page plays the phone. What the person sends with the
switch on is appended to this phone's own `history.sqlite` (device_sim's TypingHistory,
in `DemoConfig.phone_dir`); the page sets the phone's charging, idle and Wi-Fi
conditions. While the switch is on and the phone is eligible, a worker thread checks in
with the aggregator like a simulated phone and, when selected, takes the same steps as
every phone (device_sim/participation.py), in plain and in secure rounds: it trains on
that history and sends what any phone sends (device_sim/phone.py), the model update
and three evaluation counts, masked together in a secure round; in a word discovery round,
one vote, as every phone (device_sim/word_votes.py). The history itself never leaves
this machine. Nor does the phone's personal model, which the page may suggest
from: the global model fine-tuned on this history, in this process's memory (web_demo/personal_model.py).

The switch and the conditions are kept in `phone.json` beside the history, so a
restarted demo comes back as it was left; a new phone starts switched off. Switching
off stops the phone at once: an update being computed is not sent.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from aggregator.api.client import AggregatorClient
from aggregator.api.schemas import CheckinResponse, SecAggState
from device_sim.eligibility import DeviceConditions
from device_sim.history import TypingHistory
from device_sim.participation import Participant
from device_sim.phone import Phone
from device_sim.secure_aggregation import SecAggPhone
from device_sim.session import Clipping, LocalWork
from device_sim.word_votes import cast_vote
from keyboard_model.files import write_atomically
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.train import LocalTrainConfig
from web_demo.model_source import LoadedModel
from web_demo.personal_model import PersonalModel, PersonalModels

logger = logging.getLogger(__name__)
MAX_MESSAGE_CHARS = 1000


class PhoneSettings(BaseModel):
    """What the page controls: the opt-in switch and the conditions a phone trains under."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="This browser is a phone: what the person sends is kept as its history.")
    charging: bool = False
    idle: bool = False
    wifi: bool = Field(False, description="On an unmetered network.")


class PhoneState(PhoneSettings):
    eligible: bool = Field(description="Switched on, charging, idle and on Wi-Fi: the phone asks to train.")
    messages: int = Field(description="Messages in this phone's history.")
    history_path: str = Field(description="The SQLite file on the machine serving the page that holds them.")
    activity: str = Field(description="What the phone did last, in words.")
    rounds_joined: list[int] = Field(description="Rounds this phone sent an update to.")


class NewMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)


class PhoneSwitchedOffError(Exception):
    pass


class BrowserPhone:
    """The phone folder, its settings, and the worker that trains when eligible. Use as a context manager."""

    def __init__(self, folder: Path, aggregator_url: str, check_in_s: float,
                 train: LocalTrainConfig | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.phone = Phone("browser-phone", folder)
        self.settings_path = folder / "phone.json"
        self.check_in_s = check_in_s
        self.train = train or LocalTrainConfig()
        self._client = AggregatorClient(aggregator_url, timeout_s=30.0)
        self._personal = PersonalModels(self.phone)
        self._lock = threading.Lock()
        self._settings = self._load_settings()
        self._activity = "switched off" if not self._settings.enabled else "waiting to be eligible"
        self._rounds: list[int] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="browser-phone", daemon=True)

    def _load_settings(self) -> PhoneSettings:
        if not self.settings_path.exists():
            return PhoneSettings()
        try:
            return PhoneSettings.model_validate_json(self.settings_path.read_text())
        except ValueError:
            logger.warning("ignoring unreadable %s: the phone starts switched off", self.settings_path)
            return PhoneSettings()

    def _conditions(self) -> DeviceConditions:
        s = self._settings
        return DeviceConditions(idle=s.idle, charging=s.charging, unmetered=s.wifi)

    def _history_size(self) -> int:
        if not self.phone.history_path.exists():
            return 0
        history = TypingHistory(self.phone.history_path)
        try:
            return len(history)
        finally:
            history.close()

    def state(self) -> PhoneState:
        with self._lock:
            settings, activity, rounds = self._settings, self._activity, list(self._rounds)
        return PhoneState(**settings.model_dump(), eligible=settings.enabled and self._conditions().eligible,
                          messages=self._history_size(), history_path=str(self.phone.history_path.resolve()),
                          activity=activity, rounds_joined=rounds)

    def configure(self, settings: PhoneSettings) -> PhoneState:
        with self._lock:
            self._settings = settings
            write_atomically(self.settings_path, settings.model_dump_json().encode())
            if not settings.enabled:
                self._activity = "switched off"
            elif not self._conditions().eligible:
                self._activity = "waiting to be charging, idle and on Wi-Fi"
            else:
                self._activity = "eligible: checking in with the aggregator"
        if not settings.enabled:  # outside the lock: it waits for a build under way
            self._personal.forget()
        self._wake.set()
        return self.state()

    def add_message(self, message: NewMessage) -> PhoneState:
        """Append a sent message to the history; refused while the switch is off (nothing is kept then)."""
        with self._lock:
            if not self._settings.enabled:
                raise PhoneSwitchedOffError("this browser is not a phone: switch it on to keep what you send")
            history = TypingHistory(self.phone.history_path)
            try:
                history.add([(time.time(), message.text)])
            finally:
                history.close()
        self._wake.set()
        return self.state()

    def personal_model(self, base: LoadedModel) -> PersonalModel:
        """This phone's personal model, fine-tuned from the global model `base` on its history as it is now; refused
        while the switch is off (it has none then). A NoPersonalModelError while the history is too short."""
        switched_off = PhoneSwitchedOffError("this browser is not a phone: switch it on to suggest from your "
                                             "personal model")
        with self._lock:
            if not self._settings.enabled:
                raise switched_off
        model = self._personal.current(base, self._history_size())
        with self._lock:
            if self._settings.enabled:
                return model
        # Switched off during the build, after `configure` forgot the model: forget the one just built too.
        self._personal.forget()
        raise switched_off

    def _note(self, activity: str) -> None:
        with self._lock:
            if self._settings.enabled:  # switched off, the page keeps saying so
                self._activity = activity

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.check_in_s
            with self._lock:
                eligible = self._settings.enabled and self._conditions().eligible
            if eligible:
                try:
                    wait = self._step()
                except Exception as error:  # the worker must outlive a down aggregator or a bad answer
                    logger.warning("the browser phone's check-in failed: %s", error)
                    self._note(f"could not reach the aggregator: {error}")
            self._wake.wait(wait)
            self._wake.clear()

    def _step(self) -> float:
        """One check-in, and the round's work if selected. Returns seconds until the next check-in."""
        if not self.phone.history_path.exists() or not self.phone.can_train():
            self._note("eligible, but the history is too short to train on: send a few messages (a fifth is kept "
                       "aside to score the model)")
            return self.check_in_s
        decision = self.phone.check_in(self._client)
        if decision.action == "vote":
            return self._vote(decision)
        if decision.action != "train":
            self._note(f"eligible; the aggregator said to come back in {decision.retry_after_s:.0f} s")
            return max(decision.retry_after_s or 0.0, 1.0)
        kind = "secure round" if decision.secure_aggregation else "round"
        self._note(f"selected for {kind} {decision.round}")
        participant = Participant(self.phone, self._client, decision)
        outcome = participant.run(lambda secure: self._train(decision, secure), self._keep_going)
        work = participant.work
        if outcome == "reported":
            with self._lock:
                self._rounds.append(decision.round)
            masked = "a masked" if decision.secure_aggregation else "a"
            self._note(f"sent {kind} {decision.round} {masked} {len(work.upload) / 1e6:.2f} MB model update, "
                       f"trained on {work.result.num_examples} examples")
        elif outcome == "late":
            self._note(f"round {decision.round} closed before this phone's update arrived")
        elif outcome == "diverged":  # the phone aborted the round: nothing was sent
            self._note(f"sat out round {decision.round}: training diverged ({work.result.divergence}); "
                       "nothing was sent")
        elif outcome is None:
            self._note(f"{kind} {decision.round} went on without this phone")
        return self.check_in_s

    def _vote(self, decision: CheckinResponse) -> float:
        """A discovery round: one prefix of a word of this person's history that the model does not know, or none,
        as every phone votes (device_sim/word_votes.py)."""
        assert decision.discovery is not None and decision.upload_token is not None  # a vote's check-in has both
        tokenizer = KeyboardTokenizer.from_json(self._client.tokenizer_json())
        ballot = cast_vote(self.phone.messages()[0], tokenizer, decision.discovery, seed=time.time_ns() % 2**31)
        self._client.vote(decision.round, decision.upload_token, ballot)
        self._note(f"voted in word discovery round {decision.round}: " + (
            f"the start ({decision.discovery.depth} letters) of a word the model does not know" if ballot.prefix
            else "no vote, no word of this history extends what the round asked about"))
        return self.check_in_s

    def _train(self, decision: CheckinResponse, secure: tuple[SecAggPhone, SecAggState] | None) -> LocalWork:
        self._note(f"training for round {decision.round} on {self.state().messages} messages")
        tokenizer = KeyboardTokenizer.from_json(self._client.tokenizer_json())
        model = self._client.model(decision.model_encoding)
        return self.phone.local_work(model, tokenizer, self.train, seed=time.time_ns() % 2**31,
                                     clipping=Clipping.asked(decision), secure=secure,
                                     evaluate=decision.evaluate)

    def _keep_going(self, seconds: float) -> bool:
        """Wait `seconds` between a secure round's steps; False once the phone is switched off or stopped."""
        if seconds:
            self._stop.wait(seconds)
        with self._lock:
            return self._settings.enabled and not self._stop.is_set()

    def __enter__(self) -> BrowserPhone:
        self._worker.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._wake.set()
        self._worker.join()
        self._client.close()

