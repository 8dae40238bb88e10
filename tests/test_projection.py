"""Per-step directional derivatives against brute-force per-sample gradients, in float64."""

import pytest
import torch
from torch import nn

from hydraclean.gradients import parameter_dict
from hydraclean.projection import (
    FunctionalProjector,
    _conv_sample_gradients,
    LayerFactorProjector,
    make_projector,
    supports_layer_factors,
)

from . import reference as ref

CE = nn.CrossEntropyLoss(reduction="none")


def batch(shape, n=5, n_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.arange(n) % n_classes


def brute(module, xb, yb, directions, seed=7):
    grads, _ = ref.brute_per_sample_grads(module, ref.flat_params(module), xb, yb, seed, CE)
    return grads @ directions.T


def project(projector, module, xb, yb, idx, weight, seed=7):
    with ref.seeded(seed):
        projector.add(parameter_dict(module), idx, xb, yb, weight)
    return projector.result()


@pytest.mark.parametrize("accumulate_bytes", [0, 10**6])
@pytest.mark.parametrize("n_directions", [1, 4])
def test_layer_factors_equal_brute_force_for_convolutions_dropout_and_inplace_relu(n_directions, accumulate_bytes):
    module = ref.tiny_conv_net().train()
    xb, yb = batch((1, 6, 6))
    n_params = sum(p.numel() for p in module.parameters())
    V = torch.randn(n_directions, n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    idx = torch.tensor([4, 0, 7, 2, 5])
    projector = LayerFactorProjector(module, CE, V, 9, accumulate_bytes=accumulate_bytes)
    assert (projector.conv_sum is not None) == (accumulate_bytes > 0)
    P = project(projector, module, xb, yb, idx, 0.5)
    expected = torch.zeros(9, n_directions, dtype=torch.float64)
    expected[idx] = 0.5 * brute(module, xb, yb, V)
    assert ref.relative_error(P, expected) < 1e-12
    assert P[[1, 3, 6, 8]].abs().max() == 0


def test_layer_factors_sum_linear_gradients_over_positions():
    module = ref.PositionsNet().train()
    xb, yb = batch((6, 3))
    V = torch.randn(3, sum(p.numel() for p in module.parameters()), dtype=torch.float64)
    P = project(LayerFactorProjector(module, CE, V, 5), module, xb, yb, torch.arange(5), 1.0)
    assert ref.relative_error(P, brute(module, xb, yb, V)) < 1e-12


@pytest.mark.parametrize("bias", [True, False])
def test_ghost_products_equal_validation_gradient_directions(bias):
    """Directions that are validation samples' own eval-mode gradients: ghost products for Linear layers,
    with and without bias (whose "+ 1" in (a_i . a_j + 1) is the bias's own product)."""
    module = ref.tiny_conv_net().train()
    if not bias:
        for layer in (module[6], module[8]):
            layer.bias = None
    xb, yb = batch((1, 6, 6))
    X_rows, y_rows = batch((1, 6, 6), n=4, seed=3)
    w = ref.flat_params(module)
    rows = ref.eval_per_sample_grads(module, w, X_rows, y_rows, CE)
    dense = torch.randn(2, w.numel(), dtype=torch.float64)
    V = torch.cat([dense, rows])
    projector = LayerFactorProjector(module, CE, V, 5, rows=(module, X_rows, y_rows))
    assert len(projector.row_factors) == 2  # both Linear layers take the ghost route
    P = project(projector, module, xb, yb, torch.arange(5), 2.0)
    assert ref.relative_error(P, 2.0 * brute(module, xb, yb, V)) < 1e-12


def test_shared_layer_falls_back_to_functional_projection():
    module = ref.SharedLayerNet().train()
    xb, yb = batch((3,))
    V = torch.randn(2, sum(p.numel() for p in module.parameters()), dtype=torch.float64)
    projector = LayerFactorProjector(module, CE, V, 5)
    P = project(projector, module, xb, yb, torch.arange(5), 1.0)
    assert projector.fallback is not None
    assert ref.relative_error(P, brute(module, xb, yb, V)) < 1e-12


@pytest.mark.parametrize(
    "module,expected",
    [
        (ref.tiny_conv_net(), True),
        (ref.tiny_mlp(), True),
        (ref.tiny_bn_cnn(), False),  # BatchNorm couples the samples
        (nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), False),  # a parameter outside Linear / Conv2d
        (nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), False),
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding="same")), False),
    ],
)
def test_which_modules_get_layer_factors(module, expected):
    assert supports_layer_factors(module) is expected
    V = torch.zeros(1, sum(p.numel() for p in module.parameters()), dtype=next(module.parameters()).dtype)
    kind = LayerFactorProjector if expected else FunctionalProjector
    assert isinstance(make_projector(module, CE, V, 2), kind)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.Conv2d(2, 3, (3, 2), dilation=(2, 1), padding=(1, 0), bias=False),
        nn.Conv2d(3, 5, 1),  # the Linear-over-positions route
        nn.Conv2d(3, 5, 1, stride=2),
        nn.Conv2d(40, 2, 3, padding=1),  # unfolded input above UNFOLD_LIMIT: the grouped convolution
        nn.Conv2d(64, 2, 3, stride=2, dilation=2, padding=2),
    ],
)
def test_conv_sample_gradients_equal_one_backward_per_sample(conv):
    conv = conv.double()
    size = (7, 6) if conv.in_channels < 40 else (30, 30)
    a = torch.randn(4, conv.in_channels, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    delta = torch.randn_like(conv(a)).detach()
    expected = []
    for i in range(4):
        grads = torch.autograd.grad(conv(a[i : i + 1]), list(conv.parameters()), delta[i : i + 1])
        expected.append(torch.cat([g.reshape(-1) for g in grads]))
    assert ref.relative_error(_conv_sample_gradients(conv, a, delta), torch.stack(expected)) < 1e-12
