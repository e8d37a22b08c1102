"""Secure aggregation's building blocks, shared by phones and the aggregator, one module each: `keys`, `masks`,
`shares`, `graph`, `ring` and `identity`.

The protocol is Bonawitz et al. 2017 ("Practical Secure Aggregation") on the sparse
neighbour graph of SecAgg+ (Bell et al. 2020). Every primitive comes from a maintained
library: X25519, HKDF, AES-CTR and AES-GCM from `cryptography`, Shamir secret sharing
from `pycryptodome`. What is ours is how they are put together:

- Each phone has two key pairs per round: one to agree on keys that encrypt the secret
  shares it sends its neighbours, one whose agreements seed the pairwise masks. The
  private masking key is derived from a 16-byte seed, so that seed is what is shared.
- A phone's masked input is `x + PRG(b) + sum over neighbours v of ±PRG(s_uv)` in a
  ring of integers modulo 2**bits (numpy's unsigned arithmetic wraps exactly there). `b` is
  the phone's own random seed; `s_uv` comes from X25519 between u's and v's masking keys,
  so u adds what v subtracts, and the pairwise masks cancel in the sum.
- `b` and the masking seed are each split into Shamir shares, one per neighbour, with
  threshold t. After the masked inputs are in, each surviving neighbour reveals, for
  each of its neighbours, the share of `b` if that neighbour sent its input and the
  share of the masking seed if it did not, never both: the server can then remove the
  self masks of the phones that reported and the pairwise masks of the ones that did not.
- Against a server that lies (Bonawitz et al.'s active adversary), `identity`: each phone
  signs its advertised keys with an Ed25519 identity key that a directory the phones trust
  vouches for, not the server; and before unmasking, a consistency round in which each
  phone signs the survivor set it was told. A phone reveals shares only for the one set it
  signed, and only when, for each neighbour whose share it reveals, more than half that
  neighbour's neighbours signed the same set: since honest phones sign one set each, no
  two of them reveal under different sets the two kinds of share of one phone. A
  signature that does not verify counts as no signature: a member that signs garbage
  loses its own say, not the round.
- Against members that lie (`shares`): with its sealed pairs a dealer sends the server,
  in the clear, a commitment to each share (SHA-256, see `shares`) and one to its
  self-mask seed. The server refuses a revealed share that does not match its
  commitment, so it combines only the shares the dealer dealt, and checks a rebuilt
  self-mask seed against the dealer's commitment (a rebuilt masking seed against the
  public key the dealer advertised). A phone reveals a neighbour's share only if the
  pair opens and matches the commitments the server forwards, so a dealer that
  committed to other values than it sealed cannot get an honest revealer refused. A
  liar then counts as a phone that dropped out; what a dealer whose own shares are
  inconsistent can do is fail the round (its secret cannot be rebuilt), never change
  the sum.
- Public keys of small order (all zeros and a few others) are refused (`keys`).

Model deltas enter the ring rotated and in fixed point (`RingEncoding`), with a scale
chosen so that the sum of every selected phone's largest possible delta does not wrap
around; an 8-bit ring makes a masked upload the size of a plain int8 one.
"""


from keyboard_model.secagg.errors import SecAggError
from keyboard_model.secagg.graph import GraphParameters, Roster, graph_parameters, neighbours
from keyboard_model.secagg.identity import (
    SIGNATURE_BYTES,
    Directory,
    IdentityKey,
    keys_statement,
    survivors_statement,
)
from keyboard_model.secagg.keys import (
    SEED_BYTES,
    PublicKeys,
    RoundSecrets,
    masking_key,
    pairwise_seed,
    public_bytes,
    share_cipher_key,
)
from keyboard_model.secagg.masks import Layout, Masked, add_mask, pairwise_sign, prg_mask
from keyboard_model.secagg.ring import COUNTS, RING_WIDTHS, RingEncoding, masked_layout
from keyboard_model.secagg.shares import (
    COMMITMENT_BYTES,
    SEALED_BYTES,
    Dealing,
    DealtPair,
    Share,
    SharePair,
    combine_shares,
    commitment,
    open_shares,
    seal_shares,
    split_secret,
)

__all__ = [
    "COMMITMENT_BYTES", "COUNTS", "RING_WIDTHS", "SEALED_BYTES", "SEED_BYTES", "SIGNATURE_BYTES", "Dealing",
    "DealtPair", "Directory", "GraphParameters", "IdentityKey", "Layout", "Masked", "PublicKeys", "RingEncoding",
    "Roster", "RoundSecrets", "SecAggError", "Share", "SharePair", "add_mask", "combine_shares", "commitment",
    "graph_parameters", "keys_statement", "masked_layout", "masking_key", "neighbours",
    "open_shares", "pairwise_seed", "pairwise_sign", "prg_mask", "public_bytes", "seal_shares", "share_cipher_key",
    "split_secret", "survivors_statement",
]
