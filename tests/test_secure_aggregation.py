"""Secure aggregation's protocol, phones and server in one process: sums, drop-outs at every step, and what
the server can and cannot see."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from aggregator.secure_aggregation import SecureAggregation
from device_sim.secure_aggregation import SecAggPhone
from keyboard_model.secagg import (
    DealtPair,
    Layout,
    Masked,
    RingEncoding,
    SecAggError,
    add_mask,
    graph_parameters,
    neighbours,
    open_shares,
)
from tests.helpers import enrolled_phones

LENGTH = 5_000
# A secure round's two rings: the update in bytes, the counts in 32-bit words.
LAYOUT = Layout((("update", "uint8", LENGTH), ("counts", "uint32", 3)))
PHASES = ("advertise", "share", "collect", "confirm", "unmask")


def run_round(cohort: int, drop: dict[str, set[int]] | None = None, seed: int = 0, layout: Layout = LAYOUT):
    """Run one round; phones in `drop[phase]` stop answering from that phase on.
    Returns (server, phones, inputs by phone, the unmasked sum or the error)."""
    drop = {phase: set(drop.get(phase, ())) if drop else set() for phase in PHASES}
    gone: set[int] = set()
    rng = np.random.default_rng(seed)
    inputs = {k: {name: rng.integers(0, np.iinfo(dtype).max, length, dtype=dtype, endpoint=True)
                  for name, dtype, length in layout.arrays} for k in range(cohort)}
    server = SecureAggregation(round_number=7, layout=layout, graph_seed=seed)
    phones = enrolled_phones(cohort)
    device = {k: f"device-{k:03d}" for k in range(cohort)}  # sorted ids, so cohort index == k
    try:
        gone |= drop["advertise"]
        for k, phone in phones.items():
            if k not in gone:
                server.advertise(device[k], *phone.advertise())
        roster = server.close_advertising()
        index = {k: server.index_of(device[k]) for k in phones if k not in gone}
        gone |= drop["share"]
        for k in index:
            if k not in gone:
                server.add_shares(index[k], phones[k].share(roster))
        shared = server.close_sharing()
        gone |= drop["collect"]
        for k in index:
            if k not in gone:
                server.add_masked_input(index[k], phones[k].mask(inputs[k], shared, layout))
        reported = server.close_collection()
        gone |= drop["confirm"]
        for k in index:
            if k not in gone and index[k] in reported:
                server.add_confirmation(index[k], phones[k].confirm(reported))
        server.close_confirming()
        gone |= drop["unmask"]
        for k in index:
            if k not in gone and index[k] in server.confirmations:
                server.add_reveals(index[k], phones[k].reveal(server.incoming(index[k]), shared, reported,
                                                              server.confirmations_for(index[k])))
        return server, phones, inputs, server.unmasked_sum()
    except SecAggError as error:
        return server, phones, inputs, error


def plain_sum(inputs: dict[int, Masked], phones: set[int]) -> Masked:
    total = LAYOUT.zeros()
    for k in phones:
        add_mask(total, inputs[k], +1)
    return total


def assert_equal(total: Masked, expected: Masked) -> None:
    assert set(total) == set(expected)
    for name in total:
        np.testing.assert_array_equal(total[name], expected[name])


@pytest.mark.slow
@pytest.mark.parametrize("cohort", [5, 130])
def test_without_drop_outs_the_unmasked_sum_is_the_plain_sum(cohort):
    server, _, inputs, total = run_round(cohort)
    # A complete graph for a few phones (SecAgg), a sparse one for many (SecAgg+).
    assert (server.parameters.degree < cohort - 1) == (cohort == 130)
    assert_equal(total, plain_sum(inputs, set(range(cohort))))


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("cohort", [9, 40, 100])
def test_a_third_dropping_out_at_any_step_still_gives_the_sum_of_those_that_reported(phase, cohort):
    dropped = set(range(0, cohort, 3)[: cohort // 3])  # a third, spread over the cohort
    server, _, inputs, total = run_round(cohort, {phase: dropped}, seed=cohort)
    assert not isinstance(total, SecAggError), total
    counted = set(range(cohort)) if phase in ("confirm", "unmask") else set(range(cohort)) - dropped
    assert_equal(total, plain_sum(inputs, counted))
    assert [server.devices[i] for i in server.reported] == [f"device-{k:03d}" for k in sorted(counted)]


def test_drop_outs_at_every_step_in_one_round():
    cohort = 40
    drop = {"advertise": {0, 1, 2}, "share": {3, 4, 5}, "collect": {6, 7, 8}, "unmask": {9, 10, 11}}
    server, _, inputs, total = run_round(cohort, drop, seed=3)
    counted = set(range(cohort)) - set().union(drop["advertise"], drop["share"], drop["collect"])
    assert_equal(total, plain_sum(inputs, counted))


@pytest.mark.parametrize("phase", ["share", "collect"])
def test_too_few_phones_fail_the_round_cleanly_and_reveal_nothing(phase):
    cohort = 9
    threshold = graph_parameters(cohort).threshold
    dropped = set(range(cohort - threshold + 1))  # leaves threshold - 1
    server, phones, _, outcome = run_round(cohort, {phase: dropped})
    assert isinstance(outcome, SecAggError) and "too few" in str(outcome)
    assert server.phase == "failed" and server.revealed == {}
    with pytest.raises(SecAggError):
        server.unmasked_sum()


def test_too_few_revealers_fail_the_round():
    cohort = 9
    threshold = graph_parameters(cohort).threshold
    server, _, _, outcome = run_round(cohort, {"unmask": set(range(cohort - threshold + 1))})
    assert isinstance(outcome, SecAggError) and server.phase == "failed"


def test_a_masked_input_is_statistically_unrelated_to_the_input():
    length = 200_000
    layout = Layout((("update", "uint8", length),))
    server, phones, _, _ = run_round(6, layout=layout, seed=11)
    phone = phones[0]
    x = {"update": (np.arange(length) // 1_000).astype(np.uint8)}  # a strongly patterned input

    def chi_square(masked: Masked) -> float:
        counts = np.bincount(masked["update"], minlength=256)
        return ((counts - length / 256) ** 2 / (length / 256)).sum()

    # Uniform over the ring: each of the 256 values appears about equally often (chi-square, 255 d.o.f.; 350 is far
    # in the tail of that distribution, a biased mask lands far beyond it).
    masked = phone.mask(x, server.shared, layout)
    assert chi_square(masked) < 350
    assert abs(np.corrcoef(masked["update"].astype(np.float64), x["update"].astype(np.float64))[0, 1]) < 0.02
    # Two very different inputs give uploads with the same (uniform) look: nothing tells them apart.
    again = SecAggPhone(7, phone.device_id, phone.identity, phone.directory, secrets=phone.secrets,
                        roster=phone.roster, index=phone.index)
    assert chi_square(again.mask(layout.zeros(), server.shared, layout)) < 350


def test_a_phone_reveals_only_one_secret_per_neighbour_and_refuses_inconsistent_requests():
    server, phones, _, _ = run_round(9, {"collect": {2}}, seed=5)
    phone = phones[0]
    incoming = server.incoming(0)
    reported = [k for k in server.shared if k != 2]
    confirmations = server.confirmations_for(0)
    revealed = phone.reveal(incoming, server.shared, reported, confirmations)
    # For the phone that did not report, its masking-seed share; for the others, their self-mask-seed share.
    for owner, share in revealed.items():
        pair = phone_pair(phone, incoming, owner)
        assert share == (pair.masking if owner == 2 else pair.self_mask)
    with pytest.raises(SecAggError, match="never shared"):
        phone.reveal(incoming, [k for k in server.shared if k != 3], reported, confirmations)
    with pytest.raises(SecAggError, match="differs from the one this phone signed"):
        phone.reveal(incoming, server.shared, [0] + [k for k in reported if k != 0][: server.parameters.threshold - 2],
                     confirmations)


def phone_pair(phone: SecAggPhone, incoming: dict[int, DealtPair], sender: int):
    return open_shares(phone._cipher_key(sender), incoming[sender].sealed, phone.round_number, sender, phone.index,
                       phone.roster.digest())


def test_sealed_shares_cannot_be_altered_or_redirected():
    """A pair that does not open gets its sender no share revealed, whoever altered it; the other senders' shares
    are revealed as usual."""
    server, phones, _, _ = run_round(5, seed=2)
    incoming = server.incoming(0)
    sender, pair = next(iter(incoming.items()))
    tampered = dataclasses.replace(pair, sealed=pair.sealed[:-1] + bytes([pair.sealed[-1] ^ 1]))
    with pytest.raises(SecAggError, match="do not open"):
        phone_pair(phones[0], {sender: tampered}, sender)
    revealed = phones[0].reveal({**incoming, sender: tampered}, server.shared, server.reported,
                            server.confirmations_for(0))
    assert set(revealed) == set(incoming) - {sender}
    # Phone 1's shares for phone 0, handed to phone 1's other neighbour instead, do not open there either.
    other = next(k for k in server.incoming(1) if k != 0 and k in server.incoming(0))
    misdirected = {**server.incoming(other), 1: server.incoming(0)[1]}
    with pytest.raises(SecAggError, match="do not open"):
        phone_pair(phones[other], misdirected, 1)
    assert 1 not in phones[other].reveal(misdirected, server.shared, server.reported, server.confirmations_for(other))


def test_the_graph_is_sparse_for_large_cohorts_symmetric_and_regular():
    params = graph_parameters(130)
    assert params.degree < 129 and params.threshold * 3 >= params.degree
    graph = neighbours(130, params.degree, seed=4)
    for u, mine in enumerate(graph):
        assert len(mine) == params.degree and u not in mine
        assert all(u in graph[v] for v in mine)
    # Small cohorts: everyone neighbours everyone; a third of the degree rebuilds a secret.
    small = graph_parameters(13)
    assert small.degree == 12 and small.threshold == 4


def ring_sum(encoding: RingEncoding, deltas: list[np.ndarray], seed: int = 0) -> np.ndarray:
    """What unmasking yields for these deltas: their encodings summed in the ring, decoded."""
    rng = np.random.default_rng(seed)
    total = np.zeros(encoding.size, encoding.dtype)
    for delta in deltas:
        total += encoding.encode(delta, rng)
    return encoding.decode_sum(total)


def test_the_largest_sum_the_ring_is_sized_for_does_not_wrap_in_the_narrowest_ring():
    length, summands = 20_000, 100
    encoding = RingEncoding(bits=8, bound=1.0, max_summands=summands, length=length, rotation_seed=3)
    # Every phone at the bound, all alike: once spread evenly, once all on one parameter (without the rotation,
    # that value alone would wrap the ring many times over).
    for delta in (np.full(length, 1 / np.sqrt(length)), np.eye(1, length, 17)[0]):
        error = ring_sum(encoding, [delta] * summands) - summands * delta
        # Rounding alone: a sum of 100 roundings per value, each of variance at most 1/4 step^2.
        assert np.linalg.norm(error) <= 1.1 * np.sqrt(summands * length / 4) / encoding.scale
        assert np.abs(error).max() < 6 * np.sqrt(summands / 4) / encoding.scale


def test_ring_sums_are_unbiased_and_wider_rings_round_less():
    length, summands = 20_000, 20
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=length) / np.sqrt(length) * rng.uniform(0.1, 1) for _ in range(summands)]
    truth = np.sum(deltas, axis=0)
    errors = {}
    for bits in (8, 16, 32):
        encoding = RingEncoding(bits=bits, bound=1.0, max_summands=130, length=length, rotation_seed=5)
        errors[bits] = ring_sum(encoding, deltas, seed=bits) - truth
        step_noise = np.sqrt(summands / 4) / encoding.scale
        assert errors[bits].std() <= 1.05 * step_noise
        assert abs(errors[bits].mean()) < 4 * step_noise / np.sqrt(length)
    assert errors[8].std() > 100 * errors[16].std() and errors[16].std() > 1_000 * errors[32].std()
    with pytest.raises(SecAggError, match="2\\*\\*12"):
        RingEncoding(bits=12, bound=1.0, max_summands=2, length=10, rotation_seed=0)
