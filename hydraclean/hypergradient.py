"""Hypergradients along a recorded trajectory: adjoints swept backward, or tangents carried forward.

A step is ``(w_t, s_t) = U_t(w_{t-1}, s_{t-1}, g_t)`` with
``g_t = (1/b_t) sum_{i in B_t} (1 + N eps_i) grad l_i(w_{t-1})`` (DESIGN.md §7;
:mod:`hydraclean.optimizers`). For a fixed direction ``V`` (a validation
gradient at ``w_T``), ``<V, nabla_{T,i}> = <V, d w_T / d eps_i>`` for every
sample at once is one reverse-mode sweep over the stored run::

    a_T = V (state adjoint 0);  at step t:  (a_{t-1}, q_t) = (vjp of U_t)(a_t)  [+ H_t q_t into a_{t-1}]
    <V, nabla_{T,i}> = sum_{t : i in B_t} (N / b_t) <q_t, grad l_i(w_{t-1})>

``q_t`` is the adjoint of the step's gradient. ``hessian="exact"`` adds the
Hessian-vector product ``H_t q_t`` of the step's batch loss
(:func:`exact_projections`: K adjoints for K directions); ``hessian="free"``
drops it and nothing else. The vjp is that of the optimizer's own update rule,
for every optimizer. Without the Hessian the sweep is
coordinatewise for an elementwise rule, so that ``q_t = V * d_t`` with one
factor vector ``d_t`` for all directions (:func:`free_factors`), and for a
linear rule (SGD) a scalar, ``q_t = c_t V`` (:func:`scalar_coefficients`): the
per-sample products are then known before the directions, and the training
steps' own layer factors can be summed as the run goes
(:class:`hydraclean.projection.TrainingFactors`).

:class:`ExactTracker` carries the hypergradient vectors of a few samples
forward instead (``jvp`` of the same rule), for measuring the Hessian-free
approximation on a tracked subset.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.func import jacfwd, jvp, vmap

from .gradients import (
    PerSampleLoss,
    hessian_and_loss_tangents,
    hessian_vector_products,
    parameter_dict,
    per_sample_gradients,
    unflatten,
)
from .training import Step, Trajectory, step_rng

__all__ = ["ExactTracker", "exact_projections", "free_factors", "scalar_coefficients", "step_weights"]


def scalar_coefficients(trajectory: Trajectory) -> np.ndarray:
    """``c_t = d w_T / d g_t`` of a linear rule (SGD), the same scalar for every coordinate, shape (n_steps,).

    The reverse sweep of :func:`free_factors` on one coordinate: each step's
    Jacobian of the rule with respect to ``(w, s, g)`` comes from
    ``torch.func.jacfwd`` of the rule itself in float64 (once per distinct
    hyperparameters), and one backward pass of a row vector over the run
    multiplies them out. No matrix inverse, so it is stable for any schedule.
    """
    rule = trajectory.rule
    if not rule.linear:
        raise ValueError(f"{type(rule).__name__} is not linear: its Hessian-free hypergradient is not one scalar "
                         "per step (use free_factors).")
    n_state = len(rule.init(torch.zeros(1)))
    cache: dict[tuple, np.ndarray] = {}

    def jacobian(t: int) -> np.ndarray:
        """Rows: the outputs (w, s...); columns: the inputs (w, s..., g)."""
        hyper = trajectory.hyper_at(t)
        key = (tuple(hyper.values()), t == 0)  # a linear rule's coefficients: the hyperparameters, the first step
        if key not in cache:
            def step(x: torch.Tensor) -> torch.Tensor:
                w, *state, g = x.split(1)
                w, state = rule.step(w, tuple(state), g, t + 1, hyper)
                return torch.cat([w, *state])

            cache[key] = jacfwd(step)(torch.zeros(2 + n_state, dtype=torch.float64)).numpy()
        return cache[key]

    adjoint = np.zeros(1 + n_state)
    adjoint[0] = 1.0
    c = np.empty(trajectory.n_steps)
    for t in range(trajectory.n_steps - 1, -1, -1):
        J = jacobian(t)
        c[t] = adjoint @ J[:, -1]
        adjoint = adjoint @ J[:, :-1]
    return c


def step_weights(trajectory: Trajectory) -> np.ndarray:
    """``c_t N / b_t`` of every step: the weight of a per-step gradient in ``nabla_{T,i}``, shape (n_steps,)."""
    return scalar_coefficients(trajectory) * trajectory.n_samples / trajectory.batch_sizes()


def _rule_vjp(trajectory: Trajectory, step: Step, batched: bool = False):
    """The vjp of step ``t``'s update at its recorded ``(w_{t-1}, s_{t-1}, g_t)``: ``(a_w, a_s) -> (a_w', a_s',
    q)``, for a batch of adjoints (a leading axis) with ``batched``.

    By autograd over one evaluation of the rule (a third faster than ``torch.func.vjp``'s wrappers here, at
    every step of a sweep: 0.52 ms against 0.76 ms for LeNet-5's 61,706 parameters under AdamW).
    """
    inputs = (step.w, *step.state, step.g)
    inputs = tuple(x.detach().requires_grad_() for x in inputs)
    with torch.enable_grad():
        w, state = trajectory.rule.step(inputs[0], inputs[1:-1], inputs[-1], step.t + 1, trajectory.hyper_at(step.t))
    outputs = (w, *state)

    def apply(adjoint: tuple) -> tuple:
        a_w, a_s = adjoint
        grads = torch.autograd.grad(outputs, inputs, (a_w, *a_s), allow_unused=True, materialize_grads=True,
                                    is_grads_batched=batched)
        return grads[0], tuple(grads[1:-1]), grads[-1]

    return apply


def free_factors(trajectory: Trajectory, steps: Iterator[Step]) -> Iterator[tuple[Step, torch.Tensor]]:
    """Hessian-free adjoint factors of an elementwise rule, last step first.

    For every direction ``V``, the Hessian-free adjoint of step ``t``'s
    gradient is ``q_t = V * d_t``: the rule acts on each coordinate alone, so
    one sweep with ``V = 1`` (ones) gives ``d_t`` for all directions.

    Parameters
    ----------
    trajectory : Trajectory
    steps : iterator of Step
        The run's steps, last to first (:meth:`hydraclean.run_store.RunStore.walk`
        with ``reverse=True``).

    Yields
    ------
    step, d : Step, Tensor of shape (n_params,)
    """
    adjoint = None
    for step in steps:
        if adjoint is None:
            adjoint = (torch.ones_like(step.w), tuple(torch.zeros_like(s) for s in step.state))
        a_w, a_s, d = _rule_vjp(trajectory, step)(adjoint)
        yield step, d
        adjoint = (a_w, a_s)


def exact_projections(
    trajectory: Trajectory,
    steps: Iterator[Step],
    loss: PerSampleLoss,
    like: dict[str, torch.Tensor],
    directions: torch.Tensor,
    n_samples: int,
    *,
    with_hessian: bool = True,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``P[i, k] = <V_k, d w_T / d eps_i>`` with the Hessian term, for every sample: the adjoint sweep.

    Per step, one ``vjp`` of the update rule for the K adjoints (vectorised)
    and one forward-over-reverse pass of the step's batch loss per direction,
    which gives both ``H_t q_t`` and the per-sample products
    ``<q_t, grad l_i(w_{t-1})>`` (:func:`hydraclean.gradients.hessian_and_loss_tangents`),
    under the step's seed and with its batch statistics.

    Parameters
    ----------
    trajectory : Trajectory
    steps : iterator of Step
        Last to first, with their batches.
    loss : PerSampleLoss
    like : dict of str to Tensor
        The parameters' names and shapes.
    directions : Tensor of shape (K, n_params)
    n_samples : int
    with_hessian : bool, default=True
        False drops ``H_t q_t`` (the Hessian-free adjoint, for checks).
    chunk_size : int, optional
        Directions per vectorised Hessian-vector product.

    Returns
    -------
    P : Tensor of shape (n_samples, K)
    """
    out = directions.new_zeros(n_samples, directions.shape[0])
    a_w = a_s = None
    for step in steps:
        if a_w is None:
            a_w = directions.clone()
            a_s = tuple(directions.new_zeros(directions.shape) for _ in step.state)
        a_w, a_s, q = _rule_vjp(trajectory, step, batched=True)((a_w, a_s))
        with step_rng(trajectory.step_seed(step.t), step.xb.device):
            hq, d = hessian_and_loss_tangents(loss, unflatten(step.w, like), step.xb, step.yb, q, chunk_size)
        out.index_add_(0, step.idx, d.T, alpha=trajectory.n_samples / trajectory.batch_size_at(step.t))
        if with_hessian:
            a_w = a_w + hq
    return out


class ExactTracker:
    """Carries the tangents ``(d w_t / d eps_i, d s_t / d eps_i)`` of a few samples forward through training.

    A :class:`hydraclean.training.Recorder`: pass it to
    :func:`hydraclean.training.train`; afterwards :attr:`nabla` holds
    ``nabla_{T,i} = d w_T / d eps_i`` for the tracked samples. At every step
    the tangent of the gradient, ``H_t nabla_{t-1,i} + (N / b_t) 1[i in B_t]
    grad l_i(w_{t-1})``, goes through the ``jvp`` of the optimizer's update
    rule (vectorised over the samples). O(S n_params) memory and S
    Hessian-vector products per step for S samples: for small problems and for
    measuring the Hessian-free approximation (paper Figs. 3-5), where the
    vectors themselves are wanted; contributions of every sample come from
    the reverse sweep (:func:`exact_projections`).

    Parameters
    ----------
    module : nn.Module
        The architecture being trained.
    criterion : nn.Module
        Per-sample loss, ``reduction="none"``.
    trajectory : Trajectory
    indices : Tensor of int, shape (S,)
        Training samples to track.
    with_hessian : bool, default=True
        False drops the Hessian term, giving the Hessian-free vectors (to
        measure the approximation on the same run).
    chunk_size : int, optional
        Hessian-vector products per vectorised call (bounds memory).

    Attributes
    ----------
    nabla : Tensor of shape (S, n_params)
    """

    def __init__(self, module: nn.Module, criterion: nn.Module, trajectory: Trajectory, indices: torch.Tensor, *,
                 with_hessian: bool = True, chunk_size: int | None = None) -> None:
        self.loss = PerSampleLoss(module, criterion)
        self.trajectory = trajectory
        self.with_hessian = with_hessian
        self.chunk_size = chunk_size
        params = parameter_dict(module)
        self.like = params
        ref = next(iter(params.values()))
        n_params = sum(p.numel() for p in params.values())
        self.nabla = torch.zeros(len(indices), n_params, dtype=ref.dtype, device=ref.device)
        self.tangent_state: tuple[torch.Tensor, ...] | None = None
        self.slot = torch.full((trajectory.n_samples,), -1, dtype=torch.long, device=ref.device)
        self.slot[indices.to(ref.device)] = torch.arange(len(indices), device=ref.device)

    def attach(self, model: nn.Module) -> None:
        """Nothing to hook."""

    def detach(self) -> None:
        """Nothing to unhook."""

    def state_dict(self) -> dict:
        return {"nabla": self.nabla, "tangent_state": None if self.tangent_state is None else list(self.tangent_state)}

    def load_state_dict(self, state: dict) -> None:
        self.nabla = state["nabla"].to(self.nabla.device)
        if state["tangent_state"] is not None:
            self.tangent_state = tuple(s.to(self.nabla.device) for s in state["tangent_state"])

    def record(self, step: Step) -> None:
        traj = self.trajectory
        if self.tangent_state is None:
            self.tangent_state = tuple(torch.zeros_like(self.nabla) for _ in step.state)
        params = unflatten(step.w, self.like)
        dg = torch.zeros_like(self.nabla)
        if self.with_hessian and step.t > 0:  # nabla_0 = 0, so H nabla_0 = 0
            with step_rng(traj.step_seed(step.t), step.xb.device):
                dg += hessian_vector_products(self.loss, params, step.xb, step.yb, self.nabla, self.chunk_size)
        slots = self.slot[step.idx]
        tracked = slots >= 0
        if bool(tracked.any()):
            with step_rng(traj.step_seed(step.t), step.xb.device):
                g = per_sample_gradients(self.loss, params, step.xb, step.yb)
            dg.index_add_(0, slots[tracked], g[tracked], alpha=traj.n_samples / traj.batch_size_at(step.t))
        hyper, t = traj.hyper_at(step.t), step.t + 1

        def tangent(dw, ds, dgi):
            return jvp(lambda w, s, g: traj.rule.step(w, s, g, t, hyper), (step.w, step.state, step.g),
                       (dw, ds, dgi))[1]

        self.nabla, self.tangent_state = vmap(tangent)(self.nabla, self.tangent_state, dg)
