"""The whole protocol over real HTTP: a real aggregator process on loopback, phones with real SQLite histories."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import torch

from aggregator.api.client import AggregatorClient, AggregatorRefusedError
from device_sim.participation import Participant
from device_sim.phone import Phone
from device_sim.session import update_bytes
from keyboard_model.architecture import build_model
from keyboard_model.evaluate import evaluate
from keyboard_model.train import LocalTrainConfig
from keyboard_model.update_codec import decode_update
from keyboard_model.weights import model_from_bytes, parameter_shapes, write_tensors
from tests.conftest import SMALL_TEXT


class RecordingClient(AggregatorClient):
    """A phone's client that keeps every request it sends, as a network tap would see it."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.sent: list[tuple[str, str, bytes]] = []  # (method, path, body)
        self._http.event_hooks["request"].append(
            lambda request: self.sent.append((request.method, request.url.path, request.read())))

    @property
    def uploads(self) -> list[bytes]:
        return [body for _, path, body in self.sent if path.endswith("/updates")]


def make_phone(folder: Path, name: str, texts: list[str]) -> Phone:
    return Phone.create(name, folder / name, [(float(i), text) for i, text in enumerate(texts)])


def take_part(phone: Phone, client: AggregatorClient, decision, tokenizer, train: LocalTrainConfig, seed: int) -> None:
    """The selected phone's steps in its round, as every phone takes them (device_sim/participation.py)."""
    Participant(phone, client, decision).run(
        lambda secure: phone.local_work(client.model(), tokenizer, train, seed, secure=secure,
                                       evaluate=decision.evaluate), lambda _: True)


def state_of(client: AggregatorClient) -> tuple[dict[str, torch.Tensor], int]:
    model, version = model_from_bytes(client.model())
    return model.state_dict(), version


# Tests that check the averaging itself run plain FedAvg (server learning rate 1): the new model is
# then exactly the old one plus the example-weighted mean delta.
def test_three_phones_two_rounds_give_the_example_weighted_mean(
    tmp_path, start_aggregator, small_tokenizer_path, small_tokenizer, small_model_config
):
    aggregator = start_aggregator(small_tokenizer_path, small_model_config, clients_per_round=3,
                                  server_optimizer="fedavg",
                                  serving_average=0.5)
    client = RecordingClient(aggregator.url)
    # Histories of different sizes, so the weighting matters.
    phones = [make_phone(tmp_path, f"phone-{i}", SMALL_TEXT * (i + 1)) for i in range(3)]
    train = LocalTrainConfig(epochs=2, batch_size=4, learning_rate=0.5)

    for expected_round in (1, 2):
        before, version = state_of(client)
        assert version == expected_round - 1
        client.sent.clear()
        for seed, phone in enumerate(phones):
            decision = phone.check_in(client)
            assert decision.action == "train" and decision.round == expected_round
            take_part(phone, client, decision, small_tokenizer, train, seed)
        after, new_version = state_of(client)
        assert new_version == version + 1
        shapes = parameter_shapes(before)
        parsed = [decode_update(data, shapes) for data in client.uploads]
        deltas = [delta for delta, _ in parsed]
        counts = [int(metadata["num_examples"]) for _, metadata in parsed]
        assert counts == [len(p.messages()[0]) for p in phones]
        assert len(set(counts)) == 3
        for name in before:
            # Written out here rather than calling the aggregator's own averaging code.
            mean = sum(n * d[name].double() for n, d in zip(counts, deltas)) / sum(counts)
            torch.testing.assert_close(after[name], before[name] + mean.float(), rtol=1e-5, atol=1e-6)
        assert any(not torch.equal(after[name], before[name]) for name in before)

    status = client.status()
    assert status.model_version == 2 and status.round == 3
    assert [r.reported for r in status.recent_rounds] == [3, 3]
    assert [r.new_version for r in status.recent_rounds] == [1, 2]
    # Keyboards are served the average of the two models, the newer weighted 1 and the older 0.5; phones still
    # download the newer.
    first, second = (model_from_bytes(client.model_version(v))[0].state_dict() for v in (1, 2))
    served, served_version = model_from_bytes(client.served_model())
    downloaded = state_of(client)[0]
    assert served_version == 2 and served.state_dict().keys() == downloaded.keys() == second.keys()
    for name, tensor in served.state_dict().items():
        torch.testing.assert_close(tensor, (0.5 * first[name] + second[name]) / 1.5, rtol=1e-5, atol=1e-6)
        assert torch.equal(downloaded[name], second[name])


def test_a_phone_sends_only_parameter_tensors_an_example_count_and_three_recall_counts(
    tmp_path, start_aggregator, small_tokenizer_path, small_tokenizer, small_model_config
):
    aggregator = start_aggregator(small_tokenizer_path, small_model_config, clients_per_round=1)
    client = RecordingClient(aggregator.url)
    phone = make_phone(tmp_path, "phone-0", SMALL_TEXT * 5)
    decision = phone.check_in(client)
    take_part(phone, client, decision, small_tokenizer, LocalTrainConfig(), seed=0)
    assert [(method, path) for method, path, _ in client.sent] == [
        ("POST", "/devices"), ("POST", "/checkin"), ("GET", "/model"),
        ("POST", "/rounds/1/evaluations"), ("POST", "/rounds/1/updates"),
    ]
    # Enrolling, checking in and downloading send no body at all.
    assert [body for _, _, body in client.sent[:3]] == [b"", b"", b""]
    for _, _, body in client.sent:
        for text in SMALL_TEXT:
            for word in text.split():
                if len(word) >= 5:
                    assert word.encode() not in body

    # The evaluation: three counts of how the downloaded model did on the held-out messages, and its version.
    evaluation = json.loads(client.sent[3][2])
    expected = evaluate(model_from_bytes(client.model_version(0))[0], small_tokenizer, phone.held_out(small_tokenizer))
    assert evaluation == {"model_version": 0, "positions": expected.positions, "hits_at_1": expected.hits_at_1,
                          "hits_at_3": expected.hits_at_3}
    assert expected.positions > 0

    (data,) = client.uploads

    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    metadata = header.pop("__metadata__")
    train_messages, _ = phone.messages()
    assert metadata == {"num_examples": str(len(train_messages)), "compression": "int8"}
    shapes = {name: list(t.shape) for name, t in build_model(small_model_config).state_dict().items()}
    scales = {f"{name}.scale": [shape[0] if len(shape) > 1 else 1] for name, shape in shapes.items()}
    assert {name: entry["shape"] for name, entry in header.items()} == {**shapes, **scales}
    assert {name: entry["dtype"] for name, entry in header.items()} == {
        **{name: "I8" for name in shapes}, **{name: "F32" for name in scales}
    }
    # The body is exactly those tensors: nothing rides along after them.
    tensor_bytes = sum(torch.Size(shape).numel() for shape in shapes.values()) + 4 * sum(s for (s,) in scales.values())
    assert len(data) == 8 + header_length + tensor_bytes


def new_device(client: AggregatorClient) -> str:
    """Enrol a device; returns its token."""
    return client.enrol().device_token


def upload_raw(url: str, round_number: int, token: str | None, body: bytes) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{url}/rounds/{round_number}/updates", content=body, headers=headers, timeout=30)


def test_bad_uploads_are_refused_with_a_reason_and_leave_the_aggregate_alone(
    start_aggregator, small_tokenizer_path, small_model_config
):
    aggregator = start_aggregator(small_tokenizer_path, small_model_config, clients_per_round=2, over_selection=1.0,
                                  server_optimizer="fedavg")
    client = AggregatorClient(aggregator.url)
    before, _ = state_of(client)
    shapes = parameter_shapes(before)
    good = {name: torch.full(shape, 0.01) for name, shape in shapes.items()}
    first, second = client.checkin(new_device(client)), client.checkin(new_device(client))
    assert client.checkin(new_device(client)).action == "retry"  # the round is full

    wrong_shape = dict(good, output_bias=torch.zeros(3))
    nan = dict(good, output_bias=torch.full(shapes["output_bias"], float("nan")))
    huge = dict(good, output_bias=torch.full(shapes["output_bias"], 100.0))
    cases = [
        (update_bytes(wrong_shape, 5), 422, "shape"),
        (update_bytes(nan, 5), 422, "NaN"),
        (update_bytes(huge, 5), 422, "above this aggregator's bound of 20.0"),
        (write_tensors(good, {"num_examples": "5", "text": "to be or not"}), 422, "num_examples"),
        (update_bytes(good, 0), 422, "num_examples"),
        (update_bytes(good, 1_001), 422, "between 1 and 1000"),
        (b"\x80\x04pickled", 422, "safetensors"),
        (b"x" * (4 * sum(t.numel() for t in good.values()) + 200_000), 413, "at most"),
    ]
    for body, status, reason in cases:
        response = upload_raw(aggregator.url, first.round, first.upload_token, body)
        assert response.status_code == status, response.text
        assert reason in response.json()["detail"]
    # Without a Content-Length the body is streamed, and cut off as soon as it is too long.
    too_long = (b"x" * 65_536 for _ in range(200))
    response = httpx.post(f"{aggregator.url}/rounds/{first.round}/updates", content=too_long,
                          headers={"Authorization": f"Bearer {first.upload_token}"}, timeout=30)
    assert response.status_code == 413 and "at most" in response.json()["detail"]
    response = upload_raw(aggregator.url, first.round, None, update_bytes(good, 5))
    assert response.status_code == 401
    response = upload_raw(aggregator.url, first.round, "made-up-token", update_bytes(good, 5))
    assert response.status_code == 401
    assert client.status().reported == 0

    # A repeated upload counts once.
    assert client.upload(first.round, first.upload_token, update_bytes(good, 5)).duplicate is False
    again = client.upload(first.round, first.upload_token, update_bytes(good, 5))
    assert again.duplicate is True and again.reported == 1
    assert client.status().reported == 1

    other = {name: torch.full(shape, -0.03) for name, shape in shapes.items()}
    client.upload(second.round, second.upload_token, update_bytes(other, 15))
    after, version = state_of(client)
    assert version == 1
    for name in before:
        # (5 * 0.01 + 15 * -0.03) / 20 = -0.02: the refused uploads left no trace.
        torch.testing.assert_close(after[name], before[name] - 0.02)

    # The round is closed now; a late upload is told so.
    with pytest.raises(AggregatorRefusedError) as refused:
        client.upload(first.round, first.upload_token, update_bytes(good, 5))
    assert refused.value.status_code == 409 and "closed" in refused.value.detail


@pytest.mark.slow
def test_the_deadline_closes_a_round_with_the_updates_it_has(
    start_aggregator, small_tokenizer_path, small_model_config
):
    aggregator = start_aggregator(small_tokenizer_path, small_model_config, clients_per_round=3, round_deadline_s=2.0,
                                  min_report_fraction=0.3, server_optimizer="fedavg")
    client = AggregatorClient(aggregator.url)
    before, _ = state_of(client)
    decision = client.checkin(new_device(client))
    client.checkin(new_device(client))  # selected, never reports
    client.upload(decision.round, decision.upload_token,
                  update_bytes({n: torch.full_like(t, 0.1) for n, t in before.items()}, 4))
    deadline = time.monotonic() + 20
    while client.status().model_version == 0:
        assert time.monotonic() < deadline, "the round never closed at its deadline"
        time.sleep(0.2)
    status = client.status()
    closed = status.recent_rounds[-1]
    assert (closed.status, closed.selected, closed.reported, closed.dropped) == ("closed", 2, 1, 1)
    after, _ = state_of(client)
    torch.testing.assert_close(after["output_bias"], before["output_bias"] + 0.1)


@pytest.mark.slow
def test_a_round_with_too_few_reports_fails_and_keeps_the_model(
    start_aggregator, small_tokenizer_path, small_model_config
):
    aggregator = start_aggregator(small_tokenizer_path, small_model_config, clients_per_round=2,
                                  min_report_fraction=1.0, round_deadline_s=1.0)
    client = AggregatorClient(aggregator.url)
    lonely = client.checkin(new_device(client))
    client.upload(lonely.round, lonely.upload_token,
                  update_bytes({name: torch.zeros(shape)
                                for name, shape in parameter_shapes(state_of(client)[0]).items()}, 3))
    deadline = time.monotonic() + 20
    while not client.status().recent_rounds:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    failed = client.status().recent_rounds[0]
    assert (failed.status, failed.new_version, failed.reported) == ("failed", None, 1)
    assert client.status().model_version == 0


def test_a_new_aggregator_can_start_from_a_saved_model(
    tmp_path, start_aggregator, small_tokenizer_path, small_model_config
):
    from keyboard_model.weights import model_to_bytes

    trained = build_model(small_model_config, seed=42)  # stands in for a server-trained model
    path = tmp_path / "server.safetensors"
    path.write_bytes(model_to_bytes(trained.state_dict(), 7, small_model_config))
    aggregator = start_aggregator(small_tokenizer_path, small_model_config, initial_model=path)
    served, version = state_of(AggregatorClient(aggregator.url))
    assert version == 0  # version 0 of this federation, whatever the file called itself
    for name, tensor in trained.state_dict().items():
        assert torch.equal(served[name], tensor)
