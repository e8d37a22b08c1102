"""In-process mode: the fleet talks to the aggregator's own round manager by function call.

`InProcessClient` answers exactly like `AggregatorClient` (same methods, same response
models, same refusals with the same status codes), so the phones, the fleet and the
aggregation code are the ones service mode runs; only HTTP and the second process are
gone. Use it for fast research runs; use service mode to exercise the real service.
"""

from __future__ import annotations

from aggregator.api.client import AggregatorRefusedError
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
from aggregator.config import AggregatorConfig
from aggregator.refusals import UploadRefusedError
from aggregator.rounds import RoundManager
from aggregator.secure_round import dealing_of
from aggregator.storage import open_storage
from keyboard_model.secagg import PublicKeys, Share


class InProcessClient:
    def __init__(self, config: AggregatorConfig) -> None:
        self.url = f"in-process aggregator ({config.db_path})"
        self._storage = open_storage(config.db_path, config.keep_models, config.keep_every)
        self._rounds = RoundManager(config, self._storage)

    def status(self, recent: int = 20) -> StatusResponse:
        # No timer thread here: deadlines are checked whenever the fleet looks.
        self._rounds.tick()
        rounds = [RoundSummary(**row) for row in self._storage.recent_rounds(recent)]
        return StatusResponse(**self._rounds.snapshot(), recent_rounds=rounds)

    def enrol(self) -> EnrolmentResponse:
        device_id, device_token = self._rounds.enrol()
        return EnrolmentResponse(device_id=device_id, device_token=device_token)

    def checkin(self, device_token: str) -> CheckinResponse:
        device_id = _call(self._rounds.authenticate, device_token)
        return CheckinResponse(**self._rounds.checkin(device_id).__dict__)

    def model(self, encoding: str = "float32") -> bytes:
        return self._rounds.current_model(encoding)[1]

    def served_model(self) -> bytes:
        return self._rounds.served_model()[1]

    def model_version(self, version: int) -> bytes:
        data = self._storage.model(version)
        if data is None:
            raise AggregatorRefusedError(404, f"there is no model version {version}")
        return data

    def tokenizer_json(self) -> str:
        return self._rounds.tokenizer_json()

    def upload(self, round_number: int, upload_token: str, update: bytes) -> UploadResponse:
        _call(self._rounds.authorize, round_number, upload_token)
        return UploadResponse(**_call(self._rounds.submit, round_number, upload_token, update).__dict__)

    def vote(self, round_number: int, upload_token: str, vote: Vote) -> UploadResponse:
        return UploadResponse(**_call(self._rounds.submit_vote, round_number, upload_token, vote.prefix).__dict__)

    def report_evaluation(self, round_number: int, upload_token: str, report: EvaluationReport) -> EvaluationResponse:
        evaluations, duplicate = _call(self._rounds.submit_evaluation, round_number, upload_token, report)
        return EvaluationResponse(round=round_number, evaluations=evaluations, duplicate=duplicate)

    def secagg_state(self, round_number: int, upload_token: str) -> SecAggState:
        state = _call(self._rounds.secagg_state, round_number, upload_token)
        # Through JSON and back, as over HTTP, so both modes hand phones equal objects that share nothing.
        return SecAggState.model_validate_json(state.model_dump_json())

    def secagg_keys(self, round_number: int, upload_token: str, keys: SecAggKeys) -> None:
        _call(self._rounds.secagg_keys, round_number, upload_token, PublicKeys(keys.cipher, keys.masking),
              keys.signature)

    def secagg_shares(self, round_number: int, upload_token: str, shares: SecAggShares) -> None:
        _call(self._rounds.secagg_shares, round_number, upload_token, dealing_of(shares))

    def secagg_confirm(self, round_number: int, upload_token: str, confirm: SecAggConfirm) -> None:
        _call(self._rounds.secagg_confirm, round_number, upload_token, confirm.signature)

    def secagg_reveal(self, round_number: int, upload_token: str, reveal: SecAggReveal) -> None:
        revealed = {owner: Share(share.x, share.value) for owner, share in reveal.shares.items()}
        _call(self._rounds.secagg_reveal, round_number, upload_token, revealed)

    def set_clock(self, now_s: float) -> None:
        _call(self._rounds.set_simulated_time, now_s)

    def audit(self) -> RoundSummary:
        return RoundSummary(**_call(self._rounds.audit_now))

    def abort(self, round_number: int, upload_token: str) -> AbortResponse:
        return AbortResponse(round=round_number, aborted=_call(self._rounds.abort, round_number, upload_token))

    def close(self) -> None:
        self._storage.close()


def _call(method, *args):
    """Call the round manager, answering a refusal as the HTTP client would."""
    try:
        return method(*args)
    except UploadRefusedError as error:
        raise AggregatorRefusedError(error.status_code, str(error)) from error
