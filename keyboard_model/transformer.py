"""A small causal Transformer next-word model: the second architecture behind the model seam.

nanoGPT-style (pre-LayerNorm blocks, GELU MLP four times the width, learned absolute
positions) with tied input/output embeddings and the same output bias as the CIFG, so
it reads the same tokenizer and scores the same vocabulary. The defaults put it at the
CIFG's size: 1,331,493 parameters against the CIFG's 1,334,271 at the default corpus's
9,093-word vocabulary, two thirds of either in the embedding.

Context is a window of `context` tokens. Positions are learned only where training
reaches them, so the window is the training sequence length (20): rows are cut from
the middle of a phone's text, so a window that starts mid-sentence is what training
saw. A position past the window sees the `context` tokens ending at it, numbered from 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from keyboard_model.model import TiedOutputCrossEntropy

LayerCache = tuple[torch.Tensor, torch.Tensor]  # keys and values, (batch, heads, positions, head width)
# The tokens of the current window (batch, positions) and, while they fit in it, every layer's keys and values.
TransformerState = tuple[torch.Tensor, tuple[LayerCache, ...] | None]


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes of the network; the defaults match the CIFG's parameter count."""

    architecture: ClassVar[str] = "transformer"

    vocab_size: int = 10_000
    embedding_dim: int = 96  # also the width of every layer, as the embeddings are tied
    layers: int = 4
    heads: int = 4
    context: int = 20

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.embedding_dim, self.layers, self.heads, self.context) < 1:
            raise ValueError(f"every model size must be positive: {self}")
        if self.embedding_dim % self.heads:
            raise ValueError(f"embedding_dim ({self.embedding_dim}) must be a multiple of heads ({self.heads})")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def training_flops_per_token(config: TransformerConfig) -> int:
    """Matrix FLOPs of one training token: three forward passes' worth (forward, and backward through inputs and
    weights)."""
    e, t, v = config.embedding_dim, config.context, config.vocab_size
    # Per layer: query/key/value and output projections (4 e^2), the MLP (8 e^2); attention scores and the weighted
    # sum over the (t + 1) / 2 positions a token sees on average in a row of t.
    return 3 * 2 * (config.layers * (12 * e * e + e * (t + 1)) + e * v)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.embedding_dim, 3 * config.embedding_dim)
        self.out = nn.Linear(config.embedding_dim, config.embedding_dim)

    def forward(self, x: torch.Tensor, past: LayerCache | None) -> tuple[torch.Tensor, LayerCache]:
        """`x` is every position from 0 (past None), or the one position after `past`'s."""
        batch, time, width = x.shape
        q, k, v = (t.view(batch, time, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(width, dim=2))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        # A single new position may see every cached one, so only a full pass needs the causal mask.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=past is None)
        return self.out(y.transpose(1, 2).reshape(batch, time, width)), (k, v)


class Block(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.embedding_dim)
        self.attention = CausalSelfAttention(config)
        self.mlp_norm = nn.LayerNorm(config.embedding_dim)
        self.mlp = nn.Sequential(
            nn.Linear(config.embedding_dim, 4 * config.embedding_dim),
            nn.GELU(),
            nn.Linear(4 * config.embedding_dim, config.embedding_dim),
        )

    def forward(self, x: torch.Tensor, past: LayerCache | None) -> tuple[torch.Tensor, LayerCache]:
        attended, cache = self.attention(self.attention_norm(x), past)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x)), cache


class CausalTransformer(nn.Module):
    """Token + position embeddings -> causal blocks -> LayerNorm -> tied output layer."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.positions = nn.Embedding(config.context, config.embedding_dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.final_norm = nn.LayerNorm(config.embedding_dim)
        # As in the CIFG: the output layer's own bias learns word frequencies fast.
        self.output_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-2's initialisation; the residual branches' last layers are scaled down so the sum over
        # layers keeps the residual stream's size at the start.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            assert isinstance(block, Block)
            for last in (block.attention.out, block.mlp[2]):
                assert isinstance(last, nn.Linear)
                nn.init.normal_(last.weight, std=0.02 / math.sqrt(2 * self.config.layers))
        # Larger than GPT-2's 0.02, for the CIFG's reason: the tied output layer reads this matrix, and with the
        # phones' plain SGD tiny embeddings sat on a word-frequency plateau. Held-out loss after three central
        # epochs of SGD over 3,000 proxy lines: 5.86 at 0.02 (no better than after the first), 5.29 at 0.1,
        # 5.30 at 0.3 (measured).
        nn.init.normal_(self.embedding.weight, std=0.1)
        nn.init.zeros_(self.output_bias)

    def _run(self, tokens: torch.Tensor,
             past: tuple[LayerCache, ...] | None) -> tuple[torch.Tensor, tuple[LayerCache, ...]]:
        """Normalised outputs for `tokens` at the positions after `past`'s, and every layer's cache."""
        start = 0 if past is None else past[0][0].shape[2]
        x = self.embedding(tokens) + self.positions(torch.arange(start, start + tokens.shape[1]))
        caches = []
        for i, block in enumerate(self.blocks):
            x, cache = block(x, None if past is None else past[i])
            caches.append(cache)
        return self.final_norm(x), tuple(caches)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Outputs (batch, time, embedding) for every position of `tokens` (batch, time), from the start."""
        window = self.config.context
        head, _ = self._run(tokens[:, :window], None)
        if tokens.shape[1] <= window:
            return head
        # Each later position sees the window ending at it, as `step` does: one pass per window, all batched.
        windows = tokens.unfold(1, window, 1)[:, 1:]
        tail, _ = self._run(windows.reshape(-1, window), None)
        return torch.cat([head, tail[:, -1].view(tokens.shape[0], -1, head.shape[2])], dim=1)

    def output_logits(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.embedding.weight.T + self.output_bias

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary for every position of `tokens` (batch, time)."""
        return self.output_logits(self.features(tokens))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        keep = targets != ignore_index
        return TiedOutputCrossEntropy.apply(self.features(tokens)[keep], self.embedding.weight, self.output_bias,
                                            targets[keep])

    def initial_state(self, batch_size: int) -> TransformerState:
        return torch.empty(batch_size, 0, dtype=torch.long), None

    def step(self, tokens: torch.Tensor, state: TransformerState) -> tuple[torch.Tensor, TransformerState]:
        """Outputs (batch, embedding) after one more token per row, `tokens` (batch,), and the new state.

        While the window has room, the token is one position against the cached keys and values. Once it is
        full, the window slides and is recomputed, one pass over `context` tokens: the cached keys were made
        at positions that a slid window numbers differently, and keeping them (dropping only the oldest)
        would show the model position numbers it was never trained on. Keystrokes that far into a message are
        rare: Shakespeare's longest line has 30 tokens.
        """
        window, caches = state
        window = torch.cat([window, tokens[:, None]], dim=1)
        if window.shape[1] <= self.config.context:
            outputs, caches = self._run(window[:, -1:], caches)
        else:
            window = window[:, 1:]
            outputs, caches = self._run(window, None)
        return outputs[:, -1], (window, caches)
