"""One selected phone's part in one round: what it sends, in the order the round allows.

Every phone takes the same steps, the simulated fleet's (device_sim/fleet.py) and "this
browser is a phone" (web_demo/browser_phone.py) alike:
- in a plain round, "train" (its local work, device_sim/session.py), then send the
  evaluation and the update, or abort;
- in a secure round (keyboard_model/secagg.py), "keys" at once; "share" once the
  cohort is fixed; "train" once the round collects masked inputs, the upload masked;
  "confirm" (sign the survivor set) once collection closes, if its input was counted;
  "reveal" once unmasking starts, if it confirmed. A phone whose checks of the server's
  messages fail (device_sim/secure_aggregation.py) stops there: to the round it is a
  phone that dropped out.
`next_step` says what the phone may do now (asking the aggregator where a secure round
is); the phone chooses when: the fleet on simulated ticks, with phones that lose their
network between steps; the browser phone at once (`run`). Training is the caller's,
because where it runs differs (a process pool, a thread): `training` marks it started
and gives what a secure round's masking needs, and `send` takes its result. A round
that ends under a phone (the aggregator answers 409, or 401 after a restart) ends its
part quietly: a real phone drops what it had then.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from aggregator.api.client import AggregatorRefusedError
from aggregator.api.protocol import Aggregator
from aggregator.api.schemas import CheckinResponse, SecAggState
from device_sim.phone import Phone
from device_sim.secure_aggregation import SecAggPhone
from device_sim.session import LocalWork
from keyboard_model.secagg import SecAggError

# Answers that mean a phone's round is over: closed (409), or forgotten by an aggregator that restarted (401).
GONE = (401, 409)
# Answers that refuse what a phone sent (an update over the aggregator's norm bound, one too large): its part in the
# round is over, as a real phone's would be, and the fleet goes on.
REFUSED = (413, 422)
SECURE_STEPS = ("keys", "share", "train", "confirm", "reveal")
# In a secure round, after each step: (the phase in which the phone waits, the phase of its next step, that step).
_AFTER = {"keys": ("advertise", "share", "share"), "share": ("share", "collect", "train"),
          "sent": ("collect", "confirm", "confirm"), "confirm": ("confirm", "unmask", "reveal")}


@dataclass
class Participant:
    phone: Phone
    client: Aggregator
    decision: CheckinResponse
    # The last step taken: "selected", "keys", "share", "train" (training now), "sent" (its update), "confirm",
    # "over".
    done: str = "selected"
    secagg: SecAggPhone | None = field(default=None, init=False)
    state: SecAggState | None = field(default=None, init=False)
    outcome: str | None = field(default=None, init=False)  # what became of its update: see `send`
    # why it stopped, if the server's messages failed a check
    secagg_error: str | None = field(default=None, init=False)
    work: LocalWork | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.decision.secure_aggregation:
            identity, directory, device_id = (self.phone.identity(), self.phone.identity_directory(),
                                              self.phone.device_id())
            directory.register(device_id, identity.public())  # the directory, not the aggregator, vouches for it
            self.secagg = SecAggPhone(self.decision.round, device_id, identity, directory)

    @property
    def round(self) -> int:
        return self.decision.round

    def next_step(self) -> str | None:
        """"keys", "share", "train" or "reveal"; None while the phone waits for the round; "over" when nothing is
        left for it to do."""
        if self.done in ("over", "train"):
            return None if self.done == "train" else "over"
        if self.secagg is None:
            return "train" if self.done == "selected" else "over"
        if self.done == "selected":
            return "keys"
        try:
            self.state = self.client.secagg_state(self.round, self.decision.upload_token)
        except AggregatorRefusedError as refused:
            return self._gone(refused)
        waiting, next_phase, step = _AFTER[self.done]
        if self.state.phase == waiting:
            return None
        if self.state.phase == next_phase and (step not in ("confirm", "reveal")
                                               or self.state.index in (self.state.reported or [])):
            return step
        # The round moved past this phone's next step (it missed sharing, or its input was not counted) or ended.
        self.done = "over"
        return "over"

    def take(self, step: str) -> None:
        """Send a message step: "keys", "share", "confirm" or "reveal"."""
        client, token, secagg = self.client, self.decision.upload_token, self.secagg
        try:
            if step == "keys":
                client.secagg_keys(self.round, token, secagg.keys_message())
            elif step == "share":
                client.secagg_shares(self.round, token, secagg.shares_message(self.state))
            elif step == "confirm":
                client.secagg_confirm(self.round, token, secagg.confirm_message(self.state))
            elif step == "reveal":
                client.secagg_reveal(self.round, token, secagg.reveal_message(self.state))
            else:
                raise ValueError(f"{step!r} is not a message step")
        except AggregatorRefusedError as refused:
            self._gone(refused)
            return
        except SecAggError as error:  # the server's messages failed this phone's checks: it stops, saying nothing
            self.secagg_error = str(error)
            self.done = "over"
            return
        self.done = "over" if step == "reveal" else step

    def training(self) -> tuple[SecAggPhone, SecAggState] | None:
        """Training starts; in a secure round, what masking its upload needs (this phone's part, the round's state)."""
        self.done = "train"
        return None if self.secagg is None else (self.secagg, self.state)

    def send(self, work: LocalWork) -> str:
        """Send what training gave; returns the outcome: "reported", "late" (the round closed first), "refused"
        (the aggregator refused the update) or "diverged" (training blew up: the phone aborted
        instead)."""
        self.work = work
        self.outcome = "reported" if work.upload is not None else "diverged"
        try:
            self.phone.send(self.client, self.round, self.decision.upload_token, work)
        except AggregatorRefusedError as refused:
            if refused.status_code in REFUSED:
                self.outcome = "refused"
            else:
                self._gone(refused)
                if self.outcome == "reported":
                    self.outcome = "late"
        if self.outcome != "reported":
            self.done = "over"
            return self.outcome
        # A secure round's phone reveals its shares when unmasking starts. (Its masking may have run elsewhere.)
        if self.secagg is not None:
            self.secagg.masked = True
        self.done = "sent"
        return self.outcome

    def abort(self) -> None:
        """Give up the round (conditions changed, or the phone was switched off): nothing of it is sent."""
        self.outcome = "aborted"
        try:
            self.client.abort(self.round, self.decision.upload_token)
        except AggregatorRefusedError as refused:
            self._gone(refused)
        self.done = "over"

    def run(self, local_work: Callable[[tuple[SecAggPhone, SecAggState] | None], LocalWork],
            wait: Callable[[float], bool], poll_s: float = 0.5) -> str | None:
        """Take every step as soon as the round allows, training with `local_work(secure)`. `wait(seconds)` pauses
        between looks at a secure round and says whether to go on; when it says no, the phone aborts. Returns the
        outcome (see `send`; "aborted"; None if the round moved on before it trained)."""
        while (step := self.next_step()) != "over":
            if step is None:
                if not wait(poll_s):
                    self.abort()
                continue
            if step != "train":
                self.take(step)
                continue
            work = local_work(self.training())
            if wait(0.0):
                self.send(work)
            else:  # stopped while training: nothing leaves
                self.abort()
        return self.outcome

    def _gone(self, refused: AggregatorRefusedError) -> str:
        if refused.status_code not in GONE:
            raise refused
        self.done = "over"
        return "over"
