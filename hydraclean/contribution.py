"""Contributions of training samples to the validation loss.

Sign convention, used everywhere in hydraclean (DESIGN.md §1)::

    C(i)    = -(1/N) <grad L_val(w_T), nabla_{T,i}>
    C(i, j) = -(1/N) <grad l_j^val(w_T), nabla_{T,i}>

Positive means helpful: removing sample ``i`` (``eps_i = -1/N``) would raise
the validation loss by about ``C(i)``. Mislabelled samples tend to be negative.
Since ``L_val`` is the mean of the ``l_j^val``, ``C(i)`` is the mean of
``C(i, j)`` over the whole validation set.

Class-resolved contributions (DESIGN.md §5), with ``L_val^c`` the mean loss over
the validation samples of class ``c``::

    C(i, c) = -(1/N) <grad L_val^c(w_T), nabla_{T,i}>

are the class means of ``C(i, j)``, and ``C(i) = sum_c (n_c / n_val) C(i, c)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .batches import Inputs
from .checkpoint import Checkpoints
from .distributed import Shard
from .gradients import (
    class_validation_gradients,
    eval_separable,
    per_sample_validation_gradients,
    validation_gradients,
    without_second_derivative,
)
from .ghost import GhostRows
from .projection import ROW_FACTOR_BYTES
from .routes import plan_route, route_kind
from .training import Progress, SampleTrace, Trajectory, train

__all__ = [
    "Explanation",
    "HydraResult",
    "class_to_class_contribution",
    "contributions_from_projections",
    "fit_contributions",
    "inter_class_contribution",
    "suggest_labels",
    "top_contributors",
]


def contributions_from_projections(projections: torch.Tensor, n_samples: int) -> torch.Tensor:
    """``C = -(1/N) <V, nabla_T>`` from projections ``P = <V, nabla_T>`` (any shape)."""
    return projections * (-1.0 / n_samples)


@dataclass
class HydraResult:
    """Output of :func:`fit_contributions`.

    Attributes
    ----------
    model : nn.Module
        The trained copy (``w_T``).
    history : dict of str to list of float
        Per-epoch training (and validation) loss and accuracy.
    trajectory : Trajectory
        The recorded run, replayable.
    contribution : ndarray of shape (n_samples,), float64, or None
        ``C(i)``; None when no contribution was asked for.
    class_contribution : ndarray of shape (n_samples, n_classes), float64, or None
        ``C(i, c)``; a class without validation samples has a NaN column;
        None when not asked for.
    contribution_matrix : ndarray of shape (n_samples, n_rows) or None
        ``C(i, j)`` for the requested validation rows ``j``.
    trajectory_loss : ndarray of shape (n_samples,), float64
        Each sample's training loss averaged over the epochs, as the training
        steps computed it.
    trajectory_proba : ndarray of shape (n_samples, n_classes), float64
        Each sample's softmax output averaged over the epochs, likewise.
    trajectory_logit_margin : ndarray of shape (n_samples,), float64
        Each sample's logit margin averaged over the epochs, likewise
        (:class:`hydraclean.training.SampleTrace`).
    """

    model: nn.Module
    history: dict[str, list[float]]
    trajectory: Trajectory
    contribution: np.ndarray | None
    class_contribution: np.ndarray | None
    contribution_matrix: np.ndarray | None
    trajectory_loss: np.ndarray
    trajectory_proba: np.ndarray
    trajectory_logit_margin: np.ndarray


def fit_contributions(
    module: nn.Module,
    X: Inputs,
    y: torch.Tensor,
    X_val: torch.Tensor,
    y_val: torch.Tensor,
    *,
    criterion: nn.Module,
    trajectory: Trajectory,
    n_classes: int | None = None,
    hessian: str = "free",
    contributions: bool = True,
    classes: bool = True,
    val_rows: torch.Tensor | None = None,
    progress: Progress | None = None,
    max_memory: int = 10**9,
    spill_dir: str | None = None,
    checkpoint: Checkpoints | None = None,
    batchnorm: str = "constant",
) -> HydraResult:
    """Train along ``trajectory`` and score every training sample against the validation set.

    Plan the route (:func:`hydraclean.routes.plan_route`), train with it, take
    the validation directions at ``w_T``, project.

    Parameters
    ----------
    module : nn.Module
        Architecture with initial weights ``w_0``, on the data's device. Not modified.
    X : Tensor or DatasetInputs
        Training inputs (n_samples, ...) on the device, or a Dataset loaded
        batch by batch (:mod:`hydraclean.batches`).
    y : Tensor
        Integer targets (n_samples,), on the device.
    X_val, y_val : Tensor
        Trusted validation inputs and integer targets.
    criterion : nn.Module
        Per-sample loss, ``reduction="none"``.
    trajectory : Trajectory
        From :func:`hydraclean.training.plan_trajectory` (optimizer and schedule included).
    n_classes : int, optional
        Number of classes (columns of ``class_contribution``); default
        ``max(y, y_val) + 1``.
    hessian : {"free", "exact"}
        Drop the loss Hessian from the hypergradient (HYDRA's fast form), or
        keep it (reverse mode over the stored run: K Hessian-vector products
        per step for K directions).
    contributions : bool, default=True
        False trains without scoring: the contributions are None and nothing
        is kept from the run.
    classes : bool, default=True
        Project on every validation class's gradient (``class_contribution``,
        and ``C(i)`` as their weighted sum); False projects on the mean
        validation gradient alone (one direction).
    val_rows : Tensor of int, optional
        Validation rows ``j`` for which ``C(i, j)`` is wanted.
    progress : callable, optional
        Wraps each walk over the run's steps (training, scoring):
        ``progress(steps, desc, n_steps)``.
    max_memory : int, default=10**9
        Bytes (on the data's device) for what the route keeps from the run.
    spill_dir : str or "auto", optional
        Where what scoring keeps from the run goes when it does not fit in
        ``max_memory`` (:mod:`hydraclean.spill`); None: checkpoints.
    batchnorm : {"constant", "exact"}, default="constant"
        For a BatchNorm that normalises with its batch's statistics in
        training, in the Hessian-free hypergradient: those statistics held
        constant in each sample's derivative (the layer route), or their
        dependence on the weights kept (one JVP per direction); see
        :func:`hydraclean.routes.plan_route`.
    checkpoint : Checkpoints, optional
        Saves the run as it goes (:mod:`hydraclean.checkpoint`), once more
        when training is over, and continues a saved one: at its step, or at
        scoring when its training was over.

    Returns
    -------
    HydraResult

    Raises
    ------
    ValueError
        Before training: when ``max_memory`` cannot hold what scoring needs
        from the run and there is no ``spill_dir``, when that with the
        validation directions and the results is more than the device has
        free, or for ``hessian="exact"`` in a data-parallel run.
    """
    n = y.shape[0]
    if hessian == "exact" and trajectory.shard is not None:
        raise ValueError("hessian='exact' runs in one process: pass distributed=False (or hessian='free').")
    blockers = without_second_derivative(module) if hessian == "exact" else []
    if blockers:
        raise ValueError(f"hessian='exact' needs Hessian-vector products, and torch implements no second derivative "
                         f"of nn.EmbeddingBag (trainable: {', '.join(blockers)}): use hessian='free', or an "
                         "nn.Embedding followed by a mean or sum, which has one.")
    if n_classes is None:
        n_classes = int(max(y.max(), y_val.max())) + 1
    route = None
    n_directions = (n_classes + 1 if classes else 1) + (0 if val_rows is None else len(val_rows))
    if contributions:
        # what scoring will hold beside the route: the directions, and the ghost rows' factors when it uses them
        reserve = _direction_bytes(module, n_directions) + (ROW_FACTOR_BYTES if eval_separable(module) else 0)
        route = plan_route(module, criterion, X, y, trajectory, hessian=hessian, max_memory=max_memory,
                           spill_dir=spill_dir, batchnorm=batchnorm, reserve=reserve)
        if checkpoint is not None:  # a saved route's state resumes that route only (spill_dir="auto": free disk)
            checkpoint.fingerprint["scoring route (max_memory, spill_dir, free disk)"] = route_kind(route)
    try:
        if route is not None:
            _preflight(route, module, n, n_directions, y.device)
        saved = None if checkpoint is None else checkpoint.load()
        if saved is not None and saved["stage"] == "trained":  # training was over: score
            model = copy.deepcopy(module)
            model.load_state_dict(saved["model"])
            trajectory.initial_state, history = saved["initial_state"], saved["history"]
            trace = SampleTrace(*(t.to(y.device) for t in saved["trace"]))
            if route is not None:
                route.load_state_dict(saved["recorder"])
        else:
            model, history, trace = train(module, X, y, criterion, trajectory, recorder=route,
                                          validation=(X_val, y_val), progress=progress, checkpoint=checkpoint)
            if checkpoint is not None:
                checkpoint.save({"stage": "trained", "model": model.state_dict(), "history": history,
                                 "initial_state": trajectory.initial_state, "trace": [trace.loss, trace.proba, trace.margin],
                                 "recorder": {} if route is None else route.state_dict()})
        scores = by_class = matrix = contribution = None
        if route is not None:
            route.finish()  # frees what training left (the summed output gradients) before the directions take memory
            directions, mixing, layout = _directions(model, X_val, y_val, criterion, n_classes, classes, val_rows,
                                                     trajectory.shard)
            ghost = None if mixing is None else GhostRows(model, X_val, y_val, mixing)
            projections = route.project(directions, ghost, progress)
            if trajectory.shard is not None:  # each rank holds its samples' rows, zeros elsewhere
                trajectory.shard.all_reduce(projections)
                trajectory.shard.finish()
            scores = contributions_from_projections(projections, n).double().cpu().numpy()
            contribution, by_class, matrix = layout(scores)
    finally:
        if route is not None:
            route.close()
    return HydraResult(model, history, trajectory, contribution, by_class, matrix,
                       *(t.double().cpu().numpy() for t in (trace.loss, trace.proba, trace.margin)))


def _direction_bytes(module: nn.Module, n_directions: int) -> int:
    """Bytes of the K validation directions (K x n_params in the parameters' dtype)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return n_directions * sum(p.numel() for p in params) * (params[0].element_size() if params else 0)


def _preflight(route, module: nn.Module, n_samples: int, n_directions: int, device: torch.device) -> None:
    """Refuse, before training, a fit that could not hold what it needs on its device: what the route keeps
    from the run (within max_memory), the validation directions (K x n_params) and the results (N x K, on the
    device and in float64)."""
    ref = next(p for p in module.parameters() if p.requires_grad)
    directions = _direction_bytes(module, n_directions)
    results = n_samples * n_directions * (ref.element_size() + 8)
    mb = lambda b: f"{b / 1e6:,.0f} MB"  # noqa: E731
    total, free = route.nbytes + directions + results, _free_memory(device)
    if free is not None and total > free:
        raise ValueError(
            f"The fit would hold about {mb(total)} on {device} ({mb(route.nbytes)} kept from the run, "
            f"{mb(directions)} of validation directions, {mb(results)} of results), but {mb(free)} are free "
            "there. Lower max_memory (what is kept from the run), n_val_features, or free memory on the device."
        )


def _free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device``: CUDA's own count, or MemAvailable on Linux for the CPU; None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def _directions(model: nn.Module, X_val: torch.Tensor, y_val: torch.Tensor, criterion: nn.Module, n_classes: int,
                classes: bool, val_rows: torch.Tensor | None, shard: Shard | None):
    """The directions of one projection, ``[mean (when not the classes' sum), classes, rows]``, how they
    combine the validation samples' own gradients (``(K, n_val)``; None for a model whose eval-mode losses
    are not separate, BatchNorm without running statistics), and a function that lays the (N, K) scores out
    as ``(C(i), C(i, c) or None, C(i, j) or None)``."""
    n_rows = 0 if val_rows is None else len(val_rows)
    if classes:
        counts = torch.bincount(y_val, minlength=n_classes)
        present = counts > 0
        n_present = int(present.sum())
        # grad L_val = sum_c (n_c / n_val) G^c: C(i) from C(i, c), no column of its own, except for BatchNorm
        # without running statistics, whose mean loss is not the classes' sum
        lead = 0 if eval_separable(model) else 1
        ref = next(p for p in model.parameters() if p.requires_grad)
        directions = ref.new_empty(lead + n_present + n_rows, sum(p.numel() for p in model.parameters()
                                                                   if p.requires_grad))
        if n_present == n_classes:  # written in place: no second model-sized buffer per class
            _class_gradients(model, X_val, y_val, criterion, n_classes, counts, shard,
                             out=directions[lead : lead + n_present])
        else:
            directions[lead : lead + n_present] = _class_gradients(model, X_val, y_val, criterion, n_classes,
                                                                   counts, shard)[present]
        weights = counts[present].double().cpu().numpy() / len(y_val)
        present_codes = present
        present = present.cpu().numpy()
    else:
        lead, n_present = 1, 0
        ref = next(p for p in model.parameters() if p.requires_grad)
        directions = ref.new_empty(1 + n_rows, sum(p.numel() for p in model.parameters() if p.requires_grad))
    if lead:
        directions[0] = validation_gradients(model, X_val, y_val, criterion)[0]
    if n_rows:
        per_sample_validation_gradients(model, X_val, y_val, criterion, val_rows, out=directions[lead + n_present :])
        if shard is not None:  # every rank projects on rank 0's validation rows
            shard.broadcast(directions[lead + n_present :])

    mixing = None
    if eval_separable(model):
        mixing = directions.new_zeros(directions.shape[0], len(y_val))
        if lead:
            mixing[0] = 1.0 / len(y_val)
        if classes:
            codes = torch.arange(n_classes, device=y_val.device)[present_codes]
            mixing[lead : lead + n_present] = (y_val == codes[:, None]).to(mixing.dtype) / counts[codes, None]
        if n_rows:
            mixing[torch.arange(lead + n_present, lead + n_present + n_rows, device=mixing.device), val_rows] = 1.0

    def layout(scores: np.ndarray):
        by_class = None
        if classes:
            by_class = np.full((scores.shape[0], n_classes), np.nan)
            by_class[:, present] = scores[:, lead : lead + n_present]
        contribution = scores[:, 0].copy() if lead else scores[:, :n_present] @ weights
        matrix = scores[:, lead + n_present :] if n_rows else None
        return contribution, by_class, matrix

    return directions, mixing, layout


def _class_gradients(model: nn.Module, X_val: torch.Tensor, y_val: torch.Tensor, criterion: nn.Module,
                     n_classes: int, counts: torch.Tensor, shard: Shard | None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`class_validation_gradients` (into ``out``); in a data-parallel run each rank takes a share of
    the rows."""
    if shard is None:
        return class_validation_gradients(model, X_val, y_val, criterion, n_classes, out=out)
    rows = shard.split(torch.arange(len(y_val), device=y_val.device))
    local = class_validation_gradients(model, X_val[rows], y_val[rows], criterion, n_classes, out=out)
    sums = torch.nan_to_num(local, nan=0.0) * torch.bincount(y_val[rows], minlength=n_classes).unsqueeze(1)
    G = shard.all_reduce(sums) / counts.unsqueeze(1)  # 0 / 0 = NaN for an absent class
    return G if out is None else out.copy_(G)


def suggest_labels(class_contribution: np.ndarray, classes: np.ndarray, given: np.ndarray) -> np.ndarray:
    """The class whose validation loss each sample raises most: ``classes[argmin_c C(i, c)]``.

    A flipped sample (observed label a, true class b) mostly raises the loss
    of class b's validation samples, so for a mislabelled sample this names
    its likely true class (DESIGN.md §5); for a correctly labelled one it names
    the class it competes with most.

    Parameters
    ----------
    class_contribution : ndarray of shape (n_samples, n_classes)
        ``C(i, c)``; NaN columns (classes without validation samples) are
        skipped, all-NaN rows (unscored samples) keep their given label.
    classes : ndarray of shape (n_classes,)
        Label of each column.
    given : ndarray of shape (n_samples,)
        The labels as given, kept for unscored rows.

    Returns
    -------
    suggested : ndarray of shape (n_samples,), dtype of ``classes``
    """
    C = np.asarray(class_contribution, dtype=np.float64)
    scored = ~np.isnan(C).all(axis=1)
    suggested = np.asarray(given).astype(classes.dtype, copy=True)
    suggested[scored] = classes[np.nanargmin(C[scored], axis=1)]
    return suggested


def inter_class_contribution(
    contribution_matrix: np.ndarray,
    y_train: np.ndarray,
    y_val: np.ndarray,
    classes: np.ndarray | None = None,
    normalize: bool = True,
) -> np.ndarray:
    """Mean contribution of each training class to each validation class (paper eq. 23).

    ``A[a, b] = mean over i in S_a, j in T_b of C(i, j)``, with ``S_a`` the
    training samples labelled ``a`` and ``T_b`` the validation samples
    labelled ``b``.

    Parameters
    ----------
    contribution_matrix : ndarray of shape (n_train, n_val)
        ``C(i, j)``; rows that are all NaN (unscored samples) are ignored.
    y_train : ndarray of shape (n_train,)
    y_val : ndarray of shape (n_val,)
    classes : ndarray of shape (n_classes,), optional
        Row and column order; default: the sorted union of the labels.
    normalize : bool, default=True
        Divide every entry by ``sqrt(|row sum| * |column sum|)``, the paper's
        normalisation (the absolute value keeps the sign of the entry when a
        sum is negative). Entries whose row or column sums to zero become 0.

    Returns
    -------
    A : ndarray of shape (n_classes, n_classes)
        Rows: training classes; columns: validation classes. A class absent
        from one side gives a row or column of zeros.
    """
    C = np.asarray(contribution_matrix, dtype=np.float64)
    y_train, y_val = np.asarray(y_train), np.asarray(y_val)
    if C.shape != (y_train.shape[0], y_val.shape[0]):
        raise ValueError(
            f"contribution_matrix has shape {C.shape}; expected (len(y_train), len(y_val)) = "
            f"({y_train.shape[0]}, {y_val.shape[0]})."
        )
    scored = ~np.isnan(C).all(axis=1)
    C, y_train = C[scored], y_train[scored]
    if np.isnan(C).any():
        raise ValueError("contribution_matrix has NaN entries in scored rows.")
    if classes is None:
        classes = np.unique(np.concatenate([y_train, y_val]))
    rows = (y_train[:, None] == classes[None, :]).astype(np.float64)  # (n_train, n_classes)
    cols = (y_val[:, None] == classes[None, :]).astype(np.float64)  # (n_val, n_classes)
    counts = np.outer(rows.sum(0), cols.sum(0))
    total = rows.T @ C @ cols
    A = np.divide(total, counts, out=np.zeros_like(total), where=counts > 0)
    return _normalize_inter_class(A) if normalize else A


def class_to_class_contribution(
    class_contribution: np.ndarray, y_train: np.ndarray, classes: np.ndarray, normalize: bool = True
) -> np.ndarray:
    """The inter-class map of paper eq. 23 from the class-resolved ``C(i, c)`` alone.

    ``A[a, b]`` is the mean of ``C(i, b)`` over the training samples labelled
    ``a``, which equals :func:`inter_class_contribution` over every validation
    sample (``C(i, b)`` is the mean of ``C(i, j)`` over class ``b``), without the
    per-validation-sample matrix: any fit gives it.

    Parameters
    ----------
    class_contribution : ndarray of shape (n_train, n_classes)
        ``class_contribution_``; all-NaN rows (unscored samples) are ignored.
    y_train : ndarray of shape (n_train,)
        Observed training labels, values of ``classes``.
    classes : ndarray of shape (n_classes,)
        The label of each column (``classes_``), also the row order.
    normalize : bool, default=True
        As in :func:`inter_class_contribution`.

    Returns
    -------
    A : ndarray of shape (n_classes, n_classes)
        Rows: training classes; columns: validation classes. A class without
        validation samples gives a NaN column, one without training samples a
        row of zeros.
    """
    R = np.asarray(class_contribution, dtype=np.float64)
    y_train = np.asarray(y_train)
    scored = ~np.isnan(R).all(axis=1)
    rows = (y_train[scored, None] == np.asarray(classes)[None, :]).astype(np.float64)
    counts = rows.sum(0)[:, None]
    A = np.divide(rows.T @ np.nan_to_num(R[scored]), counts, out=np.zeros((len(classes), R.shape[1])),
                  where=counts > 0)
    A[:, np.isnan(R[scored]).all(axis=0)] = np.nan
    return _normalize_inter_class(A) if normalize else A


def _normalize_inter_class(A: np.ndarray) -> np.ndarray:
    """The paper's normalisation: divide by ``sqrt(|row sum| * |column sum|)`` (0 where that is 0)."""
    denom = np.sqrt(np.abs(np.outer(np.nansum(A, 1), np.nansum(A, 0))))
    out = np.divide(A, denom, out=np.zeros_like(A), where=denom > 0)
    out[np.isnan(A)] = np.nan
    return out


@dataclass
class Explanation:
    """The training samples that helped and hurt each explained validation sample most.

    Attributes
    ----------
    contribution_matrix : ndarray of shape (n_samples, n_explained)
        ``C(i, j)`` for every training row ``i`` (NaN for unscored rows) and
        every explained validation sample ``j``.
    helpful : ndarray of shape (n_explained, k), int
        Rows with the largest ``C(i, j)``, most helpful first.
    helpful_scores : ndarray of shape (n_explained, k)
    harmful : ndarray of shape (n_explained, k), int
        Rows with the smallest ``C(i, j)``, most harmful first.
    harmful_scores : ndarray of shape (n_explained, k)
    """

    contribution_matrix: np.ndarray
    helpful: np.ndarray
    helpful_scores: np.ndarray
    harmful: np.ndarray
    harmful_scores: np.ndarray


def top_contributors(contribution_matrix: np.ndarray, k: int) -> Explanation:
    """Rank the rows of ``C(i, j)`` per column: the ``k`` largest and the ``k`` smallest.

    NaN rows (unscored samples) are never ranked; ties keep row order.
    """
    C = np.asarray(contribution_matrix, dtype=np.float64)
    scored = np.flatnonzero(~np.isnan(C).all(axis=1))
    k = min(int(k), scored.size)
    sub = C[scored]  # (n_scored, M)
    order = np.argsort(sub, axis=0, kind="stable")
    harmful = scored[order[:k]].T
    helpful = scored[np.argsort(-sub, axis=0, kind="stable")[:k]].T
    cols = np.arange(C.shape[1])[:, None]
    return Explanation(C, helpful, C[helpful, cols], harmful, C[harmful, cols])
