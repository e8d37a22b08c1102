"""The aggregator's configuration: one object, filled from the command line or by code."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from aggregator.adaptive_clipping import AdaptiveClipping, default_count_stddev, update_noise_multiplier
from aggregator.mechanisms import DEFAULT_MECHANISM, MECHANISMS
from aggregator.rules import DEFAULT_RULE, RULES
from keyboard_model.architecture import ArchitectureConfig
from keyboard_model.model import ModelConfig
from keyboard_model.secagg import RING_WIDTHS
from keyboard_model.triehh import TrieHHConfig, for_privacy
from keyboard_model.weights import MODEL_ENCODINGS

DP_MECHANISMS = tuple(MECHANISMS)
# The longest word a discovery may find: a vote is at most this and its end marker (aggregator.api.schemas.Vote).
MAX_DISCOVERED_WORD = 63


@dataclass(frozen=True)
class AggregatorConfig:
    db_path: Path
    # The public tokenizer, served to phones and the web demo with the model.
    tokenizer_path: Path
    # The global model's architecture and sizes (default: the CIFG-LSTM of Hard et al. 2018).
    model: ArchitectureConfig = field(default_factory=ModelConfig)
    # The goal: a round closes as soon as this many updates have arrived.
    clients_per_round: int = 10
    # Devices selected per round, as a multiple of the goal: some drop out or abort (Bonawitz et al. 2019 use 1.3).
    over_selection: float = 1.3
    # Otherwise a round closes at this deadline...
    round_deadline_s: float = 300.0
    # ...with the updates it has if they are at least this fraction of the goal; if not, it is recorded as failed.
    min_report_fraction: float = 0.5
    # A name in aggregator.strategies.STRATEGIES: fedavg, fedavgm (server momentum), fedadam, fedyogi or fedadagrad.
    server_optimizer: str = "fedavgm"
    # None: the optimiser's own default (FedAvg 1.0, FedAvgM 0.5, FedAdam and FedYogi 0.01, FedAdagrad 0.03).
    server_learning_rate: float | None = None
    # The served model (GET /model/served, what keyboards suggest with) is the exponentially weighted average of the
    # global models with this decay, about the last 1 / (1 - decay) rounds (aggregator/strategies/averaged.py); phones
    # still train from the global model. 0 serves the global model itself.
    serving_average: float = 0.95
    # How a plain round's updates are combined, a name in aggregator.rules.RULES: mean (FedAvg's example-weighted
    # mean), median or trimmed_mean (coordinate-wise, Yin et al. 2018: robust to a few poisoned updates, and they
    # keep the round's updates in memory). Private and secure rounds aggregate a sum: only mean.
    aggregation_rule: str = DEFAULT_RULE
    # trimmed_mean: the share of the updates dropped from each end, for each value (floor(share x reported)).
    trim_fraction: float = 0.1
    # Most examples one update may claim. Weighting trusts this count, so it is capped: a
    # device cannot outweigh more than this many honest examples. Phones train on at most
    # 400 messages a round by default.
    max_examples_per_update: int = 1_000
    # Largest L2 norm an update may have; larger ones are refused, so one device cannot drag
    # the model far. Honest phones with the default training measured 0.3 to 6.0.
    max_update_norm: float = 20.0
    # Most predictions one evaluation report may claim. Federated recall weights devices by this count, so, like
    # the example count, it is capped. Phones score at most 25 held-out messages of at most 63 predictions each.
    max_eval_positions: int = 2_000
    # The share of each round's selected devices asked to score the model they download (federated evaluation,
    # aggregator/rounds.py `_evaluators`). At 10 a round of 13 selected, 0.3 asks 4: about 370 predictions a round,
    # the round's top-1 within 1.6 points of the population's (rms; 0.5 over ten rounds) against 0.8 when all 13
    # score, and each phone spends 4-8% less time on the round (benchmarks/eval_share.py, train_speed.py).
    eval_share: float = 0.3
    # Differential privacy (aggregator/privacy.py): the Gaussian noise on each round's sum is this multiple of
    # clip_norm. None leaves differential privacy off.
    noise_multiplier: float | None = None
    # With differential privacy on, phones clip their updates to this L2 norm (and the server clips again); with
    # clip_quantile, the norm the first round clips to.
    clip_norm: float = 1.0
    # Adaptive clipping (aggregator/adaptive_clipping.py, Andrew et al. 2021): the clip norm follows this quantile of
    # the update norms (0.5: the median). None keeps clip_norm fixed.
    clip_quantile: float | None = None
    # Its geometric step size (the paper's 0.2), and the noise on the sum of the phones' bits (None: the paper's
    # goal / 20); noise_multiplier then covers updates and bits together.
    clip_learning_rate: float = 0.2
    clip_count_stddev: float | None = None
    # Phones that could take part: the accountant's sampling rate is the goal over this. None: the devices enrolled.
    population: int | None = None
    # The delta at which epsilon is reported. None: 1 / population.
    dp_delta: float | None = None
    # "fedavg" (DP-FedAvg, aggregator/privacy.py: independent noise each round, accounted for as if each phone were
    # sampled with probability goal / population) or "ftrl" (DP-FTRL, aggregator/ftrl.py: BLT-correlated noise,
    # accounted for with the minimum separation the aggregator enforces, no sampling assumed).
    dp_mechanism: str = DEFAULT_MECHANISM
    # DP-FTRL: a device takes part in at most one of any this many consecutive released rounds.
    min_separation: int = 10
    # DP-FTRL: the rounds the BLT noise is optimised for (it stays valid, and accounted for, beyond them).
    dp_rounds: int = 1000
    # The empirical privacy audit (aggregator/canary_clients.py): this many canary clients inserted into training,
    # and as many held out; 0 inserts none. Every `audit_every` rounds the aggregator estimates epsilon from them.
    canary_clients: int = 0
    audit_every: int = 10
    # Word discovery (aggregator/discovery.py, TrieHH): after every `discover_every` training rounds, a discovery of
    # up to `discovery_max_word_length` + 1 rounds adds the words many phones type to the vocabulary; 0: never.
    discover_every: int = 0
    # The (epsilon, delta) each discovery spends, from which TrieHH's threshold and sampling rate are chosen
    # (keyboard_model/triehh.py `for_privacy`): at the default, a word is found once roughly 10 / 0.05 phones type it.
    discovery_epsilon: float = 8.0
    discovery_delta: float = 1e-6
    discovery_max_word_length: int = 12
    # Or the threshold and sampling rate themselves (both or neither); epsilon is then reported if the paper's
    # accounting covers them.
    discovery_theta: int | None = None
    discovery_sampling_rate: float | None = None
    # How selected phones download the model: "int8" (a quarter of the bytes, `keyboard_model/int8.py`) or
    # "float32". The aggregator keeps and steps its model in float32 either way.
    download_encoding: str = "float32"
    # Secure aggregation (aggregator/secure_round.py): the server learns only the sum of a round's updates.
    secure_aggregation: bool = False
    # Its key, share and unmask phases each close when every device has answered, or this many seconds after
    # they opened.
    secagg_phase_s: float = 120.0
    # The ring a masked update lives in, 2**bits (8, 16 or 32). 8 makes a masked upload the size of a plain int8
    # update; wider rings round less (benchmarks/secagg.py measures both).
    secagg_ring_bits: int = 8
    # Run rounds on a simulator's clock (set through PUT /clock) instead of the wall clock, so that deadlines,
    # durations and pace steering are in simulated time. Only for simulations.
    simulated_clock: bool = False
    # The shortest wait pace steering gives a device it turns away (see aggregator/pace.py).
    retry_after_s: float = 5.0
    # Devices that check in within this many seconds of each other are drawn from at random, not taken in order of
    # arrival (aggregator/selection.py). 0 takes them first come, first served.
    selection_window_s: float = 10.0
    # The operator's credential (a bearer token) for PUT /clock; the simulator that starts the aggregator holds it.
    # None: nobody may set the clock.
    operator_token: str | None = field(default=None, repr=False)
    # Enrolment from outside `trusted_networks` must present this secret (aggregator/attestation.py). None: it is
    # refused.
    enrolment_secret: str | None = field(default=None, repr=False)
    # Client addresses that enrol without attestation and without rate limits: the simulator's own machine.
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # Per client address outside `trusted_networks` (aggregator/rate_limits.py).
    enrolments_per_minute: int = 30
    checkins_per_minute: int = 120
    # Largest JSON request body; the largest honest one (a secure round's sealed shares) is a few kilobytes.
    max_json_bytes: int = 64 * 1024
    seed: int = 0
    # Start from this saved model (e.g. one trained on the server's proxy data) instead of a
    # fresh one; used only when the database is new.
    initial_model: Path | None = None
    # Model versions the database keeps, each with its optimiser state (16 MB a version for the default model with
    # FedAvgM and the served average): the newest `keep_models`, version 0 (the start a simulation's summary compares
    # with) and, if `keep_every` is positive, every version that is a multiple of it. Resuming needs only the
    # newest, and phones download only the current model; `GET /models/{version}` answers 404 for a version no longer
    # kept. 0 keeps every version.
    keep_models: int = 5
    keep_every: int = 0
    host: str = "127.0.0.1"
    port: int = 8600

    def __post_init__(self) -> None:
        if self.clients_per_round < 1:
            raise ValueError("clients_per_round must be at least 1")
        if not self.over_selection >= 1.0:
            raise ValueError(f"over_selection must be at least 1.0, got {self.over_selection}")
        if not 0.0 < self.min_report_fraction <= 1.0:
            raise ValueError(f"min_report_fraction must be in (0, 1], got {self.min_report_fraction}")
        if not 0.0 <= self.serving_average < 1.0:
            raise ValueError(f"serving_average must be in [0, 1), got {self.serving_average}")
        if self.aggregation_rule not in RULES:
            raise ValueError(f"aggregation_rule must be one of {sorted(RULES)}, got {self.aggregation_rule!r}")
        if self.aggregation_rule != DEFAULT_RULE and (self.secure_aggregation or self.differential_privacy):
            raise ValueError(f"aggregation_rule {self.aggregation_rule} is for plain rounds: a secure round's server "
                             "sees only the sum of the updates, and a private round releases their clipped, noised "
                             f"sum; use {DEFAULT_RULE} with secure aggregation or differential privacy")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.max_examples_per_update < 1 or self.max_eval_positions < 1:
            raise ValueError("max_examples_per_update and max_eval_positions must be at least 1")
        if not 0.0 < self.eval_share <= 1.0:
            raise ValueError(f"eval_share must be in (0, 1], got {self.eval_share}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be positive, got {self.noise_multiplier}")
        if not 0 < self.clip_norm <= self.max_update_norm:
            raise ValueError(f"clip_norm must be positive and at most max_update_norm, got {self.clip_norm}")
        if self.population is not None and self.population < self.clients_per_round:
            raise ValueError("population must be at least clients_per_round")
        if self.dp_delta is not None and not 0 < self.dp_delta < 1:
            raise ValueError(f"dp_delta must be in (0, 1), got {self.dp_delta}")
        if self.dp_mechanism not in MECHANISMS:
            raise ValueError(f"dp_mechanism must be one of {tuple(MECHANISMS)}, got {self.dp_mechanism!r}")
        if self.min_separation < 1 or self.dp_rounds < 1:
            raise ValueError(f"min_separation and dp_rounds must be at least 1, got {self.min_separation} and "
                             f"{self.dp_rounds}")
        if self.canary_clients == 1 or self.canary_clients < 0 or self.audit_every < 1:
            raise ValueError(f"canary_clients must be 0 or at least 2, and audit_every at least 1; got "
                             f"{self.canary_clients} and {self.audit_every}")
        if self.canary_clients and self.aggregation_rule != DEFAULT_RULE:
            raise ValueError(f"canary clients join a sum; aggregation_rule {self.aggregation_rule} does not sum: "
                             f"use {DEFAULT_RULE}")
        if self.clip_quantile is not None and not 0 < self.clip_quantile < 1:
            raise ValueError(f"clip_quantile must be in (0, 1), got {self.clip_quantile}")
        if not self.clip_learning_rate > 0 or not (self.clip_count_stddev is None or self.clip_count_stddev > 0):
            raise ValueError("clip_learning_rate and clip_count_stddev must be positive, "
                             f"got {self.clip_learning_rate} "
                             f"and {self.clip_count_stddev}")
        if self.adaptive_clipping is not None:
            # Raises if the count's noise is too small.
            update_noise_multiplier(self.private_noise_multiplier, self.adaptive_clipping.count_stddev)
        if self.download_encoding not in MODEL_ENCODINGS:
            raise ValueError(f"download_encoding must be one of {MODEL_ENCODINGS}, got {self.download_encoding!r}")
        if self.secagg_ring_bits not in RING_WIDTHS:
            raise ValueError(f"secagg_ring_bits must be one of {RING_WIDTHS}, got {self.secagg_ring_bits}")
        if not min(self.round_deadline_s, self.retry_after_s, self.max_update_norm, self.secagg_phase_s) > 0:
            raise ValueError("round_deadline_s, retry_after_s, max_update_norm and secagg_phase_s must be positive")
        if not 0 <= self.selection_window_s < self.round_deadline_s:
            raise ValueError(f"selection_window_s must be at least 0 and shorter than the round's deadline, "
                             f"got {self.selection_window_s}")
        for network in self.trusted_networks:
            try:
                ipaddress.ip_network(network)
            except ValueError as error:
                raise ValueError(f"trusted network {network!r} is not an address range like 10.0.0.0/8: "
                                 f"{error}") from error
        if min(self.enrolments_per_minute, self.checkins_per_minute, self.max_json_bytes) < 1:
            raise ValueError("enrolments_per_minute, checkins_per_minute and max_json_bytes must be at least 1")
        if self.discover_every < 0:
            raise ValueError(f"discover_every must be 0 (no discovery) or more, got {self.discover_every}")
        if self.discover_every:
            self._check_discovery()
        if self.keep_models < 0 or self.keep_every < 0:
            raise ValueError(f"keep_models and keep_every must be 0 or more, got {self.keep_models} and "
                             f"{self.keep_every}")

    def _check_discovery(self) -> None:
        """Discovery grows the model; what keeps per-weight state across rounds, or masks inputs of the model's
        shape, does not follow yet."""
        refused = {"secure_aggregation": "its votes would travel unmasked: TrieHH's votes are not summed by the "
                                         "secure aggregation protocol yet",
                   "canary_clients": "the canary clients' directions have the model's starting shape",
                   "dp_ftrl": "DP-FTRL's correlated noise keeps a stream per weight, which does not grow yet"}
        on = {"secure_aggregation": self.secure_aggregation, "canary_clients": bool(self.canary_clients),
              "dp_ftrl": self.differential_privacy and self.dp_mechanism == "ftrl"}
        for name, why in refused.items():
            if on[name]:
                raise ValueError(f"word discovery (discover_every) with {name}: {why}")
        if (self.discovery_theta is None) != (self.discovery_sampling_rate is None):
            raise ValueError("give discovery_theta and discovery_sampling_rate together, or neither")
        if self.discovery_theta is not None and self.discovery_theta < 2:
            raise ValueError(f"discovery_theta must be at least 2 votes, or one phone's word could be discovered; got "
                             f"{self.discovery_theta}")
        if not 1 <= self.discovery_max_word_length <= MAX_DISCOVERED_WORD:
            raise ValueError(f"discovery_max_word_length must be 1 to {MAX_DISCOVERED_WORD} characters, got "
                             f"{self.discovery_max_word_length}")
        self.discovery_trie  # noqa: B018 -- raises on values out of range

    @property
    def discovery_trie(self) -> TrieHHConfig:
        """TrieHH's settings: the threshold and sampling rate given, or those that spend the discovery's (ε, δ)."""
        if self.discovery_theta is not None and self.discovery_sampling_rate is not None:
            return TrieHHConfig(self.discovery_theta, self.discovery_sampling_rate, self.discovery_max_word_length)
        return for_privacy(self.discovery_epsilon, self.discovery_delta, self.discovery_max_word_length)

    @property
    def differential_privacy(self) -> bool:
        return self.noise_multiplier is not None

    @property
    def private_noise_multiplier(self) -> float:
        """The noise multiplier, where differential privacy must be on (a privacy mechanism's settings)."""
        if self.noise_multiplier is None:
            raise ValueError("differential privacy is off: there is no noise multiplier")
        return self.noise_multiplier

    @property
    def adaptive_clipping(self) -> AdaptiveClipping | None:
        """Adaptive clipping's settings, when differential privacy is on and clip_quantile is given."""
        if not self.differential_privacy or self.clip_quantile is None:
            return None
        count_stddev = self.clip_count_stddev or default_count_stddev(self.clients_per_round)
        return AdaptiveClipping(self.clip_quantile, self.clip_learning_rate, count_stddev)
