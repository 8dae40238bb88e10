"""The HYDRA math against independent computations, in float64, for every optimizer and route."""

import dataclasses
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from hydraclean.contribution import fit_contributions
from hydraclean.hypergradient import ExactTracker, free_factors, scalar_coefficients
from hydraclean.optimizers import SGD
from hydraclean.projection import StepFactors, TrainingFactors
from hydraclean.run_store import RunStore
from hydraclean.schedules import ExponentialDecay
from hydraclean.training import plan_trajectory, train

from . import reference as ref

CE = nn.CrossEntropyLoss(reduction="none")

# (n_samples, batch_size, epochs): full batch; shuffled mini-batches with a smaller last batch
SETTINGS = [(6, 6, 4), (10, 4, 3)]
# every optimizer hydraclean has a rule for, with weight decay, and SGD's variants
OPTIMIZERS = {
    "sgd": dict(optimizer=torch.optim.SGD),
    "sgd-nesterov": dict(optimizer=torch.optim.SGD, optimizer_options={"nesterov": True}),
    "sgd-dampening": dict(optimizer=torch.optim.SGD, optimizer_options={"dampening": 0.2}),
    "adam": dict(optimizer=torch.optim.Adam, lr=0.05, optimizer_options={"betas": (0.8, 0.99)}),
    "adamw": dict(optimizer=torch.optim.AdamW, lr=0.05, weight_decay=0.1),
}


def data(n, shape=(3,), n_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.arange(n) % n_classes
    Xv = torch.randn(7, *shape, generator=g, dtype=torch.float64)
    yv = torch.arange(7) % n_classes
    return X, y, Xv, yv


def plan(n, batch_size, epochs, momentum=0.9, weight_decay=0.05, lr=0.3, **kw):
    kw = {"lr_schedule": ExponentialDecay(0.7), **kw}
    return plan_trajectory(n, batch_size=batch_size, max_epochs=epochs, lr=lr, momentum=momentum,
                           weight_decay=weight_decay, seed=3, **kw)


def test_reference_closed_form_matches_explicit_matrix_products():
    rng = np.random.default_rng(0)
    lrs, p, lam = rng.uniform(0.01, 0.5, size=9), 0.8, 0.1
    c = ref.closed_form_coefficients(lrs, p, lam).numpy()
    for t in range(len(lrs)):
        prod = np.eye(2)
        for s in range(len(lrs) - 1, t, -1):
            prod = prod @ np.array([[1 - lrs[s] * lam, -lrs[s] * p], [lam, p]])
        assert c[t] == pytest.approx((prod @ np.array([-lrs[t], 1.0]))[0], rel=1e-12)


def test_scalar_coefficients_from_the_sgd_rule_equal_the_closed_form():
    """The coefficients come from differentiating torch's SGD step itself; DESIGN.md section 2 derives them by hand."""
    traj = plan(50, 7, 3, momentum=0.8, weight_decay=0.1, lr_schedule=lambda e, s: 1.0 / (1 + e + 0.1 * s))
    expected = ref.closed_form_coefficients(traj.lrs, 0.8, 0.1).numpy()
    np.testing.assert_allclose(scalar_coefficients(traj), expected, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="not linear"):
        scalar_coefficients(plan(50, 7, 1, optimizer=torch.optim.Adam))


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("n,batch_size,epochs", SETTINGS)
def test_training_follows_the_optimizer_written_out(n, batch_size, epochs, name):
    X, y, Xv, yv = data(n)
    module = ref.tiny_mlp()
    traj = plan(n, batch_size, epochs, **OPTIMIZERS[name])
    model, _, _ = train(module, X, y, CE, traj)
    w_ref = ref.unrolled_weights(module, ref.flat_params(module), X, y, traj, torch.zeros(n, dtype=torch.float64), CE)
    assert ref.relative_error(ref.flat_params(model), w_ref.detach()) < 1e-12


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_training_equals_torch_optim_step_by_step(name):
    """The rule run by training is torch's own step: the same weights as torch.optim, bit for bit (float64)."""
    n = 10
    X, y, _, _ = data(n)
    module = ref.tiny_mlp()
    traj = plan(n, 4, 2, **OPTIMIZERS[name])
    model, _, _ = train(module, X, y, CE, traj)
    torch_model = ref.tiny_mlp()
    torch_model.load_state_dict(module.state_dict())
    optimizer = traj.rule.torch_class(torch_model.parameters(), **traj.rule.torch_options(traj.hyper_at(0)))
    for t, idx in enumerate(ref.batches(traj)):
        for group in optimizer.param_groups:
            group["lr"] = float(traj.lrs[t])
        with ref.seeded(traj.seeds[t]):
            loss = CE(torch_model(X[idx]), y[idx]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(ref.flat_params(model), ref.flat_params(torch_model))


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("n,batch_size,epochs", SETTINGS)
@pytest.mark.parametrize("hessian", ["exact", "free"])
def test_contributions_equal_autograd_through_the_unrolled_run(hessian, n, batch_size, epochs, name):
    """C(i) and C(i, c) of both modes against autograd through the hand-written run (free: gradients detached)."""
    X, y, Xv, yv = data(n)
    module = ref.tiny_mlp()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    traj = plan(n, batch_size, epochs, **OPTIMIZERS[name])
    C_ref, _, _ = ref.unrolled_contributions(module, X, y, Xv, yv, traj, CE, hessian, nabla=False)
    by_class = ref.class_contributions(module, X, y, Xv, yv, traj, CE, 3, hessian)
    result = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, batch_size, epochs,
                               **OPTIMIZERS[name]), hessian=hessian)
    assert ref.relative_error(result.contribution, C_ref) < 1e-6
    assert ref.relative_error(result.class_contribution, by_class) < 1e-6
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("hessian", ["exact", "free"])
def test_contributions_with_batchnorm_and_dropout_equal_autograd(hessian, name):
    """Batch statistics of each step's batch and its dropout masks, in every mode and direction."""
    n = 8
    X, y, Xv, yv = data(n, shape=(1, 5, 5))
    module = ref.tiny_bn_cnn(track_running_stats=False)
    kw = dict(OPTIMIZERS[name], lr=0.1 if name == "sgd" else 0.02)
    traj = plan(n, 3, 2, **kw)
    C_ref, _, _ = ref.unrolled_contributions(module, X, y, Xv, yv, traj, CE, hessian, nabla=False)
    result = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, 3, 2, **kw), hessian=hessian,
                               batchnorm="exact")
    assert ref.relative_error(result.contribution, C_ref) < 1e-6


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_contributions_under_a_torch_scheduler_cycling_momentum_equal_autograd(name):
    """OneCycleLR per batch: every step's lr and momentum (SGD) or beta1 (Adam) reach both the run and the math."""
    n = 10
    X, y, Xv, yv = data(n)
    module = ref.tiny_mlp()
    kw = dict(OPTIMIZERS[name], lr_schedule=lr_scheduler.OneCycleLR, schedule_options={"pct_start": 0.4})
    traj = plan(n, 4, 3, **kw)
    assert np.ptp(traj.hyper["momentum" if name == "sgd" else "beta1"]) > 0.05  # it does cycle
    for hessian in ("exact", "free"):
        C_ref, _, _ = ref.unrolled_contributions(module, X, y, Xv, yv, traj, CE, hessian, nabla=False)
        result = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, 4, 3, **kw),
                                   hessian=hessian)
        assert ref.relative_error(result.contribution, C_ref) < 1e-6


@pytest.mark.parametrize("name", ["sgd-nesterov", "adam"])
def test_exact_contributions_equal_finite_differences(name):
    """The first-order meaning of C(i): d L_val / d eps_i by central differences of the hand-written run."""
    n = 10
    X, y, Xv, yv = data(n)
    module = ref.tiny_mlp()
    traj = plan(n, 4, 3, **OPTIMIZERS[name])
    result = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=traj, hessian="exact")
    samples = [1, 3, 8]
    fd = ref.finite_difference_contributions(module, X, y, Xv, yv, traj, CE, samples)
    np.testing.assert_allclose(result.contribution[samples], fd.numpy(), rtol=1e-5)


@pytest.mark.parametrize("name", ["sgd-dampening", "adam", "adamw"])
@pytest.mark.parametrize("with_hessian", [True, False])
def test_reverse_mode_equals_forward_tracking_on_a_subset(with_hessian, name):
    """Reverse mode (every sample at once) against the forward-mode tangents of a tracked subset."""
    n = 10
    X, y, Xv, yv = data(n)
    module = ref.tiny_mlp()
    subset = torch.tensor([0, 4, 7])
    traj = plan(n, 4, 3, **OPTIMIZERS[name])
    tracker = ExactTracker(module, CE, traj, subset, with_hessian=with_hessian)
    model, _, _ = train(module, X, y, CE, traj, recorder=tracker)
    w_T = ref.flat_params(model).requires_grad_(True)
    (g_val,) = torch.autograd.grad(ref.val_loss(module, w_T, Xv, yv, CE), w_T)
    forward = -(tracker.nabla @ g_val) / n
    result = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, 4, 3, **OPTIMIZERS[name]),
                               hessian="exact" if with_hessian else "free")
    np.testing.assert_allclose(result.contribution[subset], forward.numpy(), rtol=1e-9)


def test_free_factors_of_sgd_are_the_closed_form_coefficients():
    """The general elementwise sweep, run on SGD, gives d_t = c_t in every coordinate."""
    n = 10
    X, y, _, _ = data(n)
    traj = plan(n, 4, 3, momentum=0.7)
    store = RunStore(traj, 38, torch.float64, "cpu", 10**6, reverse=True)
    train(ref.tiny_mlp(), X, y, CE, traj, recorder=store)
    c = ref.closed_form_coefficients(traj.lrs, 0.7, 0.05)
    for step, d in free_factors(traj, store.walk(reverse=True)):
        torch.testing.assert_close(d, torch.full_like(d, float(c[step.t])), rtol=1e-10, atol=1e-14)


@dataclasses.dataclass(frozen=True)
class _GeneralSGD(SGD):
    """torch's SGD step, declared non-linear: scoring takes the routes built for Adam."""

    linear: ClassVar[bool] = False


@pytest.mark.parametrize("name", ["sgd", "sgd-nesterov"])
@pytest.mark.parametrize("max_memory", [10**9, 20_000], ids=["per-step factors", "stored run, backward"])
def test_sgd_free_by_the_general_routes_equals_the_closed_form_route(max_memory, name):
    """SGD through the routes built for other optimizers (the elementwise sweep of the rule, then per-step
    factors or a backward walk of the stored run) equals the summed factors with closed-form coefficients."""
    n = 8
    X, y, Xv, yv = data(n, shape=(1, 6, 6))
    module = ref.tiny_conv_net()
    kw = dict(OPTIMIZERS[name], lr=0.1)
    closed = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, 3, 2, **kw))
    traj = plan(n, 3, 2, **kw)
    traj.rule = _GeneralSGD(**dataclasses.asdict(traj.rule))
    general = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=traj, max_memory=max_memory)
    assert ref.relative_error(general.class_contribution, closed.class_contribution) < 1e-10
    assert (StepFactors.plan(module, CE, X[:5], y[:5], traj, max_memory) is not None) == (max_memory == 10**9)


@pytest.mark.parametrize("name", ["adam", "adamw"])
@pytest.mark.parametrize("max_memory", [10**9, 30_000, 20_000], ids=["per-step factors", "stored run", "checkpoints"])
def test_adam_free_routes_equal_autograd(max_memory, name):
    """Adam's Hessian-free contributions by every route, convolutions and dropout included."""
    n = 8
    X, y, Xv, yv = data(n, shape=(1, 6, 6))
    module = ref.tiny_conv_net()
    kw = dict(OPTIMIZERS[name], lr=0.02)
    traj = plan(n, 3, 2, **kw)
    by_class = ref.class_contributions(module, X, y, Xv, yv, traj, CE, 3, "free")
    result = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, 3, 2, **kw),
                               max_memory=max_memory)
    assert ref.relative_error(result.class_contribution, by_class) < 1e-9
    planned = StepFactors.plan(module, CE, X[:5], y[:5], traj, max_memory)
    assert (planned is not None) == (max_memory == 10**9)
    # every step's gradient, the segments' starts and one segment: 24,192 bytes; checkpoints every 2 steps 19,584
    store = RunStore(traj, 144, torch.float64, "cpu", max_memory, reverse=True)
    assert store.location == ("checkpoints" if max_memory == 20_000 else "memory")


def test_exact_from_checkpoints_equals_exact_from_every_step():
    n = 10
    X, y, Xv, yv = data(n)
    full = fit_contributions(ref.tiny_mlp(), X, y, Xv, yv, criterion=CE, trajectory=plan(n, 4, 3), hessian="exact")
    part = fit_contributions(ref.tiny_mlp(), X, y, Xv, yv, criterion=CE, trajectory=plan(n, 4, 3), hessian="exact",
                             max_memory=5_000)
    np.testing.assert_allclose(part.class_contribution, full.class_contribution, rtol=1e-12)
    # every step's gradient and the backward walk's states take 6,384 bytes; checkpoints every 2 steps 4,864
    store = RunStore(plan(n, 4, 3), 38, torch.float64, "cpu", 5_000, reverse=True)
    assert (store.location, store.interval) == ("checkpoints", 2)


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
    result = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, batch_size, 2, lr=0.1),
                               batchnorm="exact")
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
    train(module, X, y, CE, traj, recorder=tracker)
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


def test_trajectory_trace_is_each_samples_mean_training_loss_softmax_and_logit_margin(tmp_path):
    """The margin is the area under the margin as its authors' ``aum`` package computes it from the steps."""
    n, batch_size, epochs = 10, 4, 3
    X, y, Xv, yv = data(n)
    module = ref.tiny_mlp().train()
    loss, proba, aum = ref.mean_sample_losses(module, X, y, plan(n, batch_size, epochs), CE, aum_dir=tmp_path)
    result = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, batch_size, epochs))
    np.testing.assert_allclose(result.trajectory_loss, loss.numpy(), rtol=1e-12)
    np.testing.assert_allclose(result.trajectory_proba, proba.numpy(), rtol=1e-12)
    np.testing.assert_allclose(result.trajectory_logit_margin, aum.numpy(), rtol=1e-12, atol=1e-15)
    assert (aum < 0).any() and (aum > 0).any()  # both signs occur: the margin is not an absolute value


@pytest.mark.parametrize("max_memory", [10**9, 10_000, 9_500, 7_000, 3_000],
                         ids=["factors, input convolution summed", "factors, per step", "stored run",
                              "checkpoints every 2 steps", "checkpoint at the start"])
def test_free_with_convolutions_dropout_and_rows_equals_plain_recurrence(max_memory, monkeypatch):
    """Every scoring route (factors kept from training, stored gradients, checkpoints) gives C(i) and C(i, j)."""
    n = 8
    X, y, Xv, yv = data(n, shape=(1, 6, 6))
    module = ref.tiny_conv_net()
    traj = plan(n, 3, 2, lr=0.1)
    C_ref, nabla_ref, w_T = ref.free_recurrence(module, X, y, Xv, yv, traj, CE)
    rows = torch.tensor([0, 2, 5])
    G_rows = ref.eval_per_sample_grads(module, w_T, Xv[rows], yv[rows], CE)
    if max_memory == 9_500:  # room for the stored run but not for the factors
        monkeypatch.setattr(TrainingFactors, "plan", classmethod(lambda cls, *a, **k: None))
    result = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, 3, 2, lr=0.1),
                               val_rows=rows, max_memory=max_memory)
    assert ref.relative_error(result.contribution, C_ref) < 1e-9
    assert ref.relative_error(result.contribution_matrix, -(nabla_ref @ G_rows.T) / n) < 1e-9
    # the route taken: factors need 12,608 bytes here with the first convolution's output gradients
    # summed over the run (it reads the inputs), 8,000 with its per-sample gradients summed every step;
    # every step's gradient 6,912 and the start 2,304; checkpoints of weights and momentum 2,304 each
    store = RunStore(traj, 144, torch.float64, "cpu", max_memory)
    assert store.location == {9_500: "memory", 7_000: "checkpoints", 3_000: "checkpoints"}.get(max_memory, "memory")
    assert store.interval == {7_000: 2, 3_000: 6}.get(max_memory, traj.n_steps)
    planned = TrainingFactors.plan(module, CE, X[:5], y[:5], traj, np.ones(traj.n_steps), max_memory, data=X)
    assert (planned is not None) == (max_memory >= 10_000)
    if planned is not None:
        assert planned.nbytes == (12_608 if max_memory == 10**9 else 8_000)
        assert planned.kinds[0] == ("input_conv" if max_memory == 10**9 else "dense")
        assert planned.kinds[1] == "dense"  # the second convolution reads the first one's output
        assert planned.kinds[2:] == ["factors", "factors"]  # the Linear layers


def test_input_convolution_needs_the_inputs_unchanged():
    """A convolution reads the inputs only when it gets the module's input tensor itself, unchanged."""
    X = torch.rand(5, 1, 6, 6, dtype=torch.float64)
    y = torch.arange(5) % 3
    traj = plan(5, 2, 1)

    class Scaled(nn.Module):  # the first convolution sees 2 x, not x
        def __init__(self):
            super().__init__()
            self.net = ref.tiny_conv_net()

        def forward(self, x):
            return self.net(x.mul_(2.0))

    for module, expected in [(ref.tiny_conv_net(), "input_conv"), (Scaled(), "dense")]:
        planned = TrainingFactors.plan(module, CE, X[:5].clone(), y[:5], traj, np.ones(traj.n_steps), 10**9, data=X)
        assert planned.kinds[0] == expected
    # a Dataset's items may be augmented anew each epoch: no data, no summed outputs
    planned = TrainingFactors.plan(ref.tiny_conv_net(), CE, X[:5], y[:5], traj, np.ones(traj.n_steps), 10**9)
    assert planned.kinds[0] == "dense"


class _NoisyInputs(nn.Module):
    """tiny_conv_net whose training-mode forward adds noise to its input, in place or not, from its fifth
    call on: the probe's four passes (on its copy) do not see it, the training steps do."""

    def __init__(self, in_place):
        super().__init__()
        self.net, self.in_place, self.calls = ref.tiny_conv_net(), in_place, 0

    def forward(self, x):
        self.calls += self.training
        if self.training and self.calls > 4:
            noise = 0.1 * torch.randn_like(x)
            x = x.add_(noise) if self.in_place else x + noise
        return self.net(x)


@pytest.mark.parametrize("in_place", [False, True], ids=["new tensor", "in place"])
def test_a_module_that_changes_its_input_in_training_keeps_per_step_convolution_gradients(in_place):
    """The probe sees the first convolution read the inputs; later training steps do not, and say so."""
    n = 8
    X, y, Xv, yv = data(n, shape=(1, 6, 6))
    module = _NoisyInputs(in_place)
    traj = plan(n, 3, 2, lr=0.1)
    planned = TrainingFactors.plan(module, CE, X[:5], y[:5], traj, np.ones(traj.n_steps), 10**9, data=X)
    assert planned.kinds[0] == "input_conv"  # so the steps must catch it
    C_ref, _, _ = ref.free_recurrence(_NoisyInputs(in_place), X, y, Xv, yv, traj, CE)  # each run from call 0
    result = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, 3, 2, lr=0.1))
    assert ref.relative_error(result.contribution, C_ref) < 1e-9


@pytest.mark.parametrize("with_rows", [False, True], ids=["classes", "classes and validation rows"])
def test_sgd_stored_run_from_checkpoints_takes_the_layers_from_the_recomputed_steps(monkeypatch, with_rows):
    """Checkpoints recompute every step; the layers' factors ride along those passes (no pass of their own),
    dropout and ghost rows included."""
    from hydraclean.projection import LayerFactorProjector

    n = 8
    X, y, Xv, yv = data(n, shape=(1, 6, 6))
    module = ref.tiny_conv_net()
    rows = torch.arange(len(yv)) if with_rows else None
    by_class = ref.class_contributions(module, X, y, Xv, yv, plan(n, 3, 2), CE, 3, "free")
    factors = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, 3, 2), val_rows=rows)

    def no_pass_of_its_own(*args, **kwargs):
        raise AssertionError("a projection pass of its own")

    rides = []
    training_capture = LayerFactorProjector.training_capture
    monkeypatch.setattr(LayerFactorProjector, "capture_at", no_pass_of_its_own)
    monkeypatch.setattr(LayerFactorProjector, "training_capture", lambda self, m: rides.append(m) or
                        training_capture(self, m))
    result = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, 3, 2), max_memory=3_000,
                               val_rows=rows)
    assert len(rides) == 1  # the route was the stored run's, from checkpoints
    assert ref.relative_error(result.class_contribution, by_class) < 1e-9
    if with_rows:
        assert ref.relative_error(result.contribution_matrix, factors.contribution_matrix) < 1e-9


@pytest.mark.parametrize("with_rows", [False, True], ids=["classes", "classes and validation rows"])
def test_batchnorm_constant_from_checkpoints_rides_the_recomputed_steps(monkeypatch, with_rows):
    """BatchNorm in train mode with its statistics held constant: from checkpoints, a second backward pass
    through each recomputed step gives the same contributions as a projection pass of its own."""
    from hydraclean.projection import LayerFactorProjector

    n = 8
    X, y, Xv, yv = data(n, shape=(1, 5, 5))
    rows = torch.arange(len(yv)) if with_rows else None
    module = ref.tiny_bn_cnn()
    own_pass = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, 4, 2), val_rows=rows)
    rides = []
    training_capture = LayerFactorProjector.training_capture
    monkeypatch.setattr(LayerFactorProjector, "capture_at", lambda *a, **k: pytest.fail("a pass of its own"))
    monkeypatch.setattr(LayerFactorProjector, "training_capture", lambda self, m: rides.append(m) or
                        training_capture(self, m))
    ridden = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan(n, 4, 2), val_rows=rows,
                               max_memory=2_500)
    assert len(rides) == 1
    assert ref.relative_error(ridden.class_contribution, own_pass.class_contribution) < 1e-10
    if with_rows:
        assert ref.relative_error(ridden.contribution_matrix, own_pass.contribution_matrix) < 1e-10
