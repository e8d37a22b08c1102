"""The fleet: provisioning phones from a corpus, and driving them through rounds.

Simulated time advances in ticks (`device_sim/eligibility.py`). At every tick the
phones that are eligible (idle, charging, unmetered: mostly at night, local time)
and due (pace steering told them when to come back) check in. The selected ones:
- may vanish (network loss): they are never heard from again;
- train for a simulated time that depends on their speed and history; a phone whose
  conditions change during that time aborts and tells the aggregator so;
- score the model they downloaded on their held-out messages (federated evaluation) and
  send those counts and their update in the order they would finish; those after the
  round closed are late. A phone whose local training diverged sends neither and aborts
  (device_sim/phone.py).
In a discovery round (aggregator/discovery.py) a selected phone votes at once, from its own
history (device_sim/word_votes.py), and trains nothing; when a discovery grows the vocabulary, the
fleet takes the aggregator's new tokenizer before the next round, and so do its executor's phones.
In a round with secure aggregation, a selected phone first sends its keys and, once the
cohort is fixed, its sealed shares; it trains when the round starts collecting masked
inputs, signs the survivor set when collection closes, and reveals its shares when
unmasking starts. A phone that vanishes may then do so at any of these steps. The phones'
identity keys are registered in a directory beside their folders (`Phone.identity_directory`),
which the aggregator never sees.
Phones really train, on the executor the fleet is given (`device_sim/executor.py`; by
default one single-threaded worker process per core); every request to the aggregator
goes through the client, over HTTP in service mode or by function call in in-process
mode, from this process.

The fleet is pipelined: a selected phone's training is queued as soon as it reaches the
step (right after its check-in in a plain round), and the fleet keeps the executor fed
with the queued phones whose training ends soonest, a few more than it has workers, so
the workers train while this process checks phones in, downloads and uploads. It never
computes what it would throw away: a phone that vanishes or aborts is only timed; a
round's phones are handed over only while fewer than its goal are promised (handed over
and not failed), since one beyond the goal would finish after the round closed; and when
a round closes, its phones still queued are dropped: each then learns at its tick that
it is late, as one that trained would, without its training being computed.
Uploads still reach the aggregator in simulated-time order, whatever order the workers
finish in, so a run's model depends on its seeds, not on the executor.

The simulator also plays the researcher: it can read every phone's held-out messages
to score a model centrally, which no real deployment could; those scores never go to
the aggregator, and they cross-check the federated evaluation.
"""

from __future__ import annotations

import heapq
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from aggregator.api.client import AggregatorRefusedError
from aggregator.api.protocol import Aggregator
from aggregator.api.schemas import CheckinResponse
from device_sim.corpus import PreparedCorpus
from device_sim.eligibility import EligibilityConfig, SimulatedClock
from device_sim.executor import LocalProcessPool
from device_sim.executors import TrainingExecutor
from device_sim.history import split_held_out
from device_sim.participation import SECURE_STEPS, Participant
from device_sim.phone import Phone
from device_sim.session import Clipping, LocalWork
from device_sim.word_votes import cast_vote
from device_sim.worker import TrainingJob
from keyboard_model.architecture import NextWordModel
from keyboard_model.errors import UserFacingError
from keyboard_model.evaluate import EvalCounts, evaluate
from keyboard_model.files import write_atomically
from keyboard_model.personal import PersonalConfig
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.train import LocalTrainConfig, TrainResult

FLEET_MANIFEST = "fleet.json"
# A phone that lost its network checks in again this many ticks later.
VANISHED_TICKS = 36
# What became of a selected phone that leaves its round for good (a vanished phone may have reported first).
DROPPED_OUT = ("vanished", "aborted", "diverged", "refused")
# Phones handed to an executor with a known number of workers beyond one each: the one a worker takes when it is done
# while this process is busy checking phones in or uploading. More would be trained in vain when their round closes.
QUEUED_AHEAD = 1
# What a phone whose training was never computed (its round closed first) sends: no update, nothing trained.
_UNTRAINED = LocalWork(TrainResult(mean_loss=math.nan, num_examples=0), upload=b"")


class FleetError(UserFacingError):
    """The fleet cannot run as configured; the message says why."""


@dataclass(frozen=True)
class FleetConfig:
    phones_dir: Path
    # None provisions a phone for every user of the corpus; more phones than users reuse users' histories.
    num_phones: int | None = None
    train: LocalTrainConfig = field(default_factory=LocalTrainConfig)
    eligibility: EligibilityConfig = field(default_factory=EligibilityConfig)
    # How updates travel: "int8" (a quarter of the bytes, unbiased rounding) or "none" (float32).
    update_compression: str = "int8"
    # Phones' own simulated training time per message at speed 1 (a phone's speed factor multiplies it).
    minutes_per_message: float = 0.05
    # Chance that a selected phone loses its network during the round and is never heard from again.
    vanish_probability: float = 0.03
    # Training messages are typed over this many simulated days: half before the simulation starts, the
    # rest evenly after, so histories grow as the days pass.
    typing_days: float = 7.0
    # Worker processes that train phones side by side, one thread each (None: one per core).
    workers: int | None = None
    # Phones whose held-out messages score the model after every round (all of them at the end).
    eval_phones: int = 32
    # Simulated ticks to wait for a round to fill before giving up.
    max_ticks_per_round: int = 1_000
    # Phones keep a personal model, refreshed in the rounds they are asked to score (None: they keep none).
    personal: PersonalConfig | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_phones is not None and self.num_phones < 1:
            raise ValueError("num_phones must be at least 1")
        if self.eval_phones < 1:
            raise ValueError("eval_phones must be at least 1")
        if not 0.0 <= self.vanish_probability < 1.0:
            raise ValueError(f"vanish_probability must be in [0, 1), got {self.vanish_probability}")
        if self.minutes_per_message < 0 or self.typing_days < 0:
            raise ValueError("minutes_per_message and typing_days must not be negative")
        if self.workers is not None and self.workers < 1:
            raise ValueError("workers must be at least 1")


def provision(
    corpus: PreparedCorpus, phones_dir: Path, num_phones: int | None, seed: int, typing_days: float = 7.0, log=print
) -> list[Phone]:
    """Give each chosen user a phone folder with its history.sqlite; reuse a matching earlier fleet.

    Phones get opaque ids (phone-00000): the aggregator never learns whose phone it is.
    """
    users = corpus.users()
    chosen = sorted(users)
    if num_phones is not None and num_phones <= len(chosen):
        chosen = sorted(random.Random(seed).sample(chosen, num_phones))
    elif num_phones is not None:
        chosen = [chosen[k % len(chosen)] for k in range(num_phones)]
    wanted = {"corpus_sha256": corpus.manifest["sha256"]["messages.jsonl"], "users": chosen,
              "typing_days": typing_days}
    manifest_path = phones_dir / FLEET_MANIFEST
    if manifest_path.exists():
        existing = json.loads(manifest_path.read_text())
        if {k: existing.get(k) for k in wanted} == wanted:
            return [Phone(pid, phones_dir / pid) for pid in existing["phone_ids"]]
        raise FleetError(f"{phones_dir} holds a different fleet; choose another --out or delete it")
    phones_dir.mkdir(parents=True, exist_ok=True)
    replicas = f": phone k replays the history of user k mod {len(users)}" if len(chosen) > len(users) else ""
    log(f"provisioning {len(chosen)} phones in {phones_dir}{replicas}")
    phone_ids = [f"phone-{index:05d}" for index in range(len(chosen))]
    for phone_id, user in zip(phone_ids, chosen):
        Phone.create(phone_id, phones_dir / phone_id, typing_times([m.text for m in users[user]], typing_days))
    # Written last: a fleet without its manifest was interrupted and is provisioned again.
    write_atomically(manifest_path, json.dumps({**wanted, "phone_ids": phone_ids}, indent=1).encode())
    return [Phone(pid, phones_dir / pid) for pid in phone_ids]


def typing_times(texts: Sequence[str], typing_days: float) -> list[tuple[float, str]]:
    """(simulated second when typed, text) for a user's messages, oldest first.

    The older half of the training messages was typed before the simulation starts
    (time 0); the rest arrive evenly over `typing_days`; the held-out newest 20% come
    last, so they stay the newest and are never trained on.
    """
    train, held_out = split_held_out(list(texts))
    before = len(train) // 2
    later = len(train) - before
    span = typing_days * 86_400.0
    times = [0.0] * before + [span * (i + 1) / later for i in range(later)]
    times += [span + i + 1 for i in range(len(held_out))]
    return list(zip(times, [*train, *held_out]))


def provisioned_phones(phones_dir: Path) -> list[Phone]:
    """The phones of a fleet `provision` made earlier, as listed in its manifest."""
    manifest = json.loads((phones_dir / FLEET_MANIFEST).read_text())
    return [Phone(pid, phones_dir / pid) for pid in manifest["phone_ids"]]


@dataclass(frozen=True)
class Participation:
    """What became of one selected phone, seen from the simulator."""

    phone_id: str
    round: int  # the round it was selected for
    # "reported", "late", "refused" (the aggregator refused the update), "aborted", "diverged" (training blew up; it
    # aborted), "vanished", or "voted" (a discovery round's)
    outcome: str
    # Simulated ticks: when it was selected, and when it uploaded or aborted (or vanished).
    selected_tick: int
    done_tick: int
    result: TrainResult | None = None  # None if it never finished training
    upload_bytes: int = 0
    training_s: float = 0.0  # wall seconds of its local work (evaluation and training)
    scored: bool = False  # whether its local work scored the model it downloaded (the aggregator asked it to)


@dataclass
class _Selected:
    """A selected phone between its steps (device_sim/participation.py), as the simulator sees it."""

    participant: Participant
    selected_tick: int
    seed: int
    vanish_at: str | None  # the step at which it loses its network, if it does


@dataclass
class _Job:
    """A selected phone's local work: queued in the fleet (no `future` yet), then on the executor. `dropped` when its
    round closed before it was handed over: it is never computed."""

    round: int
    work: TrainingJob
    future: Future | None = None
    dropped: bool = False


@dataclass
class _Event:
    """A selected phone's training ends at simulated `tick`: it sends the result of `job`, or aborts if it has none."""

    tick: int
    selected: _Selected
    job: _Job | None


@dataclass(frozen=True)
class RoundReport:
    round: int
    participations: list[Participation]
    # Simulated ticks the round was open.
    ticks: int
    eligible_at_start: int
    # When the round began, in simulated time.
    day: int
    hour_utc: float
    # Wall seconds the phones spent on local work (evaluation and training), summed over phones.
    training_s: float
    # Check-ins the aggregator answered while the round was open.
    checkins: int
    # The round's phones still in it when it ended: selected (as far as the fleet learnt), less those that vanished,
    # aborted, diverged or had their update refused by then. A secure round needs its threshold of them.
    survived: int
    # Where this process's wall time went while the round was open (the simulator waits on one thing at a time, so
    # this is the round's critical path): seconds by activity (ACTIVITIES), the rest under "other".
    wall_s: dict[str, float] = field(default_factory=dict)

    @property
    def participants(self) -> list[Participation]:
        """The phones whose update was counted in this round."""
        return [p for p in self.participations if p.outcome == "reported" and p.round == self.round]

    def count(self, outcome: str) -> int:
        return sum(p.outcome == outcome for p in self.participations)

    @property
    def train_loss(self) -> float:
        losses = [p.result.mean_loss for p in self.participants]
        return sum(losses) / len(losses) if losses else float("nan")


# What a round's wall time is spent on: checking phones in; downloading the model; waiting for the phones' local work
# (evaluation and training, masking in a secure round); uploads, with the aggregator's decoding and summing of
# each; a secure round's other steps (keys, sealed shares, revealed shares); and the aggregator's clock ticks, in
# which it closes phases and rounds (unmasking the sum, stepping the model) when their deadlines pass.
ACTIVITIES = ("check-ins", "downloads", "training", "uploads", "secure steps", "clock ticks")


class Fleet:
    """Phones, their simulated conditions, and the aggregator they talk to."""

    def __init__(self, phones: Sequence[Phone], config: FleetConfig, client: Aggregator,
                 executor: TrainingExecutor | None = None,
                 participant: Callable[[Phone, Aggregator, CheckinResponse], Participant] = Participant) -> None:
        """`executor` runs the phones' local work (default: a local process pool of `config.workers`);
        `participant` makes a selected phone's part in its round (a benchmark may plant phones that lie)."""
        # A phone with nothing to train on never checks in: selected, it would hold a place it cannot fill.
        self.phones = [phone for phone in phones if phone.can_train()]
        if not self.phones:
            raise FleetError("no phone has any message to train on")
        self.config = config
        self.client = client
        self.clock = SimulatedClock(config.eligibility)
        self.tokenizer = KeyboardTokenizer.from_json(client.tokenizer_json())
        self._rng = random.Random(config.seed)
        self._due_tick: dict[str, float] = {phone.phone_id: 0 for phone in self.phones}
        self._pending: list[_Event] = []
        self._selected: dict[str, _Selected] = {}
        self._ids = [phone.phone_id for phone in self.phones]
        self._train = config.train  # what phones selected in the open round train with
        self._wall: Counter[str] = Counter()  # the open round's wall seconds by activity
        # An aggregator on the wall clock (one started without --simulated-clock) is left to it: its deadlines
        # are then real seconds, which a simulation passes through much faster than simulated hours.
        self._drives_clock = client.status().clock == "simulated"
        self.executor = executor or LocalProcessPool(self.tokenizer, config.workers)
        self._participant = participant
        # Jobs not yet handed to the executor, soonest simulated finish first (ties: in the order they were queued).
        self._queued: list[tuple[int, int, _Job]] = []
        self._queued_count = 0
        self._in_flight: set[Future] = set()  # handed over, not done
        # The open round's goal, and its phones whose work was handed over less those that then failed to report:
        # work handed over beyond the goal would finish after the round closed, and be thrown away.
        self._goal = 0
        self._promised: Counter[int] = Counter()
        # An executor that says how many phones it trains at once gets that many and QUEUED_AHEAD more; one that
        # does not (the vectorised cohort trains whatever is queued when a result is asked for) gets each at once.
        workers = getattr(self.executor, "workers", None)
        self._ahead = None if workers is None else workers + QUEUED_AHEAD

    @property
    def now_s(self) -> float:
        """Simulated seconds since the simulation started."""
        return self.clock.tick * self.config.eligibility.tick_minutes * 60.0

    def run_round(self, learning_rate: float | None = None) -> RoundReport:
        """Advance simulated time, tick by tick, until the open round closes; phones selected now train at
        `learning_rate` (default: the fleet's).

        At each tick, first the phones whose training has finished by now upload (or
        say they aborted), in the order they finished; then the eligible phones that
        are due check in, each selected one starting to train as it is drawn. A phone
        still training when its round closes uploads later and is told it is late; one
        whose training had not started by then is told so without training.
        """
        round_started, self._wall = time.perf_counter(), Counter()
        status, started_tick = self.client.status(recent=0), self.clock.tick + 1
        round_number, self._goal = status.round, status.goal
        self._train = self.config.train if learning_rate is None else replace(self.config.train,
                                                                              learning_rate=learning_rate)
        outcomes: list[Participation] = []
        eligible_at_start, training_s, checkins, selected = None, 0.0, 0, 0
        for _ in range(self.config.max_ticks_per_round):
            self.clock.advance()
            if self._drives_clock:  # the aggregator's deadlines and pace steering follow simulated time
                with self._timed("clock ticks"):
                    self.client.set_clock(self.now_s)
            due_now = sorted((e for e in self._pending if e.tick <= self.clock.tick), key=lambda e: e.tick)
            self._pending = [e for e in self._pending if e.tick > self.clock.tick]
            for event in due_now:
                outcome = self._finish(event)
                training_s += outcome.training_s
                outcomes.append(outcome)
            if self.client.status().round != round_number:
                self._drop_queued(round_number)
                break
            eligible = [phone for phone, ok in zip(self.phones, self.clock.eligible(self._ids)) if ok]
            eligible_at_start = len(eligible) if eligible_at_start is None else eligible_at_start
            due = [phone for phone in eligible if self._due_tick[phone.phone_id] <= self.clock.tick]
            drawn, vanished = self._check_in(due)
            selected += drawn
            outcomes += vanished + self._advance()
            checkins += len(due)
        else:
            raise FleetError(
                f"round {round_number} did not close within {self.config.max_ticks_per_round} simulated ticks: "
                f"too few eligible phones for the aggregator's goal of {self.client.status().goal} updates"
            )
        wall = dict(self._wall)
        wall["other"] = time.perf_counter() - round_started - sum(wall.values())
        gone = sum(p.round == round_number and p.outcome in DROPPED_OUT for p in outcomes)
        return RoundReport(round_number, outcomes, self.clock.tick - started_tick + 1, eligible_at_start or 0,
                           self.clock.day(started_tick), self.clock.hour_utc(started_tick), training_s, checkins,
                           selected - gone, wall)

    @contextmanager
    def _timed(self, activity: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._wall[activity] += time.perf_counter() - started

    def _check_in(self, due: list[Phone]) -> tuple[int, list[Participation]]:
        """Let these phones check in; each selected one takes its first step at once (a plain round's phone starts
        training, so the workers train while the others check in; a discovery round's votes). Returns how many were
        selected to train, and the participations of those that vanished or voted."""
        self._rng.shuffle(due)
        selected, vanished, voters = 0, [], []
        tick_minutes = self.config.eligibility.tick_minutes
        for phone in due:
            self._feed()  # a worker that finished meanwhile takes the next phone
            with self._timed("check-ins"):
                decision = phone.check_in(self.client)
            if decision.vocab_size is not None and decision.vocab_size != self.tokenizer.vocab_size:
                self.use_tokenizer(KeyboardTokenizer.from_json(self.client.tokenizer_json()))
            if decision.action == "vote":
                voted, round_over = self._vote(phone, decision)
                voters.append(voted)
                if round_over:
                    break  # the round has closed: the others check in at the next tick, in the next round
                continue
            if decision.action != "train":
                wait_ticks = math.ceil(decision.retry_after_s / 60.0 / tick_minutes)
                self._due_tick[phone.phone_id] = self.clock.tick + max(1, wait_ticks)
                continue
            # Until it has reported, a selected phone does not check in again.
            self._due_tick[phone.phone_id] = math.inf
            seed = self._rng.randrange(2**31)
            vanishes = self._rng.random() < self.config.vanish_probability
            # A phone of a secure round can vanish at any of its steps; of a plain round, before it trains (it never
            # uploads, just as if it vanished while training).
            vanish_at = None
            if vanishes:
                vanish_at = self._rng.choice(SECURE_STEPS) if decision.secure_aggregation else "train"
            drawn = self._selected[phone.phone_id] = _Selected(self._participant(phone, self.client, decision),
                                                               self.clock.tick, seed, vanish_at)
            selected += 1
            self._take_next_step(drawn, vanished)
        return selected, vanished + voters

    def _vote(self, phone: Phone, decision: CheckinResponse) -> tuple[Participation, bool]:
        """A phone selected for a discovery round votes at once, from the messages it has typed by now; it comes back
        at the next tick, for the next round. Returns what became of it, and whether its round is over (its vote
        closed it, or came after it closed)."""
        assert decision.discovery is not None and decision.upload_token is not None  # a vote's check-in has both
        with self._timed("uploads"):  # a vote is its upload
            ballot = cast_vote(phone.messages(self.now_s)[0], self.tokenizer, decision.discovery,
                               self._rng.randrange(2**31))
            try:
                outcome, round_over = "voted", self.client.vote(decision.round, decision.upload_token,
                                                                 ballot).round_closed
            except AggregatorRefusedError as refused:
                if refused.status_code != 409:  # an honest phone's vote is refused only when the round has closed
                    raise
                outcome, round_over = "late", True
        self._due_tick[phone.phone_id] = self.clock.tick + 1
        return Participation(phone.phone_id, decision.round, outcome, self.clock.tick, self.clock.tick), round_over

    def use_tokenizer(self, tokenizer: KeyboardTokenizer) -> None:
        """The model's vocabulary grew: phones vote and train with this tokenizer from now on."""
        self.tokenizer = tokenizer
        self.executor.use_tokenizer(tokenizer)

    def _advance(self) -> list[Participation]:
        """Let the selected phones take the steps their rounds now allow. Returns the ones that vanished."""
        vanished: list[Participation] = []
        progress = True
        while progress:  # one step can open the next phase, as the last share does
            progress = False
            for selected in list(self._selected.values()):
                progress = self._take_next_step(selected, vanished) or progress
        return vanished

    def _take_next_step(self, selected: _Selected, vanished: list[Participation]) -> bool:
        """Let a selected phone take the step its round now allows, if any (adding it to `vanished` if it vanishes
        then). Returns whether it took one."""
        step = selected.participant.next_step()
        if step == "over":
            del self._selected[selected.participant.phone.phone_id]  # nothing left for it to do in this round
        if step in (None, "over"):
            return False
        if step == selected.vanish_at:
            vanished.append(self._vanish(selected))
        elif step == "train":
            self._start_training(selected)
        else:
            with self._timed("secure steps"):
                selected.participant.take(step)
        return True

    def _vanish(self, selected: _Selected) -> Participation:
        """The phone loses its network. One that vanishes while unmasking has already been counted as reported;
        it appears a second time, as vanished."""
        phone_id = selected.participant.phone.phone_id
        self._due_tick[phone_id] = self.clock.tick + VANISHED_TICKS
        del self._selected[phone_id]
        return Participation(phone_id, selected.participant.round, "vanished", selected.selected_tick,
                             self.clock.tick)

    def _start_training(self, selected: _Selected) -> None:
        """The phone trains for a simulated time that depends on its speed and history, unless its conditions
        change before it is done: then it aborts at that tick."""
        participant, phone = selected.participant, selected.participant.phone
        secure = participant.training()
        tick_minutes = self.config.eligibility.tick_minutes
        typed = len(phone.messages(self.now_s)[0][-self._train.max_messages :])
        minutes = self.config.minutes_per_message * typed * self.clock.profile(phone.phone_id).speed
        finish = self.clock.tick + max(1, math.ceil(minutes / tick_minutes))
        window = range(self.clock.tick + 1, finish + 1)
        interrupted = next((t for t in window if not self.clock.conditions(phone.phone_id, t).eligible), None)
        if interrupted is not None:
            self._pending.append(_Event(interrupted, selected, None))
            return
        # The phone downloads the model it was selected to train, as the aggregator said (int8 or float32).
        with self._timed("downloads"):
            model = self.client.model(participant.decision.model_encoding)
        job = _Job(participant.round, TrainingJob(phone, model, self._train, selected.seed,
                                                  self.config.update_compression, self.now_s,
                                                  Clipping.asked(participant.decision), secure,
                                                  evaluate=participant.decision.evaluate,
                                                  personal=self.config.personal))
        heapq.heappush(self._queued, (finish, self._queued_count, job))
        self._queued_count += 1
        self._pending.append(_Event(finish, selected, job))
        self._feed()

    def _feed(self) -> None:
        """Hand the executor the queued jobs that finish soonest, while it has fewer than `self._ahead` and their
        round has been promised fewer updates than its goal. A job held back runs when its phone's training time is
        up (`_work`) if its round is still open then: one promised before it failed, or finishes later than it."""
        self._in_flight = {future for future in self._in_flight if not future.done()}
        while self._queued and (self._ahead is None or len(self._in_flight) < self._ahead):
            if self._promised[self._queued[0][2].round] >= self._goal:
                return
            self._hand_over(heapq.heappop(self._queued)[2])

    def _hand_over(self, job: _Job) -> None:
        job.future = self.executor.submit(job.work)
        self._in_flight.add(job.future)
        self._promised[job.round] += 1

    def _drop_queued(self, round_number: int) -> None:
        """The round closed: its phones still queued would upload late, so their work is never computed."""
        for _, _, job in self._queued:
            job.dropped = job.dropped or job.round == round_number
        self._queued = [entry for entry in self._queued if not entry[2].dropped]
        heapq.heapify(self._queued)

    def _work(self, job: _Job) -> tuple[LocalWork, float] | None:
        """The job's (LocalWork, wall seconds), once done; None if its round closed before it was handed over.

        A job whose turn came before a worker took it is handed over now, unless its round closed meanwhile (an
        upload of this tick closed it). While it trains, the workers that finish are given the next jobs."""
        self._feed()
        if job.future is None and not job.dropped:
            if self.client.status(recent=0).round != job.round:
                self._drop_queued(job.round)
            else:
                self._queued = [entry for entry in self._queued if entry[2] is not job]
                heapq.heapify(self._queued)
                self._hand_over(job)
        if job.dropped:
            return None
        while self._ahead is not None and not job.future.done():
            wait(self._in_flight | {job.future}, return_when=FIRST_COMPLETED)
            self._feed()
        return job.future.result()

    def _finish(self, event: _Event) -> Participation:
        """A selected phone's training ends: it uploads, or, if its conditions changed or its training diverged,
        says it aborted."""
        participant = event.selected.participant
        ticks = (event.selected.selected_tick, event.tick)
        self._due_tick[participant.phone.phone_id] = self.clock.tick + 1
        if event.job is None:
            participant.abort()
            return Participation(participant.phone.phone_id, participant.round, "aborted", *ticks)
        with self._timed("training"):
            done = self._work(event.job)
        if done is None:
            # The aggregator checks an upload's round before reading its body: this empty one is answered as the
            # late update would have been (refused, and the phone counted late). Its bytes are not counted.
            with self._timed("uploads"):
                outcome = participant.send(_UNTRAINED)
            return Participation(participant.phone.phone_id, participant.round, outcome, *ticks)
        work, seconds = done
        with self._timed("uploads"):
            outcome = participant.send(work)
            if outcome == "reported" and self.client.status(recent=0).round != participant.round:
                self._drop_queued(participant.round)  # this upload closed the round
        if outcome != "reported":
            self._promised[participant.round] -= 1  # another queued phone may take its place
        return Participation(participant.phone.phone_id, participant.round, outcome, *ticks, work.result,
                             len(work.upload or b""), seconds, participant.decision.evaluate)

    def close(self) -> None:
        self._queued = []
        self.executor.close()


def evaluate_phones(model: NextWordModel, tokenizer: KeyboardTokenizer, phones: Sequence[Phone]) -> EvalCounts:
    """Score a model on the held-out messages of `phones` (the researcher's view)."""
    held_out = [message for phone in phones for message in phone.held_out(tokenizer)]
    return evaluate(model, tokenizer, held_out)

