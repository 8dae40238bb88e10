"""The recorded run's steps, kept within a memory budget so that scoring can walk them again, either way.

Scoring revisits every step ``t`` at the weights ``w_{t-1}`` it started from
(DESIGN.md §6); a reverse-mode sweep (DESIGN.md §7) also needs the optimizer
state ``s_{t-1}`` and the gradient ``g_t``, in reverse order. A
:class:`RunStore`, filled by the training run itself (it is a
:class:`hydraclean.training.Recorder`), keeps every step's gradient ``g_t``:
from ``w_0`` and those, the weights and state of any step follow by the update
rule alone (``(w_t, s_t) = U_t(w_{t-1}, s_{t-1}, g_t)``, elementwise, no model
evaluated), bit for bit those of the training run, on a GPU too. Where they
are kept:

- ``"memory"``: every ``g_t`` on the model's device, when that fits in
  ``max_memory``;
- ``"disk"``: otherwise, where ``spill_dir`` allows (:mod:`hydraclean.spill`),
  in a memory-mapped file there;
- ``"checkpoints"``: otherwise ``(w, s)`` every ``interval`` steps; the
  gradients in between are recomputed by the training step itself from the
  last checkpoint (bit-identical on CPU).

Walking backward, the run is taken in segments, last first: from the
checkpoint at a segment's start (kept by the training run), its steps'
``(w, s)`` are recomputed forward into a buffer and handed out in reverse (the
checkpointing of reverse-mode automatic differentiation). With every ``g_t``
kept, segments are about ``sqrt(T)`` steps long.
"""

from __future__ import annotations

import copy
import math
import os
import re
import tempfile
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from .batches import Inputs, step_inputs, step_indices
from .optimizers import State, step_in_place
from .spill import spill_location, warn_recomputed
from .modes import set_modes
from .training import Step, Trajectory, advance, trainable_parameters, write_parameters

__all__ = ["RunStore", "parse_bytes"]

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


class RunStore:
    """Every step's gradient of a training run, in memory, on disk, or as checkpoints.

    Pass it as the ``recorder`` of :func:`hydraclean.training.train`; then
    :meth:`walk` hands back every step as a :class:`hydraclean.training.Step`
    at the recorded ``w_{t-1}``, ``s_{t-1}`` and ``g_t``.

    Parameters
    ----------
    trajectory : Trajectory
        The run (its update rule and length).
    n_params : int
        Trainable parameters.
    dtype, device
        Of the flat parameters.
    max_memory : int
        Bytes the store may take on ``device`` (checkpoints and the buffer
        of one segment included).
    spill_dir : str, path or "auto", optional
        Directory for a memory-mapped file of the gradients when they do not
        fit in ``max_memory``, or ``"auto"`` (the temporary directory where it
        has room, :func:`hydraclean.spill.spill_location`); without it, checkpoints.
    reverse : bool, default=False
        Whether :meth:`walk` will be asked to go backward (sizes its
        segment buffer).
    reserve : int, default=0
        Bytes of ``max_memory`` that scoring will hold beside the store (the
        validation directions). Checkpoints leave them free when some
        interval fits in what remains; a forward walk recomputes every step
        once whatever the interval, so fewer checkpoints cost it no time.

    Attributes
    ----------
    location : {"memory", "disk", "checkpoints"}
    interval : int
        Steps per segment: between checkpoints, or of a backward walk (the
        whole run when only forward walks are planned with every gradient
        kept).
    nbytes : int
        Bytes held (on disk too), at most.

    Raises
    ------
    ValueError
        When ``max_memory`` cannot hold even the checkpoints, naming the fix.
    """

    def __init__(self, trajectory: Trajectory, n_params: int, dtype: torch.dtype, device: torch.device,
                 max_memory: int, spill_dir: str | os.PathLike | None = None, *, reverse: bool = False,
                 reserve: int = 0) -> None:
        self.trajectory = trajectory
        self.dtype, self.device = dtype, torch.device(device)
        n_steps = trajectory.n_steps
        row = n_params * torch.empty(0, dtype=dtype).element_size()
        state_rows = _state_rows(trajectory)
        segment, walk_rows = _walk(n_steps, state_rows, reverse)
        self._file = self._g = None
        self._marks: list[tuple[torch.Tensor, State]] = []  # (w, s) at the first step of every segment
        if (n_steps + walk_rows) * row <= max_memory:
            self.location, self.interval = "memory", segment
            self._g = torch.empty(n_steps, n_params, dtype=dtype, device=self.device)
            self.nbytes = (n_steps + walk_rows) * row
        elif walk_rows * row <= max_memory and (folder := spill_location(spill_dir, n_steps * row)) is not None:
            self.location, self.interval = "disk", segment
            self._file = tempfile.NamedTemporaryFile(prefix="hydraclean-run-", suffix=".bin", dir=folder)
            np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
            self._g = np.memmap(self._file.name, dtype=np_dtype, mode="w+", shape=(n_steps, n_params))
            self.nbytes = (n_steps + walk_rows) * row
        else:
            self.location = "checkpoints"
            need = [(-(-n_steps // s) * state_rows + (s * (state_rows + 1) if reverse else 0)) * row
                    for s in range(1, n_steps + 1)]
            fits = [s for s, b in zip(range(1, n_steps + 1), need) if b <= max_memory - reserve] or [
                s for s, b in zip(range(1, n_steps + 1), need) if b <= max_memory]
            if not fits:
                raise ValueError(
                    f"max_memory={max_memory} bytes cannot hold one checkpoint of the model's weights and optimizer "
                    f"state ({min(need)} bytes at best for {n_params} parameters over {n_steps} steps). Raise "
                    f"max_memory (every step's gradient needs {n_steps * row} bytes) or pass spill_dir to keep "
                    "them on disk."
                )
            self.interval = fits[0]
            self.nbytes = need[self.interval - 1]
            if walk_rows * row <= max_memory:
                warn_recomputed(spill_dir, n_steps * row)

    @staticmethod
    def memory_footprint(trajectory: Trajectory, n_params: int, dtype: torch.dtype, reverse: bool = False) -> int:
        """Bytes of a store that keeps every step's gradient in memory (``location == "memory"``)."""
        state_rows = _state_rows(trajectory)
        row = n_params * torch.empty(0, dtype=dtype).element_size()
        return (trajectory.n_steps + _walk(trajectory.n_steps, state_rows, reverse)[1]) * row

    # -- the Recorder protocol: filled by the training run ------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Nothing to hook."""

    def record(self, step: Step) -> None:
        """Keep ``g_t`` (unless recomputed), and ``w_{t-1}`` and ``s_{t-1}`` at every segment's first step."""
        if step.t == 0:
            self._marks = []
        if step.t % self.interval == 0:
            self._marks.append((step.w.clone(), tuple(s.clone() for s in step.state)))
        if self.location == "memory":
            self._g[step.t].copy_(step.g)
        elif self.location == "disk":
            self._g[step.t] = step.g.detach().cpu().numpy()

    def detach(self) -> None:
        """Nothing to unhook."""

    def state_dict(self) -> dict:
        """The gradients kept so far and the segments' starts (a copy of the spill file's rows, on disk)."""
        g = None if self._g is None else self._g if isinstance(self._g, torch.Tensor) else torch.from_numpy(
            np.asarray(self._g))
        return {"g": g, "marks": [[w, list(state)] for w, state in self._marks]}

    def load_state_dict(self, state: dict) -> None:
        if state["g"] is not None:
            if self.location == "disk":
                self._g[:] = state["g"].numpy()
            else:
                self._g.copy_(state["g"])
        self._marks = [(w.to(self.device), tuple(s.to(self.device) for s in st)) for w, st in state["marks"]]

    # -- walking the run again --------------------------------------------------------------------------

    def walk(self, module: nn.Module | None = None, X: Inputs | None = None, y: torch.Tensor | None = None,
             criterion: nn.Module | None = None, *, reverse: bool = False, capture=None) -> Iterator[Step]:
        """Every step of the run at its recorded ``(w_{t-1}, s_{t-1}, g_t)``, first to last or last to first.

        Parameters
        ----------
        module : nn.Module, optional
            The architecture, for ``"checkpoints"`` (recomputes gradients).
        X, y : optional
            The training inputs and label codes: each step's batch comes with
            it. Without them the steps carry ``xb = yb = None`` (not with
            ``"checkpoints"``).
        criterion : nn.Module, optional
            For ``"checkpoints"``.
        reverse : bool, default=False
        capture : callable, optional
            With ``"checkpoints"``: called with the model that recomputes the
            steps, it returns a :class:`hydraclean.projection.LayerCapture`
            (training mode) to ride along; each step then carries what it
            caught as ``Step.captured`` (a projection needs no pass of its
            own). Ignored by the other locations.

        Yields
        ------
        Step
            Its tensors are the store's own: do not modify them. Walking
            forward, they hold until the next step (one buffer, updated in
            place).
        """
        traj, n_steps = self.trajectory, self.trajectory.n_steps
        recompute = self.location == "checkpoints"
        if recompute and (module is None or X is None or criterion is None):
            raise ValueError("A RunStore with checkpoints recomputes gradients: walk() needs module, X, y and "
                             "criterion.")
        span = self.interval if recompute or reverse else n_steps
        segments = [(a, min(a + span, n_steps)) for a in range(0, n_steps, span)]
        if reverse:
            segments.reverse()
        order = [t for a, b in segments for t in range(a, b)]
        batches = step_inputs(X, traj, order) if X is not None else step_indices(traj, order, self.device)
        model = params = None
        if recompute:
            model = copy.deepcopy(module)
            model.load_state_dict(traj.initial_state)
            set_modes(model, traj.train_modes)
            params = trainable_parameters(model)
            capture = capture(model) if capture is not None else None
        else:
            capture = None
        try:
            yield from self._walk_segments(segments, batches, model, params, criterion, y, reverse, capture)
        finally:
            if capture is not None:
                capture.detach()

    def _walk_segments(self, segments, batches, model, params, criterion, y, reverse, capture) -> Iterator[Step]:
        traj = self.trajectory
        g_buffer = None if model is None or reverse else torch.empty_like(self._marks[0][0])
        for a, b in segments:
            # forward, the whole run is one segment from w_0; otherwise every segment starts at a mark
            w, state = self._marks[a // self.interval]
            rows = []
            for t in range(a, b):
                _, idx, xb = next(batches)
                captured = None
                if model is not None:
                    write_parameters(params, w)
                    with torch.enable_grad():
                        if capture is None:
                            g = advance(model, params, criterion, traj, t, xb, y[idx], out=g_buffer)[3]
                        else:
                            _, _, loss, g = advance(model, params, criterion, traj, t, xb, y[idx],
                                                    retain_graph=capture.second_pass, out=g_buffer)
                            capture.after_step(loss)
                            del loss
                            captured = capture.take()
                else:
                    g = self._gradient(t)
                step = Step(t, idx, xb, None if y is None else y[idx], w, state, g, captured)
                if reverse:
                    rows.append(step)
                else:
                    yield step
                if t + 1 < b:
                    if reverse:  # the segment's steps are kept: each its own weights
                        w, state = traj.rule.step(w, state, g, t + 1, traj.hyper_at(t))
                    else:  # each step is used before the next: one buffer, updated in place
                        if t == a:
                            w, state = w.clone(), tuple(s.clone() for s in state)
                        step_in_place(traj.rule, w, state, g, t + 1, traj.hyper_at(t))
            yield from reversed(rows)

    def _gradient(self, t: int) -> torch.Tensor:
        if self.location == "disk":
            return torch.from_numpy(np.asarray(self._g[t])).to(self.device)
        return self._g[t]

    def close(self) -> None:
        """Free what the store holds (and delete the spill file)."""
        self._g = self._marks = None
        if self._file is not None:
            self._file.close()
            self._file = None


def _state_rows(trajectory: Trajectory) -> int:
    """Flat vectors in a checkpoint: the weights and the optimizer state."""
    return 1 + len(trajectory.rule.init(torch.zeros(1)))


def _walk(n_steps: int, state_rows: int, reverse: bool) -> tuple[int, int]:
    """Steps per segment of a walk, and the rows its segments' starts and (backward) one segment's states take."""
    segment = math.isqrt(max(n_steps - 1, 0)) + 1 if reverse else n_steps
    return segment, (-(-n_steps // segment) + (segment if reverse else 0)) * state_rows
