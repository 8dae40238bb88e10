"""The recorded run's own weights, kept within a memory budget for scoring.

Scoring needs ``w_{t-1}`` at every step (DESIGN.md §6). Recomputing them by
running the optimizer again costs a whole training run, and on a GPU, where
some kernels are not deterministic, it visits weights that drift from the
recorded ones. A :class:`WeightStore` is filled by the training run itself
(:func:`hydraclean.training.run_sgd` calls :meth:`WeightStore.before_step`
before each step) and later hands back the exact weights (:meth:`WeightStore.walk`):

- everything fits in ``max_memory``: ``w_{t-1}`` of every step, on the model's
  device; scoring never touches the optimizer;
- otherwise, with ``spill_dir``: every step, in a memory-mapped file there
  (host memory, one device-to-host copy per step);
- otherwise: every ``s``-th step with its momentum buffer, ``s`` the smallest
  interval that fits; the ``s - 1`` steps in between are recomputed by the same
  training code from that checkpoint (bit-identical on CPU).
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import re
import tempfile

import numpy as np
import torch
from torch import nn

from .batches import Inputs, step_inputs
from .gradients import flatten, parameter_dict, unflatten
from .training import Progress, StepCallback, Trajectory, make_optimizer, sgd_step

__all__ = ["WeightStore", "parse_bytes"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str) -> int:
    """A memory size in bytes from an int or a string such as ``"512MB"`` or ``"2 GiB"``.

    Raises
    ------
    ValueError
        For a string that is not a number followed by an optional unit
        (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB; case-insensitive).
    """
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(
            f"Cannot read {value!r} as a memory size. Pass a number of bytes or a string such as '512MB' or '2GiB'."
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class WeightStore:
    """``w_{t-1}`` of every step of a training run, in RAM, on disk, or as checkpoints.

    Parameters
    ----------
    module : nn.Module
        The architecture; fixes the parameter count, dtype and device.
    n_steps : int
        Steps of the run.
    max_memory : int
        Bytes the stored weights may take in memory (on the model's device).
    spill_dir : str or path, optional
        Directory for a memory-mapped file when every step does not fit in
        ``max_memory``; without it, checkpoints every ``interval`` steps.

    Attributes
    ----------
    interval : int
        ``s``: steps between stored weights (1 = every step).
    location : {"memory", "disk"}
    nbytes : int
        Bytes held (in memory or on disk).

    Raises
    ------
    ValueError
        When ``max_memory`` cannot hold one checkpoint (weights and momentum
        buffer) and there is no ``spill_dir``.
    """

    def __init__(self, module: nn.Module, n_steps: int, max_memory: int, spill_dir: str | os.PathLike | None = None):
        params = list(parameter_dict(module).values())
        ref = params[0]
        self.n_params = sum(p.numel() for p in params)
        self.n_steps = int(n_steps)
        self.dtype, self.device = ref.dtype, ref.device
        row = self.n_params * ref.element_size()
        self._file = None
        self._momentum = None
        if self.n_steps * row <= max_memory:
            self.interval, self.location = 1, "memory"
            self._weights = torch.empty(self.n_steps, self.n_params, dtype=self.dtype, device=self.device)
        elif spill_dir is not None:
            self.interval, self.location = 1, "disk"
            self._file = tempfile.NamedTemporaryFile(prefix="hydraclean-weights-", suffix=".bin", dir=spill_dir)
            np_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype
            self._weights = np.memmap(self._file.name, dtype=np_dtype, mode="w+", shape=(self.n_steps, self.n_params))
        else:
            # a checkpoint holds w_{t-1} and the momentum buffer v_{t-1}
            fit = max_memory // (2 * row)
            if fit < 1:
                raise ValueError(
                    f"max_memory={max_memory} bytes cannot hold one checkpoint of the model's weights and momentum "
                    f"({2 * row} bytes for {self.n_params} parameters). Raise max_memory (all {self.n_steps} steps "
                    f"need {self.n_steps * row} bytes) or pass spill_dir to keep them on disk."
                )
            self.interval, self.location = math.ceil(self.n_steps / fit), "memory"
            n_kept = math.ceil(self.n_steps / self.interval)
            self._weights = torch.empty(n_kept, self.n_params, dtype=self.dtype, device=self.device)
            self._momentum = torch.zeros_like(self._weights)
        self.nbytes = self._weights.nbytes + (0 if self._momentum is None else self._momentum.nbytes)

    def before_step(self, t: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Keep ``w_{t-1}`` (and ``v_{t-1}`` at a checkpoint); called by the training loop before step ``t``."""
        if t % self.interval:
            return
        params = parameter_dict(model)
        flat = flatten(params)
        if self.location == "disk":
            self._weights[t] = flat.cpu().numpy()
            return
        k = t // self.interval
        self._weights[k].copy_(flat)
        if self._momentum is not None and t > 0 and optimizer.defaults["momentum"]:
            state = {name: optimizer.state[p]["momentum_buffer"] for name, p in _trainable(model)}
            self._momentum[k].copy_(flatten(state))

    def after_step(self, t: int, idx: torch.Tensor) -> None:
        """Nothing to keep after a step."""

    def _load(self, t: int, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        if self.location == "disk":
            flat = torch.from_numpy(np.asarray(self._weights[t])).to(self.device)
        else:
            flat = self._weights[t // self.interval]
        params = parameter_dict(model)
        for p, w in zip(params.values(), unflatten(flat, params).values()):
            p.copy_(w)  # detached views: writes the parameters' data
        if optimizer is not None:
            optimizer.state.clear()
            if t > 0 and optimizer.defaults["momentum"]:
                momentum = unflatten(self._momentum[t // self.interval], params)
                for name, p in _trainable(model):
                    optimizer.state[p]["momentum_buffer"] = momentum[name].clone()

    def walk(
        self,
        trajectory: Trajectory,
        module: nn.Module,
        X: Inputs,
        y: torch.Tensor,
        criterion: nn.Module,
        on_step: StepCallback,
        progress: Progress | None = None,
    ) -> None:
        """Call ``on_step(model, t, idx, xb, yb)`` with the model holding the recorded ``w_{t-1}``.

        Same contract as :func:`hydraclean.training.replay`; with
        ``interval == 1`` no training step is taken.
        """
        model = copy.deepcopy(module)
        model.load_state_dict(trajectory.initial_state)
        model.train()
        optimizer = make_optimizer(model, trajectory) if self.interval > 1 else None
        steps = step_inputs(X, trajectory)
        per_epoch = -(-trajectory.n_samples // trajectory.batch_size)
        epochs = range(trajectory.order.shape[0])
        for _ in progress(epochs, "scoring") if progress else epochs:
            for t, idx, xb in itertools.islice(steps, per_epoch):
                yb = y[idx]
                if t % self.interval == 0:
                    self._load(t, model, optimizer)
                on_step(model, t, idx, xb, yb)
                if optimizer is not None and (t + 1) % self.interval and t + 1 < self.n_steps:
                    sgd_step(model, optimizer, criterion, trajectory, t, xb, yb)

    def close(self) -> None:
        """Free the weights (and delete the spill file)."""
        self._weights = self._momentum = None
        if self._file is not None:
            self._file.close()
            self._file = None


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters (not detached) in :func:`hydraclean.gradients.parameter_dict`'s order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]
