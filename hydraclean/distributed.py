"""Data-parallel runs on torch.distributed: each rank takes a share of every global batch.

When a default process group is initialised (a script launched with
``torchrun``), a fit runs on every rank of it. Each rank computes the forward
and backward pass of its share of step ``t``'s batch, with the loss scaled by
the *global* batch size ``b_t``; one all-reduce of the flattened gradients then
gives every rank the gradient of the global batch's mean loss, so every update
is the single-process update (up to the order of the float sums) and every
rank holds the same weights. Each rank keeps the layer factors (or projects)
only for the samples of its shares; the ``N x K`` projections, the per-sample
trace and the per-step losses are summed across ranks once, at the end of the
run or of an epoch, so every rank ends with the same fitted attributes.

Nothing here opens connections or launches processes: the process group is
the caller's (gloo on CPUs, NCCL on GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


__all__ = ["Shard", "current_shard"]


@dataclass(frozen=True)
class Shard:
    """This process's place in a data-parallel run: rank ``rank`` of ``world``."""

    rank: int
    world: int

    def split(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch: the ``rank``-th of ``world`` contiguous chunks."""
        return torch.tensor_split(idx, self.world)[self.rank]

    def local_sizes(self, batch_sizes: np.ndarray) -> np.ndarray:
        """The size of this rank's share of every batch, shape (n_steps,)."""
        base, extra = np.divmod(np.asarray(batch_sizes), self.world)
        return base + (self.rank < extra)

    def step_seed(self, seed: int) -> int:
        """The seed of this rank's forward pass in a step: dropout masks differ across ranks."""
        return (int(seed) + self.rank) % 2**63

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` across ranks, in place; returns it."""
        dist.all_reduce(tensor)
        return tensor

    def finish(self) -> None:
        """Wait for every rank at the end of a run. A barrier as the last collective leaves gloo holding
        no tensor of ours, which it would otherwise release during interpreter shutdown (an abort)."""
        dist.barrier()

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank, in place; returns it."""
        dist.broadcast(tensor, 0)
        return tensor


def current_shard(distributed: bool | str = "auto") -> Shard | None:
    """The Shard of this process in the default process group, or None for a single-process run.

    Parameters
    ----------
    distributed : bool or "auto"
        "auto": data-parallel when a default process group with more than one
        rank is initialised; True: require one; False: one process whatever.

    Raises
    ------
    ValueError
        For ``distributed=True`` without an initialised process group.
    """
    if distributed is False:
        return None
    ready = dist.is_available() and dist.is_initialized()
    if not ready:
        if distributed is True:
            raise ValueError(
                "distributed=True but no torch.distributed process group is initialised: launch with torchrun and "
                "call torch.distributed.init_process_group() before fit, or pass distributed='auto'."
            )
        return None
    world = dist.get_world_size()
    return Shard(dist.get_rank(), world) if world > 1 else None
