"""Hypergradients ``nabla_{T,i} = d w_T / d eps_i`` along a recorded trajectory.

The recursion (DESIGN.md §1), for every training sample ``i``::

    dv_t      = p dv_{t-1} + [H_{t-1} nabla_{t-1,i}] + lam nabla_{t-1,i}
                + (N / b_t) 1[i in B_t] grad l_i(w_{t-1})
    nabla_t,i = nabla_{t-1,i} - eta_t dv_t,          nabla_0 = dv_0 = 0

``hessian="exact"`` keeps the bracketed Hessian-vector product and needs the
vectors themselves (:class:`ExactTracker`, O(S n_params) memory for S tracked
samples). Without it the state ``(nabla, dv)`` evolves by the same 2x2 map
``M_t = [[1 - eta_t lam, -eta_t p], [lam, p]]`` in every coordinate and receives
the input through ``b_t = (-eta_t, 1)``, so::

    nabla_{T,i} = sum_{t : i in B_t} c_t (N / b_t) grad l_i(w_{t-1}),
    c_t = e1' M_T ... M_{t+1} b_t

and any projection ``<V, nabla_{T,i}>`` is a sum of per-step directional
derivatives (:func:`free_projections`): O(N K) memory for K directions, nothing
of size N x n_params.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .batches import Inputs
from .gradients import PerSampleLoss, hessian_vector_products, parameter_dict, per_sample_gradients
from .projection import make_projector
from .training import Progress, Trajectory, replay, step_rng
from .weight_store import WeightStore

__all__ = ["ExactTracker", "free_projections", "replay_coefficients", "step_weights"]


def replay_coefficients(lrs: np.ndarray, momentum: float, weight_decay: float) -> np.ndarray:
    """Coefficients ``c_t = e1' M_T ... M_{t+1} b_t`` of the Hessian-free hypergradient.

    One backward sweep of a row 2-vector over the schedule, in float64; no
    matrix inverse, so it is stable for any schedule.

    Parameters
    ----------
    lrs : ndarray of shape (n_steps,)
        ``eta_t`` as the optimizer used them.
    momentum, weight_decay : float
        ``p`` and ``lam``.

    Returns
    -------
    c : ndarray of shape (n_steps,), float64
    """
    p, lam = float(momentum), float(weight_decay)
    c = np.empty(len(lrs), dtype=np.float64)
    r0, r1 = 1.0, 0.0  # r = e1' M_T ... M_{t+1}
    for t in range(len(lrs) - 1, -1, -1):
        eta = float(lrs[t])
        c[t] = -eta * r0 + r1
        r0, r1 = r0 * (1.0 - eta * lam) + r1 * lam, -r0 * eta * p + r1 * p
    return c


def step_weights(trajectory: Trajectory) -> np.ndarray:
    """``c_t N / b_t`` of every step: the weight of a per-step gradient in ``nabla_{T,i}``, shape (n_steps,)."""
    c = replay_coefficients(trajectory.lrs, trajectory.momentum, trajectory.weight_decay)
    return c * trajectory.n_samples / trajectory.batch_sizes()


def free_projections(
    trajectory: Trajectory,
    module: nn.Module,
    X: Inputs,
    y: torch.Tensor,
    criterion: nn.Module,
    directions: torch.Tensor,
    progress: Progress | None = None,
    *,
    store: WeightStore | None = None,
    rows: tuple[nn.Module, torch.Tensor, torch.Tensor] | None = None,
    accumulate_bytes: int = 0,
) -> torch.Tensor:
    """``P[i, k] = <V_k, nabla_{T,i}>`` under the Hessian-free approximation.

    Walks the run once; at each step adds
    ``c_t (N / b_t) <V_k, grad l_i(w_{t-1})>`` for the batch's samples.

    Parameters
    ----------
    trajectory : Trajectory
        Recorded by :func:`hydraclean.training.train`.
    module : nn.Module
        The architecture (its weights are replaced by ``w_0``).
    X, y : Tensor (or DatasetInputs for X)
        Training data on the module's device (:mod:`hydraclean.batches`).
    criterion : nn.Module
        Per-sample loss, ``reduction="none"``.
    directions : Tensor of shape (K, n_params)
        The fixed vectors ``V_k`` (validation gradients at ``w_T``).
    progress : callable, optional
        Wraps the iterator over epochs.
    store : WeightStore, optional
        The run's stored weights; without it the run is replayed from ``w_0``
        (same weights on CPU).
    rows, accumulate_bytes
        Passed to :func:`hydraclean.projection.make_projector`.

    Returns
    -------
    P : Tensor of shape (n_samples, K)
    """
    weights = step_weights(trajectory)
    projector = make_projector(module, criterion, directions, trajectory.n_samples, rows, accumulate_bytes,
                               trajectory.autocast)

    def on_step(model: nn.Module, t: int, idx: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> None:
        with step_rng(trajectory.step_seed(t), y.device):
            projector.add(model, idx, xb, yb, float(weights[t]))

    if store is None:
        replay(trajectory, module, X, y, criterion, on_step, progress=progress)
    else:
        store.walk(trajectory, module, X, y, criterion, on_step, progress=progress)
    return projector.result()


class ExactTracker:
    """Carries ``(nabla_{t,i}, dv_{t,i})`` for a set of samples through training.

    Pass an instance as ``on_step`` to :func:`hydraclean.training.train`; after
    training, :attr:`nabla` holds ``nabla_{T,i}`` for the tracked samples.

    Parameters
    ----------
    module : nn.Module
        The architecture being trained.
    criterion : nn.Module
        Per-sample loss, ``reduction="none"``.
    trajectory : Trajectory
        Supplies ``eta_t``, ``p``, ``lam``, the step seeds and ``N``.
    indices : Tensor of int, shape (S,)
        Training samples to track.
    with_hessian : bool, default=True
        False drops the Hessian term, giving the Hessian-free vectors (used
        to measure the approximation error on the same run).
    chunk_size : int, optional
        Hessian-vector products per vectorised call (bounds memory).

    Attributes
    ----------
    nabla : Tensor of shape (S, n_params)
    dv : Tensor of shape (S, n_params)
    """

    def __init__(
        self,
        module: nn.Module,
        criterion: nn.Module,
        trajectory: Trajectory,
        indices: torch.Tensor,
        *,
        with_hessian: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        self.loss = PerSampleLoss(module, criterion)
        self.trajectory = trajectory
        self.with_hessian = with_hessian
        self.chunk_size = chunk_size
        params = parameter_dict(module)
        ref = next(iter(params.values()))
        n_params = sum(p.numel() for p in params.values())
        self.nabla = torch.zeros(len(indices), n_params, dtype=ref.dtype, device=ref.device)
        self.dv = torch.zeros_like(self.nabla)
        self.slot = torch.full((trajectory.n_samples,), -1, dtype=torch.long, device=ref.device)
        self.slot[indices.to(ref.device)] = torch.arange(len(indices), device=ref.device)

    def __call__(self, model: nn.Module, t: int, idx: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> None:
        traj = self.trajectory
        eta, p, lam = float(traj.lrs[t]), traj.momentum, traj.weight_decay
        params = parameter_dict(model)
        step = lam * self.nabla
        if self.with_hessian and t > 0:  # nabla_0 = 0, so H nabla_0 = 0
            with step_rng(traj.step_seed(t), xb.device):
                step += hessian_vector_products(self.loss, params, xb, yb, self.nabla, self.chunk_size)
        slots = self.slot[idx]
        tracked = slots >= 0
        if bool(tracked.any()):
            with step_rng(traj.step_seed(t), xb.device):
                g = per_sample_gradients(self.loss, params, xb, yb)
            step.index_add_(0, slots[tracked], g[tracked], alpha=traj.n_samples / len(idx))
        self.dv = p * self.dv + step
        self.nabla = self.nabla - eta * self.dv
