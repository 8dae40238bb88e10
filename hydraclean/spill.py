"""Where scoring keeps the training run when it does not fit in ``max_memory``: the ``spill_dir`` rule.

Scoring needs something of every training step (layer entries, or the step's
gradient). When that does not fit in ``max_memory`` it either goes to disk, or
scoring keeps checkpoints and recomputes the steps between them (about one
more training run). ``spill_dir`` decides:

- a directory: the run goes there (refused before training when the directory
  has less free space than it needs);
- ``"auto"`` (the estimator's default): the temporary directory
  (:func:`tempfile.gettempdir`, so ``$TMPDIR``) when it is on disk, not in
  memory (tmpfs, ramfs), and what would go there takes at most half of its free
  space; otherwise checkpoints, with a warning that says why and how to spare
  the recomputation;
- None: checkpoints.

The files are temporary: deleted when scoring ends, also on failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings

__all__ = ["AUTO", "MEMORY_FILE_SYSTEMS", "memory_backed", "spill_location", "warn_recomputed"]

AUTO = "auto"
#: file systems whose files are held in memory: spilling there would not spare memory
MEMORY_FILE_SYSTEMS = frozenset({"tmpfs", "ramfs"})
#: the share of a temporary directory's free space that ``"auto"`` may take
AUTO_SHARE = 0.5


def memory_backed(path: str | os.PathLike, mounts: str = "/proc/self/mounts") -> bool:
    """Whether ``path`` lies on a file system held in memory (tmpfs, ramfs), from the mount table.

    Reads Linux's mount table (``mounts``); False where there is none (macOS, Windows).
    """
    try:
        with open(mounts) as f:
            table = [fields[1:3] for fields in map(str.split, f) if len(fields) >= 3]
    except OSError:
        return False
    real = os.path.realpath(path)
    best, kind = "", ""
    for point, fstype in table:
        point = point.replace("\\040", " ")  # the table escapes spaces
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind in MEMORY_FILE_SYSTEMS


def _auto_refusal(folder: str, nbytes: int) -> str | None:
    """Why ``"auto"`` cannot put ``nbytes`` in ``folder``, or None when it can."""
    if memory_backed(folder):
        return f"the temporary directory {folder} is held in memory"
    free = shutil.disk_usage(folder).free
    if nbytes > AUTO_SHARE * free:
        return (f"about {nbytes / 1e9:.1f} GB would go to the temporary directory {folder}, more than half of its "
                f"{free / 1e9:.1f} GB free")
    return None


def spill_location(spill_dir: str | os.PathLike | None, nbytes: int) -> str | None:
    """The directory for ``nbytes`` that do not fit in memory, or None for checkpoints.

    Parameters
    ----------
    spill_dir : str, path-like or None
        A directory, ``"auto"`` or None (module docstring).
    nbytes : int
        Bytes that would go there.

    Raises
    ------
    ValueError
        When a directory given by name has less free space than ``nbytes``.
    """
    if spill_dir is None:
        return None
    if spill_dir == AUTO:
        folder = tempfile.gettempdir()
        return None if _auto_refusal(folder, nbytes) else folder
    free = shutil.disk_usage(spill_dir).free
    if free < nbytes:
        raise ValueError(
            f"Scoring would keep about {nbytes / 1e9:.1f} GB of the run in spill_dir={str(spill_dir)!r}, which has "
            f"{free / 1e9:.1f} GB free. Free disk space there, pass another spill_dir, or spill_dir=None (scoring "
            "then recomputes the steps from checkpoints: slower)."
        )
    return str(spill_dir)


def warn_recomputed(spill_dir: str | os.PathLike | None, nbytes: int) -> None:
    """Warn that ``"auto"`` could not take the run (``nbytes``) and scoring recomputes it from checkpoints."""
    if spill_dir != AUTO:
        return
    folder = tempfile.gettempdir()
    why = _auto_refusal(folder, nbytes)
    if why is None:
        return
    warnings.warn(
        f"What scoring keeps of the training run does not fit in max_memory, and {why}: scoring recomputes the "
        "steps from checkpoints instead (about one more training run). To spare that, pass spill_dir=<a directory "
        "on disk with room> (or set TMPDIR to one), or raise max_memory; spill_dir=None chooses the checkpoints "
        "without this warning.",
        UserWarning,
        stacklevel=2,
    )
