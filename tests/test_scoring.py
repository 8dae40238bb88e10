"""Label-quality scores and flag decisions against plain loops and scipy."""

import numpy as np
import pytest
from scipy.stats import median_abs_deviation

from hydraclean import scoring
from hydraclean.cleaning import (
    estimate_issue_count,
    flag_lowest,
    flag_sign_clusters,
    harms_more_than_class_helps,
    memorised_flips,
    predicted_other_class,
    validation_fell,
)
from hydraclean.contribution import suggest_labels


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    n, k = 40, 4
    proba = rng.dirichlet(np.ones(k), size=n)
    return {
        "contribution": rng.normal(size=n),
        "class_contribution": rng.normal(size=(n, k)) * np.array([1.0, 3.0, 0.5, 2.0]),
        "labels": np.arange(n) % k,
        "trajectory_loss": rng.exponential(size=n),
        "trajectory_proba": proba,
        "trajectory_logit_margin": rng.normal(size=n),
        "train_accuracy": 0.9,
    }


def test_robust_z_matches_scipy_and_handles_nan_and_constants():
    x = np.random.default_rng(1).normal(size=101) ** 3
    expected = (x - np.median(x)) / median_abs_deviation(x, scale="normal")
    np.testing.assert_allclose(scoring.robust_z(x), expected, rtol=1e-12)
    with_nan = np.r_[x, np.nan]
    np.testing.assert_allclose(scoring.robust_z(with_nan)[:-1], expected, rtol=1e-12)
    assert np.isnan(scoring.robust_z(with_nan)[-1])
    spiky = np.r_[np.zeros(10), 5.0]  # MAD 0: the standard deviation scales it
    np.testing.assert_allclose(scoring.robust_z(spiky), spiky / spiky.std())
    assert np.array_equal(scoring.robust_z(np.ones(3)), np.zeros(3))


def test_class_scores_against_loops(arrays):
    R, y = arrays["class_contribution"], arrays["labels"]
    spread = [np.sqrt(np.mean((R[:, c] - R[:, c].mean()) ** 2)) for c in range(R.shape[1])]
    for i in range(R.shape[0]):
        assert scoring.class_min(**arrays)[i] == min(R[i])
        assert scoring.class_harm(**arrays)[i] == pytest.approx(min(R[i, c] / spread[c] for c in range(R.shape[1])))
    P = arrays["trajectory_proba"]
    for i in range(P.shape[0]):
        best_other = max(P[i, c] for c in range(P.shape[1]) if c != y[i])
        assert scoring.trajectory_margin(**arrays)[i] == pytest.approx(P[i, y[i]] - best_other)
    np.testing.assert_array_equal(scoring.trajectory_loss(**arrays), -arrays["trajectory_loss"])
    np.testing.assert_array_equal(scoring.contribution(**arrays), arrays["contribution"])
    expected = sum(scoring.robust_z(f(**arrays)) for f in
                   (scoring.class_harm, scoring.trajectory_loss, scoring.trajectory_margin))
    np.testing.assert_allclose(scoring.combined(**arrays), expected, rtol=1e-12)


def test_unscored_rows_give_nan_and_classes_without_validation_samples_are_skipped(arrays):
    arrays["contribution"][3] = np.nan
    arrays["class_contribution"][3] = np.nan
    arrays["class_contribution"][:, 2] = np.nan  # a class with no validation sample
    for name, score in scoring.SCORES.items():
        out = score(**arrays)
        if score.needs == {"trajectory"}:  # the training run's record: every row has one
            assert np.isfinite(out).all(), name
        else:
            assert np.isnan(out[3]) and np.isfinite(np.delete(out, 3)).all(), name
    R = arrays["class_contribution"]
    assert scoring.class_min(**arrays)[0] == np.nanmin(R[0])
    # the other rows' z-scores do not see the unscored row
    keep = np.delete(np.arange(40), 3)
    sub = {k: v[keep] if np.ndim(v) else v for k, v in arrays.items()}
    np.testing.assert_allclose(scoring.combined(**arrays)[keep], scoring.combined(**sub), rtol=1e-12)


def test_harms_more_than_class_helps_against_a_loop(arrays):
    R, y = arrays["class_contribution"], arrays["labels"]
    R[5] = np.nan
    flags = harms_more_than_class_helps(R, y)
    scored = ~np.isnan(R).all(1)
    for i in range(len(y)):
        if not scored[i]:
            assert not flags[i]
            continue
        b = int(np.argmin(R[i]))
        typical = np.median([R[j, b] for j in range(len(y)) if y[j] == b and scored[j]])
        assert flags[i] == (-R[i, b] > typical)


def test_auto_count_adds_the_harm_rule_as_far_as_the_run_memorised(arrays):
    R, P, y = arrays["class_contribution"], arrays["trajectory_proba"], arrays["labels"]
    other = predicted_other_class(P, y)
    assert np.array_equal(other, np.array([np.argmax(P[i]) != y[i] for i in range(len(y))]))
    harm_only = harms_more_than_class_helps(R, y) & ~other
    assert 0 < harm_only.sum() and 0 < other.sum()
    assert estimate_issue_count(R, P, y) == other.sum()  # memorised 0: the prediction rule alone
    assert estimate_issue_count(R, P, y, memorised=1.0) == (other | harm_only).sum()
    assert estimate_issue_count(R, P, y, memorised=0.5) == other.sum() + round(0.5 * harm_only.sum())
    R[other.argmax()] = np.nan  # an unscored sample is never counted
    assert estimate_issue_count(R, P, y, memorised=1.0) == (other | harm_only).sum() - 1
    with pytest.raises(ValueError, match="memorised must be in"):
        estimate_issue_count(R, P, y, memorised=1.5)


def test_validation_fell_against_binomial_standard_errors():
    # best 0.9 on 400 rows: one standard error is 0.015
    assert validation_fell([0.5, 0.9, 0.869], 400)  # 2.07 SE below the best
    assert not validation_fell([0.5, 0.9, 0.871], 400)  # 1.93 SE
    assert not validation_fell([0.5, 0.7, 0.9], 400)  # the last epoch is the best
    assert not validation_fell([], 400)
    assert validation_fell([1.0, 0.99], 400)  # no spread at 1.0: any fall counts


def test_memorised_flips_is_memorisation_only_where_validation_fell(arrays):
    P, y = arrays["trajectory_proba"], arrays["labels"]
    m = scoring.memorisation(trajectory_proba=P, labels=y, train_accuracy=1.0)
    assert m > 0
    assert memorised_flips(P, y, 1.0, [0.6, 0.95, 0.80], 200) == m
    assert memorised_flips(P, y, 1.0, [0.6, 0.95, 0.95], 200) == 0.0


def test_flag_lowest_by_count_or_fraction():
    s = np.array([3.0, np.nan, 1.0, 2.0, 1.0, 5.0])
    assert np.array_equal(flag_lowest(s, count=2), [False, False, True, False, True, False])
    assert np.array_equal(flag_lowest(s, fraction=0.4), flag_lowest(s, count=2))
    assert flag_lowest(s, count=99).sum() == 5  # never the unscored one


def test_sign_clusters_flag_the_group_with_the_lower_score_in_each_class():
    # class 0: rows 0-3 help every feature, rows 4-5 hurt every feature; class 1 likewise, reversed
    M = np.array([[1.0] * 6] * 4 + [[-1.0] * 6] * 2 + [[-1.0] * 6] * 4 + [[1.0] * 6] * 2)
    labels = np.repeat([0, 1], 6)
    scores = np.r_[np.full(4, 1.0), np.full(2, -1.0), np.full(4, 0.5), np.full(2, -2.0)]
    flags = flag_sign_clusters(M, labels, scores)
    assert np.array_equal(flags, np.r_[[False] * 4, [True] * 2, [False] * 4, [True] * 2])
    # with the scores reversed, the other group of each class is flagged
    assert np.array_equal(flag_sign_clusters(M, labels, -scores), ~flags)


def test_suggested_labels_in_the_users_label_space():
    R = np.array([[0.1, -0.5, 0.2], [np.nan, np.nan, np.nan], [-0.3, np.nan, 0.1]])
    classes = np.array(["cat", "dog", "eel"])
    out = suggest_labels(R, classes, np.array(["cat", "eel", "eel"]))
    assert out.tolist() == ["dog", "eel", "cat"]  # the unscored row keeps its given label


def test_sign_clusters_split_each_class_as_scikit_learns_ward_does():
    from sklearn.cluster import AgglomerativeClustering

    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1, 2], [60, 45, 30])
    # two overlapping sign patterns per class, flipped at random: ties and near-ties in the distances
    base = rng.choice([-1.0, 1.0], size=(6, 40))
    M = base[2 * labels + (rng.random(labels.size) < 0.3)] * np.where(rng.random((labels.size, 40)) < 0.2, -1, 1)
    scores = rng.normal(size=labels.size)
    flags = flag_sign_clusters(M, labels, scores)
    for c in range(3):
        members = np.flatnonzero(labels == c)
        groups = AgglomerativeClustering(n_clusters=2, linkage="ward").fit_predict(M[members])
        low = np.argmin([scores[members[groups == g]].mean() for g in (0, 1)])
        assert np.array_equal(flags[members], groups == low)


def test_each_score_names_what_it_reads():
    """A fit computes what the score needs: no hypergradient for the training run's own record."""
    assert scoring.trajectory_loss.needs == scoring.trajectory_margin.needs == {"trajectory"}
    assert scoring.contribution.needs == {"contribution"}
    assert scoring.class_harm.needs == scoring.class_min.needs == {"class_contribution"}
    assert scoring.combined.needs == {"class_contribution", "trajectory"}
    assert all(hasattr(score, "needs") for score in scoring.SCORES.values())


def test_flag_lowest_breaks_many_ties_by_position():
    """A long array with large blocks of ties: an unstable sort (numpy's default beyond a few entries) would
    pick tied rows out of order."""
    rng = np.random.RandomState(0)
    scores = rng.randint(0, 3, size=20_000).astype(float)  # three values, thousands of ties each
    scores[rng.rand(20_000) < 0.01] = np.nan
    zeros, ones = np.flatnonzero(scores == 0), np.flatnonzero(scores == 1)
    count = zeros.size + 1_000  # every 0, then the first thousand of the thousands of tied 1s
    expected = np.zeros(scores.size, bool)
    expected[zeros] = True
    expected[ones[:1_000]] = True
    assert np.array_equal(flag_lowest(scores, count=count), expected)


def test_sign_clusters_leave_unscored_rows_out_of_the_clustering():
    """Rows without a score (NaN) are never flagged and do not move the split of the scored rows."""
    rng = np.random.RandomState(1)
    labels = np.repeat([0, 1], 30)
    C = rng.randn(60, 12) + np.where(np.arange(60) % 3 == 0, -2.0, 1.0)[:, None]
    scores = C.mean(1)
    unscored = np.zeros(60, bool)
    unscored[::4] = True
    scores_nan, C_nan = scores.copy(), C.copy()
    scores_nan[unscored] = np.nan
    C_nan[unscored] = np.where(rng.rand(unscored.sum(), 12) < 0.5, -5.0, 5.0)  # signs that would pull a split
    flagged = flag_sign_clusters(C_nan, labels, scores_nan)
    assert not flagged[unscored].any()
    alone = flag_sign_clusters(C[~unscored], labels[~unscored], scores[~unscored])
    assert np.array_equal(flagged[~unscored], alone)


def test_memorisation_is_the_share_of_disputed_samples_fitted_at_the_end(arrays):
    P, y = arrays["trajectory_proba"], arrays["labels"]
    disputed = np.mean(P.argmax(1) != y)  # the run predicted another class for these
    assert 0 < disputed < 1
    m = lambda acc: scoring.memorisation(trajectory_proba=P, labels=y, train_accuracy=acc)  # noqa: E731
    assert m(1 - disputed) == 0.0  # it fits exactly those the run agreed with
    assert m(1.0) == 1.0 and m(0.1) == 0.0  # clipped
    np.testing.assert_allclose(m(1 - disputed / 2), 0.5)
    agreed = np.eye(P.shape[1])[y]  # the run never disputed a label: nothing memorised
    assert scoring.memorisation(trajectory_proba=agreed, labels=y, train_accuracy=1.0) == 0.0


@pytest.mark.parametrize("train_accuracy", [0.0, 0.95, 1.0])
def test_memorisation_weighted_mixes_the_margins_and_the_harm(arrays, train_accuracy):
    arrays["train_accuracy"] = train_accuracy
    m = scoring.memorisation(**arrays)
    z = scoring.robust_z
    margins = z(scoring.trajectory_margin(**arrays)) + z(arrays["trajectory_logit_margin"])
    harm = z(np.min(arrays["class_contribution"] / arrays["class_contribution"].std(0), axis=1))
    np.testing.assert_allclose(scoring.memorisation_weighted(**arrays), (1 - m) * margins + 2 * m * harm,
                               rtol=1e-12, atol=1e-12)
    if train_accuracy == 0.0:
        assert m == 0.0
    if train_accuracy == 1.0:
        assert m == 1.0
