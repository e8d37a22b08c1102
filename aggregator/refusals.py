"""Refusals: what the aggregator will not do for a request, each with the HTTP status it is answered with."""

from __future__ import annotations


class UploadRefusedError(Exception):
    """An upload the aggregator will not count; `status_code` is its HTTP answer."""

    status_code = 400


class UnauthorizedError(UploadRefusedError):
    """The device or upload token is not one this aggregator issued (for this round)."""

    status_code = 401


class RoundClosedError(UploadRefusedError):
    """The update is for a round that is no longer open."""

    status_code = 409


class TooLargeError(UploadRefusedError):
    """The update is larger than any valid update of this model."""

    status_code = 413


class ClockError(UploadRefusedError):
    """The aggregator's clock cannot be set: it runs on the wall clock, or the time would go backwards."""

    status_code = 409


class AuditError(UploadRefusedError):
    """An audit asked of an aggregator without canary clients, or before any round made a model."""

    status_code = 409


class SecAggRefusedError(UploadRefusedError):
    """A secure-aggregation message that does not fit the round's phase or cohort; the message says why."""

    status_code = 409


class BadUpdateError(UploadRefusedError):
    """The update's bytes or example count are not acceptable; the message says why."""

    status_code = 422
