"""Inter-class contribution, ranking and explain()."""

import numpy as np
import pytest

from hydraclean import HydraLabelCleaner
from hydraclean.contribution import inter_class_contribution, top_contributors
from hydraclean.datasets import load_digits_images
from hydraclean.models import MLP


def test_inter_class_contribution_equals_double_loop():
    rng = np.random.RandomState(0)
    C = rng.normal(size=(30, 12))
    y_tr, y_val = rng.randint(0, 3, 30), rng.randint(0, 3, 12)
    A = inter_class_contribution(C, y_tr, y_val, normalize=False)
    for a in range(3):
        for b in range(3):
            vals = [C[i, j] for i in range(30) for j in range(12) if y_tr[i] == a and y_val[j] == b]
            assert A[a, b] == pytest.approx(np.mean(vals))
    N = inter_class_contribution(C, y_tr, y_val)
    for a in range(3):
        for b in range(3):
            assert N[a, b] == pytest.approx(A[a, b] / np.sqrt(abs(A[a].sum() * A[:, b].sum())))


def test_inter_class_contribution_ignores_unscored_rows_and_handles_missing_classes():
    C = np.array([[1.0, 2.0], [np.nan, np.nan], [3.0, 4.0]])
    A = inter_class_contribution(C, np.array([0, 0, 1]), np.array([0, 0]), classes=np.array([0, 1, 2]),
                                 normalize=False)
    np.testing.assert_allclose(A, [[1.5, 0, 0], [3.5, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="shape"):
        inter_class_contribution(C, np.array([0, 1]), np.array([0, 0]))


def test_top_contributors_brute_force():
    rng = np.random.RandomState(1)
    C = rng.normal(size=(20, 4))
    C[5] = np.nan
    ex = top_contributors(C, 3)
    for j in range(4):
        col = np.where(np.isnan(C[:, j]), np.nan, C[:, j])
        ranked = [i for i in np.argsort(-np.nan_to_num(col, nan=-np.inf))][:3]
        assert list(ex.helpful[j]) == ranked
        assert list(ex.harmful[j]) == [i for i in np.argsort(np.nan_to_num(col, nan=np.inf))][:3]
        np.testing.assert_array_equal(ex.helpful_scores[j], C[ex.helpful[j], j])
    assert 5 not in ex.helpful and 5 not in ex.harmful


@pytest.fixture(scope="module")
def fitted():
    X, y = load_digits_images()
    X = X.reshape(len(X), -1)[:300]
    y = y[:300]
    Xv, yv = load_digits_images()
    Xv, yv = Xv.reshape(len(Xv), -1)[1000:1040], yv[1000:1040]
    c = HydraLabelCleaner(lambda n_features, n_classes: MLP(n_features, n_classes, hidden=(16,)).double(), strategy="cluster",
                          n_val_features=1000, max_epochs=3, batch_size=32, lr=0.05, random_state=0)
    return c.fit(X, y, X_val=Xv, y_val=yv), X, y, Xv, yv


def test_explain_reproduces_the_fits_contribution_matrix_without_retraining(fitted):
    c, X, y, Xv, yv = fitted
    ex = c.explain(Xv, yv, k=5)
    np.testing.assert_allclose(ex.contribution_matrix, c.contribution_matrix_, rtol=1e-9, atol=1e-15)
    assert ex.helpful.shape == ex.harmful.shape == (len(yv), 5)
    assert (ex.helpful_scores[:, 0] >= ex.helpful_scores[:, -1]).all()
    assert (ex.harmful_scores[:, 0] <= ex.harmful_scores[:, -1]).all()


def test_explain_subset_and_bad_input(fitted):
    c, X, y, Xv, yv = fitted
    ex = c.explain(Xv[:2], yv[:2], k=3)
    np.testing.assert_allclose(ex.contribution_matrix, c.contribution_matrix_[:, :2], rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError, match="trailing shape"):
        c.explain(Xv[:, :5], yv)
    with pytest.raises(ValueError, match="classes_"):
        c.explain(Xv[:2], np.array([11, 12]))


def test_class_to_class_map_from_class_contributions_equals_the_matrix_map(fitted):
    c, X, y, Xv, yv = fitted
    from hydraclean.contribution import class_to_class_contribution

    for normalize in (False, True):
        expected = inter_class_contribution(c.contribution_matrix_, y, yv[c.val_feature_indices_], classes=c.classes_,
                                            normalize=normalize)
        got = class_to_class_contribution(c.class_contribution_, y, c.classes_, normalize=normalize)
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-15)
    missing = c.class_contribution_.copy()
    missing[:, 3] = np.nan  # a class without validation samples
    A = class_to_class_contribution(missing, y, c.classes_)
    assert np.isnan(A[:, 3]).all() and np.isfinite(np.delete(A, 3, axis=1)).all()


def _digits_flat(n_train=120, n_val=30):
    X, y = load_digits_images()
    X = X.reshape(len(X), -1)
    return X[:n_train], y[:n_train], X[1000 : 1000 + n_val], y[1000 : 1000 + n_val]


def _tiny(n_features, n_classes):
    return MLP(n_features, n_classes, hidden=(8,)).double()


FAST = dict(max_epochs=2, batch_size=32, lr=0.05, random_state=0)


@pytest.mark.parametrize("encode", [lambda y: 2 * y + 1, lambda y: np.array([f"class {v}" for v in y])],
                         ids=["2y+1", "strings"])
def test_explain_with_labels_that_are_not_their_codes(encode):
    X, y, Xv, yv = _digits_flat()
    c = HydraLabelCleaner(_tiny, strategy="cluster", n_val_features=1000, **FAST).fit(X, encode(y), X_val=Xv,
                                                                                       y_val=encode(yv))
    assert list(c.classes_) == sorted(set(encode(y))) and set(c.suggested_label_) <= set(c.classes_)
    ex = c.explain(Xv, encode(yv), k=3)
    np.testing.assert_allclose(ex.contribution_matrix, c.contribution_matrix_, rtol=1e-9, atol=1e-15)
    plain = HydraLabelCleaner(_tiny, strategy="cluster", n_val_features=1000, **FAST).fit(X, y, X_val=Xv, y_val=yv)
    np.testing.assert_allclose(c.contribution_matrix_, plain.contribution_matrix_, rtol=1e-12, atol=1e-18)


def test_explain_after_a_validation_mask_fit():
    X, y, Xv, yv = _digits_flat()
    X_all, y_all = np.concatenate([Xv, X]), np.concatenate([yv, y])
    mask = np.r_[np.ones(len(yv), bool), np.zeros(len(y), bool)]  # validation rows first: positions shift
    c = HydraLabelCleaner(_tiny, strategy="cluster", n_val_features=1000, **FAST).fit(X_all, y_all,
                                                                                       validation_mask=mask)
    ex = c.explain(Xv, yv, k=5)
    assert np.isnan(ex.contribution_matrix[mask]).all()
    assert not np.isin(ex.helpful, np.flatnonzero(mask)).any() and not np.isin(ex.harmful, np.flatnonzero(mask)).any()
    np.testing.assert_allclose(ex.contribution_matrix[~mask], c.contribution_matrix_[~mask], rtol=1e-9, atol=1e-15)


def test_exact_with_validation_rows_inside_X():
    """Reverse-mode exact contributions of every training row, laid out over X: NaN for validation rows,
    the same numbers as when the training rows come alone with X_val."""
    X, y, Xv, yv = _digits_flat(n_train=60, n_val=20)
    X_all, y_all = np.concatenate([Xv[:10], X[:30], Xv[10:], X[30:]]), np.concatenate([yv[:10], y[:30], yv[10:], y[30:]])
    mask = np.zeros(len(y_all), bool)
    mask[:10] = mask[40:50] = True  # validation rows before and between training rows
    inside = HydraLabelCleaner(_tiny, hessian="exact", **FAST).fit(X_all, y_all, validation_mask=mask)
    apart = HydraLabelCleaner(_tiny, hessian="exact", **FAST).fit(X_all[~mask], y_all[~mask], X_val=X_all[mask],
                                                                  y_val=y_all[mask])
    assert np.isnan(inside.contribution_[mask]).all() and not inside.label_issues_[mask].any()
    np.testing.assert_allclose(inside.contribution_[~mask], apart.contribution_, rtol=1e-10)
    np.testing.assert_allclose(inside.class_contribution_[~mask], apart.class_contribution_, rtol=1e-10)
