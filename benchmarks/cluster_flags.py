"""Can the cluster strategy's flags match the automatic count's? Every variant tried, on the suite's settings.

``strategy="cluster"`` splits each observed class in two by Ward's method on the
sign vectors of ``C(i, j)`` and flags the group with the lower label quality.
This script fits it once per setting (500 validation features at most, as the
suite does; the same run as the default, so the default's automatic flags come
from the same arrays) and compares the F1 of:

- ``auto``: the default, the lowest-scored ``estimate_issue_count`` samples;
- ``split``: the cluster strategy as shipped;
- variants that decide each class's split with the count's evidence
  (:func:`hydraclean.cleaning.predicted_other_class`, and
  :func:`hydraclean.cleaning.harms_more_than_class_helps` where the count uses it:
  the run memorised and its validation accuracy fell).

It also reports how the split lies against the flips: the share of a class that
the flagged group takes, and the share of the class's flips inside it.

    python benchmarks/cluster_flags.py --out docs/_generated/cluster_flags.md
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import init_module  # noqa: E402
from score_ablation import DEFAULT_SCORE  # noqa: E402
from settings import SETTINGS, load_data  # noqa: E402

from hydraclean import HydraLabelCleaner  # noqa: E402
from hydraclean.cleaning import (  # noqa: E402
    _ward_halves,
    estimate_issue_count,
    flag_lowest,
    flag_sign_clusters,
    harms_more_than_class_helps,
    memorised_flips,
    predicted_other_class,
)
from hydraclean.scoring import SCORES  # noqa: E402

N_FEATURES = 500
DEFAULT_SETTINGS = ["digits-sym-0.2", "digits-sym-0.4", "digits-sym-0.8", "digits-pairs", "digits-cc",
                    "digits-memorise", "digits-memorise-perm", "digits-instance", "digits-adamw-sym-0.4",
                    "digits-adamw-pairs", "digits-resnet-sym-0.4", "tabular-cc", "tabular-sym-0.4"]


def cluster_arrays(name: str, cache: Path, log) -> dict[str, np.ndarray]:
    """One cluster fit on ``name`` (cached): C(i, j) and everything a score reads, as keywords of a score."""
    path = cache / f"{name}.npz"
    if not path.exists():
        setting = SETTINGS[name]
        make_module, recipe, X, y_clean, X_val, y_val, _, _ = load_data(setting)
        y_noisy, noise = setting.make_noise(y_clean, X)
        t0 = time.perf_counter()
        fit = HydraLabelCleaner(init_module(make_module, 0), random_state=0, strategy="cluster",
                                n_val_features=min(N_FEATURES, len(y_val)), **recipe.as_params()).fit(
            X, y_noisy, X_val=X_val, y_val=y_val)
        log(f"{name}: fitted in {time.perf_counter() - t0:.0f} s")
        cache.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, matrix=fit.contribution_matrix_, contribution=fit.contribution_,
                            class_contribution=fit.class_contribution_, trajectory_loss=fit.trajectory_loss_,
                            trajectory_proba=fit.trajectory_proba_,
                            trajectory_logit_margin=fit.trajectory_logit_margin_,
                            train_accuracy=np.float64(fit.history_["train_accuracy"][-1]),
                            valid_accuracy=np.asarray(fit.history_["valid_accuracy"]), n_val=np.int64(len(y_val)),
                            labels=np.searchsorted(fit.classes_, y_noisy), noise=noise)
    with np.load(path) as z:
        a = {k: z[k] for k in z.files}
    a["quality"] = SCORES[DEFAULT_SCORE](**a)  # the default's label_quality_, which names each split's flagged side
    return a


def splits(a: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per class: (members, the members of the flagged side of Ward's split), as ``flag_sign_clusters`` has it."""
    signs = np.where(a["matrix"] >= 0, 1.0, -1.0)
    out = []
    for c in np.unique(a["labels"]):
        members = np.flatnonzero(a["labels"] == c)
        groups = _ward_halves(signs[members])
        low = int(np.argmin([a["quality"][members[groups == g]].mean() for g in (0, 1)]))
        out.append((members, members[groups == low]))
    return out


def variants(a: dict, parts: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Flags of the default, of the cluster strategy, and of each variant tried, given ``parts = splits(a)``."""
    q = a["quality"]
    memorised = memorised_flips(a["trajectory_proba"], a["labels"], a["train_accuracy"], a["valid_accuracy"],
                                a["n_val"])
    # the count's evidence: the prediction rule, and the harm rule where the count takes it (the run memorised)
    evidence = predicted_other_class(a["trajectory_proba"], a["labels"]) | (
        harms_more_than_class_helps(a["class_contribution"], a["labels"]) & (memorised > 0))
    n = len(q)
    count = estimate_issue_count(a["class_contribution"], a["trajectory_proba"], a["labels"], memorised)
    out = {"auto (default)": flag_lowest(q, count=count),
           "split (strategy='cluster')": flag_sign_clusters(a["matrix"], a["labels"], q)}
    with_evidence, majority, per_class, within = (np.zeros(n, bool) for _ in range(4))
    for members, low in parts:
        with_evidence[low] = evidence[low]
        majority[low] = evidence[low].mean() > 0.5
        k = int(evidence[members].sum())
        rest = np.setdiff1d(members, low)
        order = np.concatenate([low[np.argsort(q[low], kind="stable")], rest[np.argsort(q[rest], kind="stable")]])
        per_class[order[:k]] = True
        within[low[np.argsort(q[low], kind="stable")][:k]] = True
    out["flagged side, only its samples with the count's evidence"] = with_evidence
    out["flagged side, only if most of it has the count's evidence"] = majority
    out["the count's number per class, the flagged side's lowest first"] = per_class
    out["the count's number per class, inside the flagged side only"] = within
    out["auto, inside the flagged side only"] = out["auto (default)"] & np.isin(
        np.arange(n), np.concatenate([low for _, low in parts]))
    return out


def alignment(a: dict, parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """Mean over classes of (share of the class on the flagged side, share of the class's flips on it)."""
    noise = a["noise"].astype(bool)
    share, caught = [], []
    for members, low in parts:
        share.append(low.size / members.size)
        if noise[members].any():
            caught.append(noise[low].sum() / noise[members].sum())
    return float(np.mean(share)), float(np.mean(caught))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=sorted(SETTINGS))
    parser.add_argument("--cache", default=".cache/cluster_flags")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    rows, aligned = {}, {}
    for name in args.settings:
        a = cluster_arrays(name, Path(args.cache), log)
        noise = a["noise"].astype(bool)
        parts = splits(a)  # Ward's tree once per setting
        rows[name] = {v: f1_score(noise, f) for v, f in variants(a, parts).items()}
        aligned[name] = (alignment(a, parts), noise.mean())
    names = list(rows)
    head = "| flags | " + " | ".join(names) + " | mean | at least the default's F1 |"
    lines = ["Command: `python benchmarks/cluster_flags.py`. One cluster fit per setting (the suite's recipes, "
             f"noise and model seed 0, at most {N_FEATURES} validation features); F1 of each rule's flags.", "",
             head, "|---|" + "---|" * (len(names) + 2)]
    default = "auto (default)"
    for v in rows[names[0]]:
        vals = [rows[n][v] for n in names]
        at_least = sum(rows[n][v] >= rows[n][default] - 1e-12 for n in names)
        label = f"**{v}**" if v == default else v
        lines.append(f"| {label} | " + " | ".join(f"{x:.3f}" for x in vals) + f" | {np.mean(vals):.3f} | "
                     + ("—" if v == default else f"{at_least} of {len(names)}") + " |")
    lines += ["", "Where the split lies, mean over classes: the share of a class on its flagged side, and the share "
              "of the class's flips on it (against the noise rate).", "",
              "| setting | noise rate | flagged side's share of its class | flips on the flagged side |",
              "|---|---|---|---|"]
    lines += [f"| {n} | {rate:.2f} | {share:.2f} | {caught:.2f} |" for n, ((share, caught), rate) in aligned.items()]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
