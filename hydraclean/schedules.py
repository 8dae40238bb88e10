"""Learning-rate (and momentum) schedules, resolved to one value per optimizer step before training.

The recorded trajectory holds every step's learning rate ``eta_t`` and the
per-step hyperparameter a scheduler may cycle (SGD's momentum, Adam's
``beta1``), so that the training run and the hypergradient use the same
values (DESIGN.md §7). A schedule is given as one of:

- ``"constant"``, or ``"cosine"`` (cosine annealing from ``lr`` to 0 over the
  run, stepped every batch);
- a torch scheduler class (``torch.optim.lr_scheduler.CosineAnnealingLR``,
  ``OneCycleLR``, ``LambdaLR``, ``LinearLR``, ``SequentialLR``, ...) with its
  arguments, or a ``functools.partial`` of one. It is stepped on a stand-in
  optimizer of the training run's class over the planned steps, per epoch or
  per batch, and the values it sets are recorded. The library supplies the
  length of the run where the class needs it and it is not given:
  ``T_max`` (CosineAnnealingLR), ``total_steps`` and ``max_lr`` (OneCycleLR:
  the run's steps and ``lr``); inside ``SequentialLR``, a child's ``T_max`` is
  the length of its phase. ``SequentialLR`` and ``ChainedScheduler`` take
  their children as classes or partials (``schedulers=[partial(LinearLR,
  start_factor=0.1, total_iters=2), CosineAnnealingLR]``);
- a one-argument callable ``f(n) -> factor``: ``LambdaLR``'s ``lr_lambda``,
  with ``n`` the number of scheduler steps so far (epochs, by default);
- a two-argument callable ``schedule(epoch, step) -> factor`` (both counted
  from zero, ``step`` within the epoch), such as :class:`ExponentialDecay`.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.optim import lr_scheduler

__all__ = ["ExponentialDecay", "StepDecay", "learning_rates", "resolve_schedule"]

Schedule = Callable[[int, int], float]

#: Torch schedulers written to be stepped every batch: "auto" steps them so.
PER_BATCH = (lr_scheduler.OneCycleLR, lr_scheduler.CyclicLR)


@dataclass(frozen=True)
class ExponentialDecay:
    """Decay the learning rate by ``gamma`` once per epoch: ``eta = lr * gamma**epoch``.

    This is the schedule of the paper's Theorem 2, under which the error of the
    Hessian-free approximation vanishes.

    Parameters
    ----------
    gamma : float
        Multiplicative decay per epoch, in (0, 1].
    """

    gamma: float = 0.95

    def __call__(self, epoch: int, step: int) -> float:
        return float(self.gamma) ** epoch


@dataclass(frozen=True)
class StepDecay:
    """Multiply the learning rate by ``gamma`` every ``step_size`` epochs.

    Parameters
    ----------
    step_size : int
        Epochs between decays.
    gamma : float
        Multiplicative factor applied at each decay.
    """

    step_size: int = 10
    gamma: float = 0.1

    def __call__(self, epoch: int, step: int) -> float:
        return float(self.gamma) ** (epoch // self.step_size)


def learning_rates(lr: float, schedule: Schedule, steps_per_epoch: Sequence[int]) -> np.ndarray:
    """Expand a ``schedule(epoch, step) -> factor`` callable into the learning rate of every step.

    Returns
    -------
    lrs : ndarray of shape (n_steps,), float64
        ``lr * schedule(epoch, step)`` in step order.
    """
    factors = [schedule(epoch, step) for epoch, n_steps in enumerate(steps_per_epoch) for step in range(n_steps)]
    return float(lr) * np.asarray(factors, dtype=np.float64)


def resolve_schedule(
    lr_schedule,
    *,
    rule,
    base: Mapping[str, float],
    steps_per_epoch: Sequence[int],
    options: Mapping[str, object] | None = None,
    interval: str = "auto",
) -> dict[str, np.ndarray]:
    """Every step's scheduled hyperparameters, before training.

    Parameters
    ----------
    lr_schedule : str, torch scheduler class, partial or callable
        See the module docstring.
    rule : hydraclean.optimizers.UpdateRule
        The training run's update rule; its ``torch_class`` is the stand-in
        optimizer a torch scheduler steps.
    base : mapping
        The unscheduled values of ``rule.scheduled``: ``{"lr", "momentum"}``
        or ``{"lr", "beta1"}``.
    steps_per_epoch : sequence of int
        Optimizer steps in each epoch.
    options : mapping, optional
        Keyword arguments of a torch scheduler class (the estimator's
        ``lr_schedule__*`` parameters).
    interval : {"auto", "epoch", "batch"}, default="auto"
        When a torch scheduler (or a one-argument callable) is stepped:
        after every epoch, or after every batch. "auto" steps OneCycleLR,
        CyclicLR and ``"cosine"`` every batch, all others every epoch, as
        their torch documentation does.

    Returns
    -------
    values : dict of str to ndarray of shape (n_steps,), float64
        One array per name in ``rule.scheduled``.

    Raises
    ------
    ValueError
        For an unknown or unsupported schedule, options without a torch
        scheduler class, or values out of range.
    """
    options = dict(options or {})
    steps_per_epoch = [int(s) for s in steps_per_epoch]
    n_steps = sum(steps_per_epoch)
    if isinstance(lr_schedule, str):
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"lr_schedule={lr_schedule!r} is not a known schedule; pass 'constant', 'cosine', a torch "
                "lr_scheduler class (with its arguments as lr_schedule__<name>=...) or a callable."
            )
        if lr_schedule == "cosine":
            lr_schedule, interval = lr_scheduler.CosineAnnealingLR, "batch" if interval == "auto" else interval
    factory = _scheduler_factory(lr_schedule, options)
    if factory is None:
        if options:
            raise ValueError(f"lr_schedule__{next(iter(options))} is set, but lr_schedule={lr_schedule!r} is not a "
                             "torch scheduler class that takes arguments.")
        values = {k: np.full(n_steps, float(v)) for k, v in base.items()}
        if not isinstance(lr_schedule, str):
            values["lr"] = learning_rates(base["lr"], lr_schedule, steps_per_epoch)
    else:
        if interval not in ("auto", "epoch", "batch"):
            raise ValueError(f"lr_schedule_interval={interval!r}: pass 'auto', 'epoch' or 'batch'.")
        if interval == "auto":
            interval = "batch" if issubclass(_scheduler_class(factory), PER_BATCH) else "epoch"
        values = _step_torch_scheduler(factory, rule, base, steps_per_epoch, per_batch=interval == "batch")
    _check_values(values, rule)
    return values


def _scheduler_class(factory) -> type:
    return factory.func if isinstance(factory, functools.partial) else factory


def _is_scheduler_class(obj) -> bool:
    cls = _scheduler_class(obj)
    return isinstance(cls, type) and issubclass(cls, lr_scheduler.LRScheduler)


def _scheduler_factory(lr_schedule, options: dict):
    """A callable ``factory(optimizer, **supplied) -> scheduler``, or None for a factor callable or a string."""
    if isinstance(lr_schedule, lr_scheduler.LRScheduler):
        raise ValueError(
            f"lr_schedule is a {type(lr_schedule).__name__} instance, bound to an optimizer of your own; pass the "
            f"class instead (lr_schedule={type(lr_schedule).__name__}) with its arguments as lr_schedule__<name>=..., "
            "so that it is stepped on the run's own optimizer."
        )
    if _is_scheduler_class(lr_schedule):
        if issubclass(_scheduler_class(lr_schedule), lr_scheduler.ReduceLROnPlateau):
            raise ValueError(
                "lr_schedule=ReduceLROnPlateau is not supported: its learning rates depend on metrics seen during "
                "training, and the hypergradient needs every step's learning rate planned before the run. Use a "
                "schedule fixed in advance (CosineAnnealingLR, OneCycleLR, StepLR, ...)."
            )
        return functools.partial(lr_schedule, **options) if options else lr_schedule
    if isinstance(lr_schedule, str) or not callable(lr_schedule):
        return None
    if _n_positional(lr_schedule) == 1:  # LambdaLR's lr_lambda(n)
        return functools.partial(lr_scheduler.LambdaLR, lr_lambda=lr_schedule)
    return None


def _n_positional(fn) -> int:
    """Required positional parameters of ``fn`` (2 for anything taking ``*args``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 2
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 2
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


def _build(factory, optimizer: torch.optim.Optimizer, length: int, lr: float):
    """``factory(optimizer)`` with the run's length supplied where the class needs it and it is not given."""
    cls = _scheduler_class(factory)
    given = set(factory.keywords) if isinstance(factory, functools.partial) else set()
    if isinstance(factory, functools.partial) and factory.args:
        given |= set(list(inspect.signature(cls.__init__).parameters)[2 : 2 + len(factory.args)])
    supplied: dict = {}
    if issubclass(cls, lr_scheduler.CosineAnnealingLR) and "T_max" not in given:
        supplied["T_max"] = length
    if issubclass(cls, lr_scheduler.OneCycleLR):
        if not given & {"total_steps", "epochs", "steps_per_epoch"}:
            supplied["total_steps"] = length
        if "max_lr" not in given:
            supplied["max_lr"] = lr
    if issubclass(cls, (lr_scheduler.SequentialLR, lr_scheduler.ChainedScheduler)):
        children = factory.keywords.get("schedulers") if isinstance(factory, functools.partial) else None
        if not children or not all(_is_scheduler_class(c) for c in children):
            raise ValueError(
                f"lr_schedule={cls.__name__} takes its schedulers as classes or functools.partial objects: "
                "lr_schedule__schedulers=[partial(LinearLR, start_factor=0.1, total_iters=2), CosineAnnealingLR]."
            )
        rest = {k: v for k, v in factory.keywords.items() if k != "schedulers"}
        if issubclass(cls, lr_scheduler.ChainedScheduler):
            return cls([_build(c, optimizer, length, lr) for c in children], optimizer=optimizer)
        milestones = [int(m) for m in rest.get("milestones", [])]
        bounds = [0, *milestones, length]
        built = [_build(c, optimizer, max(1, hi - lo), lr) for c, lo, hi in zip(children, bounds, bounds[1:])]
        return cls(optimizer, built, **rest)
    return factory(optimizer, **supplied)


def _step_torch_scheduler(factory, rule, base: Mapping[str, float], steps_per_epoch: list[int], per_batch: bool
                          ) -> dict[str, np.ndarray]:
    """Step the scheduler on a stand-in optimizer and read the values it sets at every training step."""
    param = torch.zeros(1, requires_grad=True)
    try:
        optimizer = rule.torch_class([param], **rule.torch_options(base))
        length = sum(steps_per_epoch) if per_batch else len(steps_per_epoch)
        with warnings.catch_warnings():  # a scheduler's notices about its own construction
            warnings.simplefilter("ignore", UserWarning)
            scheduler = _build(factory, optimizer, length, base["lr"])
    except (TypeError, ValueError, KeyError) as exc:
        name = _scheduler_class(factory).__name__
        raise ValueError(f"lr_schedule={name} could not be built on {rule.torch_class.__name__} ({exc}); check its "
                         "lr_schedule__<name> arguments.") from exc
    group = optimizer.param_groups[0]
    rows = []
    for epoch, n in enumerate(steps_per_epoch):
        for k in range(n):
            rows.append([_read(group, name) for name in rule.scheduled])
            last = epoch == len(steps_per_epoch) - 1 and k == n - 1
            if not last and (per_batch or k == n - 1):
                optimizer.step()  # param has no gradient: nothing moves, but torch sees the order it expects
                scheduler.step()
    array = np.asarray(rows, dtype=np.float64).reshape(-1, len(rule.scheduled))
    return {name: array[:, j].copy() for j, name in enumerate(rule.scheduled)}


def _read(group: dict, name: str) -> float:
    value = group["betas"][0] if name == "beta1" else group[name]
    return float(value)


def _check_values(values: dict[str, np.ndarray], rule) -> None:
    lrs = values["lr"]
    if not np.all(np.isfinite(lrs)) or np.any(lrs < 0):
        raise ValueError("lr_schedule produced a negative or non-finite learning rate; a schedule must return "
                         "finite factors >= 0.")
    for name in rule.scheduled[1:]:
        v = values[name]
        if not np.all(np.isfinite(v)) or np.any(v < 0) or np.any(v >= 1):
            raise ValueError(f"lr_schedule set {name} outside [0, 1) (values {v.min():.3g} to {v.max():.3g}).")
    if getattr(rule, "dampening", 0.0) and "momentum" in values:
        nonzero = np.flatnonzero(values["momentum"])
        if nonzero.size and nonzero[0] > 0:
            raise ValueError("SGD with dampening and a momentum schedule that starts at 0 is not supported (torch "
                             "creates the momentum buffer at the first step with momentum); start it above 0.")
