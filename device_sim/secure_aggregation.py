"""A phone's side of secure aggregation for one round (see keyboard_model/secagg.py for the protocol).

The phone sends, in order: its two public keys, signed with its identity key; its
neighbours' shares of its two seeds, each sealed for that neighbour, with commitments to
each share and to its self-mask seed, in the clear (keyboard_model/secagg/shares.py);
its masked input; its signature of the set of survivors (the phones whose masked inputs
count) the server told it; and one share per neighbour: of the self-mask seed of a
neighbour that survived, or of the masking seed of one that did not.

It does not trust the server (Bonawitz et al. 2017, the active-adversary protocol):
- it uses a neighbour's keys only if their signature verifies against the identity key
  the directory (not the server) holds for that neighbour's device id, and they are not
  of small order;
- it signs one survivor set per round, and reveals shares only for that set, and only
  once the server hands it, for each neighbour whose share it reveals, valid signatures
  of that same set from more than half of that neighbour and its neighbours (it signs only
  a set that holds it). Honest phones sign one set each, so no two honest phones reveal
  shares of one phone under two different sets: the server cannot get a phone's self-mask
  shares from some neighbours and its masking-seed shares from others. A signature that
  does not verify (a member that sent garbage) counts as none, so it costs only its
  signer's say;
- it remembers which kind of share it revealed for each neighbour, and never reveals
  the other kind.
Any failed check raises SecAggError: the phone stops, and the round goes on without it,
as without a phone that dropped out.

Against a neighbour that lies as a dealer: a phone reveals a neighbour's share only if
the pair it was dealt opens and the share matches the commitment the dealer gave the
server, and leaves that neighbour out otherwise. (The server would refuse a mismatching
share, and with it the whole reveal.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.numpy import save as save_numpy

from aggregator.api.schemas import (
    EvaluationReport,
    RevealedShare,
    SecAggConfirm,
    SecAggKeys,
    SecAggReveal,
    SecAggShares,
    SecAggState,
)
from keyboard_model.norms import clip_to_norm
from keyboard_model.secagg import (
    Dealing,
    DealtPair,
    Directory,
    GraphParameters,
    IdentityKey,
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
    commitment,
    keys_statement,
    masked_layout,
    open_shares,
    pairwise_seed,
    pairwise_sign,
    prg_mask,
    seal_shares,
    share_cipher_key,
    split_secret,
    survivors_statement,
)
from keyboard_model.weights import Tensors


@dataclass
class SecAggPhone:
    round_number: int
    device_id: str
    identity: IdentityKey
    directory: Directory
    secrets: RoundSecrets = field(default_factory=RoundSecrets.generate)
    roster: Roster | None = None
    index: int | None = None
    masked: bool = False
    confirmed: tuple[int, ...] | None = None  # the survivor set this phone signed, once
    revealed_kinds: dict[int, str] = field(default_factory=dict)  # neighbour -> "self_mask" or "masking"

    def advertise(self) -> tuple[PublicKeys, bytes]:
        """The round's public keys, and their signature under this phone's identity key."""
        keys = self.secrets.public()
        return keys, self.identity.sign(keys_statement(self.round_number, self.device_id, keys))

    def share(self, roster: Roster) -> Dealing:
        """A dealt pair for each neighbour, by the neighbour's cohort index: its two shares sealed for it and
        committed to; and the commitment to the self-mask seed. First checks that the roster lists this phone's own
        keys under its device id, and that each neighbour's keys are signed by the identity key the directory holds
        for that neighbour's device id and are not of small order."""
        own = self.secrets.public()
        if self.roster is not None and self.roster != roster:
            raise SecAggError("this phone already shared its seeds under another roster")
        if roster.round_number != self.round_number or roster.keys.count(own) != 1:
            raise SecAggError("this roster is not for this phone's round, or lists its keys other than once")
        index = roster.keys.index(own)
        if (len(roster.device_ids) != len(roster.keys) or len(roster.signatures) != len(roster.keys)
                or len(set(roster.device_ids)) != len(roster.device_ids) or roster.device_ids[index] != self.device_id):
            raise SecAggError("the roster does not name each phone once, with a signature, and this one as itself")
        mine = roster.neighbours()[index]
        for v in mine:
            self.directory.verify(roster.device_ids[v], keys_statement(self.round_number, roster.device_ids[v],
                                                                       roster.keys[v]), roster.signatures[v])
            roster.keys[v].check()
        self.roster, self.index = roster, index
        threshold = roster.parameters.threshold
        self_mask_shares = split_secret(self.secrets.self_mask_seed, threshold, len(mine))
        masking_shares = split_secret(self.secrets.masking_seed, threshold, len(mine))
        digest = roster.digest()
        pairs = {
            v: DealtPair(seal_shares(self._cipher_key(v), SharePair(b, s), self.round_number, index, v, digest),
                         commitment(self.round_number, digest, index, "self_mask", b),
                         commitment(self.round_number, digest, index, "masking", s))
            for v, b, s in zip(mine, self_mask_shares, masking_shares)
        }
        return Dealing(pairs, commitment(self.round_number, digest, index, "self_mask",
                                         Share(0, self.secrets.self_mask_seed)))

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

    def confirm(self, reported: list[int]) -> bytes:
        """The consistency round: this phone's signature of the survivor set the server reports to it (by device
        id). A phone signs one set per round; asked to sign another, it refuses."""
        roster, u = self._roster(), self.index
        if not self.masked or u not in reported:
            raise SecAggError("a phone confirms survivors only after its own masked input was counted")
        if not set(reported) <= set(range(len(roster.keys))):
            raise SecAggError("the survivor set names phones outside the cohort")
        survivors = tuple(sorted(set(reported)))
        if self.confirmed is not None and self.confirmed != survivors:
            raise SecAggError("this phone already signed another survivor set for this round")
        self.confirmed = survivors
        return self.identity.sign(self._survivors_statement(survivors))

    def reveal(self, incoming: dict[int, DealtPair], shared: list[int], reported: list[int],
               confirmations: dict[int, bytes]) -> dict[int, Share]:
        """For each neighbour that shared with this phone: the share of its self-mask seed if it reported, of its
        masking seed if it did not. `incoming` holds the pairs the neighbours dealt this phone, by sender;
        `confirmations` the survivor-set signatures the server collected, by signer (those that do not verify
        count as none). Reveals nothing unless `reported` is the set this phone signed, at least the threshold of
        its own neighbours signed that set, and, for each neighbour whose share it reveals, more than half of that
        neighbour and its neighbours did; and never the other kind of share of a neighbour than it revealed before.
        Leaves out a neighbour whose pair does not open or whose share is not the one it committed to."""
        roster, u = self._roster(), self.index
        if not self.masked or u not in reported:
            raise SecAggError("a phone reveals shares only after its own masked input was counted")
        if self.confirmed is None or tuple(sorted(set(reported))) != self.confirmed:
            raise SecAggError("the survivor set differs from the one this phone signed: no share is revealed")
        if not set(reported) <= set(shared):
            raise SecAggError("the server says phones reported that never shared")
        if len(reported) <= roster.parameters.threshold:
            raise SecAggError(f"only {len(reported)} phones reported, too few for the threshold "
                              f"{roster.parameters.threshold}: no share is revealed")
        graph = roster.neighbours()
        statement = self._survivors_statement(self.confirmed)
        signed = {u}
        for signer, signature in confirmations.items():
            if signer != u and signer in reported and self._signed(roster.device_ids[signer], statement, signature):
                signed.add(signer)
        if len(signed & set(graph[u])) < roster.parameters.threshold:
            raise SecAggError("fewer than the threshold of this phone's neighbours signed the survivor set it was "
                              "told: no share is revealed")
        kinds = {}
        for v in set(graph[u]) & set(shared):
            # v's own signature counts: an honest v signs only a set that holds it, so it backs one story too. Left
            # out, a round where exactly half of a reporter's neighbours confirmed failed with every phone alive.
            backers = {v, *graph[v]}
            if 2 * len(signed & backers) <= len(backers):
                raise SecAggError(f"no majority of phone {v} and its neighbours signed the survivor set this phone "
                                  "was told: no share is revealed")
            kinds[v] = "self_mask" if v in reported else "masking"
            if self.revealed_kinds.get(v, kinds[v]) != kinds[v]:
                raise SecAggError(f"this phone revealed the other share of phone {v} already: it never reveals both")
        if not set(kinds) <= set(incoming):
            raise SecAggError(f"the server withheld the shares phones {sorted(set(kinds) - set(incoming))} sent")
        revealed, digest = {}, roster.digest()
        for v, kind in kinds.items():
            try:
                pair = open_shares(self._cipher_key(v), incoming[v].sealed, self.round_number, v, u, digest)
            except SecAggError:  # sealed wrongly by v, or altered: nothing of v's is revealed
                continue
            share = pair.self_mask if kind == "self_mask" else pair.masking
            if incoming[v].commits_to(kind, share, self.round_number, digest, v):
                revealed[v] = share
        self.revealed_kinds.update(kinds)
        return revealed

    def _signed(self, device_id: str, statement: bytes, signature: bytes) -> bool:
        try:
            self.directory.verify(device_id, statement, signature)
        except SecAggError:
            return False
        return True

    def _survivors_statement(self, survivors: tuple[int, ...]) -> bytes:
        ids = self._roster().device_ids
        return survivors_statement(self.round_number, self._roster().digest(), [ids[v] for v in survivors])

    def _cipher_key(self, peer: int) -> bytes:
        return share_cipher_key(self.secrets.cipher_key, self._roster().keys[peer].cipher, self.round_number)

    def _roster(self) -> Roster:
        if self.roster is None or self.index is None:
            raise SecAggError("this phone has not received the round's roster")
        return self.roster

    # --- the same steps, in and out of the aggregator's messages ---

    def keys_message(self) -> SecAggKeys:
        keys, signature = self.advertise()
        return SecAggKeys(cipher=keys.cipher, masking=keys.masking, signature=signature)

    def shares_message(self, state: SecAggState) -> SecAggShares:
        if state.roster is None:
            raise SecAggError("the round's roster is not fixed yet")
        roster = Roster(state.round, [PublicKeys(c, m) for c, m in zip(state.roster.cipher_keys,
                                                                      state.roster.masking_keys)],
                        GraphParameters(state.roster.degree, state.roster.threshold), state.roster.graph_seed,
                        tuple(state.roster.device_ids), tuple(state.roster.signatures))
        return SecAggShares.model_validate(self.share(roster), from_attributes=True)

    def masked_upload(self, delta: Tensors, evaluation: EvaluationReport | None, within_clip: bool, state: SecAggState,
                      seed: int) -> bytes:
        """The upload of a secure round, masked: the delta (clipped to the encoding's bound, rotated, in the ring), the
        evaluation counts and the adaptive-clipping bit (uint32, `keyboard_model.secagg.COUNTS`), and nothing else."""
        if state.shared is None:
            raise SecAggError("the round has not fixed who shared yet")
        encoding = RingEncoding(**state.encoding.model_dump())
        flat = torch.cat([t.flatten() for t in clip_to_norm(delta, encoding.bound).values()]).float().numpy()
        if len(flat) != encoding.length:
            raise SecAggError(f"this phone's model has {len(flat)} values; the round expects {encoding.length}")
        scored = [evaluation.positions, evaluation.hits_at_1, evaluation.hits_at_3] if evaluation else [0, 0, 0]
        counts = [*scored, int(within_clip)]
        inputs = {"update": encoding.encode(flat, np.random.default_rng(seed)), "counts": np.array(counts, np.uint32)}
        return save_numpy(self.mask(inputs, state.shared, masked_layout(encoding)))

    def confirm_message(self, state: SecAggState) -> SecAggConfirm:
        if state.reported is None:
            raise SecAggError("the round has not fixed its survivors yet")
        return SecAggConfirm(signature=self.confirm(state.reported))

    def reveal_message(self, state: SecAggState) -> SecAggReveal:
        if state.reported is None or state.shared is None or state.incoming is None or state.confirmations is None:
            raise SecAggError("the round is not unmasking this phone's neighbours")
        incoming = {v: DealtPair(pair.sealed, pair.self_mask, pair.masking) for v, pair in state.incoming.items()}
        revealed = self.reveal(incoming, state.shared, state.reported, dict(state.confirmations))
        return SecAggReveal(shares={v: RevealedShare(x=share.x, value=share.value) for v, share in revealed.items()})
