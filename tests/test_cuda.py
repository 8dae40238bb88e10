"""On a GPU: scoring uses the recorded run's own weights, and agrees with float64 on the CPU there, for SGD and AdamW.

Skipped without CUDA (CI has none); `make gpu-check` runs it on a CUDA machine.
"""

import numpy as np
import pytest
import torch
from torch import nn

from hydraclean.contribution import fit_contributions
from hydraclean.gradients import class_validation_gradients, unflatten
from hydraclean.hypergradient import free_factors
from hydraclean.models import LeNet5
from hydraclean.projection import FunctionalProjector
from hydraclean.training import Step, plan_trajectory, step_rng

from . import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CE = nn.CrossEntropyLoss(reduction="none")


class _Logged:
    """A route that also keeps, as float64 on the CPU, every step of the GPU run: its weights, state, gradient."""

    def __init__(self, route, visited):
        self.route, self.visited = route, visited

    def __getattr__(self, name):
        return getattr(self.route, name)

    def record(self, step):
        self.visited.append((step.w.double().cpu(), tuple(s.double().cpu() for s in step.state),
                             step.g.double().cpu()))
        self.route.record(step)


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.AdamW])
@pytest.mark.parametrize("max_memory", [10**9, 10**7], ids=["training factors", "stored run"])
def test_gpu_scoring_equals_float64_cpu_at_the_recorded_weights(max_memory, optimizer, monkeypatch):
    g = torch.Generator().manual_seed(0)
    n, n_val = 512, 100
    X, y = torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    Xv, yv = torch.rand(n_val, 1, 28, 28, generator=g), torch.arange(n_val) % 10
    torch.manual_seed(0)
    module = LeNet5().cuda()
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-4) if optimizer is torch.optim.SGD else dict(lr=1e-3)
    traj = plan_trajectory(n, batch_size=64, max_epochs=2, seed=0, optimizer=optimizer, **kw)
    visited = []  # the weights the GPU run took each step from
    from hydraclean import contribution

    plan = contribution.plan_route
    monkeypatch.setattr(contribution, "plan_route", lambda *a, **k: _Logged(plan(*a, **k), visited))
    result = fit_contributions(module, X.cuda(), y.cuda(), Xv.cuda(), yv.cuda(), criterion=CE, trajectory=traj,
                               n_classes=10, max_memory=max_memory)
    assert len(visited) == traj.n_steps
    # reference: float64 on the CPU, at the steps the GPU run took, with the rule's adjoint factors there
    cpu = LeNet5().double()
    like = {k: v.detach() for k, v in cpu.named_parameters()}
    G = class_validation_gradients(_at(cpu, ref.flat_params(result.model).double().cpu()), Xv.double(), yv, CE, 10)
    steps = [Step(t, idx, X[idx].double(), y[idx], *visited[t]) for t, idx in enumerate(ref.batches(traj))]
    factors = [d for _, d in free_factors(traj, reversed(steps))][::-1]
    projector = FunctionalProjector(cpu, CE, G, n)
    for step, d in zip(steps, factors):
        with step_rng(traj.step_seed(step.t), torch.device("cpu")):
            projector.add(unflatten(step.w, like), step.idx, step.xb, step.yb, n / len(step.idx), directions=G * d)
    expected = (-projector.result() / n).numpy()
    assert ref.relative_error(result.class_contribution, expected) < 1e-4
    assert np.isfinite(result.contribution).all()


def _at(module, w):
    for p, v in zip(module.parameters(), ref.split(w, module).values()):
        p.data.copy_(v)
    return module


def test_gpu_autocast_routes_agree():
    """bfloat16 autocast on the GPU: factors kept from training and stored weights score alike.

    The stored-weights route recomputes each step's bfloat16 forward; GPU kernels may round a
    recomputation differently in the last bfloat16 place, hence 1e-2 rather than float32's 1e-4.
    """
    from hydraclean import HydraLabelCleaner

    rng = np.random.RandomState(0)
    X, y = rng.rand(512, 1, 28, 28).astype(np.float32), rng.randint(0, 10, 512)
    Xv, yv = rng.rand(100, 1, 28, 28).astype(np.float32), np.arange(100) % 10
    fits = [HydraLabelCleaner(LeNet5, max_epochs=2, device="cuda", autocast="bfloat16", max_memory=m,
                              random_state=0).fit(X, y, X_val=Xv, y_val=yv) for m in (10**9, 10**7)]
    assert ref.relative_error(fits[1].class_contribution_, fits[0].class_contribution_) < 1e-2
