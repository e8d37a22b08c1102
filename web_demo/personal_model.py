"""The browser phone's personal model: the global model fine-tuned on the person's own messages, on this machine.

It is built as every phone builds its own (keyboard_model/personal.py, with the measured PersonalConfig): from the
global model the demo serves, on the phone's training messages, its history less the newest fifth that every phone
holds out to score models (device_sim/history.py). It lives in the demo's memory only: never written to a file, never
sent anywhere, so what the phone uploads in a round is unchanged.

It is built when suggestions first ask for it, and again when they ask after the global model or the history has
changed: once per sent message or new model version, never per keystroke. A build of the default-size model on a
handful of messages takes about 30 ms (measured; the first one in a process also pays torch's start-up, about a
second).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from device_sim.phone import Phone
from keyboard_model.personal import PersonalConfig, personalise
from keyboard_model.suggest import Suggester
from web_demo.model_source import LoadedModel


class NoPersonalModelError(Exception):
    """The history holds no message to fine-tune on yet."""


@dataclass(frozen=True)
class PersonalModel:
    suggester: Suggester
    base: LoadedModel  # the global model it was fine-tuned from
    messages: int  # how many of the history's messages it was fine-tuned on
    history_size: int  # the history's length when it was built: a longer history makes it stale


class PersonalModels:
    """The one personal model of a phone, built when asked for and kept while it is current; thread-safe."""

    def __init__(self, phone: Phone, config: PersonalConfig | None = None) -> None:
        self.phone = phone
        self.config = config or PersonalConfig()
        self._lock = threading.Lock()
        self._model: PersonalModel | None = None

    def current(self, base: LoadedModel, history_size: int) -> PersonalModel:
        """The personal model fine-tuned from `base` on a history of `history_size` messages (the caller counts them,
        which is cheaper than reading them): the kept one if it is that, else a new one."""
        # One build at a time: a request that comes during a build waits for it, then finds it current.
        with self._lock:
            kept = self._model
            # The same object, not only the same version number: an aggregator started again on a new database
            # serves another model under an old number.
            if kept is not None and kept.base is base and kept.history_size == history_size:
                return kept
            training, held_out = self.phone.messages() if history_size else ([], [])
            if not training:
                raise NoPersonalModelError(
                    "no personal model yet: it is fine-tuned on the messages you send with this browser as a phone "
                    "(the newest fifth is kept aside to score models, as on every phone); send a few")
            tokenizer = base.suggester.tokenizer
            # A fixed seed: the same history and global model give the same suggestions after a restart.
            model = personalise(base.suggester.model, tokenizer.encode_batch(training), self.config, seed=0)
            # Counted from what was read: a message sent since the caller counted makes the next request rebuild.
            self._model = PersonalModel(Suggester(model, tokenizer), base, len(training),
                                        len(training) + len(held_out))
            return self._model

    def forget(self) -> None:
        """Drop the personal model from memory (the phone was switched off)."""
        with self._lock:
            self._model = None
