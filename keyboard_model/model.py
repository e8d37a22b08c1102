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

    def hidden_states(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Projected outputs (batch, time, projection) for `tokens` (batch, time), and the final state."""
        if state is None:
            state = self.initial_state(tokens.shape[0])
        # The input projection of every time step is one matrix product; only the
        # recurrence has to walk the sequence.
        gate_inputs = self.input_weights(self.embedding(tokens))
        weights = (self.recurrent_weights.weight, self.projection.weight)
        if torch.is_grad_enabled():
            outputs, h, c = CIFGRecurrence.apply(gate_inputs, *state, *weights)
        else:  # inference (the keyboard): nothing to keep for a backward pass
            outputs, h, c = CIFGRecurrence.run(gate_inputs, *state, *weights)
        return outputs, (h, c)

    def output_logits(self, projected: torch.Tensor) -> torch.Tensor:
        """Scores over the vocabulary: the projected output read against the (tied) embeddings."""
        return projected @ self.embedding.weight.T + self.output_bias

    def forward(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Logits over the vocabulary for every position of `tokens` (batch, time)."""
        projected, state = self.hidden_states(tokens, state)
        return self.output_logits(projected), state


class CIFGRecurrence(torch.autograd.Function):
    """The walk over time, with a hand-written backward pass.

    Autograd would record a dozen small operations per time step and replay them one
    by one; here the backward pass walks the steps once, and the gradients of the two
    weight matrices are each one matrix product over all steps together.

    Per step, with gate pre-activations split as [input | output | candidate]:
        i, o, g = sigmoid, sigmoid, tanh of (gate_inputs[t] + h @ W_h^T)
        c = (1 - i) * c + i * g          (the coupling: what is written in is what is forgotten)
        m = o * tanh(c);   h = m @ W_p^T
    """

    @staticmethod
    def forward(ctx, gate_inputs, h, c, recurrent_weight, projection_weight):
        saved: dict[str, list[torch.Tensor]] = {name: [] for name in ("h_prev", "c_prev", "i", "o", "g", "tanh_c", "m")}
        outputs, h, c = CIFGRecurrence.run(gate_inputs, h, c, recurrent_weight, projection_weight, saved)
        ctx.save_for_backward(recurrent_weight, projection_weight, *(torch.stack(v, dim=1) for v in saved.values()))
        return outputs, h, c

    @staticmethod
    def run(gate_inputs, h, c, recurrent_weight, projection_weight, saved=None):
        """The forward walk; with `saved`, it also keeps what the backward pass needs."""
        batch, steps, _ = gate_inputs.shape
        hidden = projection_weight.shape[1]
        outputs = gate_inputs.new_empty(batch, steps, projection_weight.shape[0])
        for t in range(steps):
            pre = torch.addmm(gate_inputs[:, t], h, recurrent_weight.T)
            i, o, g = pre[:, :hidden].sigmoid(), pre[:, hidden : 2 * hidden].sigmoid(), pre[:, 2 * hidden :].tanh()
            h_prev, c_prev = h, c
            c = torch.addcmul(c - i * c, i, g)
            tanh_c = c.tanh()
            m = o * tanh_c
            h = m @ projection_weight.T
            outputs[:, t] = h
            if saved is not None:
                for name, value in zip(saved, (h_prev, c_prev, i, o, g, tanh_c, m), strict=True):
                    saved[name].append(value)
        return outputs, h, c

    @staticmethod
    def backward(ctx, d_outputs, d_h_last, d_c_last):
        recurrent_weight, projection_weight, h_prev, c_prev, i, o, g, tanh_c, m = ctx.saved_tensors
        hidden = i.shape[2]
        d_h = torch.zeros_like(h_prev[:, 0]) if d_h_last is None else d_h_last.clone()
        d_c = torch.zeros_like(c_prev[:, 0]) if d_c_last is None else d_c_last.clone()
        d_pre = i.new_empty(*i.shape[:2], 3 * hidden)
        d_h_all = torch.empty_like(d_outputs)
        for t in reversed(range(d_outputs.shape[1])):
            d_h = d_h + d_outputs[:, t]
            d_h_all[:, t] = d_h
            d_m = d_h @ projection_weight
            i_t, o_t, g_t, tanh_c_t = i[:, t], o[:, t], g[:, t], tanh_c[:, t]
            d_c = d_c + d_m * o_t * (1 - tanh_c_t * tanh_c_t)
            d_pre[:, t, :hidden] = d_c * (g_t - c_prev[:, t]) * i_t * (1 - i_t)
            d_pre[:, t, hidden : 2 * hidden] = d_m * tanh_c_t * o_t * (1 - o_t)
            d_pre[:, t, 2 * hidden :] = d_c * i_t * (1 - g_t * g_t)
            d_c = d_c * (1 - i_t)
            d_h = d_pre[:, t] @ recurrent_weight
        d_recurrent = d_pre.flatten(0, 1).T @ h_prev.flatten(0, 1)
        d_projection = d_h_all.flatten(0, 1).T @ m.flatten(0, 1)
        return d_pre, d_h, d_c, d_recurrent, d_projection


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
