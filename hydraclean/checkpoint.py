"""Checkpoints of a fit, so that a long run survives an interruption: save, verify, resume.

With ``checkpoint_dir``, a fit saves everything needed to continue, at the
end of every epoch, when it is interrupted (Ctrl-C: the step under way is
finished first), and once training is over (so that an interruption while
scoring resumes at scoring): the model's state (weights and buffers), the
optimizer state, the training run's accumulators (per-step losses, the
per-sample trace, the history so far) and the scoring route's buffers (layer
factors, stored gradients). The batch order and every step's random seed are
planned from ``random_state`` and need no saving. A fit called again with the
same data and parameters continues from the last saved point and gives the
same results as an uninterrupted fit (bit for bit on CPU); a checkpoint from
other data or parameters is refused, naming what differs.

Each save is atomic: written to a temporary file in the folder, synced, then
renamed over the latest one, whose predecessor is kept, so that a crash while
saving leaves a usable checkpoint. A checkpoint that cannot be read (truncated,
say) is skipped, with a warning, for the one before it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

__all__ = ["Checkpoints", "describe", "digest"]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def digest(*arrays) -> str:
    """A SHA-256 of arrays' dtypes, shapes and bytes (tensors, numpy arrays, or anything numpy takes)."""
    h = hashlib.sha256()
    for a in arrays:
        a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes() if a.dtype != object else repr(a.tolist()).encode())
    return h.hexdigest()


def describe(value) -> str:
    """A description of a parameter that is the same in every process (no memory addresses)."""
    if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if isinstance(value, torch.nn.Module):
        return f"{type(value).__module__}.{type(value).__qualname__}: " + digest(*value.state_dict().values())
    return _ADDRESS.sub("", repr(value))


class Checkpoints:
    """The checkpoints of one fit in a folder.

    Parameters
    ----------
    folder : str or path
        Created when missing.
    fingerprint : mapping of str to str
        What the fit depends on, by name (data digests, parameter
        descriptions): a checkpoint written under another fingerprint is
        refused.
    name : str, default="hydraclean-checkpoint"
        The files' stem (a data-parallel run gives each rank its own).

    Attributes
    ----------
    loaded : dict or None
        The state :meth:`load` found.
    interrupted : bool
        Set by the SIGINT handler of :meth:`interruptible`.
    path : Path
        The latest checkpoint's file.
    """

    def __init__(self, folder, fingerprint: Mapping[str, str], name: str = "hydraclean-checkpoint") -> None:
        self.folder = Path(folder)
        self.fingerprint = dict(fingerprint)
        self.path = self.folder / f"{name}.pt"
        self.previous = self.folder / f"{name}.previous.pt"
        self.interrupted = False
        self.loaded: dict | None = None

    def load(self) -> dict | None:
        """The latest readable state saved under this fingerprint, or None when there is none.

        Raises
        ------
        ValueError
            When the checkpoint was written by a fit with other data or
            parameters, naming what differs and the fix.
        """
        for path in (self.path, self.previous):
            if not path.exists():
                continue
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # a truncated or damaged file: the one before it
                warnings.warn(f"The checkpoint {path} cannot be read ({type(exc).__name__}); using the one before "
                              "it, if any.", UserWarning, stacklevel=3)
                continue
            differs = sorted(k for k in set(saved["fingerprint"]) | set(self.fingerprint)
                             if saved["fingerprint"].get(k) != self.fingerprint.get(k))
            if differs:
                raise ValueError(
                    f"The checkpoint in {self.folder} was written by a fit with other data or parameters (they "
                    f"differ in: {', '.join(differs)}). Fit with the same ones to resume, or remove the checkpoint "
                    "or pass another checkpoint_dir to start afresh."
                )
            self.loaded = saved["state"]
            return self.loaded
        return None

    def save(self, state: dict) -> None:
        """Write ``state`` atomically (tensors, numbers, strings, lists, tuples, dicts); keep the one before."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"fingerprint": self.fingerprint, "state": state}, f)
                f.flush()
                os.fsync(f.fileno())
            if self.path.exists():
                os.replace(self.path, self.previous)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise

    def clear(self) -> None:
        """Remove the checkpoints (after a successful fit)."""
        for path in (self.path, self.previous):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """While training: the first Ctrl-C (SIGINT) sets :attr:`interrupted`, for the loop to save the step it
        finishes and stop; a second one interrupts at once. Only in the main thread (signals go there)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.interrupted:
                if callable(previous):  # the caller's own Ctrl-C, if it has one (the CLI's)
                    previous(signum, frame)
                raise KeyboardInterrupt
            self.interrupted = True

        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
