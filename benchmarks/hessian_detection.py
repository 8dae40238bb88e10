"""Does the Hessian term matter for detection? Exact against Hessian-free HYDRA for every sample, on suite settings.

For each setting (benchmarks/settings.py: the suite's data, noise, model and
training recipe, SGD and AdamW), one run (same seed, same trajectory) is scored
with ``hessian="free"`` and with ``hessian="exact"``, the reverse-mode sweep
that keeps the Hessian term for every training sample. Every score of
``hydraclean.scoring`` is computed from each and compared by AUROC against the
flipped labels, with the Spearman correlation and sign agreement of exact and
free ``C(i)``, and the fit time of the exact fit over the free one.

    python benchmarks/hessian_detection.py --out docs/_generated/hessian_detection.md
    python benchmarks/hessian_detection.py --smoke      # tiny digits settings
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import emit  # noqa: E402
from methods import init_module  # noqa: E402
from settings import SETTINGS, load_data  # noqa: E402

from hydraclean import HydraLabelCleaner  # noqa: E402
from hydraclean.scoring import SCORES  # noqa: E402

FULL = ["digits-sym-0.2", "digits-sym-0.4", "digits-pairs", "digits-cc", "digits-memorise", "digits-adamw-sym-0.4",
        "digits-adamw-pairs", "fashion-sym-0.4", "fashion-pairs", "fashion-adamw-sym-0.4", "fashion-adamw-pairs"]
SMOKE = ["digits-sym-0.2", "digits-adamw-pairs"]


def run(name: str, smoke: bool, log) -> dict:
    setting = SETTINGS[name]
    make_module, recipe, X_tr, y_clean, X_val, y_val, _, _ = load_data(setting, smoke)
    y_noisy, noise = setting.make_noise(y_clean, X_tr)
    out = {"setting": name, "title": setting.title, "n_train": len(y_noisy), "recipe": recipe.describe()}
    fits = {}
    warm = HydraLabelCleaner(init_module(make_module, 0), random_state=0, **{**recipe.as_params(), "max_epochs": 1})
    warm.fit(X_tr[:256], y_noisy[:256], X_val=X_val, y_val=y_val)  # first-call costs stay out of the times
    for hessian in ("free", "exact"):
        cleaner = HydraLabelCleaner(init_module(make_module, 0), hessian=hessian, random_state=0,
                                    **recipe.as_params())
        t0 = time.perf_counter()
        fits[hessian] = cleaner.fit(X_tr, y_noisy, X_val=X_val, y_val=y_val)
        out[f"seconds_{hessian}"] = time.perf_counter() - t0
        log(f"{name}: {hessian} in {out[f'seconds_{hessian}']:.1f} s")
    codes = np.searchsorted(fits["free"].classes_, y_noisy)
    for score_name, score in SCORES.items():
        for hessian, c in fits.items():
            s = score(contribution=c.contribution_, class_contribution=c.class_contribution_, labels=codes,
                      trajectory_loss=c.trajectory_loss_, trajectory_proba=c.trajectory_proba_,
                      trajectory_logit_margin=c.trajectory_logit_margin_,
                      train_accuracy=c.history_["train_accuracy"][-1])
            out[f"{score_name}/{hessian}"] = float(roc_auc_score(noise, -s))
    free, exact = fits["free"].contribution_, fits["exact"].contribution_
    out["spearman C(i)"] = float(spearmanr(free, exact)[0])
    out["sign agreement C(i)"] = float(np.mean(np.sign(free) == np.sign(exact)))
    out["train accuracy"] = fits["free"].history_["train_accuracy"][-1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS))
    parser.add_argument("--smoke", action="store_true", help="tiny digits settings")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    names = args.settings or (SMOKE if args.smoke else FULL)
    rows = [run(n, args.smoke, log) for n in names]
    shown = ["contribution", "class_harm", "combined"]
    lines = [
        f"Command: `python benchmarks/hessian_detection.py{' --smoke' if args.smoke else ''}"
        f"{' --settings ' + ' '.join(args.settings) if args.settings else ''}`. Each setting's data, noise, model "
        "and recipe as in the suite (seed 0); one run scored both ways, every training sample exactly "
        f"(reverse mode). AUROC against the flipped labels; {args.threads} torch threads.",
        "",
        "| setting | recipe | train acc | " + " | ".join(f"{s}: free | {s}: exact" for s in shown)
        + " | Spearman C(i) | sign agreement | exact / free time |",
        "|---|---|---|" + "---|---|" * len(shown) + "---|---|---|",
    ]
    for r in rows:
        cells = [f"{r[f'{s}/free']:.3f} | {r[f'{s}/exact']:.3f}" for s in shown]
        lines.append(f"| {r['title']} | {r['recipe']} | {r['train accuracy']:.3f} | " + " | ".join(cells)
                     + f" | {r['spearman C(i)']:.3f} | {r['sign agreement C(i)']:.3f} | "
                     f"{r['seconds_exact'] / r['seconds_free']:.1f}x |")
    gains = {s: np.array([r[f"{s}/exact"] - r[f"{s}/free"] for r in rows]) for s in shown}
    lines += ["", "Mean AUROC change, exact - free: " + ", ".join(
        f"{s} {g.mean():+.3f} (from {g.min():+.3f} to {g.max():+.3f})" for s, g in gains.items()) + "."]
    emit(lines, args.out)
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
