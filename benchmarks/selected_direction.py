"""Would two class directions per sample do? The class a sample harms most, against the class its run predicted.

The default score reads ``class_harm = min_c C(i, c) / s_c`` over all K validation
classes, and the automatic count compares that harm with the help of the
sample's own class, so every sample is projected on K class directions: on a
ResNet-18 those products cost about one plain training run (issue 18). A route
that projected each sample on two class directions only, its label ``y_i`` and
the run's most likely other class ``p_i = argmax_{c != y_i}`` of the averaged
softmax (both known from the training run before scoring starts), would cost
about two directions. This script measures what the default would lose, on the
default fits that ``benchmarks/flag_count.py`` caches, by giving the library's
own score and count the class contributions such a route would give (``C(i, y_i)``
and ``C(i, p_i)``, NaN elsewhere; each column's spread then comes from the
samples that have it):

- agreement: the share of flipped samples, and of all samples, whose most
  harmed class ``argmin_c C(i, c) / s_c`` is ``p_i``;
- AUROC of ``class_harm`` and of the default (``memorisation_weighted``), from
  all K columns and from the two;
- the automatic count over the true number of flips, from each;
- ``m``, the run's memorisation, the default's weight on the harm (at 0 the
  default reads no hypergradient at all).

    python benchmarks/flag_count.py                      # fits and caches the arrays
    python benchmarks/selected_direction.py --out docs/_generated/selected_direction.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flag_count import HELD_OUT, SELECTION, cached_arrays  # noqa: E402
from measure import emit  # noqa: E402
from score_selection import auroc  # noqa: E402

from hydraclean.cleaning import estimate_issue_count, memorised_flips  # noqa: E402
from hydraclean.scoring import class_harm, memorisation, memorisation_weighted  # noqa: E402


def predicted_other(proba: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``argmax_{c != y_i}`` of each sample's averaged softmax, shape (n,)."""
    others = np.array(proba, dtype=np.float64)
    others[np.arange(len(labels)), labels] = -np.inf
    return others.argmax(axis=1)


def selected(R: np.ndarray, labels: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """What a route projecting each sample on two class directions would give: ``C(i, y_i)`` and
    ``C(i, p_i)``, NaN in every other column."""
    rows = np.arange(R.shape[0])
    out = np.full_like(R, np.nan)
    out[rows, labels] = R[rows, labels]
    out[rows, chosen] = R[rows, chosen]
    return out


def count(R: np.ndarray, a: dict) -> int:
    """The automatic count (``drop_fraction="auto"``) from these class contributions."""
    memorised = memorised_flips(a["trajectory_proba"], a["labels"], float(a["train_accuracy"]), a["valid_accuracy"],
                                int(a["n_val"]))
    return estimate_issue_count(R, a["trajectory_proba"], a["labels"], memorised=memorised)


def measure(a: dict) -> dict[str, float]:
    R = np.asarray(a["class_contribution"], dtype=np.float64)
    labels, noise = np.asarray(a["labels"]), np.asarray(a["noise"], dtype=bool)
    chosen = predicted_other(a["trajectory_proba"], labels)
    spread = np.nanstd(R, axis=0)
    harmed = np.nanargmin(R / np.where(spread > 0, spread, np.nan), axis=1)
    two = selected(R, labels, chosen)
    flips = max(1, int(noise.sum()))
    return {
        "m": memorisation(**a),
        "agree (flips)": float(np.mean(harmed[noise] == chosen[noise])),
        "agree (all)": float(np.mean(harmed == chosen)),
        "class_harm": auroc(noise, class_harm(class_contribution=R)),
        "class_harm, 2 columns": auroc(noise, class_harm(class_contribution=two)),
        "default": auroc(noise, memorisation_weighted(**a)),
        "default, 2 columns": auroc(noise, memorisation_weighted(**{**a, "class_contribution": two})),
        "count / flips": count(R, a) / flips,
        "count / flips, 2 columns": count(two, a) / flips,
    }


def markdown(table: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(table.values())))
    lines = ["| setting | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in table.items():
        lines.append(f"| {name}{' (held out)' if name in HELD_OUT else ''} | "
                     + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    learned = [n for n in table if n in SELECTION]
    mean = {c: np.mean([table[n][c] for n in learned]) for c in columns}
    lines.append("| mean (selection) | " + " | ".join(f"{mean[c]:.3f}" for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=".cache/flag_count")
    parser.add_argument("--settings", nargs="+", default=SELECTION + HELD_OUT)
    parser.add_argument("--out")
    args = parser.parse_args()
    present = [s for s in args.settings if (Path(args.cache) / f"{s}.npz").exists()]
    missing = sorted(set(args.settings) - set(present))
    arrays = cached_arrays(present, Path(args.cache), device=None, log=print)
    table = {name: measure(a) for name, a in arrays.items()}
    header = ("Command: `python benchmarks/selected_direction.py`, on the default fits of `benchmarks/flag_count.py` "
              "(noise and model seed 0). AUROC against the noise mask; agreement: share of samples whose most harmed "
              "class (``argmin_c C(i, c) / s_c``) is the run's most likely other class; 2 columns: ``C(i, y_i)`` "
              "and ``C(i, p_i)`` alone."
              + (f" Not fitted here: {', '.join(missing)}." if missing else ""))
    emit([header, "", markdown(table)], args.out, table)


if __name__ == "__main__":
    main()
