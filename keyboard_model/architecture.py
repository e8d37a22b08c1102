"""The model seam: what the rest of the project needs of a next-word model, and the architectures that have it.

Training (`train.py`), evaluation (`evaluate.py`), the suggestion strip (`suggest.py`),
the int8 artifact (`artifact.py`), the phones and the aggregator use a model only
through `NextWordModel`, build it with `build_model(config)` and load it with
`weights.model_from_bytes`; a saved model records its architecture's name and sizes.

Adding an architecture is one module (a frozen config dataclass, a torch module, and the
function that counts its training FLOPs) and one `Architecture` record in `ARCHITECTURES`.
The record is all that the rest reads: the vectorised executor batches its
`batched_features`, the benchmarks count its `training_flops_per_token`, and the command
line sets its config's fields (`--embedding-dim`, `--layers`, ...: keyboard_model/cli_options.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol

import torch
from torch.func import functional_call

from keyboard_model import model as cifg
from keyboard_model import transformer

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
BatchedFeatures = Callable[[Any, dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


class _Features(torch.nn.Module):
    """A model's `features` as a module's forward, so that functional_call runs it with other weights."""

    def __init__(self, model: NextWordModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.features(tokens)


def functional_features(model: NextWordModel, params: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """The model's own `features` with `params` in place of its weights: right for a model written in plain torch
    operations (the Transformer); one with hand-written autograd Functions, which vmap cannot batch, brings its own."""
    return functional_call(_Features(model), {f"model.{name}": t for name, t in params.items()}, (tokens,))


@dataclass(frozen=True)
class Architecture:
    """Everything the project needs of a network beyond `NextWordModel`."""

    label: str  # its name in tables
    # Its sizes; every field but vocab_size (the tokenizer's) is a command-line option.
    config_class: type[Any]  # a frozen dataclass whose instances meet ArchitectureConfig
    # An untrained model of a config, initialised from torch's global generator.
    model_class: Callable[[Any], NextWordModel]
    # Matrix FLOPs of one training token for a config (forward and backward): what the benchmarks divide by.
    training_flops_per_token: Callable[[Any], int]
    # What the vectorised executor batches over phones.
    batched_features: BatchedFeatures = functional_features

    def size_fields(self) -> tuple[str, ...]:
        """The sizes the command line sets, as its config names them."""
        return tuple(field.name for field in fields(self.config_class) if field.name != "vocab_size")


ARCHITECTURES: dict[str, Architecture] = {
    "cifg": Architecture("CIFG", cifg.ModelConfig, cifg.CIFGLSTM, cifg.training_flops_per_token,
                         cifg.batched_features),
    "transformer": Architecture("Transformer", transformer.TransformerConfig, transformer.CausalTransformer,
                                transformer.training_flops_per_token),
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


def build_model(config: ArchitectureConfig, seed: int = 0) -> NextWordModel:
    """A freshly initialised model of `config`'s architecture; the same seed gives the same weights."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return new_model(config)
    finally:
        torch.random.set_rng_state(generator_state)
