"""Every label-quality score and flag-count rule tried for ``HydraLabelCleaner``'s defaults.

Each variant is a function of the arrays of one benchmark setting (one run of
``benchmarks/suite.py``): ``C(i)``, ``C(i, c)``, ``C(i, j)`` over validation
features, the trajectory trace (each sample's mean training loss and softmax),
the final training loss and self-influence along the run. The suite evaluates
all of them on every setting and stores the results in its JSON; this script
turns those into the ablation table of docs/benchmarks.md:

    python benchmarks/score_ablation.py --dir docs/_generated --out docs/_generated/score_ablation.md

Variants in ``hydraclean.scoring.SCORES`` ship with the package; the rest
were tried and did not earn a place. The default is the score with the best
mean AUROC over the selection settings together among those that use the
hypergradient (``trajectory_margin``, which does not, is a few thousandths
higher on average and ships as a named score); the count rule is the one with
the best mean F1. The held-out tabular settings did not take part in the choice.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import f1_score
from sklearn.mixture import GaussianMixture

from hydraclean.cleaning import (
    estimate_issue_count,
    flag_lowest,
    harms_more_than_class_helps,
    memorised_flips,
    predicted_other_class,
    validation_fell,
)
from hydraclean.scoring import SCORES, class_harm, memorisation, robust_z

DEFAULT_SCORE = "memorisation_weighted"
DEFAULT_COUNT = "P + m x (A not P) where the validation accuracy fell, lowest scores"


def _own(R, y):
    return R[np.arange(len(y)), y]


def _others(R, y):
    out = R.astype(np.float64).copy()
    out[np.arange(len(y)), y] = np.nan
    return out


def _margin(a):
    return SCORES["trajectory_margin"](**a)


def _by_label_z(R, y):
    Z = np.full_like(R, np.nan, dtype=np.float64)
    for c in np.unique(y):
        rows = y == c
        med = np.median(R[rows], 0)
        Z[rows] = (R[rows] - med) / (1.4826 * np.median(np.abs(R[rows] - med), 0))
    return Z


def _topk(a, k):
    M = a["contribution_matrix"]
    idx = np.argpartition(-np.abs(M), k, axis=1)[:, :k]
    return M, idx


def _knn_helped(a, k):
    M, idx = _topk(a, k)
    return (np.take_along_axis(M, idx, 1) > 0).mean(1)


def _knn_label(a, k):
    _, idx = _topk(a, k)
    return (a["feature_labels"][idx] == a["labels"][:, None]).mean(1)


def _knn_mix(a, k):
    M, idx = _topk(a, k)
    v = np.take_along_axis(M, idx, 1)
    same = a["feature_labels"][idx] == a["labels"][:, None]
    return (np.sign(v) * np.where(same, 1, -1)).mean(1) + (v > 0).mean(1)


def _library(name):
    def score(a):
        if "trajectory_logit_margin" not in a or "train_accuracy" not in a:  # saved by an earlier suite run
            return np.full(len(a["labels"]), np.nan)
        return SCORES[name](**a)

    return score


def _loss(a):
    return SCORES["trajectory_loss"](**a)


def _aum(a):
    return SCORES["aum"](**a)


def _m(a):
    return memorisation(**a)


R_ = "class_contribution"
VARIANTS = {
    # shipped in hydraclean.scoring
    **{name: _library(name) for name in SCORES},
    # class-resolved forms
    "own class C(i, y_i)": lambda a: _own(a[R_], a["labels"]),
    "own class + worst other": lambda a: _own(a[R_], a["labels"]) + np.nanmin(_others(a[R_], a["labels"]), 1),
    "worst class - own class": lambda a: np.min(a[R_], 1) - _own(a[R_], a["labels"]),
    "own class / row norm": lambda a: _own(a[R_], a["labels"]) / np.linalg.norm(a[R_], axis=1),
    "class_min / row norm": lambda a: np.min(a[R_], 1) / np.linalg.norm(a[R_], axis=1),
    "C(i) / row norm": lambda a: a["contribution"] / np.linalg.norm(a[R_], axis=1),
    "minus row norm": lambda a: -np.linalg.norm(a[R_], axis=1),
    "class_min, z within observed label": lambda a: np.min(_by_label_z(a[R_], a["labels"]), 1),
    "own class, z within observed label": lambda a: _own(_by_label_z(a[R_], a["labels"]), a["labels"]),
    "mean over classes of column z": lambda a: ((a[R_] - a[R_].mean(0)) / a[R_].std(0)).mean(1),
    "min of column (x - median) / MAD": lambda a: (
        (a[R_] - np.median(a[R_], 0)) / np.median(np.abs(a[R_] - np.median(a[R_], 0)), 0)).min(1),
    "soft-min over other classes, column-scaled": lambda a: -np.log(np.nansum(
        np.exp(-_others(a[R_] / a[R_].std(0), a["labels"])), 1)),
    "sum of negative parts": lambda a: np.minimum(a[R_], 0).sum(1),
    "sum of negative parts, column-scaled": lambda a: np.minimum(a[R_] / a[R_].std(0), 0).sum(1),
    # per-validation-sample C(i, j) (the cluster strategy's features)
    "sign vote (fraction of features helped)": lambda a: -(a["contribution_matrix"] < 0).mean(1),
    "own-class sign vote": lambda a: (((a["contribution_matrix"] > 0) & (a["feature_labels"][None] == a["labels"][:, None]))
                                      .sum(1) / np.maximum((a["feature_labels"][None] == a["labels"][:, None]).sum(1), 1)),
    "2% quantile of C(i, j)": lambda a: np.quantile(a["contribution_matrix"], 0.02, axis=1),
    "min over classes of the 5 lowest C(i, j)": lambda a: np.stack(
        [np.sort(a["contribution_matrix"][:, a["feature_labels"] == c], 1)[:, :5].mean(1)
         for c in np.unique(a["feature_labels"])], 1).min(1),
    **{f"kNN by |C(i, j)|, helped share, k={k}": (lambda a, k=k: _knn_helped(a, k)) for k in (5, 10, 20, 40)},
    **{f"kNN by |C(i, j)|, label agreement, k={k}": (lambda a, k=k: _knn_label(a, k)) for k in (5, 10, 20, 40)},
    **{f"kNN by |C(i, j)|, mixed, k={k}": (lambda a, k=k: _knn_mix(a, k)) for k in (5, 10, 20, 40)},
    # along the trajectory, no validation set
    "self-influence along the run": lambda a: a["self_influence"],
    "c_t-weighted trajectory loss": lambda a: a["weighted_trajectory_loss"],
    "trajectory mean probability of the label": lambda a: _own(a["trajectory_proba"], a["labels"]),
    "final training loss": lambda a: -a["final_loss"],
    # combinations
    "rank(class_harm) + rank(trajectory_loss)": lambda a: rankdata(class_harm(**a)) + rankdata(_loss(a)),
    "rank(class_min) + rank(trajectory_loss)": lambda a: rankdata(np.min(a[R_], 1)) + rankdata(_loss(a)),
    "rank(class_harm) + rank(final loss)": lambda a: rankdata(class_harm(**a)) + rankdata(-a["final_loss"]),
    "rank(contribution) + rank(trajectory_loss)": lambda a: rankdata(a["contribution"]) + rankdata(_loss(a)),
    "z(class_harm) + z(trajectory probability)": lambda a: (
        robust_z(class_harm(**a)) + robust_z(_own(a["trajectory_proba"], a["labels"]))),
    "z(class_harm) + z(trajectory margin)": lambda a: robust_z(class_harm(**a)) + robust_z(_margin(a)),
    "z(class_harm) + z(trajectory_loss)": lambda a: robust_z(class_harm(**a)) + robust_z(_loss(a)),
    "z(class_harm) + z(aum)": lambda a: robust_z(class_harm(**a)) + robust_z(_aum(a)),
    "z(class_harm) + z(trajectory_loss) + z(aum)": lambda a: (
        robust_z(class_harm(**a)) + robust_z(_loss(a)) + robust_z(_aum(a))),
    "z(class_harm) + z(trajectory_loss) + z(trajectory margin) + z(aum)": lambda a: (
        robust_z(class_harm(**a)) + robust_z(_loss(a)) + robust_z(_margin(a)) + robust_z(_aum(a))),
    "0.5 z(class_harm) + z(aum)": lambda a: 0.5 * robust_z(class_harm(**a)) + robust_z(_aum(a)),
    "rank(class_harm) + rank(aum)": lambda a: rankdata(class_harm(**a)) + rankdata(_aum(a)),
    "min(z(class_harm), z(aum))": lambda a: np.minimum(robust_z(class_harm(**a)), robust_z(_aum(a))),
    "z(trajectory_loss) + z(trajectory margin) + z(aum) (no hypergradient)": lambda a: (
        robust_z(_loss(a)) + robust_z(_margin(a)) + robust_z(_aum(a))),
    # weighted by how far the model memorised (hydraclean.scoring.memorisation, m)
    "z(trajectory margin) + m z(class_harm)": lambda a: robust_z(_margin(a)) + _m(a) * robust_z(class_harm(**a)),
    "z(aum) + m z(class_harm)": lambda a: robust_z(_aum(a)) + _m(a) * robust_z(class_harm(**a)),
    "z(trajectory margin) + z(aum) + 2m z(class_harm)": lambda a: (
        robust_z(_margin(a)) + robust_z(_aum(a)) + 2 * _m(a) * robust_z(class_harm(**a))),
    "z(loss) + z(margin) + z(aum) + 3m z(class_harm)": lambda a: (
        robust_z(_loss(a)) + robust_z(_margin(a)) + robust_z(_aum(a)) + 3 * _m(a) * robust_z(class_harm(**a))),
    "m z(class_harm) + z(trajectory_loss) + z(trajectory margin)": lambda a: (
        _m(a) * robust_z(class_harm(**a)) + robust_z(_loss(a)) + robust_z(_margin(a))),
}


def _gmm(a, features):
    score = SCORES[DEFAULT_SCORE](**a)
    lab = GaussianMixture(2, n_init=3, random_state=0).fit(features).predict(features)
    low = np.argmin([score[lab == k].mean() for k in (0, 1)])
    return lab == low


def _a(a, factor=1.0):
    R, y = a[R_], a["labels"]
    if factor == 1.0:
        return harms_more_than_class_helps(R, y)
    worst = R.argmin(1)
    help_ = np.array([np.median(R[y == c, c]) if (y == c).any() else np.nan for c in range(R.shape[1])])
    return -R[np.arange(len(y)), worst] > factor * help_[worst]


def _l(a):
    return a["trajectory_loss"] > np.log(a[R_].shape[1])


def _p(a):
    return predicted_other_class(a["trajectory_proba"], a["labels"])


def _count(a, flags):
    return _lowest(a, flags.sum())


def _cl(a, method="off_diagonal_calibrated"):
    """Confident learning's count (cleanlab) from the trajectory's in-sample softmax, not out-of-sample ones."""
    from cleanlab.count import num_label_issues

    P = a["trajectory_proba"] / a["trajectory_proba"].sum(1, keepdims=True)
    return int(num_label_issues(a["labels"], P, estimation_method=method))


def _lowest(a, count):
    return flag_lowest(SCORES[DEFAULT_SCORE](**a), count=int(round(count)))


def _p_beyond_validation(a, epoch="best"):
    """How many more samples P flags than clean data would: P's rate less the validation error ``q`` (the
    trusted rows' error after the best or the last epoch, or averaged over the epochs), over ``1 - q``, times N."""
    va = np.asarray(a["valid_accuracy"])
    q = 1.0 - {"best": va.max(), "last": va[-1], "mean": va.mean()}[epoch]
    return max(_p(a).mean() - q, 0.0) / (1.0 - q) * len(a["labels"])


def _label_peers(a):
    """Per observed label y and class c: the median and 1.4826 MAD of C(., c) over the samples labelled y."""
    R, y = a[R_], a["labels"]
    k = R.shape[1]
    med, mad = np.zeros((k, k)), np.ones((k, k))
    for c in np.unique(y):
        med[c] = np.median(R[y == c], 0)
        mad[c] = 1.4826 * np.median(np.abs(R[y == c] - med[c]), 0)
    return med, mad


def _beyond_peers(a, factor=1.0):
    """Harm to some other class beyond what the samples with the same label do to it, above ``factor`` times
    that class's typical help (A with the label's shared push on the logits taken out)."""
    R, y = a[R_], a["labels"]
    med, _ = _label_peers(a)
    excess = med[y] - R
    excess[np.arange(len(y)), y] = -np.inf
    return (excess - factor * np.diag(med)[None, :]).max(1) > 0


def _peer_z(a, t):
    """Some other class's C(i, c) more than ``t`` robust deviations below that of the samples with i's label."""
    R, y = a[R_], a["labels"]
    med, mad = _label_peers(a)
    Z = (R - med[y]) / mad[y]
    Z[np.arange(len(y)), y] = np.inf
    return Z.min(1) < -t


def _b(a):
    """The sample's help to its own class plus its contribution to the class it hurts most is negative."""
    R, y = a[R_], a["labels"]
    rows = np.arange(len(y))
    return R[rows, y] + np.nanmin(_others(R, y), 1) < 0


def _latent_class(a, iters=300):
    """A two-class latent model of the binary tests A, P and L (conditionally independent given the class,
    fitted by EM): its estimated share of the noisy class, times N."""
    T = np.c_[_a(a), _p(a), _l(a)].astype(np.float64)
    pi, s1, s0 = 0.3, np.full(3, 0.8), np.full(3, 0.1)
    for _ in range(iters):
        l1 = pi * np.prod(np.where(T > 0, s1, 1 - s1), 1)
        l0 = (1 - pi) * np.prod(np.where(T > 0, s0, 1 - s0), 1)
        w = l1 / (l1 + l0)
        pi = w.mean()
        s1 = np.clip((w[:, None] * T).sum(0) / w.sum(), 1e-4, 1 - 1e-4)
        s0 = np.clip(((1 - w)[:, None] * T).sum(0) / (1 - w).sum(), 1e-4, 1 - 1e-4)
    return pi * len(w)


AUTO_RULES = {
    "2-component GMM on the default score": lambda a: _gmm(a, SCORES[DEFAULT_SCORE](**a)[:, None]),
    "2-component GMM on (z(class_harm), z(trajectory_loss))": lambda a: _gmm(
        a, np.c_[robust_z(class_harm(**a)), robust_z(_loss(a))]),
    "default score below -2 sqrt 2": lambda a: SCORES[DEFAULT_SCORE](**a) < -2 * np.sqrt(2),
    "default score below -3 sqrt 2": lambda a: SCORES[DEFAULT_SCORE](**a) < -3 * np.sqrt(2),
    "A: harm > typical help": _a,
    "A2: harm > 2 x typical help": lambda a: _a(a, 2.0),
    "L: trajectory loss > ln K": _l,
    "P: trajectory prediction != label": _p,
    "A or L": lambda a: _a(a) | _l(a),
    "A and L": lambda a: _a(a) & _l(a),
    "A or P": lambda a: _a(a) | _p(a),
    "A and P": lambda a: _a(a) & _p(a),
    "count of P, lowest scores": lambda a: _count(a, _p(a)),
    "count of A or P, lowest scores (the earlier default)": lambda a: _count(a, _a(a) | _p(a)),
    "count of A or P, lowest combined scores (the earlier default score)": lambda a: flag_lowest(
        SCORES["combined"](**a), count=int((_a(a) | _p(a)).sum())),
    "count of confident learning (off-diagonal), lowest scores": lambda a: _lowest(a, _cl(a, "off_diagonal")),
    "count of confident learning (calibrated), lowest scores": lambda a: _lowest(a, _cl(a)),
    "max(count of A, confident learning calibrated), lowest scores": lambda a: _lowest(
        a, max(_a(a).sum(), _cl(a))),
    "A1.5 or P (harm > 1.5 x typical help)": lambda a: _a(a, 1.5) | _p(a),
    "A2 or P": lambda a: _a(a, 2.0) | _p(a),
    "A3 or P": lambda a: _a(a, 3.0) | _p(a),
    "B: own-class help + worst class < 0": _b,
    "B or P": lambda a: _b(a) | _p(a),
    "(A and B) or P": lambda a: (_a(a) & _b(a)) | _p(a),
    "P beyond the validation error (best epoch), lowest scores": lambda a: _lowest(a, _p_beyond_validation(a)),
    "P beyond the validation error (last epoch), lowest scores": lambda a: _lowest(
        a, _p_beyond_validation(a, "last")),
    "P beyond the validation error (mean over epochs) + A not P, lowest scores": lambda a: _lowest(
        a, _p_beyond_validation(a, "mean") + (_a(a) & ~_p(a)).sum()),
    "A*: harm beyond the label's peers > typical help": _beyond_peers,
    "A* or P": lambda a: _beyond_peers(a) | _p(a),
    "A*0.5 or P": lambda a: _beyond_peers(a, 0.5) | _p(a),
    "(A* and A) or P": lambda a: (_beyond_peers(a) & _a(a)) | _p(a),
    "robust z below the label's peers < -3": lambda a: _peer_z(a, 3.0),
    "robust z below the label's peers < -3, or P": lambda a: _peer_z(a, 3.0) | _p(a),
    "robust z below the label's peers < -4, or P": lambda a: _peer_z(a, 4.0) | _p(a),
    "P beyond the validation error (best epoch) + A not P, lowest scores": lambda a: _lowest(
        a, _p_beyond_validation(a) + (_a(a) & ~_p(a)).sum()),
    "min(A or P, max(A, P beyond validation + A not P)), lowest scores": lambda a: _lowest(
        a, min((_a(a) | _p(a)).sum(), max(_a(a).sum(), _p_beyond_validation(a) + (_a(a) & ~_p(a)).sum()))),
    "latent-class model of A, P and L, lowest scores": lambda a: _lowest(a, _latent_class(a)),
    # the count mixed by memorisation m, as the default score mixes its parts: P's count where the run did not
    # memorise (A's clean flags then cost nothing), A's extra flags where it did
    "P + m x (A not P), lowest scores": lambda a: _lowest(a, _p(a).sum() + memorisation(**a) * (_a(a) & ~_p(a)).sum()),
    "P if m < 1/2, else A or P; lowest scores": lambda a: _lowest(
        a, (_p(a) | (_a(a) & (memorisation(**a) >= 0.5))).sum()),
    DEFAULT_COUNT: lambda a: _lowest(a, estimate_issue_count(  # hydraclean's own (drop_fraction="auto")
        a[R_], a["trajectory_proba"], a["labels"], memorised_flips(
            a["trajectory_proba"], a["labels"], a["train_accuracy"], a["valid_accuracy"], a["n_val"]))),
    "P + (A not P) where the validation accuracy fell, lowest scores": lambda a: _lowest(
        a, _p(a).sum() + validation_fell(a["valid_accuracy"], a["n_val"]) * (_a(a) & ~_p(a)).sum()),
    "P beyond the validation error (best epoch) + m x (A not P), lowest scores": lambda a: _lowest(
        a, _p_beyond_validation(a) + memorisation(**a) * (_a(a) & ~_p(a)).sum()),
}


def evaluate(arrays: dict, noise: np.ndarray) -> dict:
    """AUROC of every variant and count / F1 of every rule on one setting (scored rows only)."""
    from sklearn.metrics import roc_auc_score

    scores = {}
    for name, fn in VARIANTS.items():
        with np.errstate(all="ignore"):
            s = np.asarray(fn(arrays), dtype=np.float64)
        if np.isnan(s).all():  # a variant this run does not define (self-influence needs SGD's c_t)
            scores[name] = float("nan")
            continue
        scores[name] = float(roc_auc_score(noise, -np.nan_to_num(s, nan=np.nanmin(s))))
    rules = {}
    for name, fn in AUTO_RULES.items():
        flags = np.asarray(fn(arrays), dtype=bool)
        rules[name] = {"count": int(flags.sum()), "f1": float(f1_score(noise, flags, zero_division=0))}
    return {"auroc": scores, "auto": rules}


def table(results: dict[str, dict], selection: list[str], key: str) -> str:
    """Markdown: one row per variant (or rule), one column per setting, mean and worst over ``selection``."""
    names = list(results)
    head = "| | " + " | ".join(names) + " | mean (selection) | worst (selection) |"
    lines = [head, "|---|" + "---|" * (len(names) + 2)]
    rows = list(dict.fromkeys(r for res in results.values() for r in res[key]))  # every run's variants, in order
    missing = {"f1": float("nan"), "count": None}
    for r in rows:
        if key == "auroc":
            vals = [results[n][key].get(r, float("nan")) for n in names]
            cells = ["n/a" if np.isnan(v) else f"{v:.3f}" for v in vals]
        else:
            got = [results[n][key].get(r, missing) for n in names]
            vals = [g["f1"] for g in got]
            cells = ["—" if g["count"] is None else f"{g['f1']:.3f} ({g['count']})" for g in got]
        sel = [v for n, v in zip(names, vals) if n in selection]
        label = f"**{r}**" if r in (DEFAULT_SCORE, DEFAULT_COUNT) else r
        with warnings.catch_warnings():  # a variant no selection run defines: NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {np.nanmean(sel):.3f} | {np.nanmin(sel):.3f} |")
    return "\n".join(lines)


def main() -> None:
    from settings import HELD_OUT, SELECTION

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="docs/_generated", help="folder with the suite's suite_*.json")
    parser.add_argument("--out")
    args = parser.parse_args()
    results = {}
    for path in sorted(Path(args.dir).glob("suite_*.json")):
        for res in json.loads(path.read_text()):
            results[res["setting"]] = res["ablation"]
    order = [n for n in SELECTION + HELD_OUT if n in results]
    results = {n: results[n] for n in order}
    selection = [n for n in order if n in SELECTION]
    cells = {k: len(selection) for k in ("auroc",)}
    text = "\n".join([
        f"AUROC of every score tried, on the {cells['auroc']} selection settings and the held-out ones "
        f"({', '.join(n for n in order if n in HELD_OUT) or 'none run'}); the default is in bold. n/a: a variant "
        "that the run does not define (self-influence weights every step by SGD's c_t), or one added after the "
        "run (the Fashion-MNIST runs predate the logit margin); means and worst values are over the settings "
        "that define it.",
        "",
        table(results, selection, "auroc"),
        "",
        "F1 (and number flagged) of every flag-count rule tried; the default (`drop_fraction=\"auto\"`) is in bold; "
        "—: a rule added after the run.",
        "",
        table(results, selection, "auto"),
    ])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
