"""The neighbour graph of SecAgg+ (Bell et al. 2020): how many neighbours each phone has, which ones, and the
threshold of shares that rebuilds a secret; the roster every phone of a round sees."""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

from scipy.stats import binom

from keyboard_model.secagg.errors import SecAggError
from keyboard_model.secagg.keys import PublicKeys


@dataclass(frozen=True)
class GraphParameters:
    degree: int  # neighbours per phone
    threshold: int  # shares that rebuild a secret


def graph_parameters(cohort: int, dropout: float = 1 / 3, failure: float = 1e-4) -> GraphParameters:
    """The sparsest graph that survives `dropout` of the cohort (at random) in all but `failure` of rounds.

    The threshold is a third of the degree (at least two, where there are two neighbours): to rebuild a phone's
    secrets the server would have to collude with that many of its neighbours, and they stay recoverable unless
    more than two thirds of its neighbours drop out. With random drop-outs the count of neighbours left is
    binomial; the degree is the smallest (even) one for which too few are left, for any phone, with probability
    at most `failure`. When no sparse graph does, every phone neighbours every other (SecAgg), and then any
    `dropout` share of the cohort may drop out, whichever phones they are.
    """
    if cohort < 2:
        raise SecAggError("secure aggregation needs at least two phones")
    for degree in range(4, cohort - 1, 2):
        threshold = math.ceil(degree / 3)
        if cohort * binom.cdf(threshold - 1, degree, 1 - dropout) <= failure:
            return GraphParameters(degree, threshold)
    degree = cohort - 1
    return GraphParameters(degree, max(min(2, degree), math.ceil(degree / 3)))


def neighbours(cohort: int, degree: int, seed: int) -> list[list[int]]:
    """Each phone's neighbours (by cohort index): a Harary graph over a random order of the phones.

    Phones sit on a ring in an order drawn from `seed` and neighbour the `degree / 2` nearest on either side, so
    every phone has the same degree and only the loss of `degree / 2` consecutive phones cuts the ring.
    """
    if degree >= cohort - 1:
        return [[v for v in range(cohort) if v != u] for u in range(cohort)]
    order = list(range(cohort))
    random.Random(seed).shuffle(order)
    position = {phone: p for p, phone in enumerate(order)}
    half = degree // 2
    return [
        sorted(order[(position[u] + step) % cohort] for step in range(-half, half + 1) if step != 0)
        for u in range(cohort)
    ]


@dataclass(frozen=True)
class Roster:
    """The round's cohort as every phone sees it once keys are in: public keys by cohort index, and the graph."""

    round_number: int
    keys: list[PublicKeys]
    parameters: GraphParameters
    graph_seed: int
    # Each phone's device id and its identity key's signature of its keys (`identity.keys_statement`), by index.
    device_ids: tuple[str, ...] = ()
    signatures: tuple[bytes, ...] = ()

    def neighbours(self) -> list[list[int]]:
        return neighbours(len(self.keys), self.parameters.degree, self.graph_seed)

    def digest(self) -> bytes:
        """SHA-256 of everything in the roster. Phones bind their sealed shares and their survivor-set signatures
        to it, so that a server showing two phones two different rosters (cohorts, graphs) gets neither a share one
        can open that the other sealed, nor a signature that counts for the other."""
        digest = hashlib.sha256(b"fedkeyboard secagg roster\0")
        for number in (self.round_number, self.parameters.degree, self.parameters.threshold, self.graph_seed,
                       len(self.keys)):
            digest.update(number.to_bytes(8, "big", signed=True))
        for keys, device_id in zip(self.keys, self.device_ids, strict=False):
            digest.update(keys.cipher + keys.masking + len(device_id.encode()).to_bytes(4, "big") + device_id.encode())
        return digest.digest()
