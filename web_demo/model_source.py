"""The aggregator's latest global model, kept current by a background thread.

A refresh asks the aggregator for its status (model version and recent rounds, kept
for the dashboard) and downloads the model (with its tokenizer) only when that version
differs from the one loaded. The new model is built completely before it replaces the
old one, so a request always sees one whole model; when the aggregator cannot be
reached the last good model keeps serving and the reason is kept for the page to show.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from aggregator.api.client import AggregatorClient, AggregatorRefusedError, AggregatorUnavailableError
from aggregator.api.schemas import StatusResponse
from keyboard_model.suggest import Suggester
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.weights import model_from_bytes

logger = logging.getLogger(__name__)
# The most the aggregator's /status gives: the dashboard plots this many rounds back.
DASHBOARD_ROUNDS = 1000


@dataclass(frozen=True)
class LoadedModel:
    suggester: Suggester
    version: int


@dataclass(frozen=True)
class PrivacySpent:
    """The aggregator's differential privacy so far: epsilon at delta (None before its first private round)."""

    epsilon: float | None
    delta: float | None


class ModelSource:
    """Thread-safe holder of the latest model; use as a context manager to run the poller."""

    def __init__(self, aggregator_url: str, refresh_seconds: float, timeout_s: float = 10.0) -> None:
        self.url = aggregator_url.rstrip("/")
        self.refresh_seconds = refresh_seconds
        self._client = AggregatorClient(self.url, timeout_s=timeout_s)
        self._lock = threading.Lock()
        self._model: LoadedModel | None = None
        self._error: str | None = None
        self._privacy: PrivacySpent | None = None
        self._status: StatusResponse | None = None
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="model-refresh", daemon=True)

    def state(self) -> tuple[LoadedModel | None, str | None]:
        """The loaded model (None before the first success) and why the last refresh failed (None if it did not)."""
        with self._lock:
            return self._model, self._error

    def privacy(self) -> PrivacySpent | None:
        """None when the aggregator runs without differential privacy (or has not been reached)."""
        with self._lock:
            return self._privacy

    def training(self) -> StatusResponse | None:
        """The aggregator's last status, with up to DASHBOARD_ROUNDS recent rounds (None before the first)."""
        with self._lock:
            return self._status

    def refresh(self) -> None:
        """Load the aggregator's model if its version is not the one loaded; record why not if that fails."""
        loaded, previous_error = self.state()
        try:
            status = self._client.status(recent=DASHBOARD_ROUNDS)
            if loaded is None or loaded.version != status.model_version:
                self._load()
            deltas = [r.dp_delta for r in status.recent_rounds if r.dp_delta is not None]
            with self._lock:
                self._status = status
                self._privacy = (PrivacySpent(status.epsilon, deltas[-1] if deltas else None)
                                 if status.differential_privacy else None)
            error = None
        except AggregatorUnavailableError as e:
            cause = e.__cause__
            error = f"the aggregator at {self.url} is not reachable: {str(cause) or type(cause).__name__}"
        except AggregatorRefusedError as e:
            error = f"the aggregator at {self.url} answered {e.status_code}: {e.detail}"
        except ValueError as e:  # bad JSON, unreadable weights, a tokenizer that does not fit the model
            error = f"the aggregator at {self.url} sent something the demo cannot use: {e}"
        except Exception as e:
            # The poller must outlive any surprise, or the page would silently stop updating.
            logger.exception("refreshing the model from %s failed", self.url)
            error = f"refreshing the model from {self.url} failed: {e!r}"
        with self._lock:
            self._error = error
        if error and error != previous_error:
            logger.warning("%s", error)

    def _load(self) -> None:
        # The tokenizer comes with every new model: a restarted aggregator may serve another corpus.
        tokenizer_json = self._client.tokenizer_json()
        try:
            tokenizer = KeyboardTokenizer.from_json(tokenizer_json)
        except Exception as e:  # the tokenizers library raises a bare Exception for malformed JSON
            raise ValueError(f"unreadable tokenizer: {e}") from e
        model, version = model_from_bytes(self._client.served_model())
        loaded = LoadedModel(Suggester(model, tokenizer), version)
        with self._lock:
            self._model = loaded
        logger.info("model version %d loaded from %s", version, self.url)

    def _poll(self) -> None:
        while True:
            self.refresh()
            if self._stop.wait(self.refresh_seconds):
                return

    def __enter__(self) -> ModelSource:
        self._poller.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._poller.join()
        self._client.close()
