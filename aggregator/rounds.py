"""Rounds: which devices train, which updates count, and when a new global model is made.

The protocol of Bonawitz et al. 2019 ("Towards Federated Learning at Scale"):
- devices enrol once and get a secret token; every check-in carries it;
- a round selects `ceil(goal * over_selection)` of the devices that check in, because
  some will drop out or abort, and closes as soon as `goal` of them have reported;
- at its deadline a round closes with what it has if that is at least
  `min_report_fraction` of the goal, and is recorded as failed otherwise;
- devices turned away are told when to come back (pace steering, `aggregator/pace.py`);
- updates for a round that has closed are refused and counted late;
- devices also score the model they downloaded on their own held-out messages and
  report three counts (federated evaluation); summed, they are the round's quality
  metrics for the model it started from;
- with differential privacy on, devices clip their updates, each counts once, and the
  sum gets Gaussian noise once before it moves the model (`aggregator/privacy.py`), or,
  with DP-FTRL, noise correlated across rounds (`aggregator/ftrl.py`), and a device that
  reported in one of the last `min_separation` released rounds is told to retry later;
  with adaptive clipping the clip norm follows a quantile of the update norms, from one
  bit per device (`aggregator/adaptive_clipping.py`);
- with word discovery on, every `discover_every` training rounds a discovery's rounds run instead
  (`aggregator/discovery.py`): their devices vote on words the model does not know, and the
  last one grows the model's vocabulary by the words enough of them voted for;
- with secure aggregation on, the selected devices also run the phases of
  `aggregator/secure_round.py`, and the server learns only the sum of their updates; a
  device the protocol proves to lie (a share or a dealing its commitments give away) is
  told to retry at every later check-in, for good.
Closing averages the reported deltas (one aggregation per kind of round,
`aggregator/aggregation.py`; plain rounds' chosen from the table in `aggregator/rules/`)
and steps the global model with the server optimiser (`aggregator/global_model.py`),
committed to storage together with the optimiser's state, the round's counts, who
reported or aborted and who was proved to lie; on restart the manager resumes from the
last committed model. Until then reports and aborts live only in memory, so an
upload is counted whole or not at all: no write that could fail (a database busy with
another writer, say) comes after an update is added to the round's sum.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import random
import secrets
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from aggregator.adaptive_clipping import ImpossibleSumError
from aggregator.aggregation import Aggregation, PrivateMean, Release, SecureSum
from aggregator.api.schemas import EvaluationReport, SecAggState
from aggregator.canary_clients import RECORDS_SEARCHED, make_canary_clients
from aggregator.config import AggregatorConfig
from aggregator.devices import Devices, token_hash
from aggregator.discovery import BadVoteError, DiscoveryRound, DiscoveryTask, WordDiscovery
from aggregator.global_model import GlobalModel
from aggregator.mechanisms import make_mechanism
from aggregator.pace import next_spread, retry_after_s
from aggregator.personal_evaluation import Paired, paired_counts, personal_record
from aggregator.refusals import (
    AuditError,
    BadUpdateError,
    ClockError,
    RoundClosedError,
    SecAggRefusedError,
    TooLargeError,
    UnauthorizedError,
)
from aggregator.rules import make_rule
from aggregator.secure_round import SecureRound
from aggregator.selection import Comebacks, SelectionWindow
from aggregator.storage import Storage
from aggregator.uploads import check_update
from keyboard_model.errors import UserFacingError
from keyboard_model.secagg import Dealing, PublicKeys, Share
from keyboard_model.update_codec import max_encoded_bytes

logger = logging.getLogger(__name__)

# Round durations that pace steering looks back on.
RECENT_ROUNDS = 20
# When a device the protocol proved to lie is told to ask again, to be told the same: a "retry", which every client
# of the check-in protocol already follows, rather than an error that would stop a phone's whole fleet.
EXCLUDED_RETRY_S = 86_400.0


@dataclass
class CheckinDecision:
    action: str  # "train", "vote" (a discovery round) or "retry"
    round: int
    model_version: int
    upload_token: str | None = None
    retry_after_s: float | None = None
    clip_norm: float | None = None
    adaptive_clipping: bool = False
    secure_aggregation: bool = False
    model_encoding: str = "float32"
    excluded: str | None = None
    evaluate: bool = False
    discovery: DiscoveryTask | None = None  # a discovery round's question
    vocab_size: int | None = None  # the current model's, so that a device knows when to fetch the new tokenizer


@dataclass
class SubmitResult:
    round: int
    reported: int
    duplicate: bool
    round_closed: bool = False


@dataclass
class OpenRound:
    number: int
    base_version: int
    started_at: float  # wall clock, for the record
    started: float  # the manager's clock, for durations and the deadline
    deadline: float
    selection: SelectionWindow
    aggregation: Aggregation
    target: int  # devices to select
    goal: int  # reports that close it
    device_by_token: dict[str, str] = field(default_factory=dict)
    token_by_device: dict[str, str] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)
    aborted: set[str] = field(default_factory=set)
    evaluated: set[str] = field(default_factory=set)
    eval_positions: int = 0
    eval_hits_at_1: int = 0
    eval_hits_at_3: int = 0
    # Each device's (base, personal) counts, from those that keep a personal model: only their distribution is recorded.
    personal_scores: list[Paired] = field(default_factory=list)
    examples: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    secure: SecureRound | None = None
    # Devices that asked to train while the round was open: a device asks only when it is eligible.
    checked_in: set[str] = field(default_factory=set)
    failure: str | None = None
    discovery: DiscoveryRound | None = None  # a discovery round's votes (None: a training round)


# The latest audit's figures /status shows (aggregator/canary_clients.py).
AUDIT_STATUS = ("audit_epsilon", "audit_epsilon_low", "audit_epsilon_high", "audit_epsilon_lower_bound")


class RoundManager:
    """The round state machine. Thread-safe: HTTP handlers and the deadline timer share it."""

    def __init__(
        self, config: AggregatorConfig, storage: Storage, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.storage = storage
        self._simulated_now = 0.0
        self.clock = (lambda: self._simulated_now) if config.simulated_clock else clock
        self._lock = threading.Lock()
        # Seeded, so that a simulation on a simulated clock gets the same pace-steering waits, and so the same
        # trajectory, in in-process and service mode; the jitter spreads check-ins whatever its seed.
        self._rng = random.Random(config.seed)
        self.model = GlobalModel(config, storage)
        self.devices = Devices(storage)
        # Phones that could take part, counted when a round releases (devices may still enrol while it runs).
        def population() -> int:
            return config.population or len(self.devices)

        self.privacy = make_mechanism(config, storage, self.model, population) if config.differential_privacy else None
        self.canaries = make_canary_clients(config, self.model, storage, population)
        self._population = population
        recent = storage.recent_rounds(RECENT_ROUNDS)
        self.discovery = (WordDiscovery(config.discovery_trie, config.discover_every,
                                        storage.last_round_with("discoveries"))
                          if config.discover_every else None)
        self._recent_durations = collections.deque(
            (r["duration_s"] for r in recent if r["duration_s"] is not None), maxlen=RECENT_ROUNDS
        )
        # Rounds over which turned-away devices are sent back (aggregator/pace.py); it adapts within a few rounds.
        self._spread_rounds = 1.0
        self._comebacks = Comebacks()
        self._epsilon = next((r["epsilon"] for r in reversed(recent) if r.get("epsilon") is not None), None)
        self._rho = next((r["rho"] for r in reversed(recent) if r.get("rho") is not None), None)
        self._last_audit = next(({key: r[key] for key in AUDIT_STATUS} for r in reversed(recent)
                                 if r.get("audit_epsilon") is not None), dict.fromkeys(AUDIT_STATUS))
        if config.secure_aggregation and self.selection_target * config.max_eval_positions >= 2**32:
            raise UserFacingError(f"a secure round sums its evaluation counts modulo 2**32: {self.selection_target} "
                                  f"phones of up to --max-eval-positions {config.max_eval_positions} predictions "
                                  "could wrap around it; lower either")
        next_round = storage.last_round_number() + 1
        # A round that was open when the service stopped is run again from the start.
        storage.discard_selections(next_round)
        self.round = self._open_round(next_round)

    def _open_round(self, number: int) -> OpenRound:
        now = self.clock()
        secure = None
        if self.config.secure_aggregation:
            # Phones clip to the bound the ring is sized for: the round's privacy clip if there is one.
            bound = self.privacy.clip.norm if self.privacy is not None else self.config.max_update_norm
            # The graph seed is public (every device gets it with the roster); it only has to differ by round.
            secure = SecureRound(number, now, self.config, self.model.shapes, self._rng.randrange(2**63),
                                 self.selection_target, self.min_reports, bound)
        aggregation: Aggregation
        if secure is not None:
            aggregation = SecureSum(secure, self.privacy, self.config.max_eval_positions)
        elif self.privacy is not None:
            aggregation = PrivateMean(self.model.shapes, self.privacy)
        else:
            aggregation = make_rule(self.config.aggregation_rule, self.model.shapes, self.config)
        opened = OpenRound(number, self.model.version, time.time(), now, now + self.config.round_deadline_s,
                           SelectionWindow(self.config.selection_window_s, now + self.config.selection_window_s),
                           aggregation, self.selection_target, self.config.clients_per_round, secure=secure)
        if self.discovery is not None and self.discovery.due:
            # Exactly the accounting's sample, all of whose votes close the round: over-selecting would sample more.
            opened.discovery, self.discovery.state = self.discovery.opened()
            opened.target = opened.goal = self.discovery.sample_size(self._population())
        return opened

    @property
    def max_upload_bytes(self) -> int:
        """The largest honest update: an uncompressed (float32) one."""
        return max_encoded_bytes(self.model.shapes, "none")

    def current_model(self, encoding: str = "float32") -> tuple[int, bytes]:
        with self._lock:
            return self.model.version, self.model.encoded(encoding)

    def tokenizer_json(self) -> str:
        """The tokenizer of the current model (its vocabulary grows with discovered words)."""
        with self._lock:
            return self.model.tokenizer_json

    def served_model(self) -> tuple[int, bytes]:
        with self._lock:
            return self.model.version, self.model.served()

    def enrol(self) -> tuple[str, str]:
        """A new device: its id and the secret token it must show at every check-in."""
        return self.devices.enrol()

    def authenticate(self, device_token: str) -> str:
        """The enrolled device this token belongs to."""
        return self.devices.authenticate(device_token)

    def checkin(self, device_id: str) -> CheckinDecision:
        with self._lock:
            return replace(self._checkin(device_id), vocab_size=self.model.architecture.vocab_size)

    def _checkin(self, device_id: str) -> CheckinDecision:
        current = self.round
        exclusion = self.devices.exclusion(device_id)
        if exclusion is not None:
            return CheckinDecision("retry", current.number, self.model.version, retry_after_s=EXCLUDED_RETRY_S,
                                   excluded=exclusion)
        current.checked_in.add(device_id)
        done = device_id in current.reported or device_id in current.aborted
        early = None if device_id in current.token_by_device else self._comebacks.early_by(device_id, self.clock())
        if early is not None:  # polling faster than told makes no candidate (aggregator/selection.py)
            return CheckinDecision("retry", current.number, self.model.version, retry_after_s=round(early, 3))
        separation_wait = self._separation_wait(device_id) if device_id not in current.token_by_device else None
        if separation_wait is not None:
            return CheckinDecision("retry", current.number, self.model.version,
                                   retry_after_s=round(separation_wait, 3))
        if device_id not in current.token_by_device and not done and self._selecting():
            current.selection.offer(device_id, self.clock())
            self._draw()
        token = current.token_by_device.get(device_id)
        if token is not None and not done and current.discovery is not None:
            return CheckinDecision("vote", current.number, self.model.version, upload_token=token,
                                   discovery=current.discovery.task)
        if token is not None and not done:
            clip_norm = self.privacy.clip.norm if self.privacy is not None else None
            return CheckinDecision("train", current.number, self.model.version, upload_token=token,
                                   clip_norm=clip_norm, adaptive_clipping=self._adaptive_clipping,
                                   secure_aggregation=current.secure is not None,
                                   model_encoding=self.config.download_encoding,
                                   evaluate=device_id in self._evaluators())
        if device_id in current.selection.candidates:
            # Come back once the draw it is a candidate in has been made.
            wait = max(current.selection.ends - self.clock(), 0.0) + 0.001
        else:
            wait = retry_after_s(self.clock() - current.started, self._recent_durations,
                                 self.config.retry_after_s, self._rng, self._spread_rounds)
        if self.config.selection_window_s > 0:  # a window of 0 is first come, first served
            self._comebacks.told(device_id, self.clock() + wait)
        return CheckinDecision("retry", current.number, self.model.version, retry_after_s=round(wait, 3))

    def _evaluators(self) -> set[str]:
        """The open round's devices asked to score the model they download: federated evaluation runs on a share of
        each round's devices, as Gboard's does, the first ceil(eval_share x selection target) of the round's draws
        (in the draws' random order). The others spend the round on training only; in a secure round they put zero
        counts in their masked input (aggregator/config.py says what the default share costs and saves)."""
        if self.round.discovery is not None:  # a discovery round's devices vote, and score nothing
            return set()
        evaluators = math.ceil(self.config.eval_share * self.round.target)
        return set(itertools.islice(self.round.token_by_device, evaluators))

    def _separation_wait(self, device_id: str) -> float | None:
        """None if the privacy mechanism lets the device take part in this round (DP-FTRL's minimum separation may
        not); otherwise how long to wait, as pace steering would tell it, until the rounds it must sit out are
        expected to be over."""
        rounds_left = self.privacy.rounds_to_sit_out(device_id) if self.privacy is not None else 0
        if rounds_left <= 0:
            return None
        expected_round_s = (statistics.median(self._recent_durations) if self._recent_durations
                            else self.config.retry_after_s)
        elapsed = self.clock() - self.round.started
        return max(self.config.retry_after_s, rounds_left * expected_round_s - elapsed)

    def _selecting(self) -> bool:
        # A secure round's cohort is fixed once full or at its selection deadline: no one joins after that.
        current = self.round
        open_cohort = current.secure is None or current.secure.cohort_open
        return open_cohort and len(current.token_by_device) < current.target

    def _draw(self) -> None:
        """Select, at random, among the candidates of a selection window that has closed (aggregator/selection.py)."""
        current, now = self.round, self.clock()
        if not current.selection.due(now):
            return
        if not self._selecting():
            current.selection.candidates.clear()
            return
        for device_id in current.selection.draw(current.target - len(current.token_by_device), now, self._rng):
            token = secrets.token_urlsafe(24)
            self.storage.record_selection(current.number, device_id, token_hash(token))
            current.token_by_device[device_id] = token
            current.device_by_token[token] = device_id
            if current.discovery is None:  # a selected device downloads the model it is to train
                current.bytes_down += len(self.model.encoded(self.config.download_encoding))

    @property
    def _adaptive_clipping(self) -> bool:
        return self.config.adaptive_clipping is not None

    @property
    def selection_target(self) -> int:
        return math.ceil(self.config.clients_per_round * self.config.over_selection)

    @property
    def min_reports(self) -> int:
        return max(1, math.ceil(self.config.clients_per_round * self.config.min_report_fraction))

    def authorize(self, round_number: int, token: str) -> None:
        """Refuse an upload before its body is read if its token is not valid for this round."""
        with self._lock:
            self._authorize(round_number, token)

    def submit(self, round_number: int, token: str, data: bytes) -> SubmitResult:
        """Validate an uploaded delta and add it to the round's running sum."""
        if len(data) > self.max_upload_bytes:
            raise TooLargeError(f"an update may be at most {self.max_upload_bytes} bytes; this one has {len(data)}")
        with self._lock:
            device_id = self._authorize(round_number, token)
            if self.round.discovery is not None:
                raise RoundClosedError(f"round {round_number} is a discovery round: it takes votes, not updates")
            if device_id in self.round.reported:
                return SubmitResult(round_number, len(self.round.reported), duplicate=True)
            # The shapes of the round's model: a discovery may grow the model once the round has closed.
            shapes = self.model.shapes
        if self.config.secure_aggregation:
            return self._submit_masked(round_number, token, data)
        # Parsing and checking the bytes is the expensive part; do it outside the lock.
        update = check_update(data, shapes, self.config)
        with self._lock:
            device_id = self._authorize(round_number, token)
            if device_id in self.round.reported:
                return SubmitResult(round_number, len(self.round.reported), duplicate=True)
            self.round.aggregation.add(update.delta, update.num_examples, update.within_clip)
            self.round.reported.add(device_id)
            self.round.aborted.discard(device_id)
            self.round.examples += update.num_examples
            self.round.bytes_up += len(data)
            reported = len(self.round.reported)
            closed = reported >= self.round.goal
            if closed:
                self._close_round()
        return SubmitResult(round_number, reported, duplicate=False, round_closed=closed)

    def submit_vote(self, round_number: int, token: str, prefix: str | None) -> SubmitResult:
        """A selected device's vote in a discovery round (None: it has no word to vote for). The round closes when
        every selected device has voted."""
        with self._lock:
            device_id = self._authorize(round_number, token)
            current = self.round
            if current.discovery is None:
                raise RoundClosedError(f"round {round_number} trains the model: it takes updates, not votes")
            if device_id in current.reported:
                return SubmitResult(round_number, len(current.reported), duplicate=True)
            try:
                current.discovery.vote(device_id, prefix)
            except BadVoteError as error:
                raise BadUpdateError(str(error)) from None
            current.reported.add(device_id)
            current.aborted.discard(device_id)
            closed = self._all_answered(current)
            if closed:
                self._close_round()
            return SubmitResult(round_number, len(current.reported), duplicate=False, round_closed=closed)

    @staticmethod
    def _all_answered(current: OpenRound) -> bool:
        """A discovery round's sample has all voted or aborted: waiting longer would only wait for the deadline.
        Closing with fewer votes costs no privacy."""
        return len(current.reported) + len(current.aborted) >= current.goal

    def _submit_masked(self, round_number: int, token: str, data: bytes) -> SubmitResult:
        """A secure round's upload: a masked input, added to the masked sum. Reaching the goal starts unmasking."""
        secure = self.round.secure
        assert secure is not None  # a secure round's upload
        masked = secure.decode_masked(data)  # outside the lock: the layout is the same every round
        with self._lock:
            device_id = self._authorize(round_number, token)
            current = self.round
            assert current.secure is not None
            if device_id in current.reported:
                return SubmitResult(round_number, len(current.reported), duplicate=True)
            over = current.secure.masked_input(device_id, masked, self.clock(), len(current.reported) + 1)
            # This upload counted whether or not the round then fails.
            current.reported.add(device_id)
            current.aborted.discard(device_id)
            current.bytes_up += len(data)
            if over:
                self._close_round()
            return SubmitResult(round_number, len(current.reported), duplicate=False, round_closed=over)

    # --- secure aggregation's own messages, handled by the round's SecureRound (aggregator/secure_round.py) ---

    def secagg_keys(self, round_number: int, token: str, keys: PublicKeys, signature: bytes) -> None:
        self._secure_message(round_number, token, 64 + len(signature), lambda secure, device_id, cohort: secure.keys(
            device_id, keys, signature, self.clock(), *cohort))

    def secagg_confirm(self, round_number: int, token: str, signature: bytes) -> None:
        self._secure_message(round_number, token, len(signature), lambda secure, device_id, cohort: secure.confirm(
            device_id, signature, self.clock(), *cohort))

    def secagg_shares(self, round_number: int, token: str, dealing: Dealing) -> None:
        self._secure_message(round_number, token, dealing.nbytes,
                             lambda secure, device_id, cohort: secure.shares(device_id, dealing, self.clock(), *cohort))

    def secagg_reveal(self, round_number: int, token: str, shares: dict[int, Share]) -> None:
        self._secure_message(round_number, token, sum(len(share.value) + 2 for share in shares.values()),
                             lambda secure, device_id, cohort: secure.reveal(device_id, shares, self.clock(), *cohort))

    def secagg_state(self, round_number: int, token: str) -> SecAggState:
        """The round's secure aggregation as this device may see it (a snapshot, taken under the lock)."""
        with self._lock:
            device_id, secure = self._secure_device(round_number, token)
            return secure.state_for(device_id)

    def _secure_message(self, round_number: int, token: str, size: int, receive) -> None:
        """Hand one device's message to the round's SecureRound; close the round if that ended it."""
        with self._lock:
            device_id, secure = self._secure_device(round_number, token)
            self.round.bytes_up += size
            if receive(secure, device_id, (set(self.round.token_by_device), self.round.aborted)):
                self._close_round()

    def _secure_device(self, round_number: int, token: str) -> tuple[str, SecureRound]:
        device_id = self._authorize(round_number, token)
        if self.round.secure is None:
            raise SecAggRefusedError("this aggregator does not run secure aggregation")
        return device_id, self.round.secure

    def submit_evaluation(self, round_number: int, token: str, report: EvaluationReport) -> tuple[int, bool]:
        """Add a selected device's evaluation counts to the round's; returns (reports so far, duplicate)."""
        if self.config.secure_aggregation:
            raise RoundClosedError("with secure aggregation the evaluation counts travel inside the masked input")
        if report.positions > self.config.max_eval_positions:
            raise BadUpdateError(f"an evaluation may score at most {self.config.max_eval_positions} predictions; "
                                 f"this one claims {report.positions}")
        with self._lock:
            device_id = self._authorize(round_number, token)
            current = self.round
            # Only the share asked to score may: an unasked device's counts would weigh the round's figure as it liked.
            if device_id not in self._evaluators():
                raise BadUpdateError(f"this device was not asked to score the model in round {round_number}")
            if report.model_version != current.base_version:
                raise BadUpdateError(f"round {round_number} trains model version {current.base_version}; "
                                     f"this evaluation scored version {report.model_version}")
            if device_id in current.evaluated:
                return len(current.evaluated), True
            current.evaluated.add(device_id)
            current.eval_positions += report.positions
            current.eval_hits_at_1 += report.hits_at_1
            current.eval_hits_at_3 += report.hits_at_3
            paired = paired_counts(report)
            if paired is not None:
                current.personal_scores.append(paired)
            return len(current.evaluated), False

    def abort(self, round_number: int, token: str) -> int:
        """A selected device gave up (its conditions changed while training): it will not report.
        Returns how many devices of the round have aborted."""
        with self._lock:
            if round_number != self.round.number:
                raise RoundClosedError(f"round {round_number} is closed; the current round is {self.round.number}")
            device_id = self._authorize(round_number, token)
            current = self.round
            if device_id not in current.reported:
                current.aborted.add(device_id)
            aborted = len(current.aborted)
            if current.discovery is not None and self._all_answered(current):
                self._close_round()
            return aborted

    def _authorize(self, round_number: int, token: str) -> str:
        if round_number != self.round.number:
            selection = self.storage.selection_for_token(token_hash(token))
            if selection is None or selection["round"] != round_number:
                raise UnauthorizedError(f"this upload token was not issued for round {round_number}")
            if selection["status"] == "selected":
                self.storage.record_late(round_number, selection["device_id"])
            raise RoundClosedError(f"round {round_number} closed before this update arrived; it was not counted. "
                                   f"The current round is {self.round.number}")
        device_id = self.round.device_by_token.get(token)
        if device_id is None:
            raise UnauthorizedError(f"this upload token was not issued for round {round_number}")
        return device_id

    def set_simulated_time(self, now_s: float) -> None:
        """Move a simulated clock forward to `now_s` seconds, closing the round if its deadline passed."""
        if not self.config.simulated_clock:
            raise ClockError("this aggregator runs on the wall clock; start it with --simulated-clock")
        with self._lock:
            if now_s < self._simulated_now:
                raise ClockError(f"simulated time only moves forward: it is {self._simulated_now}, not {now_s}")
            self._simulated_now = now_s
        self.tick()

    def tick(self) -> None:
        """Draw the selection window that has closed, and close the round if its deadline has passed, or a secure
        round's phases whose time is up (called periodically)."""
        with self._lock:
            self._draw()
            current = self.round
            if current.secure is not None:
                if current.secure.tick(self.clock(), set(current.token_by_device), current.aborted):
                    self._close_round()
            elif self.clock() >= current.deadline:
                self._close_round()

    def _close_round(self) -> None:
        """Record the open round, closed with a new model or failed, and open the next one. Whatever goes wrong
        here, the round ends: a round left open would have every device retrying until the service restarted."""
        current = self.round
        duration = self.clock() - current.started
        selected, reported, aborted = len(current.token_by_device), len(current.reported), len(current.aborted)
        late = len(current.secure.late) if current.secure is not None else 0
        culprits = current.secure.culprits if current.secure is not None else {}
        summary = {
            "round": current.number, "started_at": current.started_at, "closed_at": time.time(),
            "duration_s": duration, "goal": current.goal, "selected": selected,
            "reported": reported, "aborted": aborted, "dropped": selected - reported - aborted - late, "late": late,
            "examples": current.examples, "bytes_up": current.bytes_up, "bytes_down": current.bytes_down,
            "base_version": current.base_version, "new_version": None, "update_norm": None,
            "eval_devices": len(current.evaluated), "eval_positions": current.eval_positions,
            "eval_hits_at_1": current.eval_hits_at_1, "eval_hits_at_3": current.eval_hits_at_3,
            **personal_record(current.personal_scores),
            "checked_in": len(current.checked_in), "clock_started_s": current.started,
            "excluded": culprits or None,
            # Where discovery stands with this round open, so that even a round recorded as failed keeps it.
            **({"round_kind": "training" if current.discovery is None else "discovery",
                **self.discovery.state.record()} if self.discovery is not None else {}),
        }
        try:
            self._commit(dict(summary))
            self.devices.exclude(culprits)
        except Exception as error:
            # Nothing of the round was committed and the model and optimiser state are as they were.
            logger.exception("closing round %d failed; it is recorded as failed", current.number)
            try:
                self.storage.record_round({**summary, "status": "failed", "failure": f"closing failed: {error!r}"},
                                          None, None, statuses=self._statuses())
                self.devices.exclude(culprits)
            except Exception:
                logger.exception("recording round %d as failed failed too", current.number)
        finally:
            self._recent_durations.append(duration)
            self._spread_rounds = next_spread(self._spread_rounds, len(current.checked_in), current.target)
            self.round = self._open_round(current.number + 1)

    def _commit(self, summary: dict) -> None:
        """Commit the round; the manager moves on to what it made (model, optimiser state, privacy spent, where
        discovery stands) only once that is committed."""
        if self.discovery is None:
            self._commit_training(summary)
            return
        if self.round.discovery is not None:
            record, words, state = self.discovery.closed(self.round.discovery, self.model.tokenizer)
            self._commit_discovery({**summary, **record}, words)
        else:
            record, state = self.discovery.trained()
            self._commit_training({**summary, **record})
        self.discovery.state = state

    def _commit_discovery(self, record: dict, words: list[str]) -> None:
        """A discovery round: the record of its votes' counts (never the votes), and, when it ends the discovery
        with new words, the grown model and tokenizer."""
        record["status"] = "closed"
        if words:
            self.model.grow_vocabulary(words, record, self._statuses())
            logger.info("word discovery added %d words: the vocabulary has %d tokens", len(words),
                        self.model.tokenizer.vocab_size)
        else:
            self.storage.record_round(record, None, None, statuses=self._statuses())

    def _commit_training(self, summary: dict) -> None:
        """Commit a training round: with the model and optimiser state its updates give, or as failed."""
        release = self._release()
        if release is None:
            summary.update(status="failed", failure=self.round.failure)
            self.storage.record_round(summary, None, None, statuses=self._statuses())
            return
        if self.round.secure is not None:  # the masked sum cannot say who scored: those asked to, that reported did
            release.record["eval_devices"] = len(self._evaluators() & self.round.reported)
        self.model.commit_step(release.mean_delta, {**summary, **release.record, "status": "closed"},
                               self.privacy.pending_state() if self.privacy is not None else None, self._statuses())
        if self.privacy is not None:
            self.privacy.spent(release.record, self.round.reported)
            self._epsilon = release.record["epsilon"]
            self._rho = release.record.get("rho")
        if self.canaries is not None and self.round.number % self.config.audit_every == 0:
            self._audit_committed({**summary, **release.record})

    def _audit_committed(self, record: dict) -> dict:
        """Audit the model the committed round of `record` made, and add the figures to the round's record (its
        record with them). A failure is logged: the round stays committed as it was, and has no audit."""
        assert self.canaries is not None
        try:
            audit = self.canaries.audit(self.model.state, self._audit_delta(record))
            self.storage.amend_round(record["round"], audit)
        except Exception:
            logger.exception("auditing the model of round %d failed; the round stands, unaudited", record["round"])
            return record
        self._last_audit = {key: audit[key] for key in AUDIT_STATUS}
        return {**record, **audit}

    def _audit_delta(self, record: dict) -> float:
        """The delta the accountant reports epsilon at, or 1 / population without differential privacy."""
        return record.get("dp_delta") or self.config.dp_delta or 1 / max(self._population(), 1)

    def audit_now(self) -> dict:
        """Audit the current model with the canary clients now, whatever `audit_every` says, and add the figures to
        the record of the round that made it (a simulation asks so at its end); that round's record."""
        with self._lock:
            if self.canaries is None:
                raise AuditError("this aggregator inserts no canary clients (--canary-clients): there is nothing to "
                                 "audit")
            made = next((row for row in reversed(self.storage.recent_rounds(RECORDS_SEARCHED))
                         if row["new_version"] == self.model.version and row["status"] == "closed"), None)
            if made is None:
                raise AuditError(f"no recent round made model version {self.model.version}: audit a model a round "
                                 "has made")
            return made if made.get("audit_epsilon") is not None else self._audit_committed(made)

    def _statuses(self) -> dict[str, str]:
        """The open round's selected devices that reported, aborted or (a secure round's) came late, as their
        selections record it: one left "selected" would be counted late a second time when it next asks."""
        late = self.round.secure.late if self.round.secure is not None else set()
        return {**dict.fromkeys(self.round.aborted, "aborted"), **dict.fromkeys(late, "late"),
                **dict.fromkeys(self.round.reported, "reported")}

    def _release(self) -> Release | None:
        """What the round's aggregation rule releases, or None if the round failed."""
        current = self.round
        if current.secure is not None:
            current.failure = current.secure.failure
            if current.secure.sum is None:
                return None
        elif len(current.reported) < self.min_reports:
            current.failure = f"{len(current.reported)} updates arrived; {self.min_reports} needed"
            return None
        try:
            canaries = self._insert_canaries(current)
            release = current.aggregation.release(len(current.reported))
        except ImpossibleSumError as error:
            current.failure = f"refused the round's aggregate: {error}"
            return None
        if self.canaries is not None:
            release.record.update(audit_canaries=self.canaries.count, audit_canaries_taking_part=canaries)
        return release

    def _insert_canaries(self, current: OpenRound) -> int:
        """The audit's canary clients that take part in the round, added to its aggregate once the phones' inputs
        are in; how many. They are drawn by release (the model's version: a failed round released nothing), each
        clipped to the round's clip norm (the operator's, without differential privacy), weighing as the round's
        average phone where updates are weighted."""
        if self.canaries is None:
            return 0
        norm = self.privacy.clip.norm if self.privacy is not None else self.config.clip_norm
        weight = max(1, round(current.examples / max(len(current.reported), 1)))
        return self.canaries.insert(current.aggregation, self.model.version, norm, weight)

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "round": self.round.number, "model_version": self.model.version,
                "clock": "simulated" if self.config.simulated_clock else "wall",
                "goal": self.round.goal, "selection_target": self.round.target,
                "selected": len(self.round.token_by_device), "reported": len(self.round.reported),
                "aborted": len(self.round.aborted),
                "deadline_in_s": max(0.0, self.round.deadline - self.clock()),
                "differential_privacy": self.config.differential_privacy, "epsilon": self._epsilon,
                "rho": self._rho, "clip_norm": self.privacy.clip.norm if self.privacy is not None else None,
                "canary_clients": self.config.canary_clients, **self._last_audit,
                "round_kind": "training" if self.round.discovery is None else "discovery",
                "vocab_size": self.model.architecture.vocab_size,
                **({"words_discovered": self.discovery.state.words_added,
                    "discovery_epsilon": self.discovery.state.epsilon, "discovery_delta": self.discovery.state.delta}
                   if self.discovery is not None else {}),
            }

