"""The HYDRA math against independent computations, in float64."""

import numpy as np
import pytest
import torch
from torch import nn

from hydraclean.contribution import fit_contributions
from hydraclean.hypergradient import ExactTracker, replay_coefficients
from hydraclean.projection import TrainingFactors
from hydraclean.schedules import ExponentialDecay
from hydraclean.training import plan_trajectory, train

from . import reference as ref

CE = nn.CrossEntropyLoss(reduction="none")

# (n_samples, batch_size, epochs): full batch; shuffled mini-batches with a smaller last batch
SETTINGS = [(6, 6, 4), (10, 4, 3)]


def data(n, shape=(3,), n_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.arange(n) % n_classes
    Xv = torch.randn(7, *shape, generator=g, dtype=torch.float64)
    yv = torch.arange(7) % n_classes
    return X, y, Xv, yv


def plan(n, batch_size, epochs, momentum=0.9, weight_decay=0.05, lr=0.3):
    return plan_trajectory(
        n,
        batch_size=batch_size,
        max_epochs=epochs,
        lr=lr,
        lr_schedule=ExponentialDecay(0.7),
        momentum=momentum,
        weight_decay=weight_decay,
        seed=3,
    )


def test_replay_coefficients_match_explicit_matrix_products():
    rng = np.random.default_rng(0)
    lrs, p, lam = rng.uniform(0.01, 0.5, size=9), 0.8, 0.1
    c = replay_coefficients(lrs, p, lam)
    for t in range(len(lrs)):
        prod = np.eye(2)
        for s in range(len(lrs) - 1, t, -1):
            prod = prod @ np.array([[1 - lrs[s] * lam, -lrs[s] * p], [lam, p]])
        assert c[t] == pytest.approx((prod @ np.array([-lrs[t], 1.0]))[0], rel=1e-12)


@pytest.mark.parametrize("n,batch_size,epochs", SETTINGS)
def test_training_follows_torch_sgd_written_out(n, batch_size, epochs):
    X, y, Xv, yv = data(n)
    module = ref.tiny_mlp()
    traj = plan(n, batch_size, epochs)
    model, _, _ = train(module, X, y, CE, traj)
    w_ref = ref.unrolled_weights(module, ref.flat_params(module), X, y, traj, torch.zeros(n, dtype=torch.float64), CE)
    assert ref.relative_error(ref.flat_params(model), w_ref.detach()) < 1e-12


@pytest.mark.parametrize("n,batch_size,epochs", SETTINGS)
def test_exact_equals_derivative_of_unrolled_training(n, batch_size, epochs):
    X, y, Xv, yv = data(n)
    module = ref.tiny_mlp()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    C_ref, nabla_ref, _ = ref.unrolled_contributions(module, X, y, Xv, yv, plan(n, batch_size, epochs), CE)

    traj = plan(n, batch_size, epochs)
    tracker = ExactTracker(module, CE, traj, torch.arange(n))
    train(module, X, y, CE, traj, on_step=tracker)
    assert ref.relative_error(tracker.nabla, nabla_ref) < 1e-6

    result = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, batch_size, epochs), hessian="exact")
    assert ref.relative_error(result.contribution, C_ref) < 1e-6
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_exact_with_batchnorm_and_dropout_equals_unrolled_training():
    n = 8
    X, y, Xv, yv = data(n, shape=(1, 5, 5))
    module = ref.tiny_bn_cnn(track_running_stats=False)
    C_ref, nabla_ref, _ = ref.unrolled_contributions(module, X, y, Xv, yv, plan(n, 3, 2, lr=0.1), CE)
    traj = plan(n, 3, 2, lr=0.1)
    tracker = ExactTracker(module, CE, traj, torch.arange(n))
    train(module, X, y, CE, traj, on_step=tracker)
    assert ref.relative_error(tracker.nabla, nabla_ref) < 1e-6
    result = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, 3, 2, lr=0.1), hessian="exact")
    assert ref.relative_error(result.contribution, C_ref) < 1e-6


def test_exact_subset_tracks_only_those_samples():
    n = 10
    X, y, Xv, yv = data(n)
    module = ref.tiny_mlp()
    full = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, 4, 2), hessian="exact")
    subset = torch.tensor([1, 4, 7])
    part = fit_contributions(
        module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, 4, 2), hessian="exact", exact_indices=subset
    )
    assert np.isnan(np.delete(part.contribution, subset)).all()
    np.testing.assert_allclose(part.contribution[subset], full.contribution[subset], rtol=1e-12)


@pytest.mark.parametrize("n,batch_size,epochs", SETTINGS)
def test_free_equals_plain_per_sample_recurrence(n, batch_size, epochs):
    X, y, Xv, yv = data(n)
    module = ref.tiny_mlp()
    C_ref, _, _ = ref.free_recurrence(module, X, y, Xv, yv, plan(n, batch_size, epochs), CE)
    result = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, batch_size, epochs))
    assert ref.relative_error(result.contribution, C_ref) < 1e-9


@pytest.mark.parametrize("batch_size", [3, 6])
def test_free_with_batchnorm_and_dropout_equals_plain_recurrence(batch_size):
    """4 directions (the mean and 3 classes): batches of 3 and the last one of 2 take the batch Jacobian,
    batches of 6 a JVP per direction."""
    n = 8
    X, y, Xv, yv = data(n, shape=(1, 5, 5))
    module = ref.tiny_bn_cnn(track_running_stats=False)
    C_ref, nabla, w_T = ref.free_recurrence(module, X, y, Xv, yv, plan(n, batch_size, 2, lr=0.1), CE)
    result = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, batch_size, 2, lr=0.1))
    assert ref.relative_error(result.contribution, C_ref) < 1e-9
    # every direction, not only the first, sees the step's dropout masks
    assert ref.relative_error(result.class_contribution, class_reference(module, nabla, w_T, Xv, yv, 3)) < 1e-9


def test_free_tracker_vectors_equal_plain_recurrence():
    n = 10
    X, y, Xv, yv = data(n)
    module = ref.tiny_mlp()
    _, nabla_ref, _ = ref.free_recurrence(module, X, y, Xv, yv, plan(n, 4, 3), CE)
    traj = plan(n, 4, 3)
    tracker = ExactTracker(module, CE, traj, torch.arange(n), with_hessian=False)
    train(module, X, y, CE, traj, on_step=tracker)
    assert ref.relative_error(tracker.nabla, nabla_ref) < 1e-9


def test_free_and_exact_agree_after_one_step():
    n = 6
    X, y, Xv, yv = data(n)
    module = ref.tiny_mlp()
    free = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, n, 1))
    exact = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, n, 1), hessian="exact")
    np.testing.assert_allclose(free.contribution, exact.contribution, rtol=1e-10)
    two_free = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, n, 2))
    two_exact = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, n, 2), hessian="exact")
    assert not np.allclose(two_free.contribution, two_exact.contribution, rtol=1e-10)


@pytest.mark.parametrize("hessian", ["free", "exact"])
def test_contribution_is_mean_of_matrix_over_the_whole_validation_set(hessian):
    n = 10
    X, y, Xv, yv = data(n)
    result = fit_contributions(
        ref.tiny_mlp(), X, y, Xv, yv, criterion=CE, trajectory=plan(n, 4, 3), hessian=hessian,
        val_rows=torch.arange(Xv.shape[0]),
    )
    assert result.contribution_matrix.shape == (n, Xv.shape[0])
    np.testing.assert_allclose(result.contribution_matrix.mean(1), result.contribution, rtol=1e-10)


def test_contribution_predicts_leave_one_out_change_for_a_small_weight():
    """First-order meaning of C(i): d L_val / d eps_i by central differences of retraining."""
    n = 10
    X, y, Xv, yv = data(n)
    module = ref.tiny_mlp()
    traj = plan(n, 4, 3)
    result = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, 4, 3), hessian="exact")
    h, i = 1e-5, 3
    w0 = ref.flat_params(module)
    losses = []
    for sign in (1, -1):
        eps = torch.zeros(n, dtype=torch.float64)
        eps[i] = sign * h
        w = ref.unrolled_weights(module, w0.requires_grad_(True), X, y, traj, eps, CE)
        losses.append(float(ref.val_loss(module, w, Xv, yv, CE).detach()))
    fd = -(losses[0] - losses[1]) / (2 * h) / n
    assert result.contribution[i] == pytest.approx(fd, rel=1e-5)


def class_reference(module, nabla, w_T, Xv, yv, n_classes):
    """-(1/N) <grad L_val^c(w_T), nabla_T,i> with L_val^c by autograd, one class at a time."""
    cols = []
    for c in range(n_classes):
        w = w_T.clone().requires_grad_(True)
        members = yv == c
        (g,) = torch.autograd.grad(ref.val_loss(module, w, Xv[members], yv[members], CE), w)
        cols.append(-(nabla @ g) / nabla.shape[0])
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("hessian", ["exact", "free"])
def test_class_contributions_equal_references(hessian):
    n, batch_size, epochs = 10, 4, 3
    X, y, Xv, yv = data(n)
    module = ref.tiny_mlp()
    if hessian == "exact":
        _, nabla, w_T = ref.unrolled_contributions(module, X, y, Xv, yv, plan(n, batch_size, epochs), CE)
    else:
        _, nabla, w_T = ref.free_recurrence(module, X, y, Xv, yv, plan(n, batch_size, epochs), CE)
    expected = class_reference(module, nabla, w_T, Xv, yv, 3)
    result = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, batch_size, epochs),
                               hessian=hessian, val_rows=torch.arange(len(yv)))
    assert ref.relative_error(result.class_contribution, expected) < 1e-9
    # DESIGN.md §5: class means of C(i, j), and C(i) their validation-weighted sum
    for c in range(3):
        np.testing.assert_allclose(result.class_contribution[:, c],
                                   result.contribution_matrix[:, (yv == c).numpy()].mean(1), rtol=1e-10, atol=1e-15)
    weights = np.bincount(yv.numpy(), minlength=3) / len(yv)
    np.testing.assert_allclose(result.class_contribution @ weights, result.contribution, rtol=1e-10, atol=1e-15)


def test_class_without_validation_samples_gets_a_nan_column():
    n = 10
    X, y, Xv, yv = data(n)
    keep = yv != 1
    result = fit_contributions(ref.tiny_mlp(), X, y, Xv[keep], yv[keep], criterion=CE, trajectory=plan(n, 4, 2))
    assert np.isnan(result.class_contribution[:, 1]).all()
    assert np.isfinite(result.class_contribution[:, [0, 2]]).all()


def test_trajectory_trace_is_each_samples_mean_training_loss_and_softmax():
    n, batch_size, epochs = 10, 4, 3
    X, y, Xv, yv = data(n)
    module = ref.tiny_mlp().train()
    loss, proba = ref.mean_sample_losses(module, X, y, plan(n, batch_size, epochs), CE)
    result = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, batch_size, epochs))
    np.testing.assert_allclose(result.trajectory_loss, loss.numpy(), rtol=1e-12)
    np.testing.assert_allclose(result.trajectory_proba, proba.numpy(), rtol=1e-12)


@pytest.mark.parametrize("max_memory", [10**9, 10_000, 7_000, 3_000],
                         ids=["factors, input convolution summed", "factors, per step", "stored weights", "checkpoints"])
def test_free_with_convolutions_dropout_and_rows_equals_plain_recurrence(max_memory):
    """Every scoring route (factors kept from training, stored weights, checkpoints) gives C(i) and C(i, j)."""
    n = 8
    X, y, Xv, yv = data(n, shape=(1, 6, 6))
    module = ref.tiny_conv_net()
    traj = plan(n, 3, 2, lr=0.1)
    C_ref, nabla_ref, w_T = ref.free_recurrence(module, X, y, Xv, yv, traj, CE)
    rows = torch.tensor([0, 2, 5])
    G_rows = ref.eval_per_sample_grads(module, w_T, Xv[rows], yv[rows], CE)
    result = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, 3, 2, lr=0.1),
                               val_rows=rows, max_memory=max_memory)
    assert ref.relative_error(result.contribution, C_ref) < 1e-9
    assert ref.relative_error(result.contribution_matrix, -(nabla_ref @ G_rows.T) / n) < 1e-9
    # the route taken: factors need 12,608 bytes here with the first convolution's output gradients
    # summed over the run (it reads the inputs), 8,000 with its per-sample gradients summed every step;
    # every step's weights 6,912, a checkpoint 2,304
    planned = TrainingFactors.plan(module, X[:2], traj, np.ones(traj.n_steps), max_memory, data=X)
    assert (planned is not None) == (max_memory >= 10_000)
    if planned is not None:
        assert planned.nbytes == (12_608 if max_memory == 10**9 else 8_000)
        assert planned.shapes[0][0] == ("input_conv" if max_memory == 10**9 else "conv")
        assert planned.shapes[1][0] == "conv"  # the second convolution reads the first one's output


def test_input_convolution_needs_the_inputs_unchanged():
    """A convolution reads the inputs only when it gets the module's input tensor itself, unchanged."""
    X = torch.rand(4, 1, 6, 6, dtype=torch.float64)
    traj = plan(4, 2, 1)

    class Scaled(nn.Module):  # the first convolution sees 2 x, not x
        def __init__(self):
            super().__init__()
            self.net = ref.tiny_conv_net()

        def forward(self, x):
            return self.net(x.mul_(2.0))

    for module, expected in [(ref.tiny_conv_net(), "input_conv"), (Scaled(), "conv")]:
        planned = TrainingFactors.plan(module, X[:2].clone(), traj, np.ones(traj.n_steps), 10**9, data=X)
        assert planned.shapes[0][0] == expected
    # a Dataset's items may be augmented anew each epoch: no data, no summed outputs
    planned = TrainingFactors.plan(ref.tiny_conv_net(), X[:2], traj, np.ones(traj.n_steps), 10**9)
    assert planned.shapes[0][0] == "conv"


class _NoisyInputs(nn.Module):
    """tiny_conv_net whose training-mode forward adds noise to its input, in place or not."""

    def __init__(self, in_place):
        super().__init__()
        self.net, self.in_place = ref.tiny_conv_net(), in_place

    def forward(self, x):
        if self.training:
            noise = 0.1 * torch.randn_like(x)
            x = x.add_(noise) if self.in_place else x + noise
        return self.net(x)


@pytest.mark.parametrize("in_place", [False, True], ids=["new tensor", "in place"])
def test_a_module_that_changes_its_input_in_training_keeps_per_step_convolution_gradients(in_place):
    """The eval-mode probe sees the first convolution read the inputs; the training steps do not, and say so."""
    n = 8
    X, y, Xv, yv = data(n, shape=(1, 6, 6))
    module = _NoisyInputs(in_place)
    traj = plan(n, 3, 2, lr=0.1)
    planned = TrainingFactors.plan(module, X[:2], traj, np.ones(traj.n_steps), 10**9, data=X)
    assert planned.shapes[0][0] == "input_conv"  # so the steps must catch it
    C_ref, _, _ = ref.free_recurrence(module, X, y, Xv, yv, traj, CE)
    result = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, 3, 2, lr=0.1))
    assert ref.relative_error(result.contribution, C_ref) < 1e-9
