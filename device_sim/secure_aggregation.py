"""A phone's side of secure aggregation for one round (see keyboard_model/secagg.py for the protocol).

The phone sends, in order: its two public keys; its neighbours' shares of its two
seeds, each sealed for that neighbour; its masked input; and, once the server says
who reported, one share per neighbour: of the self-mask seed of a neighbour that
reported, or of the masking seed of one that did not. It refuses to reveal anything
that would let the server remove both masks of any one phone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.numpy import save as save_numpy

from aggregator.api.schemas import EvaluationReport, RevealedShare, SecAggKeys, SecAggReveal, SecAggShares, SecAggState
from keyboard_model.secagg import (
    GraphParameters,
    Layout,
    Masked,
    PublicKeys,
    RingEncoding,
    Roster,
    RoundSecrets,
    SecAggError,
    Share,
    SharePair,
    add_mask,
    masked_layout,
    open_shares,
    pairwise_seed,
    pairwise_sign,
    prg_mask,
    seal_shares,
    share_cipher_key,
    split_secret,
)
from keyboard_model.norms import clip_to_norm
from keyboard_model.weights import Tensors


@dataclass
class SecAggPhone:
    round_number: int
    secrets: RoundSecrets = field(default_factory=RoundSecrets.generate)
    roster: Roster | None = None
    index: int | None = None
    masked: bool = False

    def advertise(self) -> PublicKeys:
        return self.secrets.public()

    def share(self, roster: Roster) -> dict[int, bytes]:
        """Sealed share pairs for each neighbour, by the neighbour's cohort index."""
        own = self.secrets.public()
        if roster.round_number != self.round_number or roster.keys.count(own) != 1:
            raise SecAggError("this roster is not for this phone's round, or lists its keys other than once")
        self.roster, self.index = roster, roster.keys.index(own)
        mine = roster.neighbours()[self.index]
        threshold = roster.parameters.threshold
        self_mask_shares = split_secret(self.secrets.self_mask_seed, threshold, len(mine))
        masking_shares = split_secret(self.secrets.masking_seed, threshold, len(mine))
        return {
            v: seal_shares(self._cipher_key(v), SharePair(b, s), self.round_number, self.index, v)
            for v, b, s in zip(mine, self_mask_shares, masking_shares)
        }

    def mask(self, inputs: Masked, shared: list[int], layout: Layout) -> Masked:
        """`inputs` (the encoded arrays, in the round's `layout`) plus the self mask and the pairwise masks of the
        neighbours that sent their shares (`shared`, the server's list), in each array's ring."""
        roster, u = self._roster(), self.index
        if u not in shared:
            raise SecAggError("the server's list of phones that shared leaves this phone out")
        layout.check(inputs)
        masked = {name: values.copy() for name, values in inputs.items()}
        add_mask(masked, prg_mask(self.secrets.self_mask_seed, layout), +1)
        for v in sorted(set(shared) & set(roster.neighbours()[u])):
            seed = pairwise_seed(self.secrets.masking_seed, roster.keys[v].masking, self.round_number)
            add_mask(masked, prg_mask(seed, layout), pairwise_sign(u, v))
        self.masked = True
        return masked

    def reveal(self, incoming: dict[int, bytes], shared: list[int], reported: list[int]) -> dict[int, Share]:
        """For each neighbour that shared with this phone: the share of its self-mask seed if it reported, of its
        masking seed if it did not. `incoming` holds the sealed pairs the neighbours sent, by sender."""
        roster, u = self._roster(), self.index
        if not self.masked or u not in reported:
            raise SecAggError("a phone reveals shares only after its own masked input was counted")
        if not set(reported) <= set(shared):
            raise SecAggError("the server says phones reported that never shared")
        if len(reported) <= roster.parameters.threshold:
            raise SecAggError(f"only {len(reported)} phones reported, too few for the threshold "
                              f"{roster.parameters.threshold}: no share is revealed")
        revealed = {}
        for v in set(roster.neighbours()[u]) & set(shared):
            if v not in incoming:
                raise SecAggError(f"the server withheld the shares phone {v} sent")
            pair = open_shares(self._cipher_key(v), incoming[v], self.round_number, v, u)
            revealed[v] = pair.self_mask if v in reported else pair.masking
        return revealed

    def _cipher_key(self, peer: int) -> bytes:
        return share_cipher_key(self.secrets.cipher_key, self._roster().keys[peer].cipher, self.round_number)

    def _roster(self) -> Roster:
        if self.roster is None or self.index is None:
            raise SecAggError("this phone has not received the round's roster")
        return self.roster

    # --- the same steps, in and out of the aggregator's messages ---

    def keys_message(self) -> SecAggKeys:
        keys = self.advertise()
        return SecAggKeys(cipher=keys.cipher, masking=keys.masking)

    def shares_message(self, state: SecAggState) -> SecAggShares:
        if state.roster is None:
            raise SecAggError("the round's roster is not fixed yet")
        roster = Roster(state.round, [PublicKeys(c, m) for c, m in zip(state.roster.cipher_keys,
                                                                      state.roster.masking_keys)],
                        GraphParameters(state.roster.degree, state.roster.threshold), state.roster.graph_seed)
        return SecAggShares(sealed=self.share(roster))

    def masked_upload(self, delta: Tensors, evaluation: EvaluationReport | None, state: SecAggState,
                      seed: int) -> bytes:
        """The upload of a secure round, masked: the delta (clipped to the encoding's bound, rotated, in the ring) and
        the evaluation counts (uint32), and nothing else."""
        if state.shared is None:
            raise SecAggError("the round has not fixed who shared yet")
        encoding = RingEncoding(**state.encoding.model_dump())
        flat = torch.cat([t.flatten() for t in clip_to_norm(delta, encoding.bound).values()]).double().numpy()
        if len(flat) != encoding.length:
            raise SecAggError(f"this phone's model has {len(flat)} values; the round expects {encoding.length}")
        counts = [evaluation.positions, evaluation.hits_at_1, evaluation.hits_at_3] if evaluation else [0, 0, 0]
        inputs = {"update": encoding.encode(flat, np.random.default_rng(seed)), "counts": np.array(counts, np.uint32)}
        return save_numpy(self.mask(inputs, state.shared, masked_layout(encoding)))

    def reveal_message(self, state: SecAggState) -> SecAggReveal:
        if state.reported is None or state.shared is None or state.incoming is None:
            raise SecAggError("the round is not unmasking this phone's neighbours")
        revealed = self.reveal(dict(state.incoming), state.shared, state.reported)
        return SecAggReveal(shares={v: RevealedShare(x=share.x, value=share.value) for v, share in revealed.items()})
