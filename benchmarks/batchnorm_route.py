"""Scoring a BatchNorm model at its stored weights: a JVP per direction against the batch Jacobian.

DenseNet-BC-40 (BatchNorm, so no layer factors) on random 32x32 images, batch
64, on this machine's CPU threads. Its per-sample train-mode losses couple
through the batch statistics, so a per-sample gradient is a row of the batch
Jacobian (``b`` backward passes). The default fit needs ``<V_k, grad l_i>`` for
its 10 class directions only, which forward mode gives in one JVP per
direction (``hydraclean.gradients.directional_derivatives`` takes that route
when there are fewer directions than samples).

Reported: the seconds of one scoring step by each route (and how far apart
their results are), and a one-epoch default fit on --n images against plain
training of the same model over the same batches.

    python benchmarks/batchnorm_route.py [--n 256] [--out docs/_generated/batchnorm_route.md]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from torch import nn

from measure import emit  # noqa: I001  (benchmarks/ is on sys.path when run as a script)

from hydraclean import HydraLabelCleaner
from hydraclean.gradients import PerSampleLoss, directional_derivatives, parameter_dict, per_sample_gradients
from hydraclean.models import densenet_bc_40
from hydraclean.training import step_rng

BATCH, K = 64, 10


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def one_step() -> list[str]:
    """One scoring step of 64 images against 10 directions, both routes."""
    torch.manual_seed(0)
    module = densenet_bc_40(in_channels=1)
    loss = PerSampleLoss(module, nn.CrossEntropyLoss(reduction="none"))
    params = {k: v.detach() for k, v in parameter_dict(module).items()}
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(BATCH, 1, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    V = torch.randn(K, sum(v.numel() for v in params.values()), generator=g)
    with step_rng(0, x.device):
        t_jvp, forward = timed(lambda: directional_derivatives(loss, params, x, y, V))
    with step_rng(0, x.device):
        t_jac, jacobian = timed(lambda: per_sample_gradients(loss, params, x, y) @ V.T)
    gap = float((forward - jacobian).norm() / jacobian.norm())
    return [f"| one scoring step, a JVP per direction | {t_jvp:.1f} s | |",
            f"| one scoring step, rows of the batch Jacobian | {t_jac:.1f} s | results {gap:.1e} apart (relative) |"]


def one_epoch(n: int) -> list[str]:
    """Plain training against the default fit, one epoch of ``n`` images."""
    rng = np.random.RandomState(0)
    X, y = rng.rand(n, 1, 32, 32).astype(np.float32), rng.randint(0, 10, n)
    Xv, yv = rng.rand(100, 1, 32, 32).astype(np.float32), np.arange(100) % 10
    torch.manual_seed(0)
    model = densenet_bc_40(in_channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def plain():
        for start in range(0, n, BATCH):
            xb, yb = torch.as_tensor(X[start : start + BATCH]), torch.as_tensor(y[start : start + BATCH])
            loss = nn.functional.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    t_plain, _ = timed(plain)
    cleaner = HydraLabelCleaner(lambda: densenet_bc_40(in_channels=1), max_epochs=1, batch_size=BATCH,
                                max_memory="4GB", random_state=0)
    t_fit, _ = timed(lambda: cleaner.fit(X, y, X_val=Xv, y_val=yv))
    return [f"| plain training, one epoch of {n} images | {t_plain:.1f} s | |",
            f"| default fit, the same | {t_fit:.1f} s | {t_fit / t_plain:.1f} times plain training |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    torch.set_num_threads(2)
    lines = [f"DenseNet-BC-40, batch {BATCH}, {K} directions, {torch.get_num_threads()} CPU threads, "
             f"torch {torch.__version__}.", "", "| what | time | |", "|---|---|---|"]
    emit(lines + one_step() + one_epoch(args.n), args.out)


if __name__ == "__main__":
    main()
