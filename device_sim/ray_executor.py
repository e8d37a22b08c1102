"""Phones' local work on a Ray cluster: `--executor ray [--ray-address ADDR]`.

Phones live on nodes. The first time a phone is submitted it is assigned to a node (the
node with the fewest phones per CPU so far, ties to the lower node id, so that the same
run assigns the same way) and its history.sqlite is copied there, once, into a folder
that a small actor on that node owns (`_NodeStore`); no file system is shared. From then
on only the model travels: each download is put into Ray's object store once, so a node
fetches it once however many of its phones train on it. The phone trains in a Ray task
pinned to its node, on that node's copy of its history. The aggregator and the fleet's
clock stay in the simulator's process, which keeps its own copies of the histories to
decide when phones are eligible and how long they take.

Copying a history whole and once is right: a simulation never writes to a phone's
history. Messages carry their typing times, and `Phone.messages(now)` filters by them.

The task runs the job as the local pool's workers do (`device_sim.worker.run_job`) on one
torch thread, so the same seeds give the same local work on a cluster as on the local pool.

Trust: Ray pickles jobs and results between this process and its workers. That is the
simulator's own machinery, as the local pool's multiprocessing pipes are, not the network
between phones and the aggregator: the aggregator still receives only the uploads' bytes
and checks them as it checks any phone's. Like any Ray cluster, the cluster must be
reachable by its owner only (Ray runs whatever its clients send): a Ray on this machine
(the one `ray start` runs here, or one started for the run) listens on 127.0.0.1 only.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import tempfile
from collections import Counter
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

# On Linux Ray gives a node on this machine the machine's network address, rewriting even an explicit 127.0.0.1 to
# it, and the node's services then listen on every interface. With this variable at 0 when Ray is imported, a node
# on this machine takes 127.0.0.1 and its services listen there only, as Ray does on macOS and Windows. Joining a
# cluster of other machines is unchanged: their nodes' addresses come from the cluster.
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from device_sim.executors import ExecutorSettings
from device_sim.phone import Phone
from device_sim.session import LocalWork
from device_sim.worker import TrainingJob, run_in_worker
from keyboard_model.errors import UserFacingError
from keyboard_model.files import write_atomically
from keyboard_model.tokenizer import KeyboardTokenizer

# Downloads kept in the object store: a round's float32 and int8 encodings, or the last model and the one before
# it while a late phone's job is still being handed out. Older ones are dropped as soon as no job needs them.
MODELS_KEPT = 2
# Seconds to wait for the head's port to accept a connection before ray.init is tried.
CONNECT_TIMEOUT_S = 10.0


def on_ray(tokenizer: KeyboardTokenizer, settings: ExecutorSettings) -> RayExecutor:
    """`--executor ray` (device_sim/executors.py)."""
    return RayExecutor(tokenizer, settings.ray_address)


class RayExecutor:
    """Phones' local work as Ray tasks, each phone on the node that holds its history."""

    def __init__(self, tokenizer: KeyboardTokenizer, address: str | None = None) -> None:
        """Connect to the cluster at `address` (None: the one `ray start` runs on this machine, else a Ray started
        for this executor) unless this process is connected already; the nodes with a CPU that are alive now are the
        ones phones go to."""
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            _check_loopback_stays_local()
            if address is not None:
                _check_reachable(address)
            try:
                ray.init(address=address)
            except ConnectionError as error:
                # Ray says why deep in the chained exceptions; the usual reason is a token this machine lacks.
                token = "AuthToken" in str(error.__cause__ or error.__context__)
                raise UserFacingError(f"{error}" + (": the cluster uses token authentication; set RAY_AUTH_MODE=token "
                                                    "and its token (RAY_AUTH_TOKEN, or the file ~/.ray/auth_token) "
                                                    "here too" if token else "")) from None
        self._cpus = {node["NodeID"]: int(node["Resources"]["CPU"]) for node in ray.nodes()
                      if node["Alive"] and node["Resources"].get("CPU", 0) >= 1}
        if not self._cpus:
            raise UserFacingError("the Ray cluster has no node with a CPU to train phones on")
        # ray.remote made _NodeStore an actor class, whose .options mypy cannot see.
        self._stores = {node: _NodeStore.options(scheduling_strategy=_pinned(node)).remote()  # type: ignore[attr-defined]
                        for node in self._cpus}
        self._node_of: dict[str, str] = {}
        self._phones_on: Counter[str] = Counter()
        self._folders: dict[str, ray.ObjectRef] = {}  # phone id -> its folder on its node, once copied there
        self._tokenizer_json = ray.put(tokenizer.to_json())
        self._models: list[tuple[bytes, ray.ObjectRef]] = []
        self._running: dict[ray.ObjectRef, None] = {}

    def submit(self, job: TrainingJob) -> Future[tuple[LocalWork, float]]:
        """A future of (LocalWork, wall seconds the phone spent on it)."""
        phone = job.phone
        node = self._node_for(phone.phone_id)
        folder = self._folders.get(phone.phone_id)
        if folder is None:
            # The task below takes this reference as an argument, so Ray starts it only once the copy is in place.
            folder = self._stores[node].place.remote(phone.history_path.parent.name, phone.history_path.read_bytes())
            self._folders[phone.phone_id] = folder
        task = _train_on_node.options(scheduling_strategy=_pinned(node)).remote(
            node, self._tokenizer_json, folder, self._model_ref(job.model), job.without_model())
        self._running[task] = None
        future = task.future()
        future.add_done_callback(lambda _: self._running.pop(task, None))
        return future

    def use_tokenizer(self, tokenizer: KeyboardTokenizer) -> None:
        self._tokenizer_json = ray.put(tokenizer.to_json())  # each task takes the one of its submission

    def phones_by_node(self) -> dict[str, list[Path]]:
        """Each node's id and the phone folders on it, as the nodes themselves list them."""
        return dict(ray.get([store.phones.remote() for store in self._stores.values()]))

    def close(self) -> None:
        """Stop now: cancel the jobs still queued or running, delete the phones' copies on the nodes, and leave Ray
        (stopping it if this executor started it; a cluster started with `ray start` runs on)."""
        # A job only reads its phone's history and computes: killed, it leaves nothing half-written.
        for job in list(self._running):
            ray.cancel(job, force=True)
        try:
            ray.get([store.remove.remote() for store in self._stores.values()], timeout=60)
        finally:
            for store in self._stores.values():
                ray.kill(store)
            if self._owns_ray:
                ray.shutdown()

    def _node_for(self, phone_id: str) -> str:
        node = self._node_of.get(phone_id)
        if node is None:
            node = min(self._cpus, key=lambda n: (self._phones_on[n] / self._cpus[n], n))
            self._node_of[phone_id] = node
            self._phones_on[node] += 1
        return node

    def _model_ref(self, model: bytes) -> ray.ObjectRef:
        """The model in the object store, put there once per download: the fleet hands every phone of a round the
        same bytes, and 130 phones each shipping 5 MB would be 650 MB through this process."""
        for held, ref in self._models:
            if held is model or held == model:
                return ref
        ref = ray.put(model)
        self._models = [(model, ref), *self._models][:MODELS_KEPT]
        return ref


def _check_loopback_stays_local() -> None:
    """Refuse to start or join Ray when a Ray on this machine would listen beyond loopback: Ray was imported before
    this module, or the variable that keeps a node on 127.0.0.1 was set otherwise."""
    if not ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
        raise UserFacingError(f"a Ray on this machine would listen on its network address ({LOOPBACK_ONLY_ENV} is "
                              f"{os.environ[LOOPBACK_ONLY_ENV]!r}, or Ray was imported before "
                              f"device_sim.ray_executor); set {LOOPBACK_ONLY_ENV}=0 before Python starts")


def _check_reachable(address: str) -> None:
    """Refuse a head that does not answer: ray.init retries an address that nobody listens on for many minutes,
    printing only warnings."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # "auto", a ray:// client address, or something else Ray reads by its own rules
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise UserFacingError(f"cannot reach the Ray head at {address} ({error}); start one with "
                              "`ray start --head` and pass the address it prints") from None


def _pinned(node: str) -> NodeAffinitySchedulingStrategy:
    # Not soft: a phone's job on another node would not find its history there.
    return NodeAffinitySchedulingStrategy(node_id=node, soft=False)


@ray.remote(num_cpus=0)
class _NodeStore:
    """The phones' folders on one node: a temporary folder of this executor's, removed when it closes. It takes no
    CPU, so that every CPU of the node trains phones."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="fedkb-phones-"))

    def place(self, name: str, history: bytes) -> str:
        folder = self.root / name
        folder.mkdir(exist_ok=True)
        write_atomically(folder / "history.sqlite", history)
        return str(folder)

    def phones(self) -> tuple[str, list[Path]]:
        return ray.get_runtime_context().get_node_id(), sorted(self.root.iterdir())

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@ray.remote(num_cpus=1)
def _train_on_node(node: str, tokenizer_json: str, folder: str, model: bytes,
                   job: TrainingJob) -> tuple[LocalWork, float]:
    """`job` on its phone's node, reading the node's copy of its history."""
    here = ray.get_runtime_context().get_node_id()
    if here != node:  # the scheduling strategy says it cannot happen; a phone trained elsewhere would be no test
        raise RuntimeError(f"phone {job.phone.phone_id} lives on node {node} but its job ran on {here}")
    # One thread per phone and one phone per CPU, as the local pool's workers (benchmarks/train_speed.py).
    torch.set_num_threads(1)
    return run_in_worker(tokenizer_json, replace(job, phone=Phone(job.phone.phone_id, Path(folder)), model=model))
