"""The global model the rounds train, with its server optimiser's state.

It is made on the first start (from `initial_model`, or a fresh one from the seed) and
read back from storage on every later one; a round that closes with a mean delta steps
it with the server optimiser (`aggregator/strategies/`, a pure step), and the new model,
the optimiser's state and the round's record are committed together. It moves on only
once they are: a commit that fails leaves model and state as they were.

Its vocabulary can grow (`grow_vocabulary`, with the words a discovery found, aggregator/discovery.py): the
tokenizer, the weights and the optimiser's state get rows for the new words, committed with the new version, and
every later version, on restart too, has the grown sizes and tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping

from safetensors.torch import load as load_safetensors

from aggregator.config import AggregatorConfig
from aggregator.storage import Storage
from aggregator.strategies import make_strategy
from aggregator.strategies.averaged import AVERAGE, served_weights
from keyboard_model.architecture import ArchitectureConfig, build_model
from keyboard_model.errors import UserFacingError
from keyboard_model.norms import l2_norm
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.vocabulary_growth import grow_config, grow_optimizer_state, grow_tokenizer, grow_weights
from keyboard_model.weights import (
    Tensors,
    WeightsError,
    model_from_bytes,
    model_to_bytes,
    parameter_shapes,
    read_tensors,
    write_tensors,
)


class GlobalModel:
    def __init__(self, config: AggregatorConfig, storage: Storage) -> None:
        self.config = config
        self.storage = storage
        self.strategy = make_strategy(config.server_optimizer, config.server_learning_rate, config.serving_average)
        latest = storage.latest_model()
        if latest is None:
            storage.save_initial_model(model_to_bytes(self._initial_state(), 0, config.model))
            latest = storage.latest_model()
            assert latest is not None  # just saved
        self.version, self.bytes = latest
        # The vocabulary the latest version was committed with: a grown one if word discovery grew it, else the
        # starting tokenizer's, read when first asked for (`tokenizer`).
        grown = storage.tokenizer(self.version)
        self._tokenizer = None if grown is None else (grown, KeyboardTokenizer.from_json(grown))
        self.architecture = config.model if self._tokenizer is None else grow_config(
            config.model, self._tokenizer[1].vocab_size - config.model.vocab_size)
        self.shapes = parameter_shapes(build_model(self.architecture).state_dict())
        try:
            self.state, _ = read_tensors(self.bytes, self.shapes)
        except WeightsError as error:
            raise UserFacingError(
                f"the database {config.db_path} holds a model that does not fit this configuration ({error}); "
                "use the sizes and tokenizer it was created with, or another --db"
            ) from error
        # Our own bytes from our own database, written by `commit_step`; not device input.
        saved_state = storage.optimizer_state(self.version)
        self.optimizer_state = load_safetensors(saved_state) if saved_state else self.strategy.init(self.state)
        # (version, bytes): made once per version, on first request
        self._int8: tuple[int, bytes] | None = None
        self._served: tuple[int, bytes] | None = None

    @property
    def tokenizer(self) -> KeyboardTokenizer:
        return self._vocabulary()[1]

    @property
    def tokenizer_json(self) -> str:
        return self._vocabulary()[0]

    def _vocabulary(self) -> tuple[str, KeyboardTokenizer]:
        if self._tokenizer is None:
            text = self.config.tokenizer_path.read_text(encoding="utf-8")
            self._tokenizer = (text, KeyboardTokenizer.from_json(text))
        return self._tokenizer

    def initial_bytes(self) -> bytes:
        """Version 0, which the database always keeps."""
        initial = self.storage.model(0)
        assert initial is not None  # saved when the database was made, and never dropped
        return initial

    def initial_state(self) -> Tensors:
        """Version 0's weights, in the sizes it was made with (word discovery may have grown the model since)."""
        return read_tensors(self.initial_bytes(), parameter_shapes(build_model(self.config.model).state_dict()))[0]

    def encoded(self, encoding: str) -> bytes:
        """The current model as phones download it: the stored float32 bytes, or int8.

        An int8 phone's delta is its trained model minus the int8 model it downloaded, and `commit_step` adds the
        mean delta to the float32 model: the rounding itself is never added, so it cannot pile up from round to
        round, and server momentum amplifies only training (a delta taken against the float32 model would carry
        every phone's same rounding error, which momentum would multiply by up to ten). benchmarks/int8_downloads.py
        compares the two encodings' runs, paired by seed."""
        if encoding == "float32":
            return self.bytes
        if self._int8 is None or self._int8[0] != self.version:
            self._int8 = (self.version, model_to_bytes(self.state, self.version, self.architecture, encoding))
        return self._int8[1]

    def served(self) -> bytes:
        """The model keyboards should suggest with (float32): the average of the recent models when the aggregator
        keeps one (`AggregatorConfig.serving_average`), else the current model."""
        if not self.config.serving_average:
            return self.bytes  # a database written with averaging on holds an average this run does not update
        if self._served is None or self._served[0] != self.version:
            weights = served_weights(self.state, self.optimizer_state)
            served = self.bytes if weights is self.state else model_to_bytes(weights, self.version, self.architecture)
            self._served = (self.version, served)
        return self._served[1]

    def _initial_state(self) -> Tensors:
        if self.config.initial_model is None:
            return build_model(self.config.model, seed=self.config.seed).state_dict()
        try:
            model, _ = model_from_bytes(self.config.initial_model.read_bytes())
        except (OSError, WeightsError) as error:
            raise UserFacingError(f"cannot start from {self.config.initial_model}: {error}") from error
        if model.config != self.config.model:
            raise UserFacingError(
                f"{self.config.initial_model} has sizes {model.config}, but this aggregator is set up for "
                f"{self.config.model}"
            )
        return model.state_dict()

    def commit_step(self, mean_delta: Tensors, record: dict, noise_state: bytes | None = None,
                    statuses: Mapping[str, str] | None = None) -> None:
        """Step the model by a round's mean delta and commit the new model, the optimiser's state, DP-FTRL's noise
        state if any, the round's `record` (completed here with the new version and the step's norm) and its
        devices' `statuses` (`Storage.record_round`) together."""
        new_state, optimizer_state = self.strategy.apply(self.state, self.optimizer_state, mean_delta)
        record.update(update_norm=l2_norm(mean_delta))
        self._commit(new_state, optimizer_state, record, noise_state, statuses)

    def grow_vocabulary(self, words: list[str], record: dict, statuses: Mapping[str, str] | None = None) -> None:
        """Add `words` to the vocabulary, as new tokens after every existing one, and commit the grown model, its
        optimiser state and tokenizer as a new version with the round's `record` and its devices' `statuses`.
        What the model knew is kept: old ids keep their rows (keyboard_model/vocabulary_growth.py)."""
        tokenizer = grow_tokenizer(self.tokenizer, words)
        state = grow_weights(self.state, len(words))
        optimizer_state = grow_optimizer_state(self.optimizer_state, state, weight_copies=(AVERAGE,))
        architecture = grow_config(self.architecture, len(words))
        self._commit(state, optimizer_state, record, None, statuses, architecture, tokenizer)

    def _commit(self, state: Tensors, optimizer_state: Tensors, record: dict, noise_state: bytes | None,
                statuses: Mapping[str, str] | None, architecture: ArchitectureConfig | None = None,
                tokenizer: KeyboardTokenizer | None = None) -> None:
        """Commit `state` as the next version; the manager moves on to it only once it is stored."""
        architecture = architecture or self.architecture
        new_bytes = model_to_bytes(state, self.version + 1, architecture)
        record.update(new_version=self.version + 1)
        tokenizer_json = tokenizer.to_json() if tokenizer is not None else None
        self.storage.record_round(record, new_bytes, write_tensors(optimizer_state), noise_state, statuses,
                                  tokenizer_json)
        self.version, self.bytes, self.state, self.optimizer_state = (self.version + 1, new_bytes, state,
                                                                      optimizer_state)
        if tokenizer is not None and tokenizer_json is not None:
            self._tokenizer, self.architecture = (tokenizer_json, tokenizer), architecture
            self.shapes = parameter_shapes(state)
