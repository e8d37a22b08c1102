"""Federated evaluation of personal models, as Wang et al. 2019 ("Federated evaluation of on-device personalization")
report it: per round, the distribution over devices of the personal model's top-1 recall against the base model's.

A device that keeps a personal model (device_sim/session.py's `personalised`) adds to its evaluation report its
personal model's top-1 and top-3 hits on the same held-out positions it scored the base model on. The round keeps each
such device's pair of counts in memory until it closes, and records only their distribution (`personal_record`): the
shares of devices helped and hurt, the median gain and the pooled personal recall. With a single such device (a
round's scoring share is small), that distribution is its own counts: a plain round's aggregator sees every device's
evaluation counts anyway, and the record is the operator's. Secure
rounds record none of it: their devices put the base model's three counts in the masked vector and nothing more, since
a sum cannot say which devices a personal model helped.
"""

from __future__ import annotations

from collections.abc import Sequence

from aggregator.api.schemas import EvaluationReport
from keyboard_model.evaluate import EvalCounts
from keyboard_model.personal import personal_gains

Paired = tuple[EvalCounts, EvalCounts]  # one device's (base model, personal model) counts on the same positions


def paired_counts(report: EvaluationReport) -> Paired | None:
    """The report's (base, personal) counts, or None when it has no personal counts (the schema refuses one of the
    two without the other, and personal hits beyond its positions)."""
    if report.personal_hits_at_1 is None or report.personal_hits_at_3 is None:
        return None
    return (EvalCounts(report.hits_at_1, report.hits_at_3, report.positions),
            EvalCounts(report.personal_hits_at_1, report.personal_hits_at_3, report.positions))


def personal_record(scores: Sequence[Paired]) -> dict[str, float | int | None]:
    """A round's summary fields (RoundSummary's personal_*) from its devices' pairs: 0 devices and nothing else when
    none reported personal counts."""
    gains = personal_gains(scores)
    if gains is None:
        return {"personal_devices": 0, "personal_helped": None, "personal_hurt": None, "personal_median_gain": None,
                "personal_positions": None, "personal_hits_at_1": None, "personal_hits_at_3": None}
    return {"personal_devices": gains.phones, "personal_helped": gains.helped, "personal_hurt": gains.hurt,
            "personal_median_gain": gains.median_gain_points, "personal_positions": gains.personal.positions,
            "personal_hits_at_1": gains.personal.hits_at_1, "personal_hits_at_3": gains.personal.hits_at_3}
