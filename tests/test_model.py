import torch

from keyboard_model.architecture import build_model
from keyboard_model.model import CIFGLSTM, ModelConfig, parameter_count


def reference_cifg(model: CIFGLSTM, tokens: torch.Tensor) -> torch.Tensor:
    """The CIFG-LSTM equations written out one step and one gate at a time."""
    hidden = model.config.hidden_dim
    w_x, b = model.input_weights.weight, model.input_weights.bias
    w_h, w_p, emb = model.recurrent_weights.weight, model.projection.weight, model.embedding.weight
    h = torch.zeros(tokens.shape[0], model.config.projection_dim)
    c = torch.zeros(tokens.shape[0], hidden)
    outputs = []
    for t in range(tokens.shape[1]):
        x = emb[tokens[:, t]]
        pre = x @ w_x.T + b + h @ w_h.T
        i = torch.sigmoid(pre[:, :hidden])
        f = 1 - i
        o = torch.sigmoid(pre[:, hidden : 2 * hidden])
        g = torch.tanh(pre[:, 2 * hidden :])
        c = f * c + i * g
        h = (o * torch.tanh(c)) @ w_p.T
        outputs.append(h @ emb.T + model.output_bias)
    return torch.stack(outputs, dim=1)


def test_cifg_matches_step_by_step_reference():
    config = ModelConfig(vocab_size=30, embedding_dim=4, hidden_dim=6, projection_dim=4)
    model = build_model(config, seed=3)
    with torch.no_grad():
        model.output_bias.normal_()  # so the reference also checks the bias
    tokens = torch.randint(0, 30, (2, 7), generator=torch.Generator().manual_seed(0))
    logits, _ = model(tokens)
    torch.testing.assert_close(logits, reference_cifg(model, tokens))


def test_state_carries_over_between_calls():
    model = build_model(ModelConfig(vocab_size=20, embedding_dim=4, hidden_dim=5, projection_dim=4))
    tokens = torch.randint(0, 20, (3, 6))
    whole, _ = model(tokens)
    first, state = model(tokens[:, :4])
    rest, _ = model(tokens[:, 4:], state)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), whole)


def test_output_layer_is_tied_to_the_input_embedding():
    model = build_model(ModelConfig(vocab_size=20, embedding_dim=4, hidden_dim=5, projection_dim=4))
    tokens = torch.tensor([[1, 2, 3]])
    before, _ = model(tokens)
    with torch.no_grad():
        model.embedding.weight[7] += 1.0  # a word that is not in the input
    after, _ = model(tokens)
    changed = (after - before).abs().sum(dim=(0, 1)) > 0
    assert changed.tolist() == [i == 7 for i in range(20)]


def test_default_sizes_are_gboards():
    count = parameter_count(build_model(ModelConfig()))
    # Hard et al. 2018: 1.4M parameters for the 10,000-word model.
    assert 1_350_000 < count < 1_450_000


def test_same_seed_same_weights_different_seed_different_weights():
    config = ModelConfig(vocab_size=20, embedding_dim=4, hidden_dim=5, projection_dim=4)
    a, b, c = build_model(config, 1), build_model(config, 1), build_model(config, 2)
    assert torch.equal(a.recurrent_weights.weight, b.recurrent_weights.weight)
    assert not torch.equal(a.recurrent_weights.weight, c.recurrent_weights.weight)


def test_untied_projection_width_is_refused():
    try:
        ModelConfig(embedding_dim=96, projection_dim=64)
    except ValueError as error:
        assert "tied" in str(error)
    else:
        raise AssertionError("a projection narrower than the embedding cannot be tied")


def test_hand_written_backward_matches_numerical_gradients():
    from keyboard_model.model import CIFGRecurrence

    generator = torch.Generator().manual_seed(0)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.double, requires_grad=True)

    hidden, projection = 6, 4
    inputs = (tensor(3, 5, 3 * hidden), tensor(3, projection), tensor(3, hidden),
              tensor(3 * hidden, projection), tensor(projection, hidden))
    assert torch.autograd.gradcheck(CIFGRecurrence.apply, inputs)


def test_compiled_walk_matches_the_python_walk_and_its_gradients():
    from keyboard_model.model import CIFGRecurrence, CompiledCIFGRecurrence
    from keyboard_model.native import cifg_kernel

    assert cifg_kernel() is not None, "the C++ kernel must build on a machine with a compiler"
    generator = torch.Generator().manual_seed(1)
    hidden, projection = 7, 4
    shapes = [(3, 5, 3 * hidden), (3, projection), (3, hidden), (3 * hidden, projection), (projection, hidden)]
    inputs = [torch.randn(*shape, generator=generator) for shape in shapes]
    # Gradients arriving on the outputs and on both final states, as when a state is carried on.
    upstream = [torch.randn(3, 5, projection, generator=generator), torch.randn(3, projection, generator=generator),
                torch.randn(3, hidden, generator=generator)]

    def outputs_and_gradients(walk):
        leaves = [t.clone().requires_grad_() for t in inputs]
        outputs = walk.apply(*leaves)
        torch.autograd.backward(outputs, upstream)
        return [*outputs, *(leaf.grad for leaf in leaves)]

    for compiled, python in zip(outputs_and_gradients(CompiledCIFGRecurrence),
                                outputs_and_gradients(CIFGRecurrence), strict=True):
        torch.testing.assert_close(compiled, python)


def test_training_gradients_match_autograd_through_the_reference():
    config = ModelConfig(vocab_size=30, embedding_dim=4, hidden_dim=6, projection_dim=4)
    model = build_model(config, seed=1)
    tokens = torch.randint(0, 30, (2, 7), generator=torch.Generator().manual_seed(2))
    logits, _ = model(tokens)
    logits.square().mean().backward()
    expected = reference_cifg(model, tokens).square().mean()
    gradients = torch.autograd.grad(expected, list(model.parameters()))
    for (name, parameter), gradient in zip(model.named_parameters(), gradients, strict=True):
        torch.testing.assert_close(parameter.grad, gradient, msg=name)


def test_fused_loss_matches_cross_entropy_of_the_logits_and_its_gradients():
    config = ModelConfig(vocab_size=30, embedding_dim=4, hidden_dim=6, projection_dim=4)
    model = build_model(config, seed=4)
    with torch.no_grad():
        model.output_bias.normal_()
    generator = torch.Generator().manual_seed(5)
    tokens, targets = (torch.randint(1, 30, (3, 7), generator=generator),
                       torch.randint(1, 30, (3, 7), generator=generator))
    targets[2, 4:] = 0  # padding, which both must skip

    fused = model.loss(tokens, targets, ignore_index=0)
    fused_gradients = torch.autograd.grad(fused, list(model.parameters()))
    logits, _ = model(tokens)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 30), targets.reshape(-1), ignore_index=0)
    expected_gradients = torch.autograd.grad(expected, list(model.parameters()))

    torch.testing.assert_close(fused, expected)
    for (name, _), got, want in zip(model.named_parameters(), fused_gradients, expected_gradients, strict=True):
        torch.testing.assert_close(got, want, msg=name)

