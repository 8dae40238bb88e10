"""Figures: inter-class heatmap (paper Fig. 2), helpful / harmful training images
(paper Table 2), and the distribution of contributions split by a known noise mask.

matplotlib is an optional extra (``pip install hydraclean[plot]``). Every
function returns a :class:`matplotlib.figure.Figure` and never calls ``show``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .contribution import Explanation

__all__ = ["plot_contribution_histogram", "plot_explanation", "plot_inter_class"]


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # optional extra
        raise ImportError("hydraclean.plotting needs matplotlib: pip install 'hydraclean[plot]'.") from exc
    return plt


def plot_inter_class(matrix: np.ndarray, class_names: Sequence[str] | None = None, title: str | None = None):
    """Heatmap of :func:`hydraclean.contribution.inter_class_contribution`.

    Parameters
    ----------
    matrix : ndarray of shape (n_classes, n_classes)
        Rows: training classes; columns: validation classes.
    class_names : sequence of str, optional
    title : str, optional

    Returns
    -------
    fig : matplotlib.figure.Figure
        Diverging colours centred on zero (red helps, blue hurts).
    """
    plt = _pyplot()
    matrix = np.asarray(matrix, dtype=float)
    k = matrix.shape[0]
    names = [str(c) for c in (class_names if class_names is not None else range(k))]
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * k, 0.6 + 0.5 * k), layout="constrained")
    vmax = float(np.nanmax(np.abs(matrix))) or 1.0
    im = ax.imshow(matrix, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("validation class")
    ax.set_ylabel("training class")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, label="contribution (normalised)")
    return fig


def _image(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    if x.ndim == 3 and x.shape[0] in (1, 3):
        x = x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)
    elif x.ndim == 1:
        side = int(round(np.sqrt(x.size)))
        if side * side != x.size:
            raise ValueError(f"cannot show a flat sample of {x.size} values as a square image.")
        x = x.reshape(side, side)
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def plot_explanation(
    explanation: Explanation,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    index: int = 0,
    k: int | None = None,
    suggested: np.ndarray | None = None,
):
    """A validation image beside its most helpful and most harmful training images.

    Parameters
    ----------
    explanation : Explanation
        From :meth:`HydraLabelCleaner.explain`.
    X_train, y_train : arrays
        The data given to ``fit`` (the explanation's indices point into them).
    X_val, y_val : arrays
        The explained samples.
    index : int, default=0
        Which explained sample to show.
    k : int, optional
        Images per row (default: all in the explanation).
    suggested : ndarray of shape (n_samples,), optional
        ``suggested_label_`` of the fitted cleaner: a training image whose
        suggested label differs from its label is titled ``label a -> b``.

    Returns
    -------
    fig : matplotlib.figure.Figure
        Row 1: most helpful, row 2: most harmful, each titled with label and C(i, j).
    """
    plt = _pyplot()
    k = explanation.helpful.shape[1] if k is None else min(k, explanation.helpful.shape[1])
    fig, axes = plt.subplots(2, k + 1, figsize=(1.4 * (k + 1), 3.2), layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].imshow(_image(X_val[index]), cmap="gray")
    axes[0, 0].set_title(f"validation\nlabel {y_val[index]}", fontsize=8)
    for row, (idx, scores, name) in enumerate(
        [(explanation.helpful, explanation.helpful_scores, "helpful"),
         (explanation.harmful, explanation.harmful_scores, "harmful")]
    ):
        axes[row, 0].text(0.5, 0.5 if row else 0.0, "" if not row else "most\nharmful", ha="center", va="center",
                          fontsize=9, transform=axes[row, 0].transAxes)
        for c in range(k):
            i = idx[index, c]
            axes[row, c + 1].imshow(_image(X_train[i]), cmap="gray")
            label = f"label {y_train[i]}"
            if suggested is not None and suggested[i] != y_train[i]:
                label += f" -> {suggested[i]}"
            axes[row, c + 1].set_title(f"{name} #{c + 1}\n{label}\n{scores[index, c]:+.2e}", fontsize=7)
    return fig


def plot_contribution_histogram(contribution: np.ndarray, noise_mask: np.ndarray, bins: int = 50):
    """Histogram of ``C(i)`` for clean and for mislabelled samples.

    Parameters
    ----------
    contribution : ndarray of shape (n_samples,)
        NaN entries (unscored rows) are left out.
    noise_mask : ndarray of shape (n_samples,), bool
        True where the label is known to be wrong.
    bins : int, default=50

    Returns
    -------
    fig : matplotlib.figure.Figure
    """
    plt = _pyplot()
    contribution = np.asarray(contribution, dtype=float)
    noise_mask = np.asarray(noise_mask, dtype=bool)
    keep = ~np.isnan(contribution)
    c, m = contribution[keep], noise_mask[keep]
    edges = np.histogram_bin_edges(c, bins=bins)
    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    ax.hist(c[~m], bins=edges, alpha=0.6, label=f"clean ({(~m).sum()})", color="tab:blue")
    ax.hist(c[m], bins=edges, alpha=0.6, label=f"mislabelled ({m.sum()})", color="tab:red")
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_xlabel("contribution C(i) (positive helps)")
    ax.set_ylabel("training samples")
    ax.legend()
    return fig
