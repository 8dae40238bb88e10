"""The peers written for the benchmarks, against dense and brute-force references."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call, hessian

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from methods import (  # noqa: E402
    CE,
    Training,
    aum_threshold_flags,
    influence_scores,
    init_module,
    lissa,
    one_run_scores,
    tracin_scores,
    train_with_checkpoints,
    with_extra_class,
)

from hydraclean.gradients import PerSampleLoss, flatten, parameter_dict  # noqa: E402

from . import reference as ref  # noqa: E402


def data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.arange(n) % 3


def dense_hessian(module, X, y):
    params = parameter_dict(module)

    def mean_loss(flat):
        return CE(functional_call(module, ref.split(flat, module), (X,)), y).mean()

    return hessian(mean_loss)(flatten(params))


def test_lissa_solves_the_damped_newton_system():
    module = ref.tiny_mlp()
    X, y = data()
    H = dense_hessian(module, X, y)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scale, damping = 10.0, 0.1  # scale * damping = 1 keeps H + I positive definite here
    est = lissa(PerSampleLoss(module, CE), parameter_dict(module), X, y, v, damping=damping, scale=scale,
                depth=800, batch_size=len(y))
    exact = torch.linalg.solve(H + scale * damping * torch.eye(H.shape[0], dtype=H.dtype), v)
    assert ref.relative_error(est, exact) < 1e-8


def test_influence_scores_formula():
    module = ref.tiny_mlp()
    X, y = data()
    Xv, yv = data(5, seed=3)
    scores = influence_scores(module, X, y, Xv, yv, damping=0.1, scale=10.0, depth=800, batch_size=len(y),
                              auto_damping=False)
    H = dense_hessian(module, X, y)
    module.eval()
    w = ref.flat_params(module).requires_grad_(True)
    (g_val,) = torch.autograd.grad(ref.val_loss(module, w, Xv, yv, CE), w)
    s_test = torch.linalg.solve(H + 1.0 * torch.eye(H.shape[0], dtype=H.dtype), g_val)
    grads, _ = ref.brute_per_sample_grads(module, ref.flat_params(module), X, y, 0, CE)
    np.testing.assert_allclose(scores, (grads @ s_test / len(y)).numpy(), rtol=1e-7, atol=1e-12)


def test_hessian_extremes_and_safe_settings_match_the_dense_spectrum():
    from methods import hessian_extremes, safe_lissa_settings

    module = ref.tiny_mlp()
    X, y = data()
    eig = torch.linalg.eigvalsh(dense_hessian(module, X, y))
    loss, params = PerSampleLoss(module, CE), parameter_dict(module)
    lam_max, lam_min = hessian_extremes(loss, params, X, y, batch_size=len(y), n_batches=1, n_iter=300)
    assert lam_max == pytest.approx(float(eig[-1]), rel=1e-3)
    assert lam_min == pytest.approx(min(float(eig[0]), 0.0), abs=1e-3 * float(eig[-1]))
    damping, scale = safe_lissa_settings(loss, params, X, y, damping=1e-4, scale=0.1, batch_size=len(y), n_iter=300)
    assert scale >= 2 * float(eig[-1]) - 1e-6 and scale * damping >= 2 * max(-float(eig[0]), 0) - 1e-6


def test_tracin_equals_brute_force_and_captum(tmp_path):
    X, y = data(10)
    Xv, yv = data(4, seed=5)
    recipe = Training(max_epochs=3, batch_size=4, lr=0.2)
    make = lambda: ref.tiny_mlp(seed=7)  # noqa: E731
    _, checkpoints, lrs = train_with_checkpoints(make, X, y, recipe, seed=0)
    scores = tracin_scores(make, checkpoints, lrs, X, y, Xv, yv)
    expected = np.zeros(len(y))
    module = make()
    for state, eta in zip(checkpoints, lrs):
        module.load_state_dict(state)
        w = ref.flat_params(module).requires_grad_(True)
        (g_val,) = torch.autograd.grad(ref.val_loss(module, w, Xv, yv, CE), w)
        grads, _ = ref.brute_per_sample_grads(module, ref.flat_params(module), X, y, 0, CE)
        expected += eta * (grads @ g_val).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-10)

    captum = pytest.importorskip("captum.influence")
    paths = []
    for k, state in enumerate(checkpoints):
        paths.append(str(tmp_path / f"ckpt{k}.pt"))
        torch.save(state, paths[-1])

    def load(model, path):
        model.load_state_dict(torch.load(path))
        return lrs[paths.index(path)]

    tracin = captum.TracInCP(make(), torch.utils.data.TensorDataset(X, y), paths, checkpoints_load_func=load,
                             loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), batch_size=5,
                             sample_wise_grads_per_batch=True)
    matrix = tracin.influence((Xv, yv))  # (n_val, n_train): sum_k eta_k <g_j, g_i>
    np.testing.assert_allclose(matrix.mean(0).numpy(), scores, rtol=1e-6, atol=1e-12)


def test_aum_peer_by_the_aum_package_equals_the_fits_own_margin_and_flags_by_threshold_samples():
    """Two independent records of one training run: the authors' calculator fed by a recorder, and the
    trace hydraclean keeps (scoring="aum"); the threshold-sample flags mark a minority, from two more runs."""
    from hydraclean.training import train

    X, _ = data(n=90)
    X = X.float()
    y = X.argmax(1)  # learnable, with ten flipped labels
    flipped = torch.arange(0, 90, 9)
    y[flipped] = (y[flipped] + 1) % 3
    recipe = Training(max_epochs=15, batch_size=10, lr=0.3)
    make = lambda: ref.tiny_mlp().float()  # noqa: E731
    scores = one_run_scores(init_module(make, 0), X, y, recipe, seed=0)["AUM"]
    flags = aum_threshold_flags(make, X, y, recipe, seed=0)
    _, _, trace = train(init_module(make, 0), X, y, CE, recipe.plan(len(y), 0))
    np.testing.assert_allclose(scores, trace.margin.numpy(), rtol=1e-5, atol=1e-6)
    assert flags.dtype == bool and 0 < flags.sum() < len(y) // 3 and flags[flipped].mean() > 0.5
    wider = with_extra_class(make())
    assert wider(X).shape == (90, 4)


class _EveryStep:
    """Keeps every training step's batch and logits, for counting by hand."""

    def __init__(self):
        self.steps, self.logits = [], None

    def attach(self, model):
        self.handle = model.register_forward_hook(lambda m, inputs, out: setattr(self, "logits", out.detach()))

    def detach(self):
        self.handle.remove()

    def record(self, step):
        self.steps.append((step.idx.tolist(), step.yb.tolist(), self.logits.argmax(1).tolist()))


def test_forgetting_events_and_cartography_confidence_from_one_run_against_counts_by_hand():
    """Forgetting events (Toneva et al. 2019) counted presentation by presentation in plain Python from every
    step's predictions, never-learned samples above all others; Cartography's confidence against the mean
    probability of the label in the trace hydraclean keeps of the same run."""
    from hydraclean.training import run_training, train

    X, _ = data(n=60)
    X = X.float()
    y = X.argmax(1)
    y[::6] = (y[::6] + 1) % 3
    recipe = Training(max_epochs=6, batch_size=8, lr=0.5)
    make = lambda: ref.tiny_mlp().float()  # noqa: E731
    got = one_run_scores(init_module(make, 0), X, y, recipe, seed=0)
    every = _EveryStep()
    run_training(init_module(make, 0), X, y, CE, recipe.plan(len(y), 0), recorder=every)
    last, learned, forgotten, seen = {}, set(), [0] * len(y), [0] * len(y)
    for idx, labels, predicted in every.steps:
        for i, label, p in zip(idx, labels, predicted):
            correct = p == label
            forgotten[i] += last.get(i, False) and not correct
            last[i], seen[i] = correct, seen[i] + 1
            if correct:
                learned.add(i)
    expected = [-(f if i in learned else seen[i] + 1) for i, f in enumerate(forgotten)]
    np.testing.assert_array_equal(got["forgetting events"], expected)
    assert len(learned) < len(y) and max(forgotten) > 0  # both cases occur
    _, _, trace = train(init_module(make, 0), X, y, CE, recipe.plan(len(y), 0))
    np.testing.assert_allclose(got["Cartography confidence"], trace.proba[torch.arange(len(y)), y].numpy(),
                               rtol=1e-5, atol=1e-6)
