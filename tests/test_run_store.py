"""The stored run: every walk visits exactly the recorded run's weights and state, within the memory budget."""

import numpy as np
import pytest
import torch
from torch import nn

from hydraclean import HydraLabelCleaner
from hydraclean.run_store import RunStore, parse_bytes
from hydraclean.training import Step, plan_trajectory, replay, train

from . import reference as ref

CE = nn.CrossEntropyLoss(reduction="none")


def setup(n=10, momentum=0.9, optimizer=torch.optim.SGD, epochs=3):
    module = ref.tiny_conv_net().float()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(n, 1, 6, 6, generator=g), torch.arange(n) % 3
    traj = plan_trajectory(n, batch_size=4, max_epochs=epochs, lr=0.1 if optimizer is torch.optim.SGD else 0.01,
                           momentum=momentum, weight_decay=0.01, seed=0, optimizer=optimizer)
    return module, X, y, traj


class Visits:
    """A recorder that keeps a copy of every step it sees."""

    def __init__(self):
        self.steps = {}

    def attach(self, model):
        pass

    def detach(self):
        pass

    def record(self, step):
        self.steps[step.t] = Step(step.t, step.idx.clone(), step.xb.clone(), step.yb.clone(), step.w.clone(),
                                  tuple(s.clone() for s in step.state), step.g.clone())


def kept(steps):
    """Copies of the walked steps (a forward walk updates one buffer in place)."""
    return [Step(s.t, s.idx, s.xb, s.yb, s.w.clone(), tuple(x.clone() for x in s.state), s.g.clone(), s.captured)
            for s in steps]


class Both:
    def __init__(self, *recorders):
        self.recorders = recorders

    def attach(self, model):
        for r in self.recorders:
            r.attach(model)

    def detach(self):
        for r in self.recorders:
            r.detach()

    def record(self, step):
        for r in self.recorders:
            r.record(step)


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("kind", ["memory", "checkpoints", "checkpoints, uneven", "disk"])
def test_walks_visit_the_recorded_steps_bit_for_bit(kind, reverse, momentum, optimizer, tmp_path):
    """Forward and backward, from every gradient or from checkpoints, every step's w, s and g are the run's.

    "checkpoints, uneven": an interval that does not divide the 9 steps (the last segment is short)."""
    module, X, y, traj = setup(momentum=momentum, optimizer=optimizer)
    n_params = sum(p.numel() for p in module.parameters())
    row, rows = n_params * 4, 1 + len(traj.rule.init(torch.zeros(1)))
    # checkpoints every s steps take ceil(9 / s) rows of (w, s), and a backward walk a segment of s steps
    segment = rows + 1 if reverse else 0
    uneven = 2 if reverse else 5  # intervals that do not divide 9
    budget = {"memory": 10**6, "checkpoints": (3 * rows + 3 * segment) * row,
              "checkpoints, uneven": (-(-9 // uneven) * rows + uneven * segment) * row,
              "disk": (6 if reverse else 1) * rows * row}[kind]  # the segments' starts (and one segment) only
    store = RunStore(traj, n_params, torch.float32, "cpu", budget, tmp_path if kind == "disk" else None,
                     reverse=reverse)
    recorded = Visits()
    train(module, X, y, CE, traj, recorder=Both(store, recorded))
    replayed = Visits()
    replay(traj, module, X, y, CE, replayed)
    walked = kept(store.walk(module, X, y, CE, reverse=reverse))
    assert [s.t for s in walked] == list(range(traj.n_steps))[:: -1 if reverse else 1]
    assert store.location == kind.split(",")[0]
    assert store.interval == {"checkpoints": 3, "checkpoints, uneven": uneven}.get(kind, store.interval)
    assert store.nbytes <= budget or kind == "disk"
    for step in walked:
        for other in (recorded.steps[step.t], replayed.steps[step.t]):
            assert torch.equal(step.w, other.w) and torch.equal(step.g, other.g) and torch.equal(step.xb, other.xb)
            assert all(torch.equal(a, b) for a, b in zip(step.state, other.state))
            assert torch.equal(step.idx, other.idx) and torch.equal(step.yb, other.yb)
    store.close()
    assert not list(tmp_path.iterdir())  # the spill file is gone


def test_too_small_a_budget_names_the_fix():
    module, _, _, traj = setup()
    with pytest.raises(ValueError, match="max_memory=100 bytes cannot hold one checkpoint.*spill_dir"):
        RunStore(traj, sum(p.numel() for p in module.parameters()), torch.float32, "cpu", 100)


def test_checkpoints_leave_the_reserve_free_when_an_interval_fits_in_what_remains():
    """Momentum SGD, 12 steps: a checkpoint is 2 rows (weights and buffer). 6 checkpoints fit in 12 rows, 2 in
    4; a reserve larger than the budget falls back to the budget alone (the minimum it needs still fits)."""
    traj = plan_trajectory(24, batch_size=2, max_epochs=1, lr=0.1, momentum=0.9, seed=0)
    row = 100 * 4
    interval = lambda **kw: RunStore(traj, 100, torch.float32, "cpu", 12 * row, **kw).interval  # noqa: E731
    assert interval() == 2
    assert interval(reserve=8 * row) == 6
    assert interval(reserve=100 * row) == 2
    with_reserve = RunStore(traj, 100, torch.float32, "cpu", 12 * row, reserve=8 * row)
    assert with_reserve.nbytes <= 4 * row


@pytest.mark.parametrize("reserve_rows", [0, 2, 100])
def test_a_stored_run_sums_gradients_only_in_what_the_store_and_the_reserve_leave_of_max_memory(reserve_rows):
    """The per-sample gradient sums of a layer without factors share ``max_memory`` with the checkpoints and
    with what scoring reserves (the directions, the ghost rows): together at most ``max_memory``."""
    from hydraclean.routes import StoredRun

    module, X, y, traj = setup()
    row = 4 * sum(p.numel() for p in module.parameters())
    max_memory, reserve = 8 * row, reserve_rows * row  # less than every step's gradient: checkpoints
    run = StoredRun(module, CE, traj, X, y, exact=False, max_memory=max_memory, reserve=reserve)
    assert run.store.location == "checkpoints"
    assert 0 <= run.accumulate_bytes <= max(0, max_memory - run.nbytes - reserve)


def test_a_parameter_without_gradient_is_stepped_with_zero_and_checkpointed():
    """An unused submodule: zero gradient, state kept like any other (no KeyError on a missing buffer)."""

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.spare = ref.tiny_conv_net().float(), nn.Linear(3, 3)

        def forward(self, x):
            return self.net(x)

    _, X, y, traj = setup()
    module = Unused()
    n_params = sum(p.numel() for p in module.parameters())
    store = RunStore(traj, n_params, torch.float32, "cpu", 4 * n_params * 4 * 2 + 1)
    model, _, _ = train(module, X, y, CE, traj, recorder=store)
    steps = kept(store.walk(module, X, y, CE))
    assert store.location == "checkpoints" and len(steps) == traj.n_steps
    spare = slice(n_params - 12, n_params)
    assert all(torch.equal(s.g[spare], torch.zeros(12)) for s in steps)
    # zero gradient, weight decay 0.01 at lr 0.1 each step, momentum carrying it (as torch would with a zero grad)
    w, v = module.spare.bias.detach().clone(), torch.zeros(3)
    for _ in range(traj.n_steps):
        v = 0.9 * v + 0.01 * w
        w = w - 0.1 * v
    torch.testing.assert_close(model.spare.bias.detach(), w)


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
    for kw in (dict(max_memory=3 * row, spill_dir=None), dict(max_memory=2 * row, spill_dir=str(tmp_path))):
        with pytest.warns(UserWarning, match="did not learn"):
            other = cleaner(**kw).fit(X, y, validation_mask=mask)
        scale = np.nanmax(np.abs(base.class_contribution_))
        np.testing.assert_allclose(other.contribution_, base.contribution_, rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(other.class_contribution_, base.class_contribution_, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(max_memory="1kB", spill_dir=None), "cannot hold one checkpoint"),
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


def test_a_capture_with_a_second_pass_leaves_the_recomputed_gradients_bit_for_bit():
    """BatchNorm in train mode, recomputed from checkpoints with the constant-statistics capture riding along
    (its own backward pass through each step's graph): every step's gradient is the training run's."""
    from hydraclean.projection import LayerFactorProjector, probe_layers

    module = ref.tiny_bn_cnn().float()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(10, 1, 5, 5, generator=g), torch.arange(10) % 3
    traj = plan_trajectory(10, batch_size=4, max_epochs=3, lr=0.1, momentum=0.9, weight_decay=0.01, seed=0)
    n_params = sum(p.numel() for p in module.parameters())
    visits, store = Visits(), RunStore(traj, n_params, torch.float32, "cpu", 4 * n_params * 4 * 2 + 1)

    class Both(Visits):
        def attach(self, model):
            store.attach(model)

        def record(self, step):
            super().record(step)
            store.record(step)

    visits = Both()
    train(module, X, y, CE, traj, recorder=visits)
    plan = probe_layers(module, CE, X[:4], y[:4], constant_stats=True)
    projector = LayerFactorProjector(module, CE, torch.zeros(1, n_params), 10, plan, constant_stats=True)
    steps = kept(store.walk(module, X, y, CE, capture=projector.training_capture))
    assert store.location == "checkpoints"
    for step in steps:
        assert torch.equal(step.g, visits.steps[step.t].g) and step.captured


def group_norm_net():
    torch.manual_seed(0)
    # the second convolution has more weights than a sample's input and output gradients: summed per-sample
    # gradients (TrainingFactors) take more memory than what the steps caught
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 32, 3),
                         nn.Flatten(), nn.Linear(32, 3)).double()


def captured_setup(make):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(10, 1, 5, 5, generator=g, dtype=torch.float64), torch.arange(10) % 3
    def traj():
        return plan_trajectory(10, batch_size=4, max_epochs=2, lr=0.1, momentum=0.9, weight_decay=0.01, seed=0)
    V = torch.randn(3, sum(p.numel() for p in make().parameters()), generator=g, dtype=torch.float64)
    return X, y, traj, V


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_a_captured_run_gives_the_plain_recurrences_hypergradients(where, tmp_path):
    """The training run's own layer entries, kept and multiplied by the directions afterwards: the Hessian-free
    hypergradients of the per-sample recurrence (float64), from memory or from one file a step on disk."""
    from hydraclean.projection import CapturedRun, probe_layers
    from hydraclean.routes import plan_route

    X, y, traj, V = captured_setup(group_norm_net)
    module = group_norm_net()
    plan = probe_layers(module, CE, X[:5], y[:5])
    spill = str(tmp_path) if where == "disk" else None
    route = CapturedRun.plan(module, CE, traj(), plan, 10**9 if spill is None else 100, spill)
    assert route.location == where
    # where the summed per-sample gradients do not fit and what the steps caught does, it is the route
    chosen = plan_route(module, CE, X, y, traj(), max_memory=route.nbytes + 100, spill_dir=spill)
    assert type(chosen).__name__ == "CapturedRun"
    chosen.close()
    half = CapturedRun.plan(module, CE, traj(), plan, 10**9 if spill is None else 100, spill)
    train(module, X, y, CE, route.trajectory, recorder=route)
    if where == "disk":
        assert len(list(tmp_path.glob("hydraclean-steps-*/step-*.pt"))) == route.trajectory.n_steps
    half.load_state_dict(route.state_dict())  # a checkpoint's round trip keeps every step
    _, nabla, _ = ref.free_recurrence(group_norm_net(), X, y, X[:3], y[:3], traj(), CE)
    for r in (route, half):
        assert ref.relative_error(r.project(V), nabla @ V.T) < 1e-12
        r.close()
    assert not list(tmp_path.iterdir())


def test_a_captured_batchnorm_run_equals_the_walk_that_recomputes_it():
    """BatchNorm in train mode, its statistics held constant: what the training steps caught, kept (the
    statistics-constant second backward pass of each step), gives the stored run's projections, both from
    checkpoints (whose walk rides the same second pass) and from the steps' gradients (whose projector runs
    a pass of its own through a copy with the statistics detached), float64."""
    from hydraclean.projection import CapturedRun, probe_layers
    from hydraclean.routes import StoredRun

    make = lambda: ref.tiny_bn_cnn().double()  # noqa: E731
    X, y, traj, V = captured_setup(make)
    module = make()
    plan = probe_layers(module, CE, X[:5], y[:5], constant_stats=True)
    captured = CapturedRun.plan(module, CE, traj(), plan, 10**9, constant_stats=True)
    n_params = V.shape[1]
    stored = StoredRun(module, CE, traj(), X, y, exact=False, max_memory=4 * n_params * 8 + 1, plan=plan,
                       constant_stats=True)
    assert stored.store.location == "checkpoints"
    own_pass = StoredRun(module, CE, traj(), X, y, exact=False, max_memory=10**9, plan=plan, constant_stats=True)
    assert own_pass.store.location != "checkpoints"
    projections, trained = [], []
    for route in (captured, stored, own_pass):
        trained.append(train(module, X, y, CE, route.trajectory, recorder=route)[0])
        projections.append(route.project(V))
        route.close()
    assert ref.relative_error(projections[0], projections[1]) < 1e-12
    assert ref.relative_error(projections[0], projections[2]) < 1e-12
    # the training steps' graphs served the second backward pass: the run is the plain one, bit for bit
    plain = train(module, X, y, CE, traj())[0]
    for p, q in zip(trained[0].state_dict().values(), plain.state_dict().values()):
        assert torch.equal(p, q)


def test_a_captured_run_refuses_a_spill_dir_without_room_naming_the_fix(monkeypatch, tmp_path):
    import shutil

    from hydraclean.projection import CapturedRun, probe_layers

    X, y, traj, _ = captured_setup(group_norm_net)
    module = group_norm_net()
    plan = probe_layers(module, CE, X[:5], y[:5])
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 10))
    with pytest.raises(ValueError, match="spill_dir=None"):
        CapturedRun.plan(module, CE, traj(), plan, 100, str(tmp_path))
