"""The model seam: what the rest of the project needs of a next-word model, and the architectures that have it.

Training (`train.py`), evaluation (`evaluate.py`), the suggestion strip (`suggest.py`),
the int8 artifact (`artifact.py`), the phones and the aggregator use a model only
through `NextWordModel`, build it with `build_model(config)` and load it with
`weights.model_from_bytes`; a saved model records its architecture's name and sizes.

Adding an architecture is one module (a frozen config dataclass, a torch module, and the
function that counts its training FLOPs) and one `Architecture` record in `ARCHITECTURES`.
The record is all that the rest reads: the vectorised executor batches its
`batched_features`, the benchmarks count its `training_flops_per_token`, and the command
line lists it and sets its sizes (`--embedding-dim`, `--layers`, ...: keyboard_model/cli_options.py).
It names what it needs by where it lives ("module:attribute"), as the aggregation rules and
privacy mechanisms do, so that this module, and `--help`, import no torch
(tests/test_cli_startup.py).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import torch

# A saved model without an architecture predates the seam: it is a CIFG.
DEFAULT_ARCHITECTURE = "cifg"


class ArchitectureConfig(Protocol):
    """A frozen dataclass of a network's sizes."""

    architecture: ClassVar[str]

    @property  # read-only, as a frozen dataclass's fields are
    def vocab_size(self) -> int: ...

    def to_dict(self) -> dict[str, int]: ...


# Each architecture's own incremental state (the CIFG's recurrent state, the Transformer's key/value cache);
# callers only hand it back to `step`.
ModelState = Any


class NextWordModel(Protocol):
    @property  # read-only: each model holds its own architecture's config
    def config(self) -> ArchitectureConfig: ...

    # The tied output layer: scores are features @ embedding.weight.T + output_bias. The fused losses (the model's
    # own and the vectorised executor's) read these two parameters by their names, "embedding.weight" and
    # "output_bias".
    embedding: torch.nn.Embedding
    output_bias: torch.nn.Parameter

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
    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]: ...
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> Any: ...
    def train(self, mode: bool = True) -> NextWordModel: ...
    def eval(self) -> NextWordModel: ...


# (a model, one phone's weights by parameter name, its tokens (batch, time)) -> its features (batch, time, width),
# computed with those weights in place of the model's own, in operations that torch.func.vmap can batch over phones.
BatchedFeatures = Callable[[Any, "dict[str, torch.Tensor]", "torch.Tensor"], "torch.Tensor"]


@dataclass(frozen=True)
class Architecture:
    """Everything the project needs of a network beyond `NextWordModel`, each named as "module:attribute"."""

    label: str  # its name in tables
    config: str  # its sizes: a frozen dataclass whose instances meet ArchitectureConfig
    model: str  # its module, built from a config and initialised from torch's global generator
    # Matrix FLOPs of one training token for a config (forward and backward): what the benchmarks divide by.
    flops: str
    # Its config's fields but vocab_size (the tokenizer's), each a command-line option, with the option's help
    # (tests/test_architecture.py holds them to the config's fields).
    sizes: Mapping[str, str]
    # What the vectorised executor batches over phones: by default the model's own `features` with other weights,
    # right for a model in plain torch operations; one with hand-written autograd Functions brings its own.
    batched: str = "keyboard_model.batched:functional_features"

    @property
    def config_class(self) -> type[Any]:
        return _load(self.config)

    @property
    def model_class(self) -> Callable[[Any], NextWordModel]:
        return _load(self.model)

    @property
    def training_flops_per_token(self) -> Callable[[Any], int]:
        return _load(self.flops)

    @property
    def batched_features(self) -> BatchedFeatures:
        return _load(self.batched)


ARCHITECTURES: dict[str, Architecture] = {
    "cifg": Architecture(
        "CIFG", "keyboard_model.model:ModelConfig", "keyboard_model.model:CIFGLSTM",
        "keyboard_model.model:training_flops_per_token",
        {"embedding_dim": "word embedding width (default: 96)",
         "hidden_dim": "CIFG-LSTM cells (default: 670)",
         "projection_dim": "the projection's width; tying needs it equal to --embedding-dim (default: that)"},
        batched="keyboard_model.model:batched_features"),
    "transformer": Architecture(
        "Transformer", "keyboard_model.transformer:TransformerConfig", "keyboard_model.transformer:CausalTransformer",
        "keyboard_model.transformer:training_flops_per_token",
        {"embedding_dim": "every layer's width, the embeddings' too (default: 96)",
         "layers": "blocks (default: 4)",
         "heads": "attention heads; --embedding-dim must be a multiple (default: 4)",
         "context": "tokens a position sees, the training sequence length (default: 20)"}),
}


@functools.cache
def _load(name: str) -> Any:
    module, attribute = name.split(":")
    return getattr(importlib.import_module(module), attribute)


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


def build_model(config: ArchitectureConfig, seed: int = 0) -> NextWordModel:
    """A freshly initialised model of `config`'s architecture; the same seed gives the same weights."""
    import torch

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return new_model(config)
    finally:
        torch.random.set_rng_state(generator_state)
