"""Privacy mechanisms: how a private round's clipped updates become a released, noised mean, and what that spends,
one module each.

- `fedavg` (`aggregator/privacy.py`): DP-FedAvg, independent Gaussian noise each round, accounted for as if phones
  were sampled uniformly;
- `ftrl` (`aggregator/ftrl.py`): DP-FTRL, noise correlated across rounds, accounted for with a minimum separation
  between a phone's rounds, which it makes devices keep by sitting out.

A mechanism is made once per aggregator by its factory, `(config, storage, model, population) -> PrivacyMechanism`,
which resumes from what the database holds and refuses what it cannot resume (a change the accounting cannot cover,
a state written for another model). The round manager then asks it which devices must sit out, the clip norm to tell
phones, each round's release, and the state to commit with the round; after the commit, `spent` moves it on, as
Optax's updates do, only once nothing can fail. A new mechanism is a module with such a factory and one line in
`MECHANISMS`. The table names each factory by where it lives rather than importing it, so that the command line
lists the mechanisms without importing torch or JAX (tests/test_cli_startup.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from keyboard_model.errors import UserFacingError

if TYPE_CHECKING:
    from aggregator.adaptive_clipping import ClipNorm
    from aggregator.config import AggregatorConfig
    from aggregator.global_model import GlobalModel
    from aggregator.storage import Storage
    from keyboard_model.weights import Tensors


class PrivacyMechanism(Protocol):
    # The clip norm phones are told and the server clips to again: fixed, or adaptive (aggregator/adaptive_clipping.py).
    clip: ClipNorm

    @property
    def noise_stddev(self) -> float:
        """The standard deviation of each value of the noise the next release adds to the sum (a secure round's sum
        is checked against it)."""

    def rounds_to_sit_out(self, device_id: str) -> int:
        """Released rounds this device must still sit out before it may take part again (0: it may now)."""

    def release(self, total: Tensors, within: int, reported: int) -> tuple[Tensors, dict]:
        """The round's noised mean from the sum of its clipped updates (`within` of the `reported` ones within the
        clip norm), and the round's privacy record: at least `epsilon` spent by the run so far and `dp_delta`, and
        whatever else the mechanism reads back on restart (`Storage.last_release`, `Storage.privacy_records`). Spends
        nothing until `spent`."""

    def pending_state(self) -> bytes | None:
        """What to commit with the model the last release made (None: the records are all it needs)."""

    def spent(self, record: dict, reporters: Iterable[str]) -> None:
        """The release with this record, from these devices, was committed: count it and move on."""


@dataclass(frozen=True)
class Registration:
    factory: str  # "module:function"
    # Seconds a new aggregator with it may take to start (DP-FTRL optimises its noise first: a minute or two of CPU).
    startup_s: float = 0.0


MECHANISMS: dict[str, Registration] = {
    "fedavg": Registration("aggregator.privacy:dp_fedavg"),
    "ftrl": Registration("aggregator.ftrl:dp_ftrl", startup_s=600.0),
}
DEFAULT_MECHANISM = "fedavg"


def make_mechanism(config: AggregatorConfig, storage: Storage, model: GlobalModel,
                   population: Callable[[], int]) -> PrivacyMechanism:
    """The configured mechanism, resumed from `storage`; `population`: the phones that could take part, counted when
    a round releases."""
    used = storage.dp_mechanisms() - {config.dp_mechanism}
    if used:
        raise UserFacingError(f"the database {config.db_path} holds rounds released with DP mechanism "
                              f"{', '.join(sorted(used))}; their privacy cannot be added to {config.dp_mechanism}'s: "
                              f"use --dp-mechanism {min(used)} or another --db")
    module, factory = MECHANISMS[config.dp_mechanism].factory.split(":")
    return getattr(importlib.import_module(module), factory)(config, storage, model, population)
