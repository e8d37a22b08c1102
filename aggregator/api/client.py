"""The HTTP client for the aggregator: what phones, the fleet and the web demo use to reach it."""

from __future__ import annotations

import httpx

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
from keyboard_model.errors import UserFacingError


class AggregatorUnavailableError(UserFacingError):
    """Nothing answers at the aggregator's address."""


class AggregatorRefusedError(UserFacingError):
    """The aggregator answered with an error; `status_code` and the message say why."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"the aggregator refused the request ({status_code}): {detail}")
        self.status_code = status_code
        self.detail = detail


class AggregatorClient:
    """`operator_token`: the credential of whoever started the aggregator, which setting its clock needs."""

    def __init__(self, url: str, timeout_s: float = 60.0, operator_token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)
        self._operator_token = operator_token

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise AggregatorUnavailableError(
                f"no aggregator is answering at {self.url} ({error.__class__.__name__}); "
                "start one with `fedkb aggregator`, or leave out --aggregator to start one automatically"
            ) from error
        if response.is_error:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise AggregatorRefusedError(response.status_code, str(detail))
        return response

    def status(self, recent: int = 20) -> StatusResponse:
        return StatusResponse.model_validate(self._request("GET", "/status", params={"recent": recent}).json())

    def enrol(self) -> EnrolmentResponse:
        return EnrolmentResponse.model_validate(self._request("POST", "/devices").json())

    def checkin(self, device_token: str) -> CheckinResponse:
        response = self._request("POST", "/checkin", headers={"Authorization": f"Bearer {device_token}"})
        return CheckinResponse.model_validate(response.json())

    def model(self, encoding: str = "float32") -> bytes:
        return self._request("GET", "/model", params={"encoding": encoding}).content

    def served_model(self) -> bytes:
        return self._request("GET", "/model/served").content

    def model_version(self, version: int) -> bytes:
        return self._request("GET", f"/models/{version}").content

    def tokenizer_json(self) -> str:
        return self._request("GET", "/tokenizer").text

    def upload(self, round_number: int, upload_token: str, update: bytes) -> UploadResponse:
        response = self._request(
            "POST", f"/rounds/{round_number}/updates", content=update,
            headers={"Authorization": f"Bearer {upload_token}", "Content-Type": "application/octet-stream"},
        )
        return UploadResponse.model_validate(response.json())

    def vote(self, round_number: int, upload_token: str, vote: Vote) -> UploadResponse:
        response = self._request("POST", f"/rounds/{round_number}/votes", content=vote.model_dump_json(),
                                 headers={**_bearer(upload_token), "Content-Type": "application/json"})
        return UploadResponse.model_validate(response.json())

    def report_evaluation(self, round_number: int, upload_token: str, report: EvaluationReport) -> EvaluationResponse:
        response = self._request(
            # A phone without a personal model sends the three counts alone, not two nulls beside them.
            "POST", f"/rounds/{round_number}/evaluations", content=report.model_dump_json(exclude_none=True),
            headers={"Authorization": f"Bearer {upload_token}", "Content-Type": "application/json"},
        )
        return EvaluationResponse.model_validate(response.json())

    def secagg_state(self, round_number: int, upload_token: str) -> SecAggState:
        response = self._request("GET", f"/rounds/{round_number}/secagg", headers=_bearer(upload_token))
        return SecAggState.model_validate(response.json())

    def secagg_keys(self, round_number: int, upload_token: str, keys: SecAggKeys) -> None:
        self._secagg_post(round_number, upload_token, "keys", keys)

    def secagg_shares(self, round_number: int, upload_token: str, shares: SecAggShares) -> None:
        self._secagg_post(round_number, upload_token, "shares", shares)

    def secagg_confirm(self, round_number: int, upload_token: str, confirm: SecAggConfirm) -> None:
        self._secagg_post(round_number, upload_token, "confirm", confirm)

    def secagg_reveal(self, round_number: int, upload_token: str, reveal: SecAggReveal) -> None:
        self._secagg_post(round_number, upload_token, "reveal", reveal)

    def _secagg_post(self, round_number: int, upload_token: str, what: str, body) -> None:
        self._request("POST", f"/rounds/{round_number}/secagg/{what}", content=body.model_dump_json(),
                      headers={**_bearer(upload_token), "Content-Type": "application/json"})

    def set_clock(self, now_s: float) -> None:
        self._request("PUT", "/clock", json={"now_s": now_s}, headers=self._operator("setting the aggregator's clock"))

    def audit(self) -> RoundSummary:
        response = self._request("POST", "/audit", headers=self._operator("an audit"))
        return RoundSummary.model_validate(response.json())

    def _operator(self, what: str) -> dict[str, str]:
        if self._operator_token is None:
            raise AggregatorRefusedError(401, f"{what} needs the operator's token (FEDKB_OPERATOR_TOKEN)")
        return _bearer(self._operator_token)

    def abort(self, round_number: int, upload_token: str) -> AbortResponse:
        response = self._request(
            "POST", f"/rounds/{round_number}/abort", headers={"Authorization": f"Bearer {upload_token}"}
        )
        return AbortResponse.model_validate(response.json())

    def close(self) -> None:
        self._http.close()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
