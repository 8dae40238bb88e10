"""Measuring a cleaner: detection metrics against a known noise mask, and retraining.

Protocols as DESIGN.md §4 fixes them: AUROC of ``-score`` against the noise
mask, precision at k = the true number of flips, precision / recall / F1 and
Jaccard of the flagged set; cleaning is judged by retraining the same model
from scratch on the kept samples with their (noisy) labels for the same
number of optimizer steps.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from sklearn.metrics import f1_score, jaccard_score, precision_score, recall_score, roc_auc_score
from torch import nn

from .data import input_dtype, takes_token_ids
from .training import evaluate_model, plan_trajectory, step_rng, train

__all__ = ["detection_metrics", "retrain_accuracy"]


def detection_metrics(noise_mask: np.ndarray, scores: np.ndarray, flagged: np.ndarray | None = None) -> dict[str, float]:
    """How well low scores and flags find the noisy samples.

    Parameters
    ----------
    noise_mask : ndarray of shape (n,), bool
        True for samples whose label was corrupted.
    scores : ndarray of shape (n,)
        Higher = more useful (e.g. ``contribution_``). NaN entries are ignored.
    flagged : ndarray of shape (n,), bool, optional
        The cleaner's decision (``label_issues_``).

    Returns
    -------
    metrics : dict
        ``auroc``, ``precision_at_k`` (k = number of noisy samples) and, with
        ``flagged``, ``precision``, ``recall``, ``f1``, ``jaccard`` and
        ``n_flagged``.
    """
    noise_mask = np.asarray(noise_mask, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    keep = ~np.isnan(scores)
    truth, s = noise_mask[keep], scores[keep]
    k = int(truth.sum())
    out = {
        "auroc": float(roc_auc_score(truth, -s)) if 0 < k < truth.size else float("nan"),
        "precision_at_k": float(truth[np.argsort(s, kind="stable")[:k]].mean()) if k else float("nan"),
    }
    if flagged is not None:
        f = np.asarray(flagged, dtype=bool)[keep]
        out.update(
            precision=float(precision_score(truth, f, zero_division=0)),
            recall=float(recall_score(truth, f, zero_division=0)),
            f1=float(f1_score(truth, f, zero_division=0)),
            jaccard=float(jaccard_score(truth, f, zero_division=0)),
            n_flagged=int(f.sum()),
        )
    return out


class _PerStepDecay:
    """``factor = total_decay ** (global_step / n_steps)``, whatever the epoch length."""

    def __init__(self, total_decay: float, steps_per_epoch: int, n_steps: int) -> None:
        self.total_decay, self.steps_per_epoch, self.n_steps = total_decay, steps_per_epoch, n_steps

    def __call__(self, epoch: int, step: int) -> float:
        return self.total_decay ** ((epoch * self.steps_per_epoch + step) / self.n_steps)


def retrain_accuracy(
    make_module: Callable[[], nn.Module],
    X: np.ndarray,
    y: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    *,
    n_steps: int,
    batch_size: int = 64,
    optimizer: type = torch.optim.SGD,
    lr: float | None = 0.01,
    momentum: float = 0.9,
    weight_decay: float | None = 0.0,
    total_decay: float = 1.0,
    lr_schedule: str | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> float:
    """Test accuracy of ``make_module()`` trained from scratch on ``(X, y)`` for about ``n_steps`` steps.

    The number of epochs is ``max(1, round(n_steps / steps_per_epoch))``, so a
    smaller (cleaned) training set gets as many optimizer steps as the full one.
    The learning rate decays smoothly by ``total_decay`` over those steps
    (``lr * total_decay ** (t / n_steps)`` at step ``t``), so every training-set
    size follows the same learning-rate curve; 1.0 keeps it constant. A named
    ``lr_schedule`` (``"cosine"``) is stretched over the run's own steps
    instead. ``optimizer``, ``lr`` and ``weight_decay`` as in
    :func:`hydraclean.training.plan_trajectory`. ``y`` and ``y_test`` must be
    integer class codes 0..n_classes-1.
    """
    device = torch.device(device)
    steps_per_epoch = -(-len(y) // batch_size)
    epochs = max(1, round(n_steps / steps_per_epoch))
    with step_rng(seed, torch.device("cpu")):
        module = make_module().to(device)
    dtype = next(module.parameters()).dtype
    schedule = lr_schedule or (
        "constant" if total_decay == 1.0 else _PerStepDecay(float(total_decay), steps_per_epoch, n_steps))
    traj = plan_trajectory(len(y), batch_size=batch_size, max_epochs=epochs, optimizer=optimizer, lr=lr,
                           lr_schedule=schedule, momentum=momentum, weight_decay=weight_decay, seed=seed)
    criterion = nn.CrossEntropyLoss(reduction="none")
    tokens = takes_token_ids(module)

    def to(a, dt=None):
        a = np.asarray(a)
        return torch.as_tensor(a, dtype=dt or input_dtype(a.dtype, dtype, tokens), device=device)

    model, _, _ = train(module, to(X), to(y, torch.long), criterion, traj)
    _, accuracy = evaluate_model(model, to(X_test), to(y_test, torch.long), criterion)
    return accuracy
