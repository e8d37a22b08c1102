"""The aggregator's side of secure aggregation for one round (see keyboard_model/secagg.py for the protocol).

Phases, each closed by the round manager when every phone that should answer has, or
at its deadline; whoever has not answered by then has dropped out:
1. advertise: selected phones send public keys; closing fixes the cohort, its indices
   and its neighbour graph (the roster);
2. share: phones send sealed share pairs for their neighbours, which the server only
   stores and forwards (it cannot open them), each with the dealer's commitments to its
   two shares, and a commitment to the dealer's self-mask seed;
3. collect: phones that shared send masked inputs, summed in their rings as they come;
4. confirm: the consistency round of Bonawitz et al.'s active-adversary protocol: phones
   whose input was counted sign the set of those phones (the survivors), and the server
   only collects and forwards the signatures (it cannot check them: the phones' identity
   keys are in a directory the phones trust, device_sim/secure_aggregation.py; a phone
   ignores a signature that does not verify);
5. unmask: phones that confirmed reveal one share per neighbour (leaving out a
   neighbour whose pair did not open or match its commitments); the server rebuilds the
   self-mask seeds of the phones that reported and the masking seeds of those that shared
   but did not, and removes their masks from the sum.
The server never holds an unmasked individual input: it sees masked inputs, sealed
shares, commitments, and for each phone either its self-mask seed or its masking seed,
never both. If fewer phones than the threshold remain at any phase, the round fails, and
no share has been revealed.

Against a malicious member of the cohort: a revealed share must sit at the point its
owner gave that revealer and match the owner's commitment to it, or the revealer's whole
reveal is refused and it counts as a phone that dropped out of unmasking; the round goes
on while every seed still has `threshold` shares. A seed rebuilt from them must match
its owner's commitment (self mask) or advertised public key (masking seed): a dealer
whose shares are inconsistent with those fails the round (`_rebuild`). Either way no
wrong seed reaches the sum, and the phone goes in `culprits`: an honest phone checks each
share against its commitment before revealing it and deals shares of the seeds it
committed to, so either is proof that the phone lied, which a drop-out, or a message
refused for any other reason, is not. Keys are advertised once (the same keys again are
taken as a retry), and keys of small order are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NoReturn

from keyboard_model.secagg import (
    SEED_BYTES,
    SIGNATURE_BYTES,
    Dealing,
    DealtPair,
    GraphParameters,
    Layout,
    Masked,
    PublicKeys,
    Roster,
    SecAggError,
    Share,
    add_mask,
    combine_shares,
    commitment,
    graph_parameters,
    masking_key,
    pairwise_seed,
    pairwise_sign,
    prg_mask,
    public_bytes,
)


@dataclass
class SecureAggregation:
    round_number: int
    layout: Layout  # of every masked input
    graph_seed: int
    # Drop-outs the graph is built to survive, as a share of the cohort.
    dropout: float = 1 / 3
    phase: str = "advertise"
    advertised: dict[str, PublicKeys] = field(default_factory=dict)
    signatures: dict[str, bytes] = field(default_factory=dict)  # device id -> signature of its advertised keys
    roster: Roster | None = None
    devices: list[str] = field(default_factory=list)  # cohort index -> device id
    dealt: dict[int, Dealing] = field(default_factory=dict)  # by sender
    shared: list[int] = field(default_factory=list)
    reported: list[int] = field(default_factory=list)
    confirmations: dict[int, bytes] = field(default_factory=dict)  # signer -> signature of the survivor set
    revealed: dict[int, dict[int, Share]] = field(default_factory=dict)  # owner -> revealer -> share
    revealed_by: set[int] = field(default_factory=set)
    culprits: dict[int, str] = field(default_factory=dict)  # cohort index -> how the protocol proved it lied
    _sum: Masked | None = None
    _neighbours: list[list[int]] = field(default_factory=list)

    # --- phase 1 ---
    def advertise(self, device_id: str, keys: PublicKeys, signature: bytes) -> None:
        """Take a phone's keys and their signature, which the server forwards unchecked: the phones check it. A
        phone's keys are given once: the same again (a retry) changes nothing, other keys are refused."""
        self._expect("advertise")
        if device_id in self.advertised:
            if (self.advertised[device_id], self.signatures[device_id]) != (keys, signature):
                raise SecAggError("this phone already advertised other keys for this round")
            return
        if keys in self.advertised.values():
            raise SecAggError("these public keys were already advertised by another phone")
        if len(signature) != SIGNATURE_BYTES:
            raise SecAggError(f"a signature is {SIGNATURE_BYTES} bytes")
        keys.check()
        self.advertised[device_id] = keys
        self.signatures[device_id] = signature

    def close_advertising(self, minimum: int = 3) -> Roster:
        """Fix the cohort; fails with fewer than `minimum` phones, and always with fewer than three: in a sum of
        two, either phone's update is the sum less its own."""
        self._expect("advertise")
        self.devices = sorted(self.advertised)
        if len(self.devices) < max(3, minimum):
            self._fail(f"{len(self.devices)} phones sent keys")
        self.roster = Roster(self.round_number, [self.advertised[d] for d in self.devices],
                             graph_parameters(len(self.devices), self.dropout), self.graph_seed,
                             tuple(self.devices), tuple(self.signatures[d] for d in self.devices))
        self._neighbours = self.roster.neighbours()
        self.phase = "share"
        return self.roster

    @property
    def parameters(self) -> GraphParameters:
        assert self.roster is not None
        return self.roster.parameters

    def index_of(self, device_id: str) -> int:
        if device_id not in self.advertised or self.roster is None:
            raise SecAggError("this device is not in the round's cohort")
        return self.devices.index(device_id)

    # --- phase 2 ---
    def add_shares(self, sender: int, dealing: Dealing) -> None:
        self._expect("share")
        if set(dealing.pairs) != set(self._neighbours[sender]):
            raise SecAggError("shares must go to exactly the sender's neighbours")
        self.dealt[sender] = dealing

    def close_sharing(self, minimum: int = 0) -> list[int]:
        """Fix who shared; fails with fewer than `minimum` phones, or too few to rebuild anyone's secrets (a phone's
        secrets need `threshold` shares from phones other than itself)."""
        self._expect("share")
        self.shared = sorted(self.dealt)
        if len(self.shared) < max(self.parameters.threshold + 1, minimum):
            self._fail(f"{len(self.shared)} phones shared their seeds")
        self.phase = "collect"
        return self.shared

    # --- phase 3 ---
    def add_masked_input(self, sender: int, masked: Masked) -> None:
        self._expect("collect")
        if sender not in self.dealt:
            raise SecAggError("only phones that shared their seeds may send a masked input")
        if sender in self.reported:
            return
        self.layout.check(masked)
        if self._sum is None:
            self._sum = self.layout.zeros()
        add_mask(self._sum, masked, +1)
        self.reported.append(sender)

    def close_collection(self, minimum: int = 0) -> list[int]:
        """Fix who reported; fails, before any share is revealed, with fewer than `minimum` phones or too few to
        rebuild the reporters' secrets."""
        self._expect("collect")
        self.reported.sort()
        if len(self.reported) < max(self.parameters.threshold + 1, minimum):
            self._fail(f"{len(self.reported)} phones sent masked inputs")
        self.phase = "confirm"
        return self.reported

    # --- phase 4 ---
    def add_confirmation(self, signer: int, signature: bytes) -> None:
        """Keep a phone's first signature; another is refused. The server cannot tell a valid signature from 64
        random bytes (the identity keys are in the phones' directory), and need not: phones ignore signatures that do
        not verify, so a member that sends garbage first loses only its own say. Ed25519 signs deterministically, so
        an honest phone's retry sends the same signature again."""
        self._expect("confirm")
        if signer not in self.reported:
            raise SecAggError("only phones whose input was counted confirm the survivors")
        if len(signature) != SIGNATURE_BYTES:
            raise SecAggError(f"a signature is {SIGNATURE_BYTES} bytes")
        if self.confirmations.get(signer, signature) != signature:
            raise SecAggError("this phone has already confirmed with another signature")
        self.confirmations[signer] = signature

    def close_confirming(self, minimum: int = 0) -> list[int]:
        """Fix who confirmed; fails with fewer than `minimum` phones or too few to rebuild anyone's secrets, or when
        some phone that shared and its neighbours have no majority of confirmations between them: its neighbours
        would reveal nothing (the phones' check against a lying server, device_sim/secure_aggregation.py), so its
        secrets could not be rebuilt. Failing here says so, rather than later for want of shares."""
        self._expect("confirm")
        if len(self.confirmations) < max(self.parameters.threshold + 1, minimum):
            self._fail(f"{len(self.confirmations)} phones confirmed the survivors")
        for v in self.shared:
            backers = {v, *self._neighbours[v]}
            if 2 * len(backers & set(self.confirmations)) <= len(backers):
                self._fail(f"{len(backers & set(self.confirmations))} of phone {v} and its {len(backers) - 1} "
                           "neighbours confirmed the survivors, no majority: phones reveal no share without one")
        self.phase = "unmask"
        return sorted(self.confirmations)

    def confirmations_for(self, recipient: int) -> dict[int, bytes]:
        """The survivor-set signatures `recipient` needs: of its neighbours and of their neighbours."""
        wanted = set(self._neighbours[recipient]).union(*(self._neighbours[v] for v in self._neighbours[recipient]))
        return {signer: signature for signer, signature in self.confirmations.items() if signer in wanted}

    # --- phase 5 ---
    def incoming(self, recipient: int) -> dict[int, DealtPair]:
        """The pairs the phones that shared dealt `recipient`, by sender."""
        return {sender: dealing.pairs[recipient] for sender, dealing in self.dealt.items()
                if recipient in dealing.pairs}

    def add_reveals(self, revealer: int, shares: dict[int, Share]) -> None:
        """Take one phone's revealed shares, once: at most one for each neighbour that shared with it (an honest
        phone leaves out one whose dealt pair it could not check). Each must be the share its owner dealt this
        revealer: at the point the graph fixes (the owner numbered its neighbours in order from 1), matching the
        owner's commitment to that share of the seed the round needs. Otherwise the whole reveal is refused, so that
        only dealt shares are ever combined, and the revealer counts as one that did not reveal."""
        self._expect("unmask")
        if revealer not in self.confirmations:
            raise SecAggError("only phones that confirmed the survivors reveal shares")
        if not set(shares) <= set(self._neighbours[revealer]) & set(self.shared):
            raise SecAggError("a phone reveals shares only of neighbours that shared with it")
        if revealer in self.revealed_by:
            if shares != {owner: mine[revealer] for owner, mine in self.revealed.items() if revealer in mine}:
                raise SecAggError("this phone has already revealed other shares")
            return
        digest = self.roster.digest()
        for owner, share in shares.items():
            point = self._neighbours[owner].index(revealer) + 1
            if share.x != point:
                raise SecAggError(f"phone {revealer} holds share {point} of phone {owner}'s seeds, not {share.x}")
            if len(share.value) != SEED_BYTES:
                raise SecAggError(f"a share is {SEED_BYTES} bytes")
            kind = "self_mask" if owner in self.reported else "masking"
            if not self.dealt[owner].pairs[revealer].commits_to(kind, share, self.round_number, digest, owner):
                self.culprits[revealer] = (f"revealed a share of phone {owner}'s {kind} seed other than the one "
                                           f"phone {owner} committed to")
                raise SecAggError(f"phone {revealer}'s share of phone {owner}'s {kind} seed is not the one phone "
                                  f"{owner} committed to")
        for owner, share in shares.items():
            self.revealed.setdefault(owner, {})[revealer] = share
        self.revealed_by.add(revealer)

    def unmasked_sum(self) -> Masked:
        """The sum of the reported inputs, in each array's ring; fails if some secret has fewer than threshold
        shares, or they do not rebuild the seed their owner committed to."""
        self._expect("unmask")
        total = {name: values.copy() for name, values in self._sum.items()}
        reported = set(self.reported)
        for owner in self.shared:
            seed = self._rebuild(owner)
            if owner in reported:
                add_mask(total, prg_mask(seed, self.layout), -1)
                continue
            # A phone that shared but did not report: the masks its reporting neighbours added for it stay in
            # the sum unless removed, each computed from its rebuilt masking seed and the neighbour's public key.
            for v in sorted(set(self._neighbours[owner]) & reported):
                mask = prg_mask(pairwise_seed(seed, self.roster.keys[v].masking, self.round_number), self.layout)
                add_mask(total, mask, -pairwise_sign(v, owner))  # phone v added sign(v, owner) * mask
        self.phase = "done"
        return total

    def _rebuild(self, owner: int) -> bytes:
        """The seed `owner`'s revealed shares rebuild, checked against what the owner committed to at the start: a
        self-mask seed against its commitment, a masking seed against the public key it advertised. Every revealed
        share matched its own commitment (`add_reveals`), so a seed that fails the check means the owner dealt
        shares of some other seed, or none: its masks cannot be removed, and the round fails."""
        threshold = self.parameters.threshold
        shares = list(self.revealed.get(owner, {}).values())
        if len(shares) < threshold:
            self._fail(f"phone {owner}'s secrets have {len(shares)} shares, fewer than {threshold}")
        seed = combine_shares(shares, threshold)  # at distinct points: the graph fixed them (`add_reveals`)
        if owner in self.reported:
            committed = commitment(self.round_number, self.roster.digest(), owner, "self_mask", Share(0, seed))
            agrees = committed == self.dealt[owner].seed_commitment
        else:
            agrees = public_bytes(masking_key(seed)) == self.roster.keys[owner].masking
        if not agrees:
            self.culprits[owner] = "dealt shares that rebuild another seed than the one it committed to"
            self._fail(f"phone {owner}'s shares rebuild another seed than the one it committed to",
                       cause="a phone dealt inconsistent shares")
        return seed

    def _expect(self, phase: str) -> None:
        if self.phase != phase:
            raise SecAggError(f"secure aggregation is in phase {self.phase!r}, not {phase!r}")

    def _fail(self, why: str, cause: str = "too few phones remain") -> NoReturn:
        self.phase = "failed"
        raise SecAggError(f"secure aggregation of round {self.round_number} failed, {cause}: {why}")
