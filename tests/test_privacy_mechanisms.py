"""A privacy mechanism is one module and one registration (aggregator/mechanisms.py): a toy one, registered by this
test module, runs private rounds of the real aggregator, which tells phones its clip norm, releases its mean,
records what it spent, commits its state and keeps out the devices it says must sit out, also after a restart."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from aggregator.adaptive_clipping import ClipNorm, resumed_clip
from aggregator.config import AggregatorConfig
from aggregator.global_model import GlobalModel
from aggregator.mechanisms import MECHANISMS, Registration
from aggregator.rounds import RoundManager
from aggregator.storage import Storage, open_storage
from keyboard_model.update_codec import encode_update
from keyboard_model.weights import Tensors


class Counting:
    """A toy mechanism: no noise, one unit of epsilon per release, and the devices of a release sit out the next."""

    def __init__(self, clip: ClipNorm, goal: int, releases: int, sitting_out: set[str]) -> None:
        self.clip, self._goal, self._releases, self._sitting_out = clip, goal, releases, sitting_out

    @property
    def noise_stddev(self) -> float:
        return 0.0

    def rounds_to_sit_out(self, device_id: str) -> int:
        return int(device_id in self._sitting_out)

    def release(self, total: Tensors, within: int, reported: int) -> tuple[Tensors, dict]:
        # "counting_units" is this mechanism's own: the database keeps it without a column for it.
        record = {"dp_mechanism": "counting", "dp_noise_multiplier": 1.0, "dp_delta": 1e-5,
                  "epsilon": float(self._releases + 1), "counting_units": self._releases + 1,
                  **self.clip.release(within, reported)}
        return {name: t / self._goal for name, t in total.items()}, record

    def pending_state(self) -> bytes:
        return f"{self._releases + 1}".encode()

    def spent(self, record: dict, reporters: Iterable[str]) -> None:
        self._releases += 1
        self._sitting_out = set(reporters)


def counting(config: AggregatorConfig, storage: Storage, model: GlobalModel,
             population: Callable[[], int]) -> Counting:
    """Resumed from the state it committed (a toy: who sits out is forgotten on a restart)."""
    saved = storage.noise_state()
    return Counting(resumed_clip(config, storage.last_release()), config.clients_per_round,
                    int(saved[1]) if saved is not None else 0, set())


def test_a_mechanism_registered_with_one_line_runs_private_rounds_of_the_real_aggregator(
    monkeypatch, tmp_path, small_tokenizer_path, small_model_config
):
    monkeypatch.setitem(MECHANISMS, "counting", Registration(f"{__name__}:counting"))
    config = AggregatorConfig(db_path=tmp_path / "db.sqlite", tokenizer_path=small_tokenizer_path,
                              model=small_model_config, clients_per_round=2, over_selection=1.0,
                              selection_window_s=0.0, server_optimizer="fedavg", serving_average=0.0,
                              noise_multiplier=1.0, clip_norm=0.5, dp_mechanism="counting")
    rounds = RoundManager(config, open_storage(config.db_path))
    phones = [rounds.authenticate(rounds.enrol()[1]) for _ in range(3)]
    before = {name: t.clone() for name, t in rounds.model.state.items()}
    # Each update a quarter of the clip norm, so the server's clip leaves it as it is.
    size = sum(torch.Size(shape).numel() for shape in rounds.model.shapes.values()) ** 0.5
    for phone, value in zip(phones, (0.125, -0.0625)):
        decision = rounds.checkin(phone)
        assert decision.action == "train" and decision.clip_norm == 0.5
        delta = {name: torch.full(shape, value / size) for name, shape in rounds.model.shapes.items()}
        rounds.submit(decision.round, decision.upload_token, encode_update(delta, 10, "none"))
    record = rounds.storage.recent_rounds(1)[0]
    assert record["status"] == "closed" and record["dp_mechanism"] == "counting" and record["epsilon"] == 1.0
    assert record["counting_units"] == 1 and "counting_units" not in rounds.storage.db["rounds"].columns_dict
    # Its release: the clipped sum over the goal, no noise.
    for name, t in rounds.model.state.items():
        torch.testing.assert_close(t - before[name], torch.full_like(t, 0.0625 / 2 / size), atol=1e-7, rtol=0)
    # The devices of that release sit out the next one; the third does not.
    assert [rounds.checkin(phone).action for phone in phones] == ["retry", "retry", "train"]
    # A restart resumes from the state it committed: the next release spends a second unit.
    assert rounds.storage.noise_state() == (1, b"1")
    restarted = RoundManager(config, open_storage(config.db_path))
    assert restarted.snapshot()["epsilon"] == 1.0 and restarted.privacy.pending_state() == b"2"
    assert restarted.storage.last_release()["counting_units"] == 1
