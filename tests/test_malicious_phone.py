"""A malicious member of a secure round's cohort, driven against the real aggregator: it cannot get a wrong seed
into the sum, and a lie costs the round no more than that phone dropping out would.

- A revealer that sends a wrong share value: its dealer's commitment refuses it (issue 24, item 2).
- A dealer that commits to other values than it sealed: the honest revealer leaves that share out, and the others
  rebuild the dealer's seed; a dealer whose shares rebuild another seed than it committed to fails the round
  cleanly.
- A member that confirms the survivors with 64 random bytes: honest phones ignore a signature that does not verify
  (item 3).
- A member that advertises keys of small order, or other keys after its first: refused (item 5).
- A member the commitments prove to lie (a wrong share revealed, or shares of another seed dealt) takes part in no
  later round, also after a restart; a phone that merely dropped out is never excluded.
"""

from __future__ import annotations

import dataclasses
import os
import time

import pytest

from aggregator.api.client import AggregatorRefusedError
from aggregator.api.schemas import RevealedShare, SecAggConfirm, SecAggKeys, SecAggReveal
from aggregator.rounds import EXCLUDED_RETRY_S
from keyboard_model.secagg import PublicKeys, Roster, RoundSecrets, SecAggError, graph_parameters, keys_statement
from keyboard_model.weights import model_from_bytes, parameter_shapes
from tests.helpers import (
    ROUND,
    Device,
    assert_mean_within_rounding,
    confirm_all,
    enrolled_phones,
    finished_round,
    random_delta,
    secure_client,
    start_secure,
    unmasking_round,
    until_collecting,
    wait_for_phase,
)

# Points of small order on Curve25519 (0, 1, two of order 8, p - 1) and encodings of 0 and 1 past p: X25519 with any of
# them gives the all-zero secret.
SMALL_ORDER = [bytes.fromhex(point) for point in (
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
)]


def mean_of(deltas, before):
    return {name: sum(delta[name] for delta in deltas) / len(deltas) for name in before}


# --- item 2: wrong shares ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_wrong_share_where_only_threshold_remain_is_refused_and_the_round_fails_without_moving_the_model(
    start_aggregator, small_tokenizer_path, small_model_config
):
    """The issue's attack, over HTTP: cohort 4, threshold 2, one honest phone drops out of unmasking, and the liar
    sends the right points with wrong values for the owners left with exactly two revealers. Its reveal is refused;
    those owners then have one honest share, too few, and the round fails; the model does not move."""
    client, before = start_secure(start_aggregator, small_tokenizer_path, small_model_config, clients_per_round=4,
                                  over_selection=1.0, secagg_ring_bits=16)
    devices = [Device(client) for _ in range(4)]
    liar, *honest, dropped = devices
    state = until_collecting(devices)
    assert state.roster.threshold == 2
    shapes = parameter_shapes(before)
    for seed, device in enumerate(devices):
        device.upload(random_delta(shapes, seed), None, seed)
    wait_for_phase(liar, "confirm")
    confirm_all(devices)
    genuine = liar.part.reveal_message(liar.state())
    graph = liar.part.roster.neighbours()
    gone = dropped.part.index
    lies = {owner: RevealedShare(x=share.x, value=bytes(16))
            if len([r for r in graph[owner] if r != gone]) == state.roster.threshold else share
            for owner, share in genuine.shares.items()}
    assert lies != genuine.shares
    # First in the phase, so that it is judged by its shares, not by the phase's time.
    with pytest.raises(AggregatorRefusedError) as refused:
        client.secagg_reveal(liar.round, liar.token, SecAggReveal(shares=lies))
    assert refused.value.status_code == 409 and "committed to" in refused.value.detail
    for device in honest:
        device.reveal()
    summary = finished_round(client)
    assert summary.status == "failed" and "fewer than 2" in summary.failure
    assert summary.new_version is None and client.status().model_version == 0
    # The refused reveal proved it lied: it takes part in no later round.
    assert_excluded(client, liar, "revealed a share")
    assert list(summary.excluded) == [liar.part.device_id]


def test_a_liar_that_reveals_wrong_shares_is_left_out_and_the_round_closes_with_the_honest_sum(
    tmp_path, small_tokenizer_path, small_model_config
):
    client = secure_client(tmp_path, small_tokenizer_path, small_model_config, devices=5)
    (liar, *honest), deltas, state, before = unmasking_round(client, 5)
    genuine = liar.part.reveal_message(liar.state())
    lies = {owner: RevealedShare(x=share.x, value=bytes(16)) for owner, share in genuine.shares.items()}
    with pytest.raises(AggregatorRefusedError) as refused:
        client.secagg_reveal(liar.round, liar.token, SecAggReveal(shares=lies))
    assert refused.value.status_code == 409 and "committed to" in refused.value.detail
    # One wrong share among right ones refuses the whole reveal, so nothing of the liar's is combined.
    one_lie = dict(genuine.shares)
    owner, share = next(iter(one_lie.items()))
    one_lie[owner] = RevealedShare(x=share.x, value=bytes(a ^ 1 for a in share.value))
    with pytest.raises(AggregatorRefusedError):
        client.secagg_reveal(liar.round, liar.token, SecAggReveal(shares=one_lie))
    for device in honest:
        device.reveal()
    # The liar counts as not having revealed: at the unmask phase's end the honest shares rebuild every seed (the
    # liar's own input was counted: it reported).
    summary = finished_round(client)
    assert (summary.status, summary.reported) == ("closed", 5)
    after, _ = model_from_bytes(client.model())
    assert_mean_within_rounding(after.state_dict(), before, mean_of(deltas, before), state, reporters=5)


def test_a_dealer_that_commits_to_another_value_than_it_sealed_cannot_get_an_honest_share_refused(
    tmp_path, small_tokenizer_path, small_model_config
):
    """The dealer's commitment to the share it sealed for one neighbour is wrong: were that neighbour to reveal what
    it opened, the server would refuse its reveal. It leaves that share out instead, its other shares count, and
    the dealer's seed comes from its other neighbours' shares."""
    client = secure_client(tmp_path, small_tokenizer_path, small_model_config, devices=5)
    framed_indices = []

    def forge(message):
        # The dealer's cohort index depends on the random device ids: frame its first neighbour, whichever it is.
        framed_indices.append(min(message.pairs))
        pair = message.pairs[framed_indices[0]]
        message.pairs[framed_indices[0]] = pair.model_copy(update={"self_mask": os.urandom(32)})
        return message

    members, deltas, state, before = unmasking_round(client, 5, forge)
    dealer, framed = members[0], next(d for d in members if d.part.index == framed_indices[0])
    reveal = framed.part.reveal_message(framed.state())
    assert dealer.part.index not in reveal.shares and len(reveal.shares) == 3
    for device in members:
        device.reveal()  # the framed phone's reveal is accepted: 204
    summary = finished_round(client)
    assert (summary.status, summary.reported) == ("closed", 5)
    after, _ = model_from_bytes(client.model())
    assert_mean_within_rounding(after.state_dict(), before, mean_of(deltas, before), state, reporters=5)


def test_a_dealer_whose_shares_rebuild_another_seed_than_it_committed_to_fails_the_round_cleanly(
    tmp_path, small_tokenizer_path, small_model_config
):
    """Its self mask cannot be removed from the sum: the round fails, naming the cause, and the model stays."""
    client = secure_client(tmp_path, small_tokenizer_path, small_model_config, devices=4)
    members, _, _, _ = unmasking_round(
        client, 4, lambda message: message.model_copy(update={"seed_commitment": os.urandom(32)}))
    for device in members:
        device.reveal()
    summary = finished_round(client)
    assert summary.status == "failed" and "dealt inconsistent shares" in summary.failure
    assert f"phone {members[0].part.index}'s shares" in summary.failure
    assert client.status().model_version == 0
    assert client.status().round == 2 and Device(client).round == 2  # the aggregator goes on


# --- a proven liar is excluded ------------------------------------------------------------------------------------

INCONSISTENT_DEALER = "dealt shares that rebuild another seed than the one it committed to"


def inconsistent_dealer_round(client) -> Device:
    """A round of four that fails because its first device dealt shares of another seed than it committed to;
    returns that device."""
    members, _, _, _ = unmasking_round(
        client, 4, lambda message: message.model_copy(update={"seed_commitment": os.urandom(32)}))
    for device in members:
        device.reveal()
    assert finished_round(client).status == "failed"
    return members[0]


def assert_excluded(client, device: Device, why: str) -> None:
    decision = client.checkin(device.device_token)
    assert decision.action == "retry", "a device proved to lie was selected again"
    assert decision.retry_after_s == EXCLUDED_RETRY_S and why in decision.excluded


def round_summary(client, number: int, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while not (summaries := [r for r in client.status().recent_rounds if r.round == number]):
        assert time.monotonic() < deadline, f"round {number} never ended"
        time.sleep(0.1)
    return summaries[0]


def test_a_dealer_proved_inconsistent_is_refused_at_check_in_and_the_next_round_closes_with_honest_phones(
    tmp_path, small_tokenizer_path, small_model_config
):
    client = secure_client(tmp_path, small_tokenizer_path, small_model_config, devices=4)
    dealer = inconsistent_dealer_round(client)
    # Checking in first, before any honest phone of round 2: without the exclusion it would take a place in it.
    assert_excluded(client, dealer, INCONSISTENT_DEALER)
    assert finished_round(client).excluded == {dealer.part.device_id: INCONSISTENT_DEALER}
    members, deltas, state, before = unmasking_round(client, 4)
    assert dealer.part.device_id not in members[0].state().roster.device_ids
    for device in members:
        device.reveal()
    summary = round_summary(client, 2)
    assert (summary.status, summary.reported, summary.excluded) == ("closed", 4, None)
    after, _ = model_from_bytes(client.model())
    assert_mean_within_rounding(after.state_dict(), before, mean_of(deltas, before), state, reporters=4)


def test_a_proved_liar_stays_excluded_when_the_aggregator_restarts_on_the_same_database(
    tmp_path, small_tokenizer_path, small_model_config
):
    client = secure_client(tmp_path, small_tokenizer_path, small_model_config, devices=4)
    dealer = inconsistent_dealer_round(client)
    client.close()
    restarted = secure_client(tmp_path, small_tokenizer_path, small_model_config, devices=4)
    assert_excluded(restarted, dealer, INCONSISTENT_DEALER)


def test_a_revealer_proved_to_lie_is_excluded_and_the_honest_phone_that_dropped_out_of_unmasking_is_not(
    tmp_path, small_tokenizer_path, small_model_config
):
    client = secure_client(tmp_path, small_tokenizer_path, small_model_config, devices=5)
    members, _, _, _ = unmasking_round(client, 5)
    liar, *revealers, dropped = members  # `dropped` confirmed, then never revealed
    genuine = liar.part.reveal_message(liar.state())
    lies = {owner: RevealedShare(x=share.x, value=bytes(16)) for owner, share in genuine.shares.items()}
    with pytest.raises(AggregatorRefusedError):
        client.secagg_reveal(liar.round, liar.token, SecAggReveal(shares=lies))
    for device in revealers:
        device.reveal()
    # The others' shares rebuild every seed, the dropped-out phone's too: it is honest, so its seed matches.
    assert finished_round(client).status == "closed"
    assert_excluded(client, liar, "revealed a share")
    rejoined = client.checkin(dropped.device_token)
    assert rejoined.excluded is None and rejoined.action == "train"
    excluded = finished_round(client).excluded
    assert list(excluded) == [liar.part.device_id] and "revealed a share" in excluded[liar.part.device_id]


# --- item 3: a garbage confirmation ----------------------------------------------------------------------------------


def test_a_garbage_confirmation_is_ignored_by_honest_phones_and_the_round_closes(
    tmp_path, small_tokenizer_path, small_model_config
):
    client = secure_client(tmp_path, small_tokenizer_path, small_model_config, devices=5)
    before, _ = model_from_bytes(client.model())
    members = [Device(client) for _ in range(5)]
    state = until_collecting(members)
    deltas = [random_delta(parameter_shapes(before.state_dict()), seed) for seed in range(5)]
    for seed, (device, delta) in enumerate(zip(members, deltas)):
        device.upload(delta, None, seed)
    wait_for_phase(members[0], "confirm")
    liar, *honest = members
    client.secagg_confirm(liar.round, liar.token, SecAggConfirm(signature=os.urandom(64)))
    # The server cannot verify signatures: it keeps the first, and refuses the liar's real one.
    with pytest.raises(AggregatorRefusedError) as refused:
        liar.confirm()
    assert refused.value.status_code == 409
    confirm_all(honest)
    for device in members:  # honest phones count the liar's garbage as no signature, and reveal
        device.reveal()
    summary = finished_round(client)
    assert (summary.status, summary.reported) == ("closed", 5)
    after, _ = model_from_bytes(client.model())
    assert_mean_within_rounding(after.state_dict(), before.state_dict(), mean_of(deltas, before.state_dict()), state,
                                reporters=5)


# --- item 5: keys ----------------------------------------------------------------------------------------------------


def test_keys_of_small_order_are_refused(tmp_path, small_tokenizer_path, small_model_config):
    client = secure_client(tmp_path, small_tokenizer_path, small_model_config, devices=3)
    attacker = Device(client)
    genuine = attacker.part.keys_message()
    for point in SMALL_ORDER:
        for keys in (PublicKeys(point, genuine.masking), PublicKeys(genuine.cipher, point)):
            signature = attacker.part.identity.sign(keys_statement(attacker.round, attacker.part.device_id, keys))
            with pytest.raises(AggregatorRefusedError) as refused:
                client.secagg_keys(attacker.round, attacker.token,
                                   SecAggKeys(cipher=keys.cipher, masking=keys.masking, signature=signature))
            assert refused.value.status_code == 409 and "small order" in refused.value.detail
    attacker.send_keys()  # its genuine keys are taken


def test_a_phone_cannot_change_its_keys_once_advertised(tmp_path, small_tokenizer_path, small_model_config):
    client = secure_client(tmp_path, small_tokenizer_path, small_model_config, devices=3)
    attacker, *others = [Device(client) for _ in range(3)]
    genuine = attacker.part.keys_message()
    attacker.send_keys()
    attacker.send_keys()  # the same keys again: a retry, accepted
    other = dataclasses.replace(attacker.part, secrets=RoundSecrets.generate()).keys_message()
    with pytest.raises(AggregatorRefusedError) as refused:
        client.secagg_keys(attacker.round, attacker.token, other)
    assert refused.value.status_code == 409 and "already advertised other keys" in refused.value.detail
    for device in others:
        device.send_keys()
    roster = wait_for_phase(attacker, "share").roster
    position = roster.device_ids.index(attacker.part.device_id)
    assert (roster.cipher_keys[position], roster.masking_keys[position]) == (genuine.cipher, genuine.masking)


@pytest.mark.parametrize("which", ["cipher", "masking"])
def test_a_phone_stops_cleanly_at_a_neighbour_key_of_small_order(which):
    """Should a lying server pass on a key of small order (signed by its colluding owner), the phone stops with the
    protocol's error before sharing anything, as at any failed check."""
    phones = enrolled_phones(4, ROUND)
    advertised = [phones[k].advertise() for k in range(4)]
    keys = dataclasses.replace(advertised[0][0], **{which: SMALL_ORDER[0]})
    advertised[0] = (keys, phones[0].identity.sign(keys_statement(ROUND, phones[0].device_id, keys)))
    roster = Roster(ROUND, [k for k, _ in advertised], graph_parameters(4), 0,
                    tuple(phones[k].device_id for k in range(4)), tuple(s for _, s in advertised))
    with pytest.raises(SecAggError, match="small order"):
        phones[1].share(roster)
    assert phones[1].roster is None
