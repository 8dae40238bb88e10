"""Cleaning decisions: which training samples to flag, given their contributions.

Both rules use only the contributions and the observed (possibly noisy)
labels; no ground truth names the noisy group.
"""

from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import linkage, to_tree  # scipy: a dependency of scikit-learn
from scipy.spatial.distance import squareform
from sklearn.cluster import KMeans

from .scoring import memorisation

__all__ = ["estimate_issue_count", "flag_lowest", "flag_sign_clusters", "harms_more_than_class_helps",
           "memorised_flips", "predicted_other_class", "validation_fell"]

#: Classes with fewer samples than this are not split by :func:`flag_sign_clusters`.
MIN_CLUSTER_CLASS_SIZE = 4
#: Above this many samples in a class, Ward's O(n^2) memory gives way to k-means.
MAX_WARD_CLASS_SIZE = 10_000


def flag_lowest(scores: np.ndarray, fraction: float | None = None, count: int | None = None) -> np.ndarray:
    """Flag the ``round(fraction * n_scored)`` (or ``count``) samples with the lowest score.

    Parameters
    ----------
    scores : ndarray of shape (n_samples,)
        Higher is more useful. NaN marks an unscored sample, never flagged.
    fraction : float in [0, 1], optional
    count : int, optional
        Instead of ``fraction``: how many to flag (at most the scored ones).

    Returns
    -------
    flagged : ndarray of shape (n_samples,), bool
        Ties are broken by position (stable sort), so the result is deterministic.
    """
    scores = np.asarray(scores, dtype=np.float64)
    scored = np.flatnonzero(~np.isnan(scores))
    k = int(round(fraction * scored.size)) if count is None else min(int(count), scored.size)
    flagged = np.zeros(scores.shape[0], dtype=bool)
    flagged[scored[np.argsort(scores[scored], kind="stable")[:k]]] = True
    return flagged


def harms_more_than_class_helps(class_contribution: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Samples that hurt some class more than that class's own samples typically help it.

    With ``b = argmin_c C(i, c)`` the class sample ``i`` hurts most: flagged
    when ``-C(i, b)`` exceeds the median of ``C(j, b)`` over the samples ``j``
    labelled ``b``. Both sides are in the units of ``C(., b)``, so no
    threshold is tuned.

    Parameters
    ----------
    class_contribution : ndarray of shape (n_samples, n_classes)
        ``C(i, c)``; NaN rows are unscored and never flagged.
    labels : ndarray of shape (n_samples,)
        Observed labels as codes ``0..n_classes-1``.

    Returns
    -------
    flagged : ndarray of shape (n_samples,), bool
    """
    R = np.asarray(class_contribution, dtype=np.float64)
    labels = np.asarray(labels)
    flagged = np.zeros(R.shape[0], dtype=bool)
    scored = np.flatnonzero(~np.isnan(R).all(axis=1))
    if scored.size == 0:
        return flagged
    worst = np.nanargmin(R[scored], axis=1)
    typical_help = np.full(R.shape[1], np.nan)
    for c in np.unique(labels[scored]):
        typical_help[c] = np.nanmedian(R[scored[labels[scored] == c], c])
    with np.errstate(invalid="ignore"):  # NaN (no sample labelled b): not flagged
        flagged[scored] = -R[scored, worst] > typical_help[worst]
    return flagged


def predicted_other_class(trajectory_proba: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Samples for which the model, averaged over the training run, predicted another class.

    Parameters
    ----------
    trajectory_proba : ndarray of shape (n_samples, n_classes)
        Softmax outputs averaged over the epochs (as training computed them).
    labels : ndarray of shape (n_samples,)
        Observed labels as codes ``0..n_classes-1``.

    Returns
    -------
    flagged : ndarray of shape (n_samples,), bool
    """
    return np.argmax(np.asarray(trajectory_proba), axis=1) != np.asarray(labels)


def validation_fell(valid_accuracy, n_val: int, z: float = 2.0) -> bool:
    """Whether the trusted rows' accuracy fell from its best epoch to the last by more than ``z`` standard errors.

    Fitting clean labels does not cost accuracy on held-out clean data;
    memorising flipped ones does. The standard error is the binomial one at
    the best accuracy, ``sqrt(a (1 - a) / n_val)``.

    Parameters
    ----------
    valid_accuracy : sequence of float, one per epoch
        Accuracy on the validation set after each epoch (``history_["valid_accuracy"]``).
    n_val : int
        Number of validation samples.
    z : float, default=2.0

    Returns
    -------
    fell : bool
    """
    acc = np.asarray(valid_accuracy, dtype=np.float64)
    if acc.size == 0:
        return False
    best = acc.max()
    return bool(best - acc[-1] > z * np.sqrt(best * (1.0 - best) / max(int(n_val), 1)))


def memorised_flips(trajectory_proba: np.ndarray, labels: np.ndarray, train_accuracy: float,
                    valid_accuracy, n_val: int) -> float:
    """How far the run memorised flipped labels, in [0, 1]: the argument ``memorised`` of :func:`estimate_issue_count`.

    :func:`hydraclean.scoring.memorisation` (how far the model fitted the
    labels its run disputed) where :func:`validation_fell` says that fitting
    them cost accuracy on the trusted rows, else 0: a model that memorises
    clean labels loses no validation accuracy by it.

    Parameters
    ----------
    trajectory_proba : ndarray of shape (n_samples, n_classes)
    labels : ndarray of shape (n_samples,)
    train_accuracy : float
        Training accuracy of the last epoch on the observed labels.
    valid_accuracy : sequence of float, one per epoch
    n_val : int

    Returns
    -------
    memorised : float
    """
    if not validation_fell(valid_accuracy, n_val):
        return 0.0
    return memorisation(trajectory_proba=trajectory_proba, labels=labels, train_accuracy=train_accuracy)


def estimate_issue_count(class_contribution: np.ndarray, trajectory_proba: np.ndarray, labels: np.ndarray,
                         memorised: float = 0.0) -> int:
    """How many scored samples are mislabelled, estimated without knowing the noise rate.

    The samples that :func:`predicted_other_class` flags (the flips the model
    did not learn: it kept predicting their true class), plus ``memorised``
    times the further samples that :func:`harms_more_than_class_helps` flags
    (flips the model fitted, whose harm to their true class accumulated over
    the run).

    Parameters
    ----------
    class_contribution : ndarray of shape (n_samples, n_classes)
        ``C(i, c)``; NaN rows are unscored and never counted.
    trajectory_proba : ndarray of shape (n_samples, n_classes)
    labels : ndarray of shape (n_samples,)
        Observed labels as codes ``0..n_classes-1``.
    memorised : float in [0, 1], default=0.0
        How far the run memorised flipped labels (:func:`memorised_flips`,
        as the estimator computes it).

    Returns
    -------
    count : int

    Notes
    -----
    The harm rule alone flags about a third of the rows of clean data (a
    sample's harm to a class it resembles is often larger than that class's
    typical help), so it counts only where the run memorised and the trusted
    rows show that memorising cost accuracy. Where the model keeps confusing
    some classes (Fashion-MNIST's shirts and pullovers) the prediction rule
    also counts clean samples it keeps mispredicting. ``benchmarks/flag_count.py``
    compares this with every other rule tried.
    """
    if not 0.0 <= memorised <= 1.0:
        raise ValueError(f"memorised must be in [0, 1], got {memorised!r}.")
    scored = ~np.isnan(np.asarray(class_contribution, dtype=np.float64)).all(axis=1)
    other = predicted_other_class(trajectory_proba, labels) & scored
    harmful = harms_more_than_class_helps(class_contribution, labels) & scored & ~other
    return int(other.sum() + round(memorised * harmful.sum()))


def flag_sign_clusters(
    contribution_matrix: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    random_state: int | np.random.RandomState | None = None,
) -> np.ndarray:
    """Per class, split the sign vectors of ``C(i, j)`` in two and flag the less useful group.

    Parameters
    ----------
    contribution_matrix : ndarray of shape (n_samples, n_features)
        ``C(i, j)`` over the validation features; NaN rows are unscored.
    labels : ndarray of shape (n_samples,)
        Observed training labels; each class is clustered separately.
    scores : ndarray of shape (n_samples,)
        ``C(i)``; the group with the lower mean is flagged.
    random_state : int, RandomState or None
        Seeds k-means, used only for classes above ``MAX_WARD_CLASS_SIZE``.

    Returns
    -------
    flagged : ndarray of shape (n_samples,), bool

    Notes
    -----
    The sign vectors lie in {-1, +1}^M, where squared Euclidean distance is
    four times the Hamming distance. Each class is split by Ward's
    agglomerative clustering, which merges groups so as to keep the
    within-group Hamming dispersion smallest (scikit-learn's
    ``AgglomerativeClustering(linkage="ward")``, computed from the sign
    vectors' Gram matrix: the same distances, exactly, at the cost of one
    matrix product instead of a pairwise loop). Measured on digits at 20% and
    50% symmetric noise (``benchmarks/cluster_choice.py``), it found the
    noisy group better than k-means on the same vectors and than average
    linkage with the Hamming metric, varied least across seeds, and needs
    no random initialisation. Its memory is quadratic in the class size, so
    classes above ``MAX_WARD_CLASS_SIZE`` samples use k-means (k=2, 10
    initialisations), which minimises the same dispersion criterion.
    Classes with fewer than ``MIN_CLUSTER_CLASS_SIZE`` scored samples, or
    whose sign vectors are all equal, are left unflagged: there is nothing to
    split.
    """
    signs = np.where(np.asarray(contribution_matrix) >= 0, 1.0, -1.0)
    scores = np.asarray(scores, dtype=np.float64)
    flagged = np.zeros(signs.shape[0], dtype=bool)
    scored = ~np.isnan(scores)
    for cls in np.unique(labels):
        members = np.flatnonzero((labels == cls) & scored)
        if members.size < MIN_CLUSTER_CLASS_SIZE or np.all(signs[members] == signs[members[0]]):
            continue
        if members.size <= MAX_WARD_CLASS_SIZE:
            groups = _ward_halves(signs[members])
        else:
            groups = KMeans(n_clusters=2, n_init=10, random_state=random_state).fit_predict(signs[members])
        means = [scores[members[groups == g]].mean() for g in (0, 1)]
        flagged[members[groups == int(np.argmin(means))]] = True
    return flagged


def _ward_halves(signs: np.ndarray) -> np.ndarray:
    """The two groups at the root of Ward's tree over sign vectors in {-1, +1}^M.

    Squared distances are ``2M - 2 s_i . s_j``: integers, computed exactly by
    one matrix product, so the tree equals Ward's on the vectors themselves
    (scipy's linkage, which scikit-learn's ``ward_tree`` also calls), and the
    two clusters are the last merge's two sides, as in ``AgglomerativeClustering``.
    """
    squared = np.maximum(2.0 * signs.shape[1] - 2.0 * (signs @ signs.T), 0.0)
    np.fill_diagonal(squared, 0.0)
    root = to_tree(linkage(squareform(np.sqrt(squared), checks=False), method="ward"))
    groups = np.zeros(signs.shape[0], dtype=np.intp)
    groups[root.get_left().pre_order()] = 1
    return groups
