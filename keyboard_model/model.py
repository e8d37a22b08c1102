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
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from keyboard_model.native import cifg_kernel


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the CIFG network. The defaults are Gboard's."""

    architecture: ClassVar[str] = "cifg"

    vocab_size: int = 10_000
    embedding_dim: int = 96
    hidden_dim: int = 670
    projection_dim: int = 0  # 0: as wide as the embedding, which tying needs

    def __post_init__(self) -> None:
        if self.projection_dim == 0:
            object.__setattr__(self, "projection_dim", self.embedding_dim)
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
            walk = CompiledCIFGRecurrence if cifg_kernel() is not None else CIFGRecurrence
            outputs, h, c = walk.apply(gate_inputs, *state, *weights)
        else:  # inference (the keyboard): no autograd bookkeeping
            outputs, h_all, c_all, *_ = CIFGRecurrence.run(gate_inputs, *state, *weights)
            h, c = h_all[-1], c_all[-1]
        return outputs, (h, c)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Projected outputs (batch, time, projection) for `tokens` (batch, time), from the initial state."""
        return self.hidden_states(tokens)[0]

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Projected output (batch, projection) after one more token per row, `tokens` (batch,), and the state."""
        outputs, state = self.hidden_states(tokens[:, None], state)
        return outputs[:, 0], state

    def output_logits(self, projected: torch.Tensor) -> torch.Tensor:
        """Scores over the vocabulary: the projected output read against the (tied) embeddings."""
        return projected @ self.embedding.weight.T + self.output_bias

    def forward(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Logits over the vocabulary for every position of `tokens` (batch, time)."""
        projected, state = self.hidden_states(tokens, state)
        return self.output_logits(projected), state

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """Mean next-token cross-entropy of `tokens` (batch, time) against `targets`, skipping `ignore_index`.

        Equal to `F.cross_entropy(self(tokens)[0], targets)`, but the scores over the
        vocabulary, the largest tensor of a training step, are made and walked fewer times.
        """
        projected, _ = self.hidden_states(tokens)
        keep = targets != ignore_index
        return TiedOutputCrossEntropy.apply(projected[keep], self.embedding.weight, self.output_bias, targets[keep])


class TiedOutputCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the tied output layer, output layer and loss in one.

    The gradient of cross-entropy with respect to the scores is softmax minus the one-hot
    target, so the log-probabilities kept from the forward pass become that gradient in
    place; autograd's separate softmax and loss would allocate and fill several more
    (positions x vocabulary) tensors. Backward runs once: it consumes what it saved.
    """

    @staticmethod
    def forward(ctx, projected, embedding, bias, targets):
        log_probs = torch.addmm(bias, projected, embedding.T)
        torch.log_softmax(log_probs, dim=1, out=log_probs)
        ctx.save_for_backward(projected, embedding, log_probs, targets)
        return -log_probs.gather(1, targets[:, None]).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_loss):
        projected, embedding, log_probs, targets = ctx.saved_tensors
        d_scores = log_probs.exp_()
        d_scores[torch.arange(len(targets)), targets] -= 1
        d_scores.mul_(d_loss / len(targets))
        return d_scores @ embedding, d_scores.T @ projected, d_scores.sum(0), None


class CIFGRecurrence(torch.autograd.Function):
    """The walk over time, with a hand-written backward pass.

    Per step, with gate pre-activations split as [input | output | candidate]:
        i, o, g = sigmoid, sigmoid, tanh of (gate_inputs[t] + h @ W_h^T)
        c = (1 - i) * c + i * g          (the coupling: what is written in is what is forgotten)
        m = o * tanh(c);   h = m @ W_p^T

    Autograd would record a dozen small operations per step and replay them one by one.
    Here every step writes into preallocated time-major buffers; the backward pass first
    computes, for all steps at once, each local derivative that does not depend on the
    incoming gradient, so its walk back is two matrix products and four products of
    vectors per step; the weight gradients are one matrix product over all steps each.
    """

    @staticmethod
    def forward(ctx, gate_inputs, h, c, recurrent_weight, projection_weight):
        walk = CIFGRecurrence.run(gate_inputs, h, c, recurrent_weight, projection_weight)
        outputs, h_all, c_all, gates, tanh_c, m = walk
        ctx.save_for_backward(recurrent_weight, projection_weight, h_all, c_all, gates, tanh_c, m)
        return outputs, h_all[-1].clone(), c_all[-1].clone()

    @staticmethod
    def run(gate_inputs, h, c, recurrent_weight, projection_weight):
        """The forward walk: (outputs (batch, time, projection), then, time-major, h and c of
        every step including the initial state, the gate activations, tanh(c) and m)."""
        batch, steps, _ = gate_inputs.shape
        hidden, projection = projection_weight.shape[1], projection_weight.shape[0]
        new = gate_inputs.new_empty
        h_all, c_all = new(steps + 1, batch, projection), new(steps + 1, batch, hidden)
        gates, tanh_c, m = new(steps, batch, 3 * hidden), new(steps, batch, hidden), new(steps, batch, hidden)
        h_all[0], c_all[0] = h, c
        pre = new(batch, 3 * hidden)
        for t in range(steps):
            torch.addmm(gate_inputs[:, t], h_all[t], recurrent_weight.T, out=pre)
            torch.sigmoid(pre[:, : 2 * hidden], out=gates[t, :, : 2 * hidden])
            torch.tanh(pre[:, 2 * hidden :], out=gates[t, :, 2 * hidden :])
            i, o, g = gates[t].split(hidden, dim=1)
            torch.lerp(c_all[t], g, i, out=c_all[t + 1])  # c + i (g - c) = (1 - i) c + i g
            torch.tanh(c_all[t + 1], out=tanh_c[t])
            torch.mul(o, tanh_c[t], out=m[t])
            torch.mm(m[t], projection_weight.T, out=h_all[t + 1])
        return h_all[1:].transpose(0, 1).contiguous(), h_all, c_all, gates, tanh_c, m

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_outputs, d_h_last, d_c_last):
        recurrent_weight, projection_weight, h_all, c_all, gates, tanh_c, m = ctx.saved_tensors
        steps, hidden = m.shape[0], m.shape[2]
        i, o, g = gates.split(hidden, dim=2)
        # For all steps at once: how a gradient on m reaches c, and how one on c or m reaches each gate's
        # pre-activation. The input and candidate gates both take theirs from c, so one product per step
        # fills both, through a view of every other gate block of d_pre.
        c_from_m = o * (1 - tanh_c * tanh_c)
        input_and_candidate_from_c = torch.stack([(g - c_all[:-1]) * i * (1 - i), i * (1 - g * g)], dim=2)
        output_from_m = tanh_c * o * (1 - o)
        forget = 1 - i

        d_outputs = d_outputs.transpose(0, 1)
        d_h_all = torch.empty_like(d_outputs)  # gradient reaching each step's h, from above and from later steps
        d_pre = torch.empty_like(gates)
        d_m = torch.empty_like(m[0])
        d_c = torch.zeros_like(c_all[0]) if d_c_last is None else d_c_last.clone()
        d_h_all[-1] = d_outputs[-1] if d_h_last is None else d_outputs[-1] + d_h_last
        for t in reversed(range(steps)):
            torch.mm(d_h_all[t], projection_weight, out=d_m)
            d_c.addcmul_(d_m, c_from_m[t])
            d_gates = d_pre[t].view(-1, 3, hidden)
            torch.mul(d_c[:, None], input_and_candidate_from_c[t], out=d_gates[:, ::2])
            torch.mul(d_m, output_from_m[t], out=d_gates[:, 1])
            d_c.mul_(forget[t])
            if t > 0:
                torch.addmm(d_outputs[t - 1], d_pre[t], recurrent_weight, out=d_h_all[t - 1])
        d_h = d_pre[0] @ recurrent_weight
        d_recurrent = d_pre.flatten(0, 1).T @ h_all[:-1].flatten(0, 1)
        d_projection = d_h_all.flatten(0, 1).T @ m.flatten(0, 1)
        return d_pre.transpose(0, 1), d_h, d_c, d_recurrent, d_projection


class CompiledCIFGRecurrence(torch.autograd.Function):
    """`CIFGRecurrence` for training, each direction one call into `cifg_kernel.cpp`.

    Same results (tested against it); a quarter faster on a phone-sized batch, because
    a step's dozen small operations no longer each pay Python's dispatch.
    """

    @staticmethod
    def forward(ctx, gate_inputs, h, c, recurrent_weight, projection_weight):
        outputs, h_all, c_all, m, *local = cifg_kernel().forward(
            gate_inputs.contiguous(), h.contiguous(), c.contiguous(), recurrent_weight, projection_weight
        )
        ctx.save_for_backward(recurrent_weight, projection_weight, h_all, m, *local)
        return outputs, h_all[-1].clone(), c_all[-1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_outputs, d_h_last, d_c_last):
        recurrent_weight, projection_weight, h_all, m, *local = ctx.saved_tensors
        return tuple(
            cifg_kernel().backward(d_outputs, d_h_last, d_c_last, recurrent_weight, projection_weight, h_all, m, local)
        )


def training_flops_per_token(config: ModelConfig) -> int:
    """Matrix FLOPs of one training token: three forward passes' worth (forward, and backward through inputs and
    weights)."""
    e, h, p, v = config.embedding_dim, config.hidden_dim, config.projection_dim, config.vocab_size
    return 3 * 2 * (e * 3 * h + p * 3 * h + h * p + p * v)


def batched_features(model: CIFGLSTM, params: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """The projected outputs (batch, time, projection) with `params` in place of the model's weights, in plain
    operations that vmap and autograd can batch over phones (the vectorised executor): the model's own walk,
    `CIFGRecurrence`, has the same equations but writes into preallocated buffers, and its C++ kernel is opaque."""
    hidden = model.config.hidden_dim
    projection = params["projection.weight"]
    gate_inputs = F.linear(F.embedding(tokens, params["embedding.weight"]), params["input_weights.weight"],
                           params["input_weights.bias"])
    h = gate_inputs.new_zeros(tokens.shape[0], projection.shape[0])
    c = gate_inputs.new_zeros(tokens.shape[0], hidden)
    outputs = []
    # unbind, not indexing per step: the backward of `gate_inputs[:, t]` fills a whole zero tensor of every step's
    # shape and adds the twenty of them up (measured: a third of the CPU time of a pass).
    for gate_input in gate_inputs.unbind(1):
        pre = gate_input + F.linear(h, params["recurrent_weights.weight"])
        i, o = torch.sigmoid(pre[:, : 2 * hidden]).split(hidden, dim=1)
        c = c + i * (torch.tanh(pre[:, 2 * hidden :]) - c)  # (1 - i) c + i g: the coupled gates
        h = F.linear(o * torch.tanh(c), projection)
        outputs.append(h)
    return torch.stack(outputs, dim=1)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
