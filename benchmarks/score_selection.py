"""Which score should rank by default? AUROC of every variant against AUM's, on the default fits of flag_count.py.

Reads the arrays that ``benchmarks/flag_count.py`` caches (one default fit per
setting: 21 image and tabular settings to choose on, two token-id settings kept
aside until the choice was made) and scores every variant of
``benchmarks/score_ablation.py`` that those arrays define. AUM (the logit margin
averaged over the run, ``scoring="aum"``) is computed from the same run, so each
variant's difference to it is paired. Issue 19's bar: a default whose mean
AUROC is at least AUM's plus 0.01.

    python benchmarks/flag_count.py   # fits and caches the arrays first
    python benchmarks/score_selection.py --out docs/_generated/score_selection.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flag_count import HELD_OUT, SELECTION, cached_arrays  # noqa: E402
from measure import emit  # noqa: E402
from score_ablation import DEFAULT_SCORE, VARIANTS  # noqa: E402

REFERENCE = "aum"


def auroc(noise: np.ndarray, score: np.ndarray) -> float:
    """AUROC of ``score`` (higher = cleaner) against the noise mask; NaN (unscored) ranks as the lowest score."""
    return float(roc_auc_score(noise, -np.nan_to_num(score, nan=np.nanmin(score))))


def aurocs(arrays: dict[str, dict]) -> dict[str, dict[str, float]]:
    """``{variant: {setting: AUROC}}`` for the variants these arrays define (others are left out)."""
    out: dict[str, dict] = {}
    for name, fn in VARIANTS.items():
        try:
            with np.errstate(all="ignore"):
                scores = {s: np.asarray(fn(a), dtype=np.float64) for s, a in arrays.items()}
        except KeyError:  # reads something a default fit does not give (C(i, j), the final loss, self-influence)
            continue
        out[name] = {s: auroc(arrays[s]["noise"], v) for s, v in scores.items()}
    return out


def markdown(table: dict, names: list[str]) -> str:
    held = [n for n in names if n in HELD_OUT]
    sel = [n for n in names if n in SELECTION]
    head = ("| score | " + " | ".join(n + (" (held out)" if n in HELD_OUT else "") for n in names)
            + " | mean (selection) | mean - AUM's (selection) | worst - AUM's (selection) | mean - AUM's (held out) |")
    lines = [head, "|---|" + "---|" * (len(names) + 4)]
    ref = table[REFERENCE]
    order = sorted(table, key=lambda v: -np.mean([table[v][n] for n in sel]))
    for v in order:
        d_sel = [table[v][n] - ref[n] for n in sel]
        d_held = [table[v][n] - ref[n] for n in held]
        label = f"**{v}**" if v == DEFAULT_SCORE else v
        lines.append(f"| {label} | " + " | ".join(f"{table[v][n]:.3f}" for n in names)
                     + f" | {np.mean([table[v][n] for n in sel]):.4f} | {np.mean(d_sel):+.4f} | {min(d_sel):+.3f} | "
                     + (f"{np.mean(d_held):+.4f} |" if held else "— |"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=".cache/flag_count")
    parser.add_argument("--settings", nargs="+", default=SELECTION + HELD_OUT)
    parser.add_argument("--out")
    args = parser.parse_args()
    missing = [s for s in args.settings if not (Path(args.cache) / f"{s}.npz").exists()]
    if missing:
        raise SystemExit(f"No cached fit for {', '.join(missing)}: run benchmarks/flag_count.py first.")
    arrays = cached_arrays(args.settings, Path(args.cache), device=None, log=print)
    table = aurocs(arrays)
    header = ("Command: `python benchmarks/score_selection.py`, on the default fits of `benchmarks/flag_count.py` "
              f"(noise and model seed 0). AUROC against the noise mask; the default (`{DEFAULT_SCORE}`) in bold; "
              "sorted by the mean over the selection settings.")
    emit([header, "", markdown(table, args.settings)], args.out, table)


if __name__ == "__main__":
    main()
