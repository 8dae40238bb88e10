"""Label-quality scores from one recorded run: higher = more likely correctly labelled.

Every score is a small pure function of what one fit computes, called with
keywords (it ignores those it does not use)::

    score(contribution=C, class_contribution=R, labels=y, trajectory_loss=L,
          trajectory_proba=P, trajectory_logit_margin=M, train_accuracy=a) -> (n_samples,)

``C`` is the paper's ``C(i)`` (n_samples,), ``R`` the class-resolved
``C(i, c)`` (n_samples, n_classes), ``y`` the observed labels as class codes
``0..n_classes-1``, and ``L``, ``P`` and ``M`` each sample's training loss,
softmax output and logit margin averaged over the epochs, as the training
steps computed them (the trajectory trace), and ``a`` the training accuracy of
the last epoch on the observed labels. Rows that were not scored (NaN in ``C`` or ``R``) get
NaN; NaN columns of ``R`` (classes without validation samples) are skipped.
Each score's ``needs`` names what it reads, so that a fit computes only that:
a score that needs no hypergradient costs none.

``docs/benchmarks.md`` ("Choosing the default score") compares these and the
variants that did not earn a place, on every benchmark setting.
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = [
    "SCORES",
    "aum",
    "class_harm",
    "class_min",
    "combined",
    "contribution",
    "memorisation",
    "memorisation_weighted",
    "robust_z",
    "trajectory_loss",
    "trajectory_margin",
]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():  # all-NaN rows and columns give NaN, as documented
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)


#: MAD times this estimates the standard deviation of normal data (1 / Phi^-1(3/4)).
MAD_TO_SD = 1.482602218505602


def robust_z(x: np.ndarray) -> np.ndarray:
    """``(x - median) / (1.4826 MAD)`` over the finite entries (the standard deviation if MAD is 0).

    Parameters
    ----------
    x : ndarray of shape (n,)

    Returns
    -------
    z : ndarray of shape (n,)
        NaN where ``x`` is NaN; all 0 when ``x`` is constant.
    """
    x = np.asarray(x, dtype=np.float64)
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return np.full_like(x, np.nan)
    med = np.median(finite)
    scale = MAD_TO_SD * np.median(np.abs(finite - med))
    if scale == 0:
        scale = finite.std()
    return (x - med) / scale if scale > 0 else np.where(np.isnan(x), np.nan, 0.0)


def needs(*inputs: str):
    """Mark a score with the fit's results it reads: ``"contribution"`` and ``"class_contribution"`` cost a
    hypergradient, ``"trajectory"`` (the training run's record of each sample) does not."""

    def mark(score):
        score.needs = frozenset(inputs)
        return score

    return mark


@needs("contribution")
def contribution(*, contribution: np.ndarray, **_) -> np.ndarray:
    """The paper's ``C(i)``: the sample's contribution to the mean validation loss."""
    return np.asarray(contribution, dtype=np.float64)


@needs("class_contribution")
def class_min(*, class_contribution: np.ndarray, **_) -> np.ndarray:
    """``min_c C(i, c)``: the contribution to the class the sample hurts most."""
    return _quiet(np.nanmin, np.asarray(class_contribution, dtype=np.float64), axis=1)


@needs("class_contribution")
def class_harm(*, class_contribution: np.ndarray, **_) -> np.ndarray:
    """``min_c C(i, c) / s_c``, with ``s_c`` the standard deviation of ``C(., c)`` over the samples.

    As :func:`class_min`, with every class's column in units of its own
    spread, so that a class with large validation gradients (a hard class)
    does not decide the minimum for every sample.
    """
    R = np.asarray(class_contribution, dtype=np.float64)
    spread = _quiet(np.nanstd, R, axis=0)
    return _quiet(np.nanmin, R / np.where(spread > 0, spread, np.nan), axis=1)


@needs("trajectory")
def trajectory_loss(*, trajectory_loss: np.ndarray, **_) -> np.ndarray:
    """Minus the sample's training loss averaged over the run (no hypergradient).

    A mislabelled sample is fitted late, if at all, so its loss stays high
    for much of the run even when the final model has memorised it.
    """
    return -np.asarray(trajectory_loss, dtype=np.float64)


@needs("trajectory")
def trajectory_margin(*, trajectory_proba: np.ndarray, labels: np.ndarray, **_) -> np.ndarray:
    """Averaged over the run, the probability of the observed label minus the largest other one.

    No hypergradient: the softmax outputs that the training steps computed,
    averaged over the epochs (in the spirit of the area under the margin of
    Pleiss et al., 2020). Negative when the model, on average along the
    run, preferred another class.
    """
    P = np.asarray(trajectory_proba, dtype=np.float64)
    rows = np.arange(P.shape[0])
    labels = np.asarray(labels, dtype=np.int64)
    own = P[rows, labels]
    others = P.copy()
    others[rows, labels] = -np.inf
    return own - others.max(axis=1)


@needs("trajectory")
def aum(*, trajectory_logit_margin: np.ndarray, **_) -> np.ndarray:
    """The area under the margin (Pleiss et al., 2020): the logit of the observed label minus the largest
    other logit, averaged over every step that trained on the sample (no hypergradient).

    The logits are those of the training steps' own forward passes, before
    each step's update, as the ``aum`` package records them.
    """
    return np.asarray(trajectory_logit_margin, dtype=np.float64)


@needs("class_contribution", "trajectory")
def combined(**arrays) -> np.ndarray:
    """``robust_z(class_harm) + robust_z(trajectory_loss) + robust_z(trajectory_margin)``.

    How the sample moved the model (the harm it did, through the whole
    trajectory, to the validation class it hurts most) and how the model
    treated the sample along the way (its training loss and margin over the
    run), each put on a common scale by :func:`robust_z` over the scored
    samples (those with every part) and added with equal weight. The default
    of ``scoring``.
    """
    parts = [score(**arrays) for score in (class_harm, trajectory_loss, trajectory_margin)]
    scored = np.logical_and.reduce([np.isfinite(p) for p in parts])
    return sum(robust_z(np.where(scored, p, np.nan)) for p in parts)


def memorisation(*, trajectory_proba: np.ndarray, labels: np.ndarray, train_accuracy: float, **_) -> float:
    """How far the model memorised its labels, in [0, 1], from the run's own record.

    Of the samples that the run predicted as another class on average (their
    share is ``f``), the share that the model fits by the last epoch, if every
    other sample stays fitted: ``(train_accuracy - (1 - f)) / f``, clipped to
    [0, 1]; 0 when ``f`` is 0. Near 0 when the model kept predicting what the run
    predicted (it did not learn the disputed labels), near 1 when it ended up
    fitting them all.
    """
    P = np.asarray(trajectory_proba, dtype=np.float64)
    disputed = float(np.mean(np.argmax(P, axis=1) != np.asarray(labels)))
    if disputed == 0:
        return 0.0
    return float(np.clip((float(train_accuracy) - (1.0 - disputed)) / disputed, 0.0, 1.0))


@needs("class_contribution", "trajectory")
def memorisation_weighted(**arrays) -> np.ndarray:
    """``(1 - m) (z(trajectory_margin) + z(aum)) + 2 m z(class_harm)``, with ``m`` = :func:`memorisation`.

    The training run's record of a sample (its softmax and logit margins
    averaged over the run) finds the flips that the model did not learn; once
    the model memorises its labels that record fades, and the harm a flip did
    to its true class (the hypergradient) carries the evidence. So the two
    are mixed by how far the model memorised: on a run that did not memorise,
    this is the margins alone; on one that fitted every label, the harm alone.
    Each part is on a common scale (:func:`robust_z` over the scored samples,
    those with every part); the harm counts twice so that both sides weigh
    the same.
    """
    m = memorisation(**arrays)
    record = [trajectory_margin(**arrays), aum(**arrays)]
    harm = class_harm(**arrays)
    scored = np.logical_and.reduce([np.isfinite(p) for p in [*record, harm]])
    z = [robust_z(np.where(scored, p, np.nan)) for p in [*record, harm]]
    return (1.0 - m) * (z[0] + z[1]) + 2.0 * m * z[2]


SCORES = {
    "contribution": contribution,
    "class_min": class_min,
    "class_harm": class_harm,
    "trajectory_loss": trajectory_loss,
    "trajectory_margin": trajectory_margin,
    "aum": aum,
    "combined": combined,
    "memorisation_weighted": memorisation_weighted,
}
