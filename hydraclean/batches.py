"""Where each recorded training batch comes from: tensors on the device, or a torch Dataset.

The trajectory fixes which samples step ``t`` takes (``trajectory.order``);
every pass over the run (training, checkpoint recomputation, ``explain``'s
replay) asks for the inputs of those samples here:

- a tensor ``X`` on the device: the batch is ``X[idx]``;
- :class:`DatasetInputs`, a map-style ``torch.utils.data.Dataset``: the
  recorded batches are loaded by index through one ``DataLoader`` per pass
  (worker processes, pinned memory for a GPU), so the whole set is never in
  memory. A random transform inside the dataset draws from generators
  (torch's, Python's ``random``, numpy's global one) seeded by
  :func:`sample_seed` of the step's seed and the sample's index, so every
  pass over step ``t`` sees the same augmented inputs; the caller's generator
  states are restored.

Labels never come from here: they are the checked label codes, a tensor ``y``
on the device, indexed by the same ``idx``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from .data import input_dtype

if TYPE_CHECKING:
    from .training import Trajectory

__all__ = ["DatasetInputs", "Inputs", "first_inputs", "materialize", "sample_seed", "sample_shape", "step_indices",
           "step_inputs"]

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def sample_seed(step_seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` in the step whose seed is ``step_seed`` (splitmix64 mixing).

    Depends on nothing else (not on the batch, the worker or the process), so a
    sample's augmentation in a step is the same wherever it is loaded.
    """
    z = (int(step_seed) * _MIX[0] + int(index) + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * _MIX[1]) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * _MIX[2]) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1


class _SeededItems(Dataset):
    """``dataset[i]``'s input, drawn under :func:`sample_seed` for keys ``(step_seed, i)``.

    Seeds torch's default generator and Python's ``random`` (torchvision's
    transforms draw from them) and numpy's global generator (hand-written
    augmentation often does), and restores all three afterwards.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[torch.Tensor]:
        """A batch's inputs (the DataLoader's batched fetch): the generators are saved and restored once."""
        state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            try:
                return [self._draw(step_seed, i) for step_seed, i in keys]
            finally:
                random.setstate(state)
                np.random.set_state(np_state)

    def _draw(self, step_seed: int, i: int) -> torch.Tensor:
        seed = sample_seed(step_seed, i)
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        item = self.dataset[i]
        return torch.as_tensor(item[0] if isinstance(item, (tuple, list)) else item)


class DatasetInputs:
    """The inputs of a map-style Dataset, loaded batch by batch in the recorded order.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        Map-style; ``dataset[i]`` is ``(x, label)`` or ``x``, with ``x`` a
        tensor or array of one fixed shape (after its transform). The label is
        not read here.
    device : torch.device
        Where the batches go.
    dtype : torch.dtype
        The module's floating dtype; floating (and other non-token) inputs are
        cast to it, int64 and int32 token ids reach the module as they are.
    token_ids : bool, default=True
        Whether integer inputs are token ids (the module has an embedding);
        otherwise they are features, cast to ``dtype``.
    num_workers : int, default=0
        ``DataLoader`` worker processes.
    pin_memory : bool, default=False
        Page-locked host batches, for asynchronous copies to a GPU.
    """

    def __init__(self, dataset: Dataset, device: torch.device, dtype: torch.dtype, num_workers: int = 0,
                 pin_memory: bool = False, token_ids: bool = True) -> None:
        self.dataset = dataset
        self.device = torch.device(device)
        self.dtype, self.token_ids = dtype, token_ids
        self.num_workers = num_workers
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return len(self.dataset)

    def steps(self, trajectory: Trajectory, steps: Sequence[int] | None = None
              ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(t, idx, xb)`` for the run's ``steps`` (default: all, in order), through one DataLoader."""
        order = torch.as_tensor(trajectory.order)
        loader = _loader(self.dataset, _StepKeys(trajectory, order, steps), self.num_workers, self.pin_memory)
        for (t, rows), xb in zip(_batches(trajectory, order, steps), loader):
            dtype = input_dtype(xb.dtype, self.dtype, self.token_ids)
            yield t, rows.to(self.device), xb.to(self.device, dtype=dtype, non_blocking=self.pin_memory)


def _loader(dataset: Dataset, keys: Iterable[list[tuple[int, int]]], num_workers: int = 0,
            pin_memory: bool = False) -> DataLoader:
    """A DataLoader of ``dataset``'s inputs for ``(step_seed, index)`` keys, one list of keys per batch."""
    return DataLoader(_SeededItems(dataset), batch_sampler=keys, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=default_collate)


class _StepKeys:
    """The DataLoader's batch sampler: ``[(step seed, index), ...]`` per step, made as they are asked for."""

    def __init__(self, trajectory: Trajectory, order: torch.Tensor, steps: Sequence[int] | None = None) -> None:
        self.trajectory, self.order, self.steps = trajectory, order, steps

    def __len__(self) -> int:
        return self.trajectory.n_steps if self.steps is None else len(self.steps)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for t, rows in _batches(self.trajectory, self.order, self.steps):
            seed = int(self.trajectory.seeds[t])
            yield [(seed, i) for i in rows.tolist()]


#: Training inputs: a tensor on the device, or a Dataset loaded by index.
Inputs = Union[torch.Tensor, DatasetInputs]


def step_inputs(X: Inputs, trajectory: Trajectory, steps: Sequence[int] | None = None
                ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(t, idx, xb)`` for the run's ``steps`` (default: every step, in order): ``idx`` on the device, ``xb``
    its inputs.

    In a data-parallel run ``idx`` is this rank's share of the batch.
    """
    if isinstance(X, DatasetInputs):
        yield from X.steps(trajectory, steps)
        return
    order = torch.as_tensor(trajectory.order, device=X.device)  # one copy, no transfer per step
    for t, idx in _batches(trajectory, order, steps):
        yield t, idx, X[idx]


def step_indices(trajectory: Trajectory, steps: Sequence[int] | None, device: torch.device
                 ) -> Iterator[tuple[int, torch.Tensor, None]]:
    """``(t, idx, None)``: :func:`step_inputs` without the inputs."""
    order = torch.as_tensor(trajectory.order, device=device)
    for t, idx in _batches(trajectory, order, steps):
        yield t, idx, None


def _batches(trajectory: Trajectory, order: torch.Tensor, steps: Sequence[int] | None = None
             ) -> Iterator[tuple[int, torch.Tensor]]:
    """``(t, idx)`` of each step: the batch, or this rank's share of it."""
    bs, per_epoch = trajectory.batch_size, trajectory.steps_per_epoch
    for t in range(trajectory.n_steps) if steps is None else steps:
        epoch, k = divmod(t, per_epoch)
        idx = order[epoch, k * bs : (k + 1) * bs]
        yield t, idx if trajectory.shard is None else trajectory.shard.split(idx)


def first_inputs(X: Inputs, k: int) -> torch.Tensor:
    """The inputs of the first ``k`` samples, a probe of shapes (a Dataset's drawn under seed 0, in process)."""
    if isinstance(X, DatasetInputs):
        items = _SeededItems(X.dataset)
        xb = torch.stack([items[(0, i)] for i in range(min(k, len(X)))])
        return xb.to(X.device, dtype=input_dtype(xb.dtype, X.dtype, X.token_ids))
    return X[:k]


def sample_shape(dataset: Dataset) -> tuple[int, ...]:
    """The shape of one input of ``dataset`` (its first, drawn under seed 0)."""
    return tuple(_SeededItems(dataset)[(0, 0)].shape)


def materialize(dataset: Dataset, rows: np.ndarray | None = None, batch_size: int = 256, num_workers: int = 0
                ) -> torch.Tensor:
    """Stack the inputs of ``dataset`` (or of its ``rows``) into one CPU tensor, each drawn under seed 0."""
    rows = np.arange(len(dataset)) if rows is None else np.asarray(rows)
    keys = [[(0, int(i)) for i in rows[s : s + batch_size]] for s in range(0, rows.size, batch_size)]
    return torch.cat(list(_loader(dataset, keys, num_workers)))
