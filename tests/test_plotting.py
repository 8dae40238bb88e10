"""Figures render to PNG with the Agg backend."""

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from hydraclean.contribution import top_contributors  # noqa: E402
from hydraclean.plotting import plot_contribution_histogram, plot_explanation, plot_inter_class  # noqa: E402


def png_size(fig, path):
    fig.savefig(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return len(data)


def test_inter_class_heatmap(tmp_path):
    fig = plot_inter_class(np.random.RandomState(0).normal(size=(4, 4)), class_names=list("abcd"), title="t")
    assert png_size(fig, tmp_path / "heat.png") > 1000
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list("abcd")


def test_explanation_images(tmp_path):
    rng = np.random.RandomState(0)
    X, y = rng.rand(20, 1, 8, 8), rng.randint(0, 3, 20)
    ex = top_contributors(rng.normal(size=(20, 2)), 4)
    fig = plot_explanation(ex, X, y, rng.rand(2, 1, 8, 8), np.array([0, 1]), index=1)
    assert len([a for a in fig.axes if a.images]) == 1 + 2 * 4
    assert png_size(fig, tmp_path / "ex.png") > 1000
    suggested = y.copy()
    shown = ex.harmful[1, 0]
    suggested[shown] = y[shown] + 5
    fig = plot_explanation(ex, X, y, rng.rand(2, 1, 8, 8), np.array([0, 1]), index=1, suggested=suggested)
    titles = [a.get_title() for a in fig.axes]
    assert sum("->" in t for t in titles) == 1 and f"label {y[shown]} -> {y[shown] + 5}" in " ".join(titles)


def test_contribution_histogram(tmp_path):
    rng = np.random.RandomState(0)
    c = np.r_[rng.normal(1, 1, 80), rng.normal(-1, 1, 20), [np.nan]]
    mask = np.r_[np.zeros(80, bool), np.ones(20, bool), [False]]
    fig = plot_contribution_histogram(c, mask)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["clean (80)", "mislabelled (20)"]
    assert png_size(fig, tmp_path / "hist.png") > 1000
