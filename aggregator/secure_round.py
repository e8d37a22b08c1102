"""Secure aggregation inside a round of the round protocol: when each phase closes, and what the sum holds.

The round protocol (aggregator/rounds.py) still selects devices, counts reports and
closes the round; with `secure_aggregation` on, a round also runs the four phases of
`aggregator/secure_aggregation.py`:
- advertise ends once the selection is full and every selected device has sent keys, or
  `secagg_phase_s` after it filled; a selection that has not filled by half the round's
  deadline goes on with the keys it has;
- share and unmask end when every device that should answer has, or `secagg_phase_s`
  after they opened;
- collect ends at the goal or the round's deadline, as a plain round does.

What a device masks (`keyboard_model/secagg.py`) is two arrays: "update", its clipped model
delta rotated and in fixed point modulo 2**secagg_ring_bits, and "counts", its three
evaluation counts modulo 2**32. The unmasked sum is therefore the sum of deltas and the
summed counts, and nothing else.
"""

from __future__ import annotations

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as load_numpy

from aggregator.config import AggregatorConfig
from aggregator.api.schemas import SecAggEncoding, SecAggRoster, SecAggState
from aggregator.secure_aggregation import SecureAggregation
from keyboard_model.secagg import Masked, RingEncoding, SecAggError, masked_layout
from keyboard_model.weights import Tensors, WeightsError


class SecureRound:
    def __init__(self, number: int, started: float, config: AggregatorConfig, shapes: dict[str, tuple[int, ...]],
                 graph_seed: int, selection_target: int) -> None:
        self.shapes = shapes
        self.numel = sum(int(np.prod(shape)) for shape in shapes.values())
        # Phones clip to the bound the ring is sized for: the privacy clip if there is one, else the norm bound.
        bound = config.clip_norm if config.differential_privacy else config.max_update_norm
        self.encoding = RingEncoding(config.secagg_ring_bits, bound, selection_target, self.numel, graph_seed)
        self.protocol = SecureAggregation(number, masked_layout(self.encoding), graph_seed)
        self.phase_s = config.secagg_phase_s
        self.phase_deadline = started + config.secagg_phase_s
        self.full_since: float | None = None  # when the selection reached its target
        self.selection_deadline = started + config.round_deadline_s / 2
        self.selection_target = selection_target
        self.sum: Masked | None = None

    @property
    def phase(self) -> str:
        return self.protocol.phase

    def advance(self, now: float, selected: set[str], aborted: set[str], min_reports: int) -> None:
        """Close the phases whose work is done or whose time is up. Raises SecAggError if the round must fail."""
        protocol = self.protocol
        if protocol.phase == "advertise":
            # Keys are awaited from the whole selection: once it is full, until all came or the phase's time is up.
            # A selection that does not fill by half the round's deadline goes on with the keys it has.
            full = len(selected) >= self.selection_target
            if full and self.full_since is None:
                self.full_since, self.phase_deadline = now, now + self.phase_s
            all_keys = full and set(protocol.advertised) >= selected - aborted
            # A selection that filled gets its phase's time for keys, even when it filled at the selection deadline.
            if all_keys or (full and now >= self.phase_deadline) or (not full and now >= self.selection_deadline):
                protocol.close_advertising(min_reports)
                self.phase_deadline = now + self.phase_s
        if protocol.phase == "share":
            cohort = {index for index, device in enumerate(protocol.devices) if device not in aborted}
            if set(protocol.sealed) >= cohort or now >= self.phase_deadline:
                protocol.close_sharing(min_reports)
        if protocol.phase == "unmask":
            if set(protocol.revealed_by) >= set(protocol.reported) or now >= self.phase_deadline:
                self.sum = protocol.unmasked_sum()

    def close_collection(self, now: float, min_reports: int) -> None:
        self.protocol.close_collection(min_reports)
        self.phase_deadline = now + self.phase_s

    def state(self, index: int | None) -> SecAggState:
        """What the device at cohort `index` (None: not in the cohort, or not fixed yet) may see now."""
        protocol, phase = self.protocol, self.protocol.phase
        roster = None
        if protocol.roster is not None:
            keys = protocol.roster.keys
            roster = SecAggRoster(cipher_keys=[k.cipher for k in keys], masking_keys=[k.masking for k in keys],
                                  degree=protocol.parameters.degree, threshold=protocol.parameters.threshold,
                                  graph_seed=protocol.graph_seed)
        unmasking = phase == "unmask" and index in protocol.reported
        return SecAggState(
            round=protocol.round_number, phase=phase, index=index, roster=roster,
            shared=protocol.shared if phase in ("collect", "unmask", "done") else None,
            reported=protocol.reported if phase in ("unmask", "done") else None,
            incoming=protocol.incoming(index) if unmasking else None,
            encoding=SecAggEncoding(bits=self.encoding.bits, bound=self.encoding.bound,
                                    max_summands=self.encoding.max_summands, length=self.encoding.length,
                                    rotation_seed=self.encoding.rotation_seed),
        )

    def decode_masked(self, data: bytes) -> Masked:
        """A device's masked input from its upload: the round's layout, nothing else. Raises WeightsError."""
        try:
            masked = load_numpy(data)
            self.protocol.layout.check(masked)
        except (SafetensorError, ValueError, KeyError, TypeError, SecAggError) as error:  # KeyError: unknown dtypes
            raise WeightsError(f"not a masked upload of this round: {error}") from error
        return masked

    def result(self) -> tuple[Tensors, tuple[int, int, int]]:
        """(sum of the reported deltas, float64 by parameter; summed evaluation counts)."""
        assert self.sum is not None
        flat = torch.from_numpy(self.encoding.decode_sum(self.sum["update"]))
        total, offset = {}, 0
        for name, shape in self.shapes.items():
            size = int(np.prod(shape))
            total[name] = flat[offset : offset + size].reshape(shape)
            offset += size
        positions, hits_1, hits_3 = (int(v) for v in self.sum["counts"])
        return total, (positions, hits_1, hits_3)
