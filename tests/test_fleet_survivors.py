"""The fleet's count of the phones a round still had when it ended, and the seam that makes each selected phone's
part (benchmarks/soak.py plants lying phones through it)."""

from __future__ import annotations

import pytest

from aggregator.inprocess import InProcessClient
from aggregator.process import local_aggregator_config
from device_sim.fleet import Fleet
from device_sim.participation import Participant
from tests.helpers import fleet_config, make_phones


@pytest.mark.slow
def test_a_round_counts_its_phones_still_in_it_when_it_ended_through_the_participants_it_was_given(
    tmp_path, small_tokenizer_path, small_model_config
):
    client = InProcessClient(local_aggregator_config(
        tmp_path, small_tokenizer_path, model=small_model_config, clients_per_round=3, simulated_clock=True,
        round_deadline_s=3600.0, secure_aggregation=True))
    made: list[Participant] = []

    def participant(phone, aggregator, decision) -> Participant:
        made.append(Participant(phone, aggregator, decision))
        return made[-1]

    folder = tmp_path / "phones"
    # Nobody vanishes, and phones train in a tick, before their conditions can change: every phone survives.
    fleet = Fleet(make_phones(folder, 12), fleet_config(folder, vanish_probability=0.0, minutes_per_message=0.01),
                  client, participant=participant)
    try:
        reports = [fleet.run_round() for _ in range(2)]
    finally:
        fleet.close()
    summaries = {s.round: s for s in client.status().recent_rounds}
    for report in reports:
        assert report.count("aborted") == 0 and report.count("vanished") == 0
        # A phone drawn while it was a candidate that is no longer eligible when it should come back never learns
        # it was selected: the aggregator counts it, the fleet cannot, and it did not survive.
        assert 0 < report.survived == sum(p.round == report.round for p in made) <= summaries[report.round].selected
