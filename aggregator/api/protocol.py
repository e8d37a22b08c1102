"""What a phone, the fleet or the web demo may ask of an aggregator, however it is reached."""

from __future__ import annotations

from typing import Protocol

from aggregator.api.schemas import (
    AbortResponse,
    CheckinResponse,
    EnrolmentResponse,
    EvaluationReport,
    EvaluationResponse,
    RoundSummary,
    SecAggConfirm,
    SecAggKeys,
    SecAggReveal,
    SecAggShares,
    SecAggState,
    StatusResponse,
    UploadResponse,
    Vote,
)

# Credentials travel in the environment, never on a command line, which every user of the machine can read: the
# operator's token (it alone may set a simulated clock) and the secret that enrols devices from untrusted networks.
OPERATOR_TOKEN_ENV = "FEDKB_OPERATOR_TOKEN"
ENROLMENT_SECRET_ENV = "FEDKB_ENROLMENT_SECRET"


class Aggregator(Protocol):
    """An aggregator's answers; a refusal raises `AggregatorRefusedError` with the HTTP status it stands for."""

    url: str

    def status(self, recent: int = 20) -> StatusResponse: ...

    def enrol(self) -> EnrolmentResponse: ...

    def checkin(self, device_token: str) -> CheckinResponse: ...

    def model(self, encoding: str = "float32") -> bytes:
        """The current model, as "float32" or "int8" (the smaller download a check-in may ask for): what phones
        train from."""

    def served_model(self) -> bytes:
        """What keyboards should suggest with: the average of the recent models (`--serving-average`), in float32."""

    def model_version(self, version: int) -> bytes: ...

    def tokenizer_json(self) -> str: ...

    def upload(self, round_number: int, upload_token: str, update: bytes) -> UploadResponse: ...

    def vote(self, round_number: int, upload_token: str, vote: Vote) -> UploadResponse:
        """A discovery round's answer (aggregator/discovery.py)."""

    def report_evaluation(self, round_number: int, upload_token: str,
                          report: EvaluationReport) -> EvaluationResponse: ...

    def secagg_state(self, round_number: int, upload_token: str) -> SecAggState: ...

    def secagg_keys(self, round_number: int, upload_token: str, keys: SecAggKeys) -> None: ...

    def secagg_shares(self, round_number: int, upload_token: str, shares: SecAggShares) -> None: ...

    def secagg_confirm(self, round_number: int, upload_token: str, confirm: SecAggConfirm) -> None: ...

    def secagg_reveal(self, round_number: int, upload_token: str, reveal: SecAggReveal) -> None: ...

    def set_clock(self, now_s: float) -> None: ...

    def audit(self) -> RoundSummary:
        """The operator's: audit the current model with the canary clients now (aggregator/canary_clients.py); the
        record of the round that made it, with the audit added."""

    def abort(self, round_number: int, upload_token: str) -> AbortResponse: ...

    def close(self) -> None: ...
