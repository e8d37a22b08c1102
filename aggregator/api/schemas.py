"""Request and response bodies of the aggregator's HTTP API."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    computed_field,
    model_validator,
)


def _from_base64(value: object) -> object:
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as error:
            raise ValueError(f"not base64: {error}") from error
    return value


# Bytes in Python, base64 text in JSON.
Base64Bytes = Annotated[bytes, BeforeValidator(_from_base64),
                        PlainSerializer(lambda data: base64.b64encode(data).decode("ascii"), return_type=str),
                        WithJsonSchema({"type": "string", "contentEncoding": "base64"})]


class EnrolmentResponse(BaseModel):
    device_id: str
    device_token: str = Field(
        description="Secret; send it as 'Authorization: Bearer <device_token>' at every check-in."
    )


class DiscoveryQuestion(BaseModel):
    """A discovery round's question (aggregator/discovery.py): one vote, of `depth` characters, extending one of
    `frontier` (the trie's prefixes of depth - 1 characters; none in the first round)."""

    model_config = ConfigDict(from_attributes=True)
    depth: int
    frontier: list[str]
    max_word_length: int = Field(description="Words longer than this cannot be found in this discovery: vote on "
                                             "others.")


class CheckinResponse(BaseModel):
    action: Literal["train", "vote", "retry"]
    round: int
    model_version: int
    upload_token: str | None = Field(None, description="Present when action is 'train' or 'vote'; authorises one "
                                                       "upload, or one vote.")
    retry_after_s: float | None = Field(
        None, description="Present when action is 'retry': seconds to wait, spread by the server (pace steering)."
    )
    clip_norm: float | None = Field(
        None, description="With differential privacy on: the L2 norm the device must clip its update to."
    )
    adaptive_clipping: bool = Field(
        False, description="With adaptive clipping: the device also reports whether its update's norm was within "
                           "clip_norm, one bit (in the upload's metadata, or inside the masked vector)."
    )
    secure_aggregation: bool = Field(
        False, description="The round runs secure aggregation: see /rounds/{round}/secagg."
    )
    model_encoding: Literal["float32", "int8"] = Field(
        "float32", description="Present when action is 'train': download the model as GET /model?encoding=this."
    )
    excluded: str | None = Field(
        None, description="Present when this device takes part in no round any more, because secure aggregation proved "
                          "it lied: how. Its action is then always 'retry'."
    )
    evaluate: bool = Field(
        True, description="When action is 'train': score the downloaded model on held-out messages and report the "
                          "counts (federated evaluation runs on a share of each round's devices). A device not asked "
                          "reports none; in a secure round it puts zero counts in its masked input."
    )
    vocab_size: int | None = Field(
        None, description="Tokens in the current model's vocabulary: when it differs from the device's tokenizer's, "
                          "word discovery grew it, and the device fetches GET /tokenizer before it votes or trains.")
    discovery: DiscoveryQuestion | None = Field(
        None, description="Present when action is 'vote': the discovery round's question, answered with POST "
                          "/rounds/{round}/votes."
    )


class Vote(BaseModel):
    """A discovery round's answer: the first `depth` characters of one of the device's own words that the model
    does not know (ending with '$' when the word ends there), extending a prefix of the question; or null."""

    model_config = ConfigDict(extra="forbid")
    prefix: str | None = Field(max_length=64)  # aggregator.config.MAX_DISCOVERED_WORD letters and the end marker


class UploadResponse(BaseModel):
    round: int
    reported: int = Field(description="Updates accepted in this round so far, this one included.")
    duplicate: bool = Field(description="True when this device had already reported; the update was not counted again.")
    round_closed: bool = Field(False, description="True when this update completed the round.")


class EvaluationReport(BaseModel):
    """Federated evaluation: how well the model a device downloaded for this round predicts the device's own
    held-out messages. Three counts, and which model they score; no words, no per-word counts. A device that keeps a
    personal model may add two: its personal model's hits on the same positions."""

    # Anything else a device sends is refused, not ignored: nothing rides along with the counts.
    model_config = ConfigDict(extra="forbid")

    model_version: int = Field(ge=0, le=2**63 - 1,
                               description="The global model version scored: the one this round trains.")
    # At most the aggregator's --max-eval-positions, which its OpenAPI document states.
    positions: int = Field(ge=1, description="Next-word predictions scored (word targets in the held-out messages).")
    hits_at_1: int = Field(ge=0, description="Predictions whose target was the top suggestion.")
    hits_at_3: int = Field(ge=0, description="Predictions whose target was among the three suggestions.")
    # Personal models (keyboard_model/personal.py): one field without the other is refused.
    personal_hits_at_1: int | None = Field(
        default=None, ge=0,
        description="A device that keeps a personal model: the positions its personal model got right at top-1, of "
                    "the same held-out positions. Accepted in plain rounds only.")
    personal_hits_at_3: int | None = Field(
        default=None, ge=0,
        description="With personal_hits_at_1: those its personal model got among three suggestions.")

    @model_validator(mode="after")
    def _counts_are_consistent(self) -> EvaluationReport:
        if not self.hits_at_1 <= self.hits_at_3 <= self.positions:
            raise ValueError("the counts must satisfy hits_at_1 <= hits_at_3 <= positions")
        if (self.personal_hits_at_1 is None) != (self.personal_hits_at_3 is None):
            raise ValueError("personal_hits_at_1 and personal_hits_at_3 come together or not at all")
        if self.personal_hits_at_1 is not None and self.personal_hits_at_3 is not None and not (
                self.personal_hits_at_1 <= self.personal_hits_at_3 <= self.positions):
            raise ValueError("the counts must satisfy personal_hits_at_1 <= personal_hits_at_3 <= positions")
        return self


class EvaluationResponse(BaseModel):
    round: int
    evaluations: int = Field(description="Evaluation reports accepted in this round so far, this one included.")
    duplicate: bool = Field(description="True when this device had already reported; it was not counted again.")


# Simulated time stays below a few centuries: a deadline added to it must still be a different number.
MAX_SIMULATED_S = 1e10


class ClockUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # Strict: JSON false or "5" is not a time.
    now_s: float = Field(ge=0, le=MAX_SIMULATED_S, strict=True,
                         description="Simulated seconds since the simulation started.")


class AbortResponse(BaseModel):
    round: int
    aborted: int = Field(description="Devices of this round that have aborted so far.")


class RoundSummary(BaseModel):
    """A finished round. Counts are None for rounds recorded by an older version."""

    round: int
    status: Literal["closed", "failed"]
    started_at: float
    closed_at: float
    duration_s: float | None
    goal: int
    selected: int
    reported: int
    aborted: int | None = Field(description="Selected devices that said they gave up (their conditions changed).")
    dropped: int | None = Field(description="Selected devices never heard from again.")
    late: int | None = Field(description="Selected devices whose update arrived after the round closed.")
    examples: int
    bytes_up: int | None = Field(description="Bytes of the accepted updates.")
    bytes_down: int | None = Field(description="Model bytes sent to the selected devices.")
    base_version: int
    new_version: int | None
    update_norm: float | None
    eval_devices: int | None = Field(
        None, description="Devices that scored the round's base model on their held-out messages."
    )
    eval_positions: int | None = Field(None, description="Next-word predictions those devices scored, summed.")
    eval_hits_at_1: int | None = None
    eval_hits_at_3: int | None = None
    # Federated evaluation of personalisation (Wang et al. 2019), from the devices that reported their personal
    # model's hits beside the global model's: plain rounds only, as a masked sum cannot say which devices it helped.
    personal_devices: int | None = Field(
        None, description="Devices that scored their personal model beside the base model, on the same positions.")
    personal_helped: float | None = Field(
        None, description="The share of them whose personal model got more top-1 hits than the base model.")
    personal_hurt: float | None = Field(None, description="The share whose personal model got fewer.")
    personal_median_gain: float | None = Field(
        None, description="The median over them of personal minus base top-1 recall, in percentage points.")
    personal_positions: int | None = Field(None, description="The predictions they scored, summed.")
    personal_hits_at_1: int | None = None
    personal_hits_at_3: int | None = None
    dp_noise_multiplier: float | None = Field(None, description="Differential privacy: the round's noise multiplier.")
    dp_sampling_rate: float | None = Field(
        None, description="The sampling rate the accountant assumed: goal / population."
    )
    dp_delta: float | None = None
    epsilon: float | None = Field(None, description="Privacy spent by every round up to this one, at dp_delta.")
    dp_mechanism: str | None = Field(None, description="Differential privacy: fedavg or ftrl (null: fedavg).")
    rho: float | None = Field(None, description="DP-FTRL: rho-zCDP spent by every round up to this one.")
    dp_clip_norm: float | None = Field(None, description="Differential privacy: the L2 norm updates were clipped to.")
    dp_update_noise_multiplier: float | None = Field(
        None, description="Adaptive clipping: the updates' noise multiplier, above dp_noise_multiplier, which counts "
                          "the clipping bits too.")
    dp_count_stddev: float | None = Field(None, description="Adaptive clipping: noise on the sum of the clipping bits.")
    dp_fraction_within: float | None = Field(
        None, description="Adaptive clipping: the released (noisy) fraction of updates within dp_clip_norm.")
    dp_next_clip_norm: float | None = Field(None, description="Adaptive clipping: the clip norm of the next round.")
    failure: str | None = Field(None, description="Why a failed round failed.")
    audit_canaries_taking_part: int | None = Field(
        None, description="Empirical privacy audit: canary clients (the server's own inputs) in the round's aggregate.")
    audit_canaries: int | None = Field(None, description="Audited rounds: the canary clients inserted (as many are "
                                                         "held out).")
    audit_epsilon: float | None = Field(
        None, description="Audited rounds: the one-shot empirical epsilon at audit_delta (Andrew et al. 2024), an "
                          "estimate for that attack, not a bound.")
    audit_epsilon_low: float | None = Field(None, description="Its 95% bootstrap interval's low end.")
    audit_epsilon_high: float | None = Field(None, description="Its 95% bootstrap interval's high end.")
    audit_epsilon_lower_bound: float | None = Field(
        None, description="A 95%-confidence lower bound on epsilon from the same scores (jax-privacy's one-run "
                          "auditor).")
    audit_delta: float | None = None
    audit_score_in: float | None = Field(None, description="Inserted canaries' mean cosine with the model's movement.")
    audit_score_out: float | None = Field(None, description="Held-out canaries' mean cosine with it.")
    excluded: dict[str, str] | None = Field(
        None, description="Secure aggregation: the devices this round proved to lie (device id -> how), excluded from "
                          "every later round."
    )
    checked_in: int | None = Field(
        None, description="Devices that asked to train while the round was open (devices ask only when eligible)."
    )
    clock_started_s: float | None = Field(
        None, description="When the round opened on the aggregator's clock (simulated seconds with a simulated clock)."
    )
    round_kind: Literal["training", "discovery"] | None = Field(
        None, description="With word discovery on: whether the round trained the model or voted on new words.")
    discovery_depth: int | None = Field(None, description="A discovery round: the characters of its votes.")
    discovery_prefixes_added: int | None = Field(
        None, description="A discovery round: the prefixes that reached the threshold and joined the trie.")
    words_discovered: int | None = Field(
        None, description="A discovery round that ended a discovery: the words it added to the vocabulary.")
    words_discovered_total: int | None = Field(None, description="Words discovery has added so far.")
    discovery_epsilon: float | None = Field(
        None, description="Epsilon the discoveries started so far spend, composed by addition (None outside "
                          "TrieHH's accounting).")
    discovery_delta: float | None = None

    # The quality metrics: the model this round started from (base_version), scored by federated evaluation.
    @computed_field
    @property
    def recall_at_1(self) -> float | None:
        return self.eval_hits_at_1 / self.eval_positions if self.eval_positions else None

    @computed_field
    @property
    def recall_at_3(self) -> float | None:
        return self.eval_hits_at_3 / self.eval_positions if self.eval_positions else None

    # The personal models' recall, pooled over personal_devices (all of eval_devices when every device keeps one).
    @computed_field
    @property
    def personal_recall_at_1(self) -> float | None:
        return self.personal_hits_at_1 / self.personal_positions if self.personal_positions else None

    @computed_field
    @property
    def personal_recall_at_3(self) -> float | None:
        return self.personal_hits_at_3 / self.personal_positions if self.personal_positions else None


class StatusResponse(BaseModel):
    round: int = Field(description="The round now open.")
    clock: Literal["wall", "simulated"] = Field(description="What the round's deadline and durations are measured on.")
    model_version: int
    goal: int
    selection_target: int = Field(description="Devices the round selects: the goal times the over-selection factor.")
    selected: int
    reported: int
    aborted: int
    deadline_in_s: float
    differential_privacy: bool
    epsilon: float | None = Field(
        description="Privacy spent so far (differential privacy on), at the last round's delta."
    )
    rho: float | None = Field(None, description="DP-FTRL: rho-zCDP spent so far.")
    clip_norm: float | None = Field(None, description="Differential privacy: the clip norm the open round asks for.")
    canary_clients: int = Field(0, description="Canary clients the aggregator inserts for its privacy audit (0: none).")
    round_kind: Literal["training", "discovery"] = Field(
        "training", description="Whether the open round trains the model or votes on new words.")
    vocab_size: int | None = Field(None, description="Tokens in the current model's vocabulary; it grows with "
                                                     "discovered words, and GET /tokenizer follows.")
    words_discovered: int | None = Field(None, description="With word discovery on: the words it has added so far.")
    discovery_epsilon: float | None = Field(None, description="With word discovery on: the epsilon its discoveries "
                                                              "spend, composed by addition.")
    discovery_delta: float | None = None
    audit_epsilon: float | None = Field(
        None, description="Canary clients on: the latest audit's empirical epsilon (an estimate for that attack).")
    audit_epsilon_low: float | None = Field(None, description="Its 95% bootstrap interval's low end.")
    audit_epsilon_high: float | None = Field(None, description="Its 95% bootstrap interval's high end.")
    audit_epsilon_lower_bound: float | None = Field(None, description="The latest audit's 95% lower bound on epsilon.")
    recent_rounds: list[RoundSummary]


def exactly(size: int) -> Any:
    """Exactly `size` bytes in Python; in JSON, base64 text of 4 characters for every 3 bytes or part of 3."""
    text = 4 * -(-size // 3)
    schema = {"type": "string", "contentEncoding": "base64", "minLength": text, "maxLength": text}
    return Annotated[Base64Bytes, Field(min_length=size, max_length=size), WithJsonSchema(schema)]


# Raw X25519 public keys.
PublicKey = exactly(32)
# A cohort index, as a JSON object's key: a string of digits.
CohortIndex = Annotated[int, Field(ge=0, le=65_535)]
COHORT_INDEX_KEYS = {"propertyNames": {"pattern": "^[0-9]{1,5}$"}}


# Raw Ed25519 signatures.
Signature = exactly(64)


class SecAggKeys(BaseModel):
    """A device's two public keys for the round (raw X25519, 32 bytes each, base64), signed with its identity key."""

    model_config = ConfigDict(extra="forbid")
    cipher: PublicKey
    masking: PublicKey
    signature: Signature = Field(description="Ed25519, by the device's identity key (registered with the phones' "
                                             "directory, not with the aggregator), of the round, device id and keys.")


class SecAggConfirm(BaseModel):
    """The consistency round: the device's signature of the survivor set (`reported`) the server told it."""

    model_config = ConfigDict(extra="forbid")
    signature: Signature


# A sealed share pair: nonce, two shares, AES-GCM's tag (keyboard_model.secagg.SEALED_BYTES).
SealedPair = exactly(64)
# A SHA-256 commitment to a share or a seed (keyboard_model.secagg.commitment).
Commitment = exactly(32)


class DealtShares(BaseModel):
    """A share pair its dealer sent for one neighbour: sealed for it (the server cannot open it), and the dealer's
    commitments to the two shares, in the clear. Revealed shares are checked against the commitments."""

    # From attributes: the aggregator's state hands a phone the keyboard_model.secagg.DealtPair objects it holds.
    model_config = ConfigDict(extra="forbid", from_attributes=True)
    sealed: SealedPair
    self_mask: Commitment = Field(description="SHA-256 commitment to the share of the dealer's self-mask seed.")
    masking: Commitment = Field(description="SHA-256 commitment to the share of the dealer's masking seed.")


class SecAggShares(BaseModel):
    """Share pairs, by the cohort index of the neighbour each is for, and the dealer's commitment to its self-mask
    seed."""

    model_config = ConfigDict(extra="forbid")
    pairs: dict[CohortIndex, DealtShares] = Field(json_schema_extra=COHORT_INDEX_KEYS)
    seed_commitment: Commitment = Field(description="SHA-256 commitment to the dealer's self-mask seed, which the "
                                                    "seed rebuilt from its shares must match.")


# A Shamir share of a 16-byte seed (keyboard_model.secagg.SEED_BYTES).
ShareValue = exactly(16)


class RevealedShare(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Its owner's Shamir point for this neighbour: 1 to the owner's number of neighbours (two bytes on the wire).
    x: int = Field(ge=1, le=65_535)
    value: ShareValue


class SecAggReveal(BaseModel):
    """One share per neighbour, by the neighbour's cohort index: of its self-mask seed if it reported, of its
    masking seed if it did not."""

    model_config = ConfigDict(extra="forbid")
    shares: dict[CohortIndex, RevealedShare] = Field(json_schema_extra=COHORT_INDEX_KEYS)


class SecAggRoster(BaseModel):
    cipher_keys: list[Base64Bytes]
    masking_keys: list[Base64Bytes]
    device_ids: list[str] = Field(description="Each phone's device id, by cohort index.")
    signatures: list[Base64Bytes] = Field(description="Each phone's signature of its keys, by cohort index.")
    degree: int
    threshold: int
    graph_seed: int


class SecAggEncoding(BaseModel):
    """How a device puts its update into the ring (keyboard_model/secagg.py's RingEncoding)."""

    bits: Literal[8, 16, 32] = Field(description="The update is masked modulo 2**bits; the 4 counts modulo 2**32.")
    bound: float = Field(description="Clip the update to this L2 norm.")
    max_summands: int
    length: int = Field(description="The model's parameters, in order.")
    rotation_seed: int


class SecAggState(BaseModel):
    """Where a round's secure aggregation is, as one selected device needs to see it."""

    round: int
    phase: Literal["advertise", "share", "collect", "confirm", "unmask", "done", "failed"]
    index: int | None = Field(None, description="This device's place in the cohort, once the roster is fixed.")
    roster: SecAggRoster | None = None
    shared: list[int] | None = Field(None, description="Who sent shares; fixed when the collect phase opens.")
    reported: list[int] | None = Field(
        None, description="Whose masked input counts (the survivors); fixed when the confirm phase opens.")
    incoming: dict[int, DealtShares] | None = Field(
        None, description="In the unmask phase, for a device that reported: the pairs its neighbours dealt it, with "
                          "their commitments."
    )
    confirmations: dict[int, Base64Bytes] | None = Field(
        None, description="In the unmask phase, for a device that reported: the survivor-set signatures of its "
                          "neighbours and of their neighbours, by signer."
    )
    encoding: SecAggEncoding


class FieldError(BaseModel):
    """One reason a request's parameters or body did not validate (FastAPI's format, without the input)."""

    type: str
    loc: list[str | int]
    msg: str


class ErrorResponse(BaseModel):
    detail: str | list[FieldError] = Field(
        description="Why the request was refused: a sentence, or for a malformed request one entry per field."
    )
