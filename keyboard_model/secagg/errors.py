"""The one error of secure aggregation's building blocks."""

from __future__ import annotations


class SecAggError(Exception):
    """The protocol cannot go on: a message is malformed, forged, or too few phones remain."""
