"""On a GPU: scoring uses the recorded run's own weights, and agrees with float64 on the CPU there.

Skipped without CUDA (CI has none); `make gpu-check` runs it on a CUDA machine.
"""

import numpy as np
import pytest
import torch
from torch import nn

from hydraclean.contribution import fit_contributions
from hydraclean.gradients import class_validation_gradients
from hydraclean.hypergradient import replay_coefficients
from hydraclean.models import LeNet5
from hydraclean.projection import FunctionalProjector
from hydraclean.training import plan_trajectory

from . import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CE = nn.CrossEntropyLoss(reduction="none")


@pytest.mark.parametrize("max_memory", [10**9, 10**7], ids=["training factors", "stored weights"])
def test_gpu_scoring_equals_float64_cpu_at_the_recorded_weights(max_memory):
    g = torch.Generator().manual_seed(0)
    n, n_val = 512, 100
    X, y = torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    Xv, yv = torch.rand(n_val, 1, 28, 28, generator=g), torch.arange(n_val) % 10
    torch.manual_seed(0)
    module = LeNet5().cuda()
    traj = plan_trajectory(n, batch_size=64, max_epochs=2, lr=0.05, lr_schedule="constant", momentum=0.9,
                           weight_decay=1e-4, seed=0)
    visited = []  # the weights the GPU run took each step from, as float64 on the CPU

    def keep(model, t, idx, xb, yb):
        visited.append(ref.flat_params(model).double().cpu())

    from hydraclean import training

    original = training.run_sgd

    def run_sgd(*args, on_step=None, **kw):  # record w_{t-1} beside whatever else runs at each step
        def both(*a):
            keep(*a)
            if on_step is not None:
                on_step(*a)
        return original(*args, on_step=both, **kw)

    training.run_sgd = run_sgd
    try:
        result = fit_contributions(module, X.cuda(), y.cuda(), Xv.cuda(), yv.cuda(), criterion=CE, trajectory=traj,
                                   n_classes=10, max_memory=max_memory)
    finally:
        training.run_sgd = original
    assert len(visited) == traj.n_steps
    # reference: float64 on the CPU, at the weights the GPU run visited
    cpu = LeNet5().double()
    w_T = ref.flat_params(result.model).double().cpu()
    for p, v in zip(cpu.parameters(), ref.split(w_T, cpu).values()):
        p.data.copy_(v)
    G = class_validation_gradients(cpu, Xv.double(), yv, CE, 10)
    projector = FunctionalProjector(cpu, CE, G, n)
    weights = replay_coefficients(traj.lrs, traj.momentum, traj.weight_decay) * n / traj.batch_sizes()
    for t, idx in enumerate(ref.batches(traj)):
        for p, v in zip(cpu.parameters(), ref.split(visited[t], cpu).values()):
            p.data.copy_(v)
        projector.add(cpu, idx, X[idx].double(), y[idx], float(weights[t]))
    expected = (-projector.result() / n).numpy()
    assert ref.relative_error(result.class_contribution, expected) < 1e-4
    assert np.isfinite(result.contribution).all()


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
