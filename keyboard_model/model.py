"""The keyboard's language model: a one-layer CIFG-LSTM with a projection and tied embeddings.

This is the network of Hard et al. 2018 ("Federated Learning for Mobile Keyboard
Prediction"): a Coupled Input and Forget Gate LSTM, whose forget gate is one minus
its input gate, so it has three gate matrices instead of four. Its output is
projected down to the embedding width and scored against the same embedding
matrix that reads the input (tied embeddings), which keeps the model at ~1.4M
parameters for a 10,000-word vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the network. The defaults are Gboard's."""

    vocab_size: int = 10_000
    embedding_dim: int = 96
    hidden_dim: int = 670
    projection_dim: int = 96

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.embedding_dim, self.hidden_dim, self.projection_dim) < 1:
            raise ValueError(f"every model size must be positive: {self}")
        if self.projection_dim != self.embedding_dim:
            # Tying reads the output projection against the input embedding matrix.
            raise ValueError(
                f"projection_dim ({self.projection_dim}) must equal embedding_dim "
                f"({self.embedding_dim}) for tied embeddings"
            )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


State = tuple[torch.Tensor, torch.Tensor]  # (projected output h, cell c)


class CIFGLSTM(nn.Module):
    """Embedding -> CIFG-LSTM with projection -> tied output layer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        hidden, proj = config.hidden_dim, config.projection_dim
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        # Three gate blocks, in this order: input gate, output gate, candidate cell.
        self.input_weights = nn.Linear(config.embedding_dim, 3 * hidden)
        self.recurrent_weights = nn.Linear(proj, 3 * hidden, bias=False)
        self.projection = nn.Linear(hidden, proj, bias=False)
        # The tied output layer's own bias lets the model learn word frequencies fast.
        self.output_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.config.hidden_dim)
        # Larger than the usual +-0.05: the tied output layer reads this same matrix, and
        # with tiny embeddings the logits start near zero and federated training sat on a
        # word-frequency plateau for ~100 rounds before using the context (measured).
        nn.init.normal_(self.embedding.weight, std=0.3)
        for weight in (self.input_weights.weight, self.recurrent_weights.weight, self.projection.weight):
            nn.init.uniform_(weight, -bound, bound)
        nn.init.zeros_(self.input_weights.bias)
        nn.init.zeros_(self.output_bias)

    def initial_state(self, batch_size: int) -> State:
        zeros = self.embedding.weight.new_zeros
        return zeros(batch_size, self.config.projection_dim), zeros(batch_size, self.config.hidden_dim)

    def step(self, gate_inputs: torch.Tensor, state: State) -> State:
        """One time step, given this step's share of the input projection."""
        h, c = state
        input_gate, output_gate, candidate = (gate_inputs + self.recurrent_weights(h)).chunk(3, dim=-1)
        input_gate = torch.sigmoid(input_gate)
        # The coupling: what is written in is exactly what is forgotten.
        c = (1.0 - input_gate) * c + input_gate * torch.tanh(candidate)
        h = self.projection(torch.sigmoid(output_gate) * torch.tanh(c))
        return h, c

    def hidden_states(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Projected outputs (batch, time, projection) for `tokens` (batch, time), and the final state."""
        if state is None:
            state = self.initial_state(tokens.shape[0])
        # The input projection of every time step is one matrix product; only the
        # recurrence has to walk the sequence.
        gate_inputs = self.input_weights(self.embedding(tokens))
        outputs = []
        for t in range(tokens.shape[1]):
            state = self.step(gate_inputs[:, t], state)
            outputs.append(state[0])
        return torch.stack(outputs, dim=1), state

    def output_logits(self, projected: torch.Tensor) -> torch.Tensor:
        """Scores over the vocabulary: the projected output read against the (tied) embeddings."""
        return projected @ self.embedding.weight.T + self.output_bias

    def forward(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Logits over the vocabulary for every position of `tokens` (batch, time)."""
        projected, state = self.hidden_states(tokens, state)
        return self.output_logits(projected), state


def build_model(config: ModelConfig, seed: int = 0) -> CIFGLSTM:
    """A freshly initialised model; the same seed gives the same weights."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return CIFGLSTM(config)
    finally:
        torch.random.set_rng_state(generator_state)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
