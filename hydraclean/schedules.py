"""Learning-rate schedules, expanded to one value per optimizer step.

A schedule is a callable ``schedule(epoch, step) -> factor`` (both counted from
zero, ``step`` within the epoch); the learning rate of that step is
``lr * factor``. Expanding it up front gives the recorded per-step values
``eta_t`` that both the optimizer and the hypergradient recursion use, so the
two can never disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ExponentialDecay", "StepDecay", "learning_rates"]

Schedule = Callable[[int, int], float]


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


def learning_rates(
    lr: float, schedule: str | Schedule, steps_per_epoch: Sequence[int]
) -> np.ndarray:
    """Expand a schedule into the learning rate of every optimizer step.

    Parameters
    ----------
    lr : float
        Base learning rate.
    schedule : "constant" or callable
        ``"constant"`` keeps ``lr``; a callable ``schedule(epoch, step)``
        returns the factor applied to ``lr`` at that step.
    steps_per_epoch : sequence of int
        Number of optimizer steps in each epoch.

    Returns
    -------
    lrs : ndarray of shape (n_steps,), float64
        ``eta_t`` for t = 1..T, in step order.
    """
    if isinstance(schedule, str):
        if schedule != "constant":
            raise ValueError(
                f"lr_schedule={schedule!r} is not a known schedule; pass 'constant' "
                "or a callable (epoch, step) -> factor such as ExponentialDecay(0.95)."
            )
        return np.full(int(sum(steps_per_epoch)), float(lr))
    factors = [
        schedule(epoch, step)
        for epoch, n_steps in enumerate(steps_per_epoch)
        for step in range(n_steps)
    ]
    lrs = float(lr) * np.asarray(factors, dtype=np.float64)
    if not np.all(np.isfinite(lrs)) or np.any(lrs < 0):
        raise ValueError(
            "lr_schedule produced a negative or non-finite learning rate; a schedule "
            "must return finite factors >= 0."
        )
    return lrs
