"""Per-sample gradients, directional derivatives and HVPs against brute force."""

import pytest
import torch
from torch import nn

from hydraclean.gradients import (
    PerSampleLoss,
    class_validation_gradients,
    directional_derivatives,
    flatten,
    hessian_vector_products,
    is_sample_separable,
    parameter_dict,
    per_sample_gradients,
    per_sample_validation_gradients,
    unflatten,
    validation_gradients,
)
from hydraclean.training import step_rng

from . import reference as ref

CE = nn.CrossEntropyLoss(reduction="none")
CPU = torch.device("cpu")


def small_cnn_with_bn_and_dropout():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4 * 4 * 4, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(8, 3),
    ).double()


def batch(b=6, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, *shape, generator=g, dtype=torch.float64), torch.arange(b) % 3


def test_flatten_roundtrip():
    params = parameter_dict(ref.tiny_mlp())
    flat = flatten(params)
    back = unflatten(flat, params)
    assert all(torch.equal(back[k], params[k]) for k in params)
    stacked = unflatten(torch.stack([flat, 2 * flat]), params)
    assert torch.equal(flatten(stacked, batch_dims=1)[1], 2 * flat)


def test_separability():
    assert is_sample_separable(ref.tiny_mlp())
    assert not is_sample_separable(small_cnn_with_bn_and_dropout())


@pytest.mark.parametrize("make", [small_cnn_with_bn_and_dropout, ref.tiny_mlp])
def test_per_sample_gradients_equal_brute_force(make):
    module = make().train()
    x, y = batch(shape=(1, 8, 8)) if make is small_cnn_with_bn_and_dropout else batch(shape=(3,))
    loss = PerSampleLoss(module, CE)
    params = parameter_dict(module)
    with step_rng(7, CPU):
        grads = per_sample_gradients(loss, params, x, y)
    brute, _ = ref.brute_per_sample_grads(module, ref.flat_params(module), x, y, 7, CE)
    assert ref.relative_error(grads, brute) < 1e-12


def test_batchnorm_gradient_is_not_the_batch_of_one_gradient():
    """The per-sample gradient uses the step's batch statistics, not a batch of one."""
    module = small_cnn_with_bn_and_dropout().train()
    x, y = batch()
    brute, _ = ref.brute_per_sample_grads(module, ref.flat_params(module), x, y, 7, CE)
    alone, _ = ref.brute_per_sample_grads(module, ref.flat_params(module), x[:2], y[:2], 7, CE)
    assert ref.relative_error(alone[0], brute[0]) > 1e-3


def test_dropout_mask_is_the_training_steps_own():
    module = small_cnn_with_bn_and_dropout().train()
    x, y = batch()
    loss = PerSampleLoss(module, CE)
    with step_rng(7, CPU):
        ours = loss(parameter_dict(module), x, y)
    with step_rng(7, CPU):
        step = CE(module(x), y)
    with step_rng(8, CPU):
        other = CE(module(x), y)
    assert torch.equal(ours, step.detach())
    assert not torch.allclose(ours, other.detach())


@pytest.mark.parametrize("k", [1, 3, 8], ids=["one JVP", "a JVP per direction", "batch Jacobian"])
def test_directional_derivatives_equal_brute_force(k):
    """BatchNorm and Dropout: fewer directions than samples (6) take forward mode, each JVP with the step's
    dropout masks; more take the rows of the batch Jacobian."""
    module = small_cnn_with_bn_and_dropout().train()
    x, y = batch()
    loss = PerSampleLoss(module, CE)
    params = parameter_dict(module)
    V = torch.randn(k, flatten(params).numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with step_rng(7, CPU):
        D = directional_derivatives(loss, params, x, y, V)
    brute, _ = ref.brute_per_sample_grads(module, ref.flat_params(module), x, y, 7, CE)
    assert D.shape == (x.shape[0], k)
    assert ref.relative_error(D, brute @ V.T) < 1e-12


def test_hessian_vector_products_equal_finite_differences_of_the_gradient():
    module = small_cnn_with_bn_and_dropout().train()
    x, y = batch()
    loss = PerSampleLoss(module, CE)
    params = parameter_dict(module)
    w = ref.flat_params(module)
    V = torch.randn(2, w.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with step_rng(7, CPU):
        HV = hessian_vector_products(loss, params, x, y, V, chunk_size=1)

    def mean_grad(wv):
        g, _ = ref.brute_per_sample_grads(module, wv, x, y, 7, CE)
        return g.mean(0)

    h = 1e-5
    fd = torch.stack([(mean_grad(w + h * v) - mean_grad(w - h * v)) / (2 * h) for v in V])
    assert ref.relative_error(HV, fd) < 1e-6


def test_validation_gradients_in_eval_mode():
    module = small_cnn_with_bn_and_dropout()
    module.train()
    module(batch(16)[0])  # give BatchNorm non-trivial running statistics
    x, y = batch(5)
    mean, rows = validation_gradients(module, x, y, CE, rows=torch.tensor([0, 3]), batch_size=2)
    assert module.training  # evaluated on a copy: the caller's module keeps its mode
    module.eval()
    w = ref.flat_params(module).requires_grad_(True)
    from torch.func import functional_call

    def loss_of(xb, yb):
        return CE(functional_call(module, ref.split(w, module), (xb,)), yb)

    (g_ref,) = torch.autograd.grad(loss_of(x, y).mean(), w)
    (g0,) = torch.autograd.grad(loss_of(x[:1], y[:1]).sum(), w)
    (g3,) = torch.autograd.grad(loss_of(x[3:4], y[3:4]).sum(), w)
    assert ref.relative_error(mean, g_ref) < 1e-12
    assert ref.relative_error(rows, torch.stack([g0, g3])) < 1e-12


def test_class_validation_gradients_are_class_mean_gradients_in_eval_mode():
    module = small_cnn_with_bn_and_dropout()
    module.train()
    module(batch(16)[0])
    x, y = batch(9)
    y = torch.tensor([0, 2, 0, 0, 2, 0, 2, 0, 0])  # class 1 absent; class 0 spans three batches of 2
    G = class_validation_gradients(module, x, y, CE, 3, batch_size=2)
    rows = per_sample_validation_gradients(module, x, y, CE, torch.arange(9))
    assert module.training
    module.eval()
    w = ref.flat_params(module).requires_grad_(True)
    from torch.func import functional_call

    for c in (0, 2):
        keep = y == c
        loss = CE(functional_call(module, ref.split(w, module), (x[keep],)), y[keep]).mean()
        (g,) = torch.autograd.grad(loss, w)
        assert ref.relative_error(G[c], g) < 1e-12
        assert ref.relative_error(G[c], rows[keep].mean(0)) < 1e-12
    assert torch.isnan(G[1]).all()
