"""Secure aggregation against a lying server (Bonawitz et al. 2017, the active-adversary protocol): a malicious
aggregator, played here by a test double that drives the real phones' protocol code (device_sim/
secure_aggregation.py, keyboard_model/secagg) without the honest server, tries to learn one phone's input.

- It tells some of a phone's neighbours that the phone dropped out (so they would reveal its masking-seed share)
  and the others that it survived (so they would reveal its self-mask share): the consistency round stops it.
- It asks a phone for the other share of a neighbour it already revealed one of: refused.
- It swaps a neighbour's public keys for its own: the phone checks the signature against the directory the phones
  trust, and stops.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from aggregator.api.schemas import CheckinResponse, SecAggEncoding, SecAggRoster, SecAggState
from device_sim.participation import Participant
from device_sim.phone import Phone
from device_sim.secure_aggregation import SecAggPhone
from keyboard_model.secagg import (
    Directory,
    IdentityKey,
    Layout,
    Masked,
    PublicKeys,
    Roster,
    RoundSecrets,
    SecAggError,
    Share,
    add_mask,
    combine_shares,
    graph_parameters,
    keys_statement,
    masking_key,
    open_shares,
    pairwise_seed,
    pairwise_sign,
    prg_mask,
    public_bytes,
)
from tests.helpers import ROUND, enrolled_phones

LAYOUT = Layout((("update", "uint8", 2_000), ("counts", "uint32", 3)))


class LyingServer:
    """Plays the aggregator's part for one round, honestly up to the masked inputs, then as it likes. It sees what a
    real aggregator sees: public keys, signatures, sealed shares, masked inputs, revealed shares."""

    def __init__(self, cohort: int, seed: int = 0, other_view: frozenset[int] = frozenset()) -> None:
        self.phones = enrolled_phones(cohort, ROUND)
        rng = np.random.default_rng(seed)
        self.inputs = {k: {name: rng.integers(0, np.iinfo(dtype).max, length, dtype=dtype, endpoint=True)
                           for name, dtype, length in LAYOUT.arrays} for k in range(cohort)}
        advertised = [self.phones[k].advertise() for k in range(cohort)]
        self.roster = Roster(ROUND, [keys for keys, _ in advertised], graph_parameters(cohort), seed,
                             tuple(self.phones[k].device_id for k in range(cohort)),
                             tuple(signature for _, signature in advertised))
        self.graph = self.roster.neighbours()
        self.threshold = self.roster.parameters.threshold
        # Phones in `other_view` are shown another roster: the same phones and keys, another graph seed.
        other = dataclasses.replace(self.roster, graph_seed=seed + 1)
        self.dealt = {k: self.phones[k].share(other if k in other_view else self.roster) for k in range(cohort)}
        self.shared = list(range(cohort))
        self.masked: dict[int, Masked] = {}
        # What the server collects: owner -> kind ("self_mask", "masking") -> revealer -> share.
        self.collected: dict[int, dict[str, dict[int, Share]]] = {
            k: {"self_mask": {}, "masking": {}} for k in range(cohort)}
        self.aborted: dict[int, str] = {}

    def collect(self, reporting: set[int]) -> None:
        for k in sorted(reporting):
            self.masked[k] = self.phones[k].mask(self.inputs[k], self.shared, LAYOUT)

    def incoming(self, u: int) -> dict[int, bytes]:
        return {v: self.dealt[v].pairs[u] for v in self.graph[u]}

    def unmask(self, told: dict[int, list[int]], hand: str = "matching") -> None:
        """Tell each reporting phone `told[phone]` as the survivors, take its signature, hand it signatures (`hand`:
        "all" it got, or only those of phones told the same set), and ask it to reveal."""
        signatures = {}
        for u, survivors in told.items():
            signatures[u] = self.phones[u].confirm(survivors)
        for u, survivors in told.items():
            given = {v: s for v, s in signatures.items() if hand == "all" or told[v] == survivors}
            self.ask(u, survivors, given)

    def ask(self, u: int, survivors: list[int], confirmations: dict[int, bytes]) -> None:
        try:
            revealed = self.phones[u].reveal(self.incoming(u), self.shared, survivors, confirmations)
        except SecAggError as error:
            self.aborted[u] = str(error)
            return
        for owner, share in revealed.items():
            self.collected[owner]["self_mask" if owner in survivors else "masking"][u] = share

    # --- what the server can compute from what it holds ---

    def unmask_one(self, owner: int, collected: dict[str, dict[int, Share]] | None = None) -> Masked:
        """`owner`'s own input, from its masked input and both its seeds rebuilt from shares; SecAggError if the
        shares do not rebuild them."""
        collected = collected or self.collected[owner]
        self_mask_seed = combine_shares(list(collected["self_mask"].values()), self.threshold)
        masking_seed = combine_shares(list(collected["masking"].values()), self.threshold)
        if public_bytes(masking_key(masking_seed)) != self.roster.keys[owner].masking:
            raise SecAggError("the masking-seed shares rebuild a wrong seed")
        total = {name: values.copy() for name, values in self.masked[owner].items()}
        add_mask(total, prg_mask(self_mask_seed, LAYOUT), -1)
        for v in self.graph[owner]:
            seed = pairwise_seed(masking_seed, self.roster.keys[v].masking, ROUND)
            add_mask(total, prg_mask(seed, LAYOUT), -pairwise_sign(owner, v))
        return total

    def unmasked_sum(self, survivors: list[int]) -> Masked:
        """The honest server's work: the sum of the survivors' inputs."""
        total = LAYOUT.zeros()
        for k in survivors:
            add_mask(total, self.masked[k], +1)
        for owner in self.shared:
            kind = "self_mask" if owner in survivors else "masking"
            seed = combine_shares(list(self.collected[owner][kind].values()), self.threshold)
            if owner in survivors:
                add_mask(total, prg_mask(seed, LAYOUT), -1)
                continue
            for v in set(self.graph[owner]) & set(survivors):
                add_mask(total, prg_mask(pairwise_seed(seed, self.roster.keys[v].masking, ROUND), LAYOUT),
                         -pairwise_sign(v, owner))
        return total

    def could_unmask(self, owner: int) -> bool:
        kinds = self.collected[owner]
        return len(kinds["self_mask"]) >= self.threshold and len(kinds["masking"]) >= self.threshold


def plain_sum(inputs: dict[int, Masked], phones) -> Masked:
    total = LAYOUT.zeros()
    for k in phones:
        add_mask(total, inputs[k], +1)
    return total


def assert_equal(total: Masked, expected: Masked) -> None:
    for name in expected:
        np.testing.assert_array_equal(total[name], expected[name])


@pytest.mark.parametrize("cohort", [7, 40])
def test_the_honest_path_still_unmasks_the_right_sum(cohort):
    server = LyingServer(cohort, seed=cohort)
    survivors = [k for k in range(cohort) if k != 3]  # phone 3 shared, then dropped out before its input
    server.collect(set(survivors))
    server.unmask({u: survivors for u in survivors})
    assert server.aborted == {}
    assert_equal(server.unmasked_sum(survivors), plain_sum(server.inputs, survivors))
    # Honest phones gave the server one kind of share of each phone: it rebuilds no single input.
    assert not any(server.could_unmask(owner) for owner in range(cohort))


@pytest.mark.parametrize("cohort", [7, 40])
def test_the_attack_the_consistency_round_stops_works_on_phones_that_do_not_check(cohort):
    """Without the checks the server's lie pays: half of phone 0's neighbours, told it dropped out, give its
    masking-seed shares, the other half its self-mask shares, and its input comes out exactly. (The share pairs are
    opened here with the phones' own keys, as phones that reveal whatever they are told would.)"""
    server = LyingServer(cohort, seed=1)
    server.collect(set(range(cohort)))
    target, neighbours = 0, server.graph[0]
    told_dropped = neighbours[: len(neighbours) // 2]
    collected = {"self_mask": {}, "masking": {}}
    for u in neighbours:
        phone = server.phones[u]
        pair = open_shares(phone._cipher_key(target), server.dealt[target].pairs[u].sealed, ROUND, target, u,
                           server.roster.digest())
        if u in told_dropped:
            collected["masking"][u] = pair.masking
        else:
            collected["self_mask"][u] = pair.self_mask
    assert_equal(server.unmask_one(target, collected), server.inputs[target])


@pytest.mark.slow
@pytest.mark.parametrize("hand", ["all", "matching"])
@pytest.mark.parametrize(("cohort", "told_dropped_share"), [(7, 0.5), (7, 0.34), (7, 0.67), (40, 0.5), (40, 0.75)])
def test_different_drop_out_sets_for_different_phones_stop_at_the_consistency_check(cohort, told_dropped_share, hand):
    server = LyingServer(cohort, seed=2)
    everyone = list(range(cohort))
    server.collect(set(everyone))
    target, neighbours = 0, server.graph[0]
    # Some of the target's neighbours hear it dropped out; everyone else hears that it survived.
    told_dropped = set(neighbours[: round(told_dropped_share * len(neighbours))])
    told = {u: [k for k in everyone if k != target] if u in told_dropped else everyone for u in everyone}
    server.unmask(told, hand)
    assert server.aborted  # some phones saw the lie and revealed nothing
    # A signature of the other set does not verify and counts as none (as if withheld): what stops the phones is
    # the count of signatures of their own set.
    assert all("signed the survivor set" in why for why in server.aborted.values()), server.aborted
    # Whatever it collected, the server holds both seeds of no phone: no single input can be unmasked.
    for owner in everyone:
        assert not server.could_unmask(owner), owner
        with pytest.raises(SecAggError):
            server.unmask_one(owner)


@pytest.mark.parametrize("cohort", [7, 40])
def test_phones_shown_different_rosters_open_no_shares_and_reveal_nothing(cohort):
    """A server that shows some phones another roster (here another graph, so that a phone's neighbourhood differs
    between the two groups and no majority need overlap) gets nothing that unmasks an input: phones bind their sealed
    shares and their signatures to the roster they saw, so shares sealed under one roster do not open under the
    other."""
    server = LyingServer(cohort, seed=4, other_view=frozenset(range(cohort // 2)))
    everyone = list(range(cohort))
    server.collect(set(everyone))
    server.unmask({u: everyone for u in everyone}, hand="all")
    # The phones shown the other roster stop. Those of the larger group may hold a majority between themselves and
    # reveal each other's self-mask shares, as in an honest round where all reported, but never a masking seed's.
    assert set(range(cohort // 2)) <= set(server.aborted)
    assert all(not kinds["masking"] for kinds in server.collected.values())
    assert not any(server.could_unmask(owner) for owner in everyone)
    # A share sealed by a phone that saw the other roster does not open under this one (for two phones that are
    # neighbours in both graphs, so that the sealed pair exists).
    u = cohort - 1
    v = next(v for v in server.graph[u] if v < cohort // 2 and u in server.dealt[v].pairs)
    with pytest.raises(SecAggError, match="do not open"):
        open_shares(server.phones[u]._cipher_key(v), server.dealt[v].pairs[u].sealed, ROUND, v, u,
                    server.roster.digest())
    # And a phone does not share twice, under a second roster.
    with pytest.raises(SecAggError, match="another roster"):
        server.phones[0].share(server.roster)


def test_a_phone_refuses_to_reveal_both_shares_of_a_neighbour():
    cohort = 7
    server = LyingServer(cohort, seed=3)
    everyone = list(range(cohort))
    server.collect(set(everyone))
    server.unmask({u: everyone for u in everyone})
    assert server.aborted == {} and len(server.collected[0]["self_mask"]) == cohort - 1
    phone, confirmations = server.phones[1], {}
    # Now the server says phone 0 dropped out after all, to get its masking-seed share too.
    without_0 = everyone[1:]
    with pytest.raises(SecAggError, match="already signed another survivor set"):
        phone.confirm(without_0)
    for v in without_0:  # even with signatures of that set from the other phones (as colluding phones might give)
        if v != 1:
            statement_phone = dataclasses.replace(server.phones[v], confirmed=None)
            confirmations[v] = statement_phone.confirm(without_0)
    with pytest.raises(SecAggError, match="differs from the one this phone signed"):
        phone.reveal(server.incoming(1), server.shared, without_0, confirmations)
    # And if the phone lost its record of the set it signed, it still remembers which share of phone 0 it revealed.
    forgetful = dataclasses.replace(phone, confirmed=None)
    forgetful.confirm(without_0)
    with pytest.raises(SecAggError, match="revealed the other share of phone 0"):
        forgetful.reveal(server.incoming(1), server.shared, without_0, confirmations)
    assert server.collected[0]["masking"] == {}


def swapped_roster(roster: Roster, owner: int, forger: IdentityKey | None) -> Roster:
    """The roster with `owner`'s keys replaced by the server's own, signed by `forger` (or left with the owner's
    signature of its real keys)."""
    keys = list(roster.keys)
    keys[owner] = RoundSecrets.generate().public()
    signatures = list(roster.signatures)
    if forger is not None:
        signatures[owner] = forger.sign(keys_statement(roster.round_number, roster.device_ids[owner], keys[owner]))
    return dataclasses.replace(roster, keys=keys, signatures=tuple(signatures))


@pytest.mark.parametrize("forger", ["own signature kept", "signed by the server's key"])
def test_a_substituted_public_key_makes_the_phone_abort(forger):
    cohort = 7
    phones = enrolled_phones(cohort, ROUND)
    advertised = [phones[k].advertise() for k in range(cohort)]
    roster = Roster(ROUND, [keys for keys, _ in advertised], graph_parameters(cohort), 0,
                    tuple(phones[k].device_id for k in range(cohort)), tuple(s for _, s in advertised))
    forged = swapped_roster(roster, 0, None if forger == "own signature kept" else IdentityKey.generate())
    for u in roster.neighbours()[0]:
        with pytest.raises(SecAggError, match="signature does not verify"):
            phones[u].share(forged)
        assert phones[u].roster is None  # nothing was shared under the forged roster
    # A device id the directory does not know (one the server made up) is refused the same way.
    unknown = dataclasses.replace(roster, device_ids=("device-made-up",) + roster.device_ids[1:])
    with pytest.raises(SecAggError, match="no identity key"):
        phones[1].share(unknown)
    # The genuine roster passes.
    assert set(phones[1].share(roster).pairs) == set(roster.neighbours()[1])


class ForgingAggregator:
    """Just enough of an aggregator for one phone's secure round: it answers with a roster in which one neighbour's
    keys are the server's own, and records what the phone sends."""

    def __init__(self, others: dict[int, SecAggPhone]) -> None:
        self.others = others
        self.sent: list[str] = []
        self.keys = None

    def secagg_keys(self, round_number, token, keys) -> None:
        self.sent.append("keys")
        self.keys = keys

    def secagg_shares(self, round_number, token, shares) -> None:
        self.sent.append("shares")

    def secagg_state(self, round_number, token) -> SecAggState:
        advertised = {k: phone.advertise() for k, phone in self.others.items()}
        cohort = len(self.others) + 1
        keys = [advertised[k][0] if k in advertised else PublicKeys(self.keys.cipher, self.keys.masking)
                for k in range(cohort)]
        signatures = [advertised[k][1] if k in advertised else self.keys.signature for k in range(cohort)]
        ids = [self.others[k].device_id if k in self.others else "device-me" for k in range(cohort)]
        parameters = graph_parameters(cohort)
        roster = swapped_roster(Roster(ROUND, keys, parameters, 0, tuple(ids), tuple(signatures)), 1,
                                IdentityKey.generate())
        return SecAggState(round=ROUND, phase="share", index=cohort - 1, roster=SecAggRoster(
            cipher_keys=[k.cipher for k in roster.keys], masking_keys=[k.masking for k in roster.keys],
            device_ids=list(ids), signatures=list(roster.signatures), degree=parameters.degree,
            threshold=parameters.threshold, graph_seed=0),
            encoding=SecAggEncoding(bits=8, bound=1.0, max_summands=cohort, length=10, rotation_seed=0))


def test_a_fleet_phone_shown_a_forged_key_stops_and_sends_nothing_more(tmp_path):
    """The participation layer every phone runs (fleet and browser phone): the phone registers its identity key in
    the phones' directory, sends its signed keys, then sees a forged neighbour key and stops, sending no shares: to
    the round it is a phone that dropped out."""
    phone = Phone.create("me", tmp_path / "me", [(0.0, "hello there")])
    phone.credentials_path.write_text(json.dumps({"device_id": "device-me", "device_token": "secret"}))
    directory = phone.identity_directory()
    others = {}
    for k in range(5):
        identity = IdentityKey.generate()
        directory.register(f"device-{k}", identity.public())
        others[k] = SecAggPhone(ROUND, f"device-{k}", identity, directory)
    server = ForgingAggregator(others)
    decision = CheckinResponse(action="train", round=ROUND, model_version=0, upload_token="t", secure_aggregation=True)
    participant = Participant(phone, server, decision)
    assert Directory(tmp_path / "identity-directory")._lookup("device-me") == phone.identity().public()
    assert participant.next_step() == "keys"
    participant.take("keys")
    assert participant.next_step() == "share"
    participant.take("share")
    assert server.sent == ["keys"] and "does not verify" in participant.secagg_error
    assert participant.next_step() == "over"
