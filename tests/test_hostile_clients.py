"""A hostile client cannot stall, crash or steer the aggregator: each test here is an attack that worked once."""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import json
import math
import random
import socket
import time

import httpx
import pytest
import torch

from aggregator.api.client import AggregatorClient, AggregatorRefusedError
from aggregator.api.schemas import RevealedShare, SecAggReveal
from aggregator.config import AggregatorConfig
from aggregator.refusals import RoundClosedError
from aggregator.rounds import RoundManager
from aggregator.storage import open_storage
from keyboard_model.update_codec import encode_update
from keyboard_model.weights import model_from_bytes
from tests.helpers import assert_mean_within_rounding, finished_round, secure_client, unmasking_round


def raw_request(url: str, head: str, body: bytes = b"", timeout_s: float = 5.0) -> str:
    """Send a request's head and (part of) its body on a raw socket; the status line and body of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as connection:
        connection.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) == 0:
            chunk = connection.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer.decode(errors="replace")


# --- secure aggregation: a member of the cohort reveals bad shares ------------------------------------------------


def test_a_share_moved_to_another_point_is_refused_and_the_round_still_unmasks(
    tmp_path, small_tokenizer_path, small_model_config
):
    client = secure_client(tmp_path, small_tokenizer_path, small_model_config, devices=5)
    (attacker, *honest), deltas, state, before = unmasking_round(client, 5)
    genuine = attacker.part.reveal_message(attacker.state())
    owner, share = next(iter(genuine.shares.items()))
    # Another revealer's point of the same owner, and the last point two bytes can hold.
    for x in (share.x % 4 + 1, 65_535):
        forged = SecAggReveal(shares={**genuine.shares, owner: RevealedShare(x=x, value=share.value)})
        with pytest.raises(AggregatorRefusedError) as refused:
            client.secagg_reveal(attacker.round, attacker.token, forged)
        assert refused.value.status_code == 409 and "holds share" in refused.value.detail
    for device in honest:
        device.reveal()
    # The attacker's shares were refused, so it counts as not having revealed: at the unmask phase's end the
    # others' shares suffice.
    assert finished_round(client).status == "closed"
    after, _ = model_from_bytes(client.model())
    assert_mean_within_rounding(after.state_dict(), before, {n: sum(d[n] for d in deltas) / 5 for n in before},
                                state, reporters=5)


def test_an_error_while_unmasking_ends_the_round_at_its_deadline(
    tmp_path, small_tokenizer_path, small_model_config, monkeypatch
):
    client = secure_client(tmp_path, small_tokenizer_path, small_model_config, devices=4)
    members, _, _, _ = unmasking_round(client, 4)

    def broken(self):
        raise RuntimeError("a fault nobody foresaw")

    monkeypatch.setattr("aggregator.secure_aggregation.SecureAggregation.unmasked_sum", broken)
    for device in members[:3]:
        device.reveal()
    time.sleep(1.1)  # the unmask phase's time is up: it unmasks with the reveals it has, and fails
    status = client.status()
    assert status.round == 2 and status.recent_rounds[0].status == "failed"
    assert "nobody foresaw" in status.recent_rounds[0].failure


# --- the server optimiser's step is committed with the model, or not at all ------------------------------------


def test_a_failed_commit_leaves_the_model_and_the_momentum_as_they_were(
    tmp_path, small_tokenizer_path, small_model_config
):
    def manager(name: str) -> RoundManager:
        config = AggregatorConfig(db_path=tmp_path / name / "db.sqlite", tokenizer_path=small_tokenizer_path,
                                  model=small_model_config, clients_per_round=2, over_selection=1.0,
                                  server_optimizer="fedavgm", selection_window_s=0.0)
        return RoundManager(config, open_storage(config.db_path))

    def run_round(rounds: RoundManager, devices: list[str], scale: float) -> None:
        for k, device in enumerate(devices):
            decision = rounds.checkin(device)
            delta = {name: torch.full(shape, scale * (k + 1)) for name, shape in rounds.model.shapes.items()}
            rounds.submit(decision.round, decision.upload_token, encode_update(delta, 5, "none"))

    reference = manager("reference")
    devices = [reference.authenticate(reference.enrol()[1]) for _ in range(2)]
    run_round(reference, devices, 0.01)
    run_round(reference, devices, -0.02)

    flaky = manager("flaky")
    devices = [flaky.authenticate(flaky.enrol()[1]) for _ in range(2)]
    record_round, failures = flaky.storage.record_round, []

    def fail_once(summary, weights, *rest, **named):
        if weights is not None and not failures:
            failures.append(summary["round"])
            raise OSError("disk full")
        record_round(summary, weights, *rest, **named)

    flaky.storage.record_round = fail_once
    run_round(flaky, devices, 0.01)  # its commit fails: recorded as failed, nothing of it kept
    assert failures == [1] and flaky.model.version == 0 and flaky.round.number == 2
    assert flaky.storage.recent_rounds(1)[0]["status"] == "failed"
    run_round(flaky, devices, 0.01)
    run_round(flaky, devices, -0.02)
    # The same two steps as the reference: the failed close applied no momentum.
    torch.testing.assert_close(flaky.model.state, reference.model.state, rtol=0, atol=0)


# --- selection: Sybils polling fast do not hold the slots ------------------------------------------------------


def test_devices_polling_fast_hold_no_more_slots_than_their_share(tmp_path, small_tokenizer_path, small_model_config):
    """Six Sybils poll every 0.1 s; fourteen honest phones come back when told (pace steering). Both kinds train as
    long and rest as long once they have reported, so polling is the only difference. Events run on the aggregator's
    simulated clock, seeded: the same slots on every machine."""
    config = AggregatorConfig(db_path=tmp_path / "db.sqlite", tokenizer_path=small_tokenizer_path,
                              model=small_model_config, clients_per_round=4, over_selection=1.25,
                              round_deadline_s=120.0, selection_window_s=10.0, simulated_clock=True)
    rounds = RoundManager(config, open_storage(config.db_path))
    sybils = {rounds.authenticate(rounds.enrol()[1]) for _ in range(6)}
    devices = [*sybils, *(rounds.authenticate(rounds.enrol()[1]) for _ in range(14))]
    update = encode_update({name: torch.zeros(shape) for name, shape in rounds.model.shapes.items()}, 5, "none")
    rng = random.Random(0)
    # (time, order, device, the check-in decision to upload for, or None to check in)
    events = [(rng.uniform(0, 30), order, device, None) for order, device in enumerate(devices)]
    heapq.heapify(events)
    slots, order = collections.Counter(), itertools.count(len(devices))
    while rounds.clock() < 3000:
        now, _, device, selected = heapq.heappop(events)
        rounds.set_simulated_time(now)
        if selected is not None:
            with contextlib.suppress(RoundClosedError):  # the round closed while it trained
                rounds.submit(selected.round, selected.upload_token, update)
            heapq.heappush(events, (now + 1.0, next(order), device, None))  # rests a second, then asks again
            continue
        decision = rounds.checkin(device)
        if decision.action == "train":
            slots[device in sybils] += 1
            heapq.heappush(events, (now + rng.uniform(2, 10), next(order), device, decision))  # trains
        else:
            wait = 0.1 if device in sybils else decision.retry_after_s
            heapq.heappush(events, (now + wait, next(order), device, None))
    drawn, share = slots[True] + slots[False], len(sybils) / len(devices)
    assert drawn >= 500  # enough slots for the bound below to mean something
    # Were slots drawn independently with the Sybils' share, they would hold this many or more with odds below
    # 1 in 30,000 (four standard deviations). They hold 264 of 864 (0.31, their share 0.3); before devices were
    # held to the time they were told, 361 (0.42).
    assert slots[True] <= share * drawn + 4 * math.sqrt(drawn * share * (1 - share)), (slots, drawn)


def test_the_first_device_after_a_quiet_spell_is_not_selected_alone(tmp_path, small_tokenizer_path,
                                                                     small_model_config):
    config = AggregatorConfig(db_path=tmp_path / "db.sqlite", tokenizer_path=small_tokenizer_path,
                              model=small_model_config, clients_per_round=1, over_selection=1.0,
                              round_deadline_s=600.0, selection_window_s=10.0, simulated_clock=True)
    rounds = RoundManager(config, open_storage(config.db_path))
    quick, other = (rounds.authenticate(rounds.enrol()[1]) for _ in range(2))
    rounds.set_simulated_time(100.0)  # the round's first window closed long ago, with nobody in it
    first = rounds.checkin(quick)
    assert first.action == "retry" and first.retry_after_s == pytest.approx(10.0, abs=0.01)
    rounds.set_simulated_time(105.0)
    assert rounds.checkin(other).action == "retry"  # a candidate of the same window
    rounds.set_simulated_time(111.0)
    assert sum(rounds.checkin(device).action == "train" for device in (quick, other)) == 1


def test_enrolment_outside_the_trusted_networks_needs_the_secret_and_is_rate_limited(
    start_aggregator, small_tokenizer_path, small_model_config
):
    # Loopback untrusted, so that this test's own requests count as a stranger's.
    aggregator = start_aggregator(small_tokenizer_path, small_model_config, trusted_networks=(),
                                  enrolment_secret="open sesame", enrolments_per_minute=3, checkins_per_minute=5)
    url = aggregator.url
    assert httpx.post(f"{url}/devices").status_code == 403
    assert httpx.post(f"{url}/devices", headers={"X-Enrolment-Secret": "open sesam"}).status_code == 403
    enrolled = httpx.post(f"{url}/devices", headers={"X-Enrolment-Secret": "open sesame"})
    assert enrolled.status_code == 201
    # Three enrolments a minute from one address, the refused ones included: the secret cannot be guessed fast.
    limited = httpx.post(f"{url}/devices", headers={"X-Enrolment-Secret": "open sesame"})
    assert limited.status_code == 429 and limited.headers["Retry-After"]
    token = {"Authorization": f"Bearer {enrolled.json()['device_token']}"}
    answers = [httpx.post(f"{url}/checkin", headers=token).status_code for _ in range(7)]
    assert answers == [200] * 5 + [429] * 2


# --- the HTTP surface: bodies, credentials, literals, numbers -----------------------------------------------------


@pytest.fixture
def service(start_aggregator, small_tokenizer_path, small_model_config):
    """A simulated-clock aggregator, an enrolled and selected device, and its upload token."""
    aggregator = start_aggregator(small_tokenizer_path, small_model_config, simulated_clock=True,
                                  clients_per_round=2, over_selection=1.0)
    client = AggregatorClient(aggregator.url)
    decision = client.checkin(client.enrol().device_token)
    return aggregator, decision


def test_a_json_body_is_read_only_after_its_credential_and_never_past_its_limit(service):
    aggregator, decision = service
    operator = aggregator.config.operator_token
    huge = "Content-Type: application/json\nContent-Length: 120000000\n"
    # No credential: refused at once, without waiting for 120 MB that never come.
    answer = raw_request(aggregator.url, f"PUT /clock HTTP/1.1\nHost: localhost\n{huge}", b'{"now_s": ')
    assert answer.startswith("HTTP/1.1 401")
    answer = raw_request(aggregator.url, f"POST /rounds/{decision.round}/evaluations HTTP/1.1\nHost: localhost\n"
                                         f"Authorization: Bearer not-a-token\n{huge}", b"{")
    assert answer.startswith("HTTP/1.1 401")
    # With it, refused for its size, declared or streamed.
    answer = raw_request(aggregator.url, f"PUT /clock HTTP/1.1\nHost: localhost\nAuthorization: Bearer {operator}\n"
                                         f"{huge}", b"{")
    assert answer.startswith("HTTP/1.1 413")

    def chunks():
        yield b'{"now_s": 1, "padding": "'
        for _ in range(100):
            yield b"x" * 1024

    streamed = httpx.put(f"{aggregator.url}/clock", content=chunks(), headers={"Authorization": f"Bearer {operator}"})
    assert streamed.status_code == 413


def test_only_the_operator_sets_the_clock_and_only_to_a_finite_time(service):
    aggregator, _ = service
    url, operator = f"{aggregator.url}/clock", {"Authorization": f"Bearer {aggregator.config.operator_token}"}
    assert httpx.put(url, json={"now_s": 10}).status_code == 401
    assert httpx.put(url, json={"now_s": 10}, headers={"Authorization": "Bearer guess"}).status_code == 401
    for literal in ("1e308", "Infinity", "NaN", "false", '"5"', "-1"):
        answer = httpx.put(url, content=f'{{"now_s": {literal}}}', headers=operator)
        assert answer.status_code == 422, literal
        assert isinstance(answer.json()["detail"], list)
    assert httpx.put(url, json={"now_s": 10}, headers=operator).status_code == 204
    assert AggregatorClient(aggregator.url).status().recent_rounds == []  # no round failed on the way


@pytest.mark.slow
def test_literals_json_cannot_echo_are_refused_with_422(service):
    aggregator, decision = service
    bodies = {"evaluations": '{"model_version": 0, "positions": %s, "hits_at_1": 0, "hits_at_3": 0}',
              "secagg/keys": '{"cipher": %s, "masking": %s}', "secagg/shares": '{"sealed": {"0": %s}}',
              "secagg/reveal": '{"shares": {"0": {"x": %s, "value": "AA=="}}}'}
    for route, body in bodies.items():
        for literal in ("NaN", "Infinity", "-Infinity", '"\\ud800"'):
            answer = httpx.post(f"{aggregator.url}/rounds/{decision.round}/{route}",
                                content=body.replace("%s", literal).encode(),
                                headers={"Authorization": f"Bearer {decision.upload_token}",
                                         "Content-Type": "application/json"})
            assert answer.status_code == 422, (route, literal)
            assert all({"type", "loc", "msg"} == set(item) for item in answer.json()["detail"])


def test_numbers_outside_64_bits_are_refused_not_a_server_error(service):
    aggregator, decision = service
    assert httpx.get(f"{aggregator.url}/models/9223372036854775808").status_code == 422
    assert httpx.get(f"{aggregator.url}/models/-1").status_code == 422
    reveal = {"shares": {"0": {"x": 2**128 + 1, "value": "AAAAAAAAAAAAAAAAAAAAAA=="}}}
    answer = httpx.post(f"{aggregator.url}/rounds/{decision.round}/secagg/reveal", content=json.dumps(reveal),
                        headers={"Authorization": f"Bearer {decision.upload_token}"})
    assert answer.status_code == 422
