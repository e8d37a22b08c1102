"""The Ray executor on a real two-node Ray cluster on this machine: the local pool's model, with phones on both nodes,
and nothing listening beyond loopback."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

try:
    # First: it sets the variable that keeps a Ray on this machine on loopback, which Ray reads as it is imported.
    # isort: off
    from device_sim.ray_executor import LOOPBACK_ONLY_ENV, RayExecutor
    import ray
    from ray.cluster_utils import Cluster
    # isort: on
except ImportError:
    pytest.fail("Ray is missing: run `bash dev.sh test`, which installs the project's [ray] extra", pytrace=False)

from aggregator.process import free_port
from device_sim import cli as device_cli
from device_sim.executor import LocalProcessPool
from keyboard_model.architecture import build_model
from keyboard_model.errors import UserFacingError
from tests.helpers import listening_beyond_loopback, run_fleet

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Cluster]:
    """A head and a worker node with one CPU each, both on this machine, on 127.0.0.1: each trains one phone at a
    time."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


class Recorded(RayExecutor):
    """Keeps, as it closes, which phone folders each node held (as the nodes list them)."""

    def close(self) -> None:
        self.placed = self.phones_by_node()
        super().close()


def test_the_same_seeds_give_the_local_pools_model_with_phones_on_both_nodes(
    two_nodes, tmp_path, small_tokenizer_path, small_tokenizer, small_model_config
):
    settings = dict(rounds=3, phones=10, per_round=4)
    on_ray = Recorded(small_tokenizer, two_nodes.address)
    model, reports = run_fleet(tmp_path / "ray", small_tokenizer_path, small_model_config, on_ray, **settings)
    local, expected = run_fleet(tmp_path / "local", small_tokenizer_path, small_model_config,
                                LocalProcessPool(small_tokenizer, 2), **settings)

    # The same phones took part in the same rounds with the same outcomes and the same training...
    assert [len(report.participants) for report in reports] == [len(report.participants) for report in expected]
    assert all(report.participants for report in reports)
    for report, same in zip(reports, expected):
        assert [(p.phone_id, p.outcome, p.result and p.result.num_examples) for p in report.participations] == [
            (p.phone_id, p.outcome, p.result and p.result.num_examples) for p in same.participations]
        for p, q in zip(report.participations, same.participations):
            if p.result is not None:  # None: aborted before it trained
                assert math.isclose(p.result.mean_loss, q.result.mean_loss, rel_tol=1e-6), p.phone_id
    # ...and ended at the same model, which moved: an untrained model on both sides would pass for the wrong reason.
    initial = build_model(small_model_config).state_dict()
    for name, tensor in local.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    assert any(not torch.equal(tensor, initial[name]) for name, tensor in model.state_dict().items())

    # Both nodes held phones, each phone on one node only, and every phone that trained had its history on a node
    # (the job checks that it runs on its phone's node).
    nodes = {node.node_id for node in two_nodes.list_all_nodes()}
    assert set(on_ray.placed) == nodes and len(nodes) == 2
    held = [folder.name for folders in on_ray.placed.values() for folder in folders]
    assert all(on_ray.placed.values()) and len(held) == len(set(held))
    assert {p.phone_id for report in reports for p in report.participations if p.result is not None} <= set(held)
    # Closed, the executor removed the copies it made on the nodes.
    assert not any(folder.exists() for folders in on_ray.placed.values() for folder in folders)


def test_nothing_listens_beyond_loopback_while_the_cluster_holds_phones_and_an_aggregator_runs(
    two_nodes, start_aggregator, small_tokenizer, small_tokenizer_path, small_model_config
):
    start_aggregator(small_tokenizer_path, small_model_config)
    executor = RayExecutor(small_tokenizer, two_nodes.address)
    try:
        executor.phones_by_node()  # each node's store answers: a worker process runs on each node
        addresses = {node["NodeManagerAddress"] for node in ray.nodes()}
        listening = listening_beyond_loopback()
    finally:
        executor.close()
    # Ray's GCS, raylets, object managers, runtime-env agents and workers, this driver, and the aggregator.
    assert listening == []
    assert len(two_nodes.list_all_nodes()) == 2 and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def test_ray_address_goes_with_the_ray_executor_only_and_a_head_that_does_not_answer_is_refused(small_tokenizer):
    parser = argparse.ArgumentParser()
    device_cli.add_fleet_arguments(parser)
    # Nobody listens there: refused in seconds, where ray.init would retry for many minutes.
    unanswered = parser.parse_args(["--executor", "ray", "--ray-address", f"127.0.0.1:{free_port()}"])
    with pytest.raises(UserFacingError, match="cannot reach the Ray head"):
        device_cli.executor_from_args(unanswered)(small_tokenizer)
    assert not ray.is_initialized()
    with pytest.raises(UserFacingError, match="--ray-address"):
        device_cli.executor_from_args(parser.parse_args(["--ray-address", "10.0.0.1:6379"]))
    with pytest.raises(UserFacingError, match="--device cuda"):
        args = parser.parse_args(["--executor", "ray"])
        args.device = "cuda"
        device_cli.executor_from_args(args)


def test_a_ray_started_for_the_run_listens_on_loopback_only(small_tokenizer, monkeypatch):
    # A Ray of its own, not the module's cluster (whose address Ray's address file names). Ray turns token
    # authentication on for it (setting RAY_AUTH_MODE here, undone after the test); the test gives the token, where
    # Ray would write one into the home folder.
    monkeypatch.setenv("RAY_ADDRESS", "local")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    executor = RayExecutor(small_tokenizer)
    try:
        assert executor.phones_by_node()  # its node's store answers: a worker process runs
        addresses = {node["NodeManagerAddress"] for node in ray.nodes()}
        listening = listening_beyond_loopback()
    finally:
        executor.close()
    assert listening == []
    assert all(ipaddress.ip_address(address).is_loopback for address in addresses)
    assert not ray.is_initialized()


def test_a_ray_that_would_listen_beyond_loopback_is_refused(tmp_path, shakespeare):
    run = subprocess.run(
        [sys.executable, "-m", "fedkb", "simulate", "--executor", "ray", "--phones", "2", "--clients-per-round", "1",
         "--rounds", "1", "--in-process", "--hidden-dim", "8", "--embedding-dim", "8", "--out", str(tmp_path / "run"),
         "--no-progress"],
        env={**os.environ, LOOPBACK_ONLY_ENV: "1"}, cwd=Path(__file__).resolve().parent.parent,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 2 and "would listen on its network address" in run.stderr, run.stderr
