"""Secure aggregation inside a round of the round protocol: the devices' messages, when each phase closes, and
what the sum holds.

The round protocol (aggregator/rounds.py) still selects devices, authenticates them,
counts reports and closes the round; with `secure_aggregation` on, it hands each
device's secure-aggregation message to the round's `SecureRound`, which runs the five
phases of `aggregator/secure_aggregation.py`:
- the cohort is fixed once the selection is full or, if it does not fill, at half the
  round's deadline; advertise then ends once every selected device has sent keys, or
  `secagg_phase_s` after the cohort was fixed (devices drawn at the last moment get
  that time too);
- share, confirm and unmask end when every device that should answer has, or
  `secagg_phase_s` after they opened;
- collect ends at the goal, or at the round's deadline moved later by the time from fixing
  the cohort to opening collection: devices train only once collection opens, and the key
  and share phases (each a whole `secagg_phase_s` when a device dropped out of it) must not
  eat the time to train that the cohort had when it was fixed;
- confirm and unmask then have their phases' time, past the deadline if need be: every
  phase ends by its own time, so no round stays open for good.
Every message and every tick says whether the round is over: its sum is ready, or it
failed (`failure` says why); `culprits` names the devices the protocol proved to lie. A
message that does not fit the protocol is refused (`SecAggRefusedError`) and leaves the
round as it was, save for naming its sender a culprit if it is proof of a lie; any error
while closing a phase, whatever its cause, fails the round instead of leaving it stuck in
a phase.

What a device masks (`keyboard_model/secagg.py`) is two arrays: "update", its clipped model
delta rotated and in fixed point modulo 2**secagg_ring_bits, and "counts", its three
evaluation counts and its adaptive-clipping bit (0 when the round does not adapt) modulo
2**32. The unmasked sum is therefore the sum of deltas and the summed counts, and nothing
else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from safetensors import SafetensorError
from safetensors.numpy import load as load_numpy

from aggregator.api.schemas import SecAggEncoding, SecAggRoster, SecAggShares, SecAggState
from aggregator.config import AggregatorConfig
from aggregator.refusals import BadUpdateError, RoundClosedError, SecAggRefusedError
from aggregator.secure_aggregation import SecureAggregation
from keyboard_model.flat import length, views
from keyboard_model.secagg import (
    Dealing,
    DealtPair,
    Masked,
    PublicKeys,
    RingEncoding,
    SecAggError,
    Share,
    masked_layout,
)
from keyboard_model.weights import Tensors

logger = logging.getLogger(__name__)


class SecureRound:
    def __init__(self, number: int, started: float, config: AggregatorConfig, shapes: dict[str, tuple[int, ...]],
                 graph_seed: int, selection_target: int, min_reports: int, bound: float) -> None:
        """`bound`: the L2 norm phones clip to, which the ring is sized for (the round's privacy clip norm if there
        is one, else the aggregator's norm bound)."""
        self.shapes = shapes
        self.numel = length(shapes)
        self.encoding = RingEncoding(config.secagg_ring_bits, bound, selection_target, self.numel, graph_seed)
        self.protocol = SecureAggregation(number, masked_layout(self.encoding), graph_seed)
        self.phase_s = config.secagg_phase_s
        self.phase_deadline = started + config.secagg_phase_s
        self.deadline = started + config.round_deadline_s
        self.fixed_at: float | None = None  # when the cohort was fixed: no device is selected after that
        self.selection_deadline = started + config.round_deadline_s / 2
        self.selection_target = selection_target
        self.goal = config.clients_per_round
        self.min_reports = min_reports
        self.sum: Masked | None = None
        self.failure: str | None = None
        self.late: set[str] = set()  # devices whose masked input came after collection closed

    @property
    def phase(self) -> str:
        return self.protocol.phase

    @property
    def cohort_open(self) -> bool:
        """Devices may still be selected: the cohort is not fixed yet."""
        return self.phase == "advertise" and self.fixed_at is None

    @property
    def culprits(self) -> dict[str, str]:
        """The devices the protocol proved to lie in this round (device id -> how), whether the round closed or
        failed: the round manager excludes them from later rounds."""
        return {self.protocol.devices[index]: why for index, why in self.protocol.culprits.items()}

    @property
    def over(self) -> bool:
        """The sum is ready, or the round failed: either way the round manager closes it."""
        return self.sum is not None or self.failure is not None

    # --- the devices' messages; `selected` and `aborted` are the round's device ids, for closing phases ---

    def keys(self, device_id: str, keys: PublicKeys, signature: bytes, now: float, selected: set[str],
             aborted: set[str]) -> bool:
        return self._receive(lambda: self.protocol.advertise(device_id, keys, signature), now, selected, aborted)

    def confirm(self, device_id: str, signature: bytes, now: float, selected: set[str], aborted: set[str]) -> bool:
        return self._receive(lambda: self.protocol.add_confirmation(self.protocol.index_of(device_id), signature),
                             now, selected, aborted)

    def shares(self, device_id: str, dealing: Dealing, now: float, selected: set[str], aborted: set[str]) -> bool:
        return self._receive(lambda: self.protocol.add_shares(self.protocol.index_of(device_id), dealing),
                             now, selected, aborted)

    def reveal(self, device_id: str, shares: dict[int, Share], now: float, selected: set[str],
               aborted: set[str]) -> bool:
        return self._receive(lambda: self.protocol.add_reveals(self.protocol.index_of(device_id), shares),
                             now, selected, aborted)

    def masked_input(self, device_id: str, masked: Masked, now: float, reported: int) -> bool:
        """Add a device's masked input (`decode_masked`) to the sum; `reported` counts the round's reports with this
        one. At the goal collection closes and the consistency round (confirm) starts."""
        if self.phase in ("advertise", "share"):
            raise SecAggRefusedError(f"round {self.protocol.round_number} does not collect masked inputs yet")
        if self.phase != "collect":
            self.late.add(device_id)
            raise RoundClosedError(f"round {self.protocol.round_number} no longer collects masked inputs (it is in "
                                   f"phase {self.phase!r}); this one was not counted")
        try:
            self.protocol.add_masked_input(self.protocol.index_of(device_id), masked)
        except SecAggError as error:
            raise SecAggRefusedError(str(error)) from error
        # At the goal, unless a tiny cohort's reporters could not yet rebuild each other's self masks.
        if reported >= max(self.goal, self.protocol.parameters.threshold + 1):
            self._transition(lambda: self._close_collection(now))
        return self.over

    def tick(self, now: float, selected: set[str], aborted: set[str]) -> bool:
        """Close the phases whose time is up."""
        if now >= self.deadline and self.phase == "collect":
            # The deadline ends collection with the inputs that came, if they are enough; else the round fails.
            if not self._transition(lambda: self._close_collection(now)):
                return True
        self._transition(lambda: self._advance(now, selected, aborted))
        return self.over

    def _receive(self, message: Callable[[], None], now: float, selected: set[str], aborted: set[str]) -> bool:
        try:
            message()
        except SecAggError as error:  # the message, not the round, is at fault
            raise SecAggRefusedError(str(error)) from error
        self._transition(lambda: self._advance(now, selected, aborted))
        return self.over

    def _transition(self, transition: Callable[[], None]) -> bool:
        """Close a phase. If that fails, whatever the cause, the round fails (returns False)."""
        try:
            transition()
        except Exception as error:
            if not isinstance(error, SecAggError):
                logger.exception("secure aggregation of round %d failed", self.protocol.round_number)
            self.failure = str(error)
            return False
        return True

    def _advance(self, now: float, selected: set[str], aborted: set[str]) -> None:
        """Close the phases whose work is done or whose time is up. Raises SecAggError if the round must fail."""
        protocol = self.protocol
        if protocol.phase == "advertise":
            # Keys are awaited from the whole cohort once it is fixed (full, or half the round's deadline passed),
            # until all came or the phase's time is up: a device drawn just as the selection deadline passed still
            # has to come back for its answer before it can send keys.
            if self.fixed_at is None and (len(selected) >= self.selection_target or now >= self.selection_deadline):
                self.fixed_at, self.phase_deadline = now, now + self.phase_s
            if self.fixed_at is not None and (set(protocol.advertised) >= selected - aborted
                                              or now >= self.phase_deadline):
                protocol.close_advertising(self.min_reports)
                self.phase_deadline = now + self.phase_s
        if protocol.phase == "share":
            cohort = {index for index, device in enumerate(protocol.devices) if device not in aborted}
            if set(protocol.dealt) >= cohort or now >= self.phase_deadline:
                protocol.close_sharing(self.min_reports)
                self.deadline += now - self.fixed_at  # the key and share phases' time is not training time
        if protocol.phase == "confirm":
            if set(protocol.confirmations) >= set(protocol.reported) or now >= self.phase_deadline:
                protocol.close_confirming(self.min_reports)
                self.phase_deadline = now + self.phase_s
        if protocol.phase == "unmask":
            if set(protocol.revealed_by) >= set(protocol.confirmations) or now >= self.phase_deadline:
                self.sum = protocol.unmasked_sum()

    def _close_collection(self, now: float) -> None:
        self.protocol.close_collection(self.min_reports)
        self.phase_deadline = now + self.phase_s

    def state_for(self, device_id: str) -> SecAggState:
        """The round's secure aggregation as this device may see it."""
        protocol = self.protocol
        in_cohort = protocol.roster is not None and device_id in protocol.devices
        return self.state(protocol.index_of(device_id) if in_cohort else None)

    def state(self, index: int | None) -> SecAggState:
        """What the device at cohort `index` (None: not in the cohort, or not fixed yet) may see now."""
        protocol, phase = self.protocol, self.protocol.phase
        roster = None
        if protocol.roster is not None:
            keys = protocol.roster.keys
            roster = SecAggRoster(cipher_keys=[k.cipher for k in keys], masking_keys=[k.masking for k in keys],
                                  device_ids=list(protocol.roster.device_ids),
                                  signatures=list(protocol.roster.signatures),
                                  degree=protocol.parameters.degree, threshold=protocol.parameters.threshold,
                                  graph_seed=protocol.graph_seed)
        unmasking = phase == "unmask" and index in protocol.confirmations
        return SecAggState(
            round=protocol.round_number, phase=phase, index=index, roster=roster,
            shared=protocol.shared if phase in ("collect", "confirm", "unmask", "done") else None,
            reported=protocol.reported if phase in ("confirm", "unmask", "done") else None,
            incoming=protocol.incoming(index) if unmasking else None,
            confirmations=protocol.confirmations_for(index) if unmasking else None,
            encoding=SecAggEncoding(bits=self.encoding.bits, bound=self.encoding.bound,
                                    max_summands=self.encoding.max_summands, length=self.encoding.length,
                                    rotation_seed=self.encoding.rotation_seed),
        )

    def decode_masked(self, data: bytes) -> Masked:
        """A device's masked input from its upload: the round's layout, nothing else."""
        try:
            masked = load_numpy(data)
            self.protocol.layout.check(masked)
        except (SafetensorError, ValueError, KeyError, TypeError, SecAggError) as error:  # KeyError: unknown dtypes
            raise BadUpdateError(f"not a masked upload of this round: {error}") from error
        return masked

    def result(self) -> tuple[Tensors, tuple[int, int, int, int]]:
        """(sum of the reported deltas, float64 by parameter; summed evaluation counts and clipping bits)."""
        assert self.sum is not None
        total = views(torch.from_numpy(self.encoding.decode_sum(self.sum["update"])), self.shapes)
        positions, hits_1, hits_3, within = (int(v) for v in self.sum["counts"])
        return total, (positions, hits_1, hits_3, within)


def dealing_of(message: SecAggShares) -> Dealing:
    """A device's share message as the protocol takes it."""
    return Dealing({v: DealtPair(pair.sealed, pair.self_mask, pair.masking) for v, pair in message.pairs.items()},
                   message.seed_commitment)
