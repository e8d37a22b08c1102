"""The model seam: what the rest of the project needs of a next-word model, and the architectures that have it.

Training (`train.py`), evaluation (`evaluate.py`), the suggestion strip (`suggest.py`),
the int8 artifact (`artifact.py`), the phones and the aggregator use a model only
through `NextWordModel`, build it with `model.build_model(config)` and load it with
`weights.model_from_bytes`; a saved model records its architecture's name and sizes.
Adding an architecture is one module with a config and a model class, and one line in
`ARCHITECTURES`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from keyboard_model.model import CIFGLSTM, ModelConfig
from keyboard_model.transformer import CausalTransformer, TransformerConfig

# A saved model without an architecture predates the seam: it is a CIFG.
DEFAULT_ARCHITECTURE = "cifg"


class ArchitectureConfig(Protocol):
    """A frozen dataclass of a network's sizes."""

    architecture: ClassVar[str]
    vocab_size: int

    def to_dict(self) -> dict[str, int]: ...


# Each architecture's own incremental state (the CIFG's recurrent state, the Transformer's key/value cache);
# callers only hand it back to `step`.
ModelState = Any


class NextWordModel(Protocol):
    config: ArchitectureConfig

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Outputs (batch, time, width) before the output layer, for every position of `tokens` (batch, time),
        each seeing only the tokens up to it, from the start of the row."""

    def output_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Scores over the vocabulary (..., vocab) for `features` (..., width)."""

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """Mean next-token cross-entropy of `tokens` (batch, time) against `targets`, skipping `ignore_index`."""

    def initial_state(self, batch_size: int) -> ModelState:
        """The state before any token."""

    def step(self, tokens: torch.Tensor, state: ModelState) -> tuple[torch.Tensor, ModelState]:
        """Features (batch, width) after one more token per row, `tokens` (batch,), and the state after it.
        `state` stays valid, so a caller can step again from an earlier state (the keyboard's backspace)."""

    # What training, averaging and export use of a torch module.
    def parameters(self) -> Iterator[torch.nn.Parameter]: ...
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> Any: ...
    def train(self, mode: bool = True) -> NextWordModel: ...
    def eval(self) -> NextWordModel: ...


@dataclass(frozen=True)
class Architecture:
    label: str  # its name in tables
    config_class: type[ArchitectureConfig]
    model_class: type[NextWordModel]


ARCHITECTURES: dict[str, Architecture] = {
    "cifg": Architecture("CIFG", ModelConfig, CIFGLSTM),
    "transformer": Architecture("Transformer", TransformerConfig, CausalTransformer),
}


def architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown model architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None


def config_from_dict(name: str, sizes: Mapping[str, int]) -> ArchitectureConfig:
    """The config that `name`'s `to_dict` wrote."""
    return architecture(name).config_class(**sizes)


def new_model(config: ArchitectureConfig) -> NextWordModel:
    """An untrained model of `config`'s architecture, initialised from torch's global generator."""
    return architecture(config.architecture).model_class(config)
