"""What scoring keeps from the training run, and how it projects: one protocol, four routes.

Every route is a :class:`hydraclean.training.Recorder` handed to the training
run, then asked for the projections of the run's hypergradients on the
validation directions, which exist only once training is over::

    route = plan_route(...)                 # the cheapest that applies and fits in max_memory
    train(..., recorder=route)              # keeps what it needs from every step
    route.finish()
    P = route.project(directions)           # P[i, k] = <V_k, nabla_{T,i}>, shape (N, K)
    route.close()

The routes (the choice is :func:`plan_route`'s):

- :class:`hydraclean.projection.TrainingFactors`: Hessian-free, linear rule
  (SGD), a model of Linear and Conv2d layers: each step's layer factors,
  weighted by scalars known before training and summed as the run goes;
- :class:`hydraclean.projection.CapturedRun`: the same, when those sums do
  not fit (a ResNet's convolutions): each step's layer inputs and output
  gradients as the training run caught them, in memory or, when every
  step's gradient does not fit in memory either, on disk as ``spill_dir``
  allows (:mod:`hydraclean.spill`), multiplied by the directions after
  training, with no second pass over the model;
- :class:`hydraclean.projection.StepFactors`: Hessian-free, any other
  (elementwise) rule (Adam, AdamW), the same models: each step's layer factors
  and gradient, then one backward sweep of the update rule;
- :class:`StoredRun`: everything else (``hessian="exact"``, the functional
  route, or when none of the above fits): every step's gradient, then a walk
  over the run at its recorded weights.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .batches import Inputs, first_inputs
from .ghost import GhostRows
from .gradients import PerSampleLoss, parameter_dict, unflatten
from .hypergradient import exact_projections, free_factors, step_weights
from .modes import training_modes
from .projection import (
    CapturedRun,
    LayerFactorProjector,
    StepFactors,
    TrainingFactors,
    has_batch_statistics,
    make_projector,
    probe_layers,
)
from .run_store import RunStore
from .training import Progress, Recorder, Step, Trajectory, step_rng

__all__ = ["Route", "StoredRun", "plan_route", "route_kind"]

class Route(Recorder, Protocol):
    """A recorder for the training run that projects the run's hypergradients afterwards.

    Attributes
    ----------
    nbytes : int
        Memory held (disk included), at most.
    """

    nbytes: int

    def finish(self) -> None:
        """Complete what training left (called once, after training, before any direction exists)."""

    def project(self, directions: torch.Tensor, ghost: GhostRows | None = None, progress: Progress | None = None
                ) -> torch.Tensor:
        """``P[i, k] = <V_k, nabla_{T,i}>`` for every training sample, shape (N, K).

        ``directions`` (K, n_params); ``ghost``: how they combine validation
        samples' own gradients (ghost products where a route has them and
        they cost less); ``progress`` wraps a walk over the run's steps, where
        the route takes one.
        """

    def close(self) -> None:
        """Free what the route holds (files included)."""


def plan_route(module: nn.Module, criterion: nn.Module, X: Inputs, y: torch.Tensor, trajectory: Trajectory, *,
               hessian: str = "free", max_memory: int = 10**9, spill_dir=None, batchnorm: str = "constant",
               reserve: int = 0) -> Route:
    """The cheapest route that applies to this run and fits in ``max_memory`` (see the module docstring).

    Parameters
    ----------
    module : nn.Module
        The architecture (``w_0``), on the data's device.
    criterion : nn.Module
    X, y
        The training inputs (a tensor or a Dataset's loader) and label codes.
    trajectory : Trajectory
    hessian : {"free", "exact"}
    max_memory : int
        Bytes on the data's device for what the route keeps.
    spill_dir : str or "auto", optional
        Where :class:`CapturedRun` may put the steps' layer entries, and
        :class:`StoredRun` the gradients, when they do not fit
        (:func:`hydraclean.spill.spill_location`).
    batchnorm : {"constant", "exact"}, default="constant"
        For a model with a BatchNorm that uses its batch's statistics in
        training: the layer route with those statistics held constant in the
        per-sample derivative (:func:`hydraclean.projection.constant_statistics`),
        or the exact per-sample gradients through them (the functional route,
        one JVP per direction).
    reserve : int, default=0
        Bytes of ``max_memory`` that scoring will hold beside the route (the
        validation directions and their ghost factors): :class:`StoredRun`'s
        checkpoints leave them free where they can.

    Raises
    ------
    ValueError
        When ``max_memory`` cannot hold even :class:`StoredRun`'s checkpoints.
    """
    plan, constant = None, False
    if hessian == "free":
        modes = trajectory.train_modes or training_modes(module)  # a replay's: the run's recorded modes
        constant = batchnorm == "constant" and has_batch_statistics(module, modes)
        probe = first_inputs(X, 5)
        data = X if isinstance(X, torch.Tensor) and trajectory.rule.linear else None
        plan = probe_layers(module, criterion, probe, y[: probe.shape[0]], modes=modes, constant_stats=constant,
                            data=data)
        route = None
        if plan is not None and trajectory.rule.linear:
            route = TrainingFactors.plan(module, criterion, None, None, trajectory, step_weights(trajectory),
                                         max_memory, data, constant, layer_plan=plan)
            if route is None:  # to disk only to spare the walk from checkpoints: the steps' gradients in
                # memory spare it too, at the same cost (benchmarks/overhead.py's Transformer row), writing nothing
                params = list(parameter_dict(module).values())  # what StoredRun's store would keep
                in_memory = RunStore.memory_footprint(trajectory, sum(p.numel() for p in params),
                                                      params[0].dtype) <= max_memory
                route = CapturedRun.plan(module, criterion, trajectory, plan, max_memory,
                                         None if in_memory else spill_dir, constant, reserve)
        elif plan is not None:
            route = StepFactors.plan(module, criterion, None, None, trajectory, max_memory, constant, layer_plan=plan)
        if route is not None:
            return route
    return StoredRun(module, criterion, trajectory, X, y, exact=hessian == "exact", max_memory=max_memory,
                     spill_dir=spill_dir, plan=plan, constant_stats=constant, reserve=reserve)


def route_kind(route: Route) -> str:
    """Which route, as far as its saved state goes (a checkpoint of one route cannot resume another): the
    class, and for a store whether it keeps the steps' gradients (in memory or on disk) or checkpoints."""
    store = getattr(route, "store", None)
    if store is None:
        return type(route).__name__
    return f"{type(route).__name__} ({'checkpoints' if store.location == 'checkpoints' else 'gradients'})"


class StoredRun:
    """Scores from the run's stored steps (:class:`hydraclean.run_store.RunStore`): any model, any rule.

    A :class:`hydraclean.training.Recorder` for the training run (the store's),
    then :meth:`project`:

    - ``exact``: the adjoint sweep with Hessian-vector products
      (:func:`exact_projections`), last step first;
    - Hessian-free, linear rule (SGD): a forward walk adding
      ``c_t (N / b_t) <V, grad l_i(w_{t-1})>`` at every step (layer factors or
      ``torch.func``, :func:`hydraclean.projection.make_projector`);
    - Hessian-free, other rules: a backward walk with the directions
      ``V * d_t`` of :func:`free_factors` at every step.

    Parameters
    ----------
    module : nn.Module
        The architecture (its weights do not matter).
    criterion : nn.Module
    trajectory : Trajectory
    X, y
        The training inputs and label codes, walked again.
    exact : bool
    max_memory : int
        Bytes for the store.
    spill_dir : str, optional
    reserve : int, default=0
        Bytes of ``max_memory`` the directions will take (:class:`RunStore`).
    """

    def __init__(self, module: nn.Module, criterion: nn.Module, trajectory: Trajectory, X: Inputs, y: torch.Tensor,
                 *, exact: bool, max_memory: int, spill_dir=None, plan=None, constant_stats: bool = False,
                 reserve: int = 0) -> None:
        like = parameter_dict(module)
        ref = next(iter(like.values()))
        self.module, self.criterion, self.trajectory, self.X, self.y = module, criterion, trajectory, X, y
        self.like = {k: v.detach() for k, v in like.items()}
        self.exact = exact
        self.plan, self.constant_stats = plan, constant_stats
        self.store = RunStore(trajectory, sum(p.numel() for p in like.values()), ref.dtype, ref.device, max_memory,
                              spill_dir, reverse=exact or not trajectory.rule.linear, reserve=reserve)
        self.nbytes = self.store.nbytes
        # room for a convolution buffer: what max_memory has left beside the store and what scoring reserves
        self.accumulate_bytes = max(0, max_memory - self.store.nbytes - reserve)

    def attach(self, model: nn.Module) -> None:
        self.store.attach(model)

    def record(self, step: Step) -> None:
        self.store.record(step)

    def detach(self) -> None:
        self.store.detach()

    def state_dict(self) -> dict:
        return self.store.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.store.load_state_dict(state)

    def finish(self) -> None:
        """Nothing to complete after training."""

    def project(self, directions: torch.Tensor, ghost: GhostRows | None = None, progress: Progress | None = None
                ) -> torch.Tensor:
        """``P[i, k] = <V_k, nabla_{T,i}>`` for every sample, shape (N, K)."""
        traj, n = self.trajectory, self.trajectory.n_samples
        linear, modes = traj.rule.linear, traj.train_modes
        if self.exact:
            return exact_projections(traj, self._steps(progress, reverse=True), PerSampleLoss(
                self.module, self.criterion, modes), self.like, directions, n)
        projector = make_projector(self.module, self.criterion, directions, n, self.plan, ghost if linear else None,
                                   self.accumulate_bytes if linear else 0, traj.autocast, modes,
                                   self.constant_stats)
        # steps recomputed from checkpoints, forward: their own passes give the layers' factors (with the
        # BatchNorm statistics held constant, by a second backward pass through the step's graph)
        capture = None

        def ride_along(model: nn.Module):
            nonlocal capture
            capture = projector.training_capture(model)
            return capture

        rides = (linear and self.store.location == "checkpoints" and isinstance(projector, LayerFactorProjector)
                 and traj.shard is None)
        steps = self._steps(progress, reverse=not linear, capture=ride_along if rides else None)
        if linear:
            weights = step_weights(traj)
            for step in steps:
                if step.captured is not None:
                    projector.add_captured(step.captured, step.idx, float(weights[step.t]),
                                           algebras=capture.algebras)
                    continue
                with step_rng(traj.step_seed(step.t), step.xb.device):
                    projector.add(unflatten(step.w, self.like), step.idx, step.xb, step.yb, float(weights[step.t]))
            return projector.result()
        for step, d in free_factors(traj, steps):
            with step_rng(traj.step_seed(step.t), step.xb.device):
                projector.add(unflatten(step.w, self.like), step.idx, step.xb, step.yb,
                              n / traj.batch_size_at(step.t), directions=directions * d)
        return projector.result()

    def _steps(self, progress: Progress | None, reverse: bool, capture=None):
        steps = self.store.walk(self.module, self.X, self.y, self.criterion, reverse=reverse, capture=capture)
        return steps if progress is None else iter(progress(steps, "scoring", self.trajectory.n_steps))

    def close(self) -> None:
        self.store.close()
