"""Stored weights: the scoring walk visits exactly the recorded run's weights, within the memory budget."""

import numpy as np
import pytest
import torch
from torch import nn

from hydraclean import HydraLabelCleaner
from hydraclean.hypergradient import free_projections
from hydraclean.training import plan_trajectory, replay, train
from hydraclean.weight_store import WeightStore, parse_bytes

from . import reference as ref

CE = nn.CrossEntropyLoss(reduction="none")


def setup(n=10, momentum=0.9):
    module = ref.tiny_conv_net().float()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(n, 1, 6, 6, generator=g), torch.arange(n) % 3
    traj = plan_trajectory(n, batch_size=4, max_epochs=3, lr=0.1, lr_schedule="constant", momentum=momentum,
                           weight_decay=0.01, seed=0)
    return module, X, y, traj


def visited(walk):
    weights = {}

    def on_step(model, t, idx, xb, yb):
        weights[t] = ref.flat_params(model)

    walk(on_step)
    return weights


@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("kind", ["every step", "checkpoints", "disk"])
def test_walk_visits_the_recorded_weights_bit_for_bit(kind, momentum, tmp_path):
    module, X, y, traj = setup(momentum=momentum)
    n_params = sum(p.numel() for p in module.parameters())
    row = n_params * 4
    budget, spill = {"every step": (10**6, None), "checkpoints": (2 * row * 4, None), "disk": (row, tmp_path)}[kind]
    store = WeightStore(module, traj.n_steps, budget, spill)
    recorded = visited(lambda f: train(module, X, y, CE, traj, on_step=f, store=store))
    walked = visited(lambda f: store.walk(traj, module, X, y, CE, f))
    replayed = visited(lambda f: replay(traj, module, X, y, CE, f))
    assert store.interval == (3 if kind == "checkpoints" else 1)
    assert store.location == ("disk" if kind == "disk" else "memory")
    assert store.nbytes <= budget or kind == "disk"
    for t in range(traj.n_steps):
        assert torch.equal(walked[t], recorded[t]) and torch.equal(replayed[t], recorded[t])
    store.close()
    assert not list(tmp_path.iterdir())  # the spill file is gone


def test_projections_from_stored_weights_equal_the_replay_bit_for_bit():
    module, X, y, traj = setup()
    store = WeightStore(module, traj.n_steps, 10**6)
    train(module, X, y, CE, traj, store=store)
    V = torch.randn(3, sum(p.numel() for p in module.parameters()))
    stored = free_projections(traj, module, X, y, CE, V, store=store)
    replayed = free_projections(traj, module, X, y, CE, V)
    assert torch.equal(stored, replayed)


def test_too_small_a_budget_names_the_fix():
    module, _, _, traj = setup()
    with pytest.raises(ValueError, match="max_memory=100 bytes cannot hold one checkpoint.*spill_dir"):
        WeightStore(module, traj.n_steps, 100)


@pytest.mark.parametrize(
    "value,expected",
    [(123, 123), ("512MB", 512 * 10**6), ("2 GiB", 2 * 2**30), ("1.5kb", 1500), ("64", 64)],
)
def test_parse_bytes(value, expected):
    assert parse_bytes(value) == expected


@pytest.mark.parametrize("value", ["lots", "12 parsecs", "-3MB"])
def test_parse_bytes_rejects_what_it_cannot_read(value):
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes(value)


def digits_like(n=60, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.randn(n, 1, 6, 6).astype(np.float32)
    y = rng.randint(0, 3, n)
    return X, y


def cleaner(**kw):
    return HydraLabelCleaner(lambda: ref.tiny_conv_net().float(), max_epochs=2, batch_size=8, lr=0.05,
                             random_state=0, **kw)


def test_estimator_contributions_do_not_depend_on_where_the_weights_are_kept(tmp_path):
    """Up to float32 rounding: without room for the convolution buffer they are projected every step."""
    X, y = digits_like()
    mask = np.arange(len(y)) >= 45
    with pytest.warns(UserWarning, match="did not learn"):  # random labels: only the arithmetic matters here
        base = cleaner().fit(X, y, validation_mask=mask)
    row = sum(p.numel() for p in base.module_.parameters()) * 4
    for kw in (dict(max_memory=3 * row), dict(max_memory=row, spill_dir=str(tmp_path))):
        with pytest.warns(UserWarning, match="did not learn"):
            other = cleaner(**kw).fit(X, y, validation_mask=mask)
        scale = np.nanmax(np.abs(base.class_contribution_))
        np.testing.assert_allclose(other.contribution_, base.contribution_, rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(other.class_contribution_, base.class_contribution_, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(max_memory="1kB"), "cannot hold one checkpoint"),
        (dict(max_memory="plenty"), "memory size"),
        (dict(max_memory=1, spill_dir="/nonexistent/dir"), "is not a directory"),
    ],
)
def test_estimator_memory_errors(kw, message):
    X, y = digits_like()
    est = cleaner(**kw)
    with pytest.raises(ValueError, match=message):
        est.fit(X, y, validation_mask=np.arange(len(y)) >= 45)
    assert not hasattr(est, "contribution_")
