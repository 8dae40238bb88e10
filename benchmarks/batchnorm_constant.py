"""BatchNorm in train mode: the batch statistics held constant against the exact derivative.

A BatchNorm layer in train mode normalises each sample with its batch's
statistics, so a sample's loss depends on the weights through the other samples
of its batch too. ``batchnorm="exact"`` differentiates that (one JVP per
direction and step); ``batchnorm="constant"`` holds the statistics constant in
the per-sample derivative, which lets every layer keep its per-layer algebra.
The training run is the same either way; only the hypergradient's per-sample
term differs.

On the suite's BatchNorm settings (benchmarks/settings.py, the same data, noise,
model and recipe), both fits from the same seed: the relative difference of
``C(i, c)`` (Frobenius, over the classes with validation samples), the Spearman
correlation of ``C(i)`` and of the default score between the routes, each
route's AUROC against the noise mask (default score and ``C(i)``), and each
fit's time over one plain training run measured in the same process.

    python benchmarks/batchnorm_constant.py [--settings digits-resnet-sym-0.4 fashion-resnet-sym-0.2]
        [--smoke] [--out docs/_generated/batchnorm_constant.md]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from dataclasses import replace

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from measure import emit  # noqa: I001  (benchmarks/ is on sys.path when run as a script)
from methods import init_module, train_with_checkpoints
from settings import SETTINGS, load_data

from hydraclean import HydraLabelCleaner

DEFAULT_SETTINGS = ["digits-resnet-sym-0.4", "fashion-resnet-sym-0.2"]


def compare(name: str, smoke: bool) -> dict:
    setting = SETTINGS[name]
    make_module, recipe, X_tr, y_clean, X_val, y_val, _, _ = load_data(setting, smoke)
    y_noisy, noise = setting.make_noise(y_clean, X_tr)
    Xt, yt = torch.as_tensor(X_tr), torch.as_tensor(y_noisy)
    train_with_checkpoints(make_module, Xt, yt, replace(recipe, max_epochs=1), seed=0)  # warm-up
    t0 = time.perf_counter()
    train_with_checkpoints(make_module, Xt, yt, recipe, seed=0)
    plain = time.perf_counter() - t0
    fits, seconds = {}, {}
    for route in ("constant", "exact"):
        t0 = time.perf_counter()
        fits[route] = HydraLabelCleaner(init_module(make_module, 0), batchnorm=route, random_state=0,
                                        **recipe.as_params()).fit(X_tr, y_noisy, X_val=X_val, y_val=y_val)
        seconds[route] = time.perf_counter() - t0
    c, e = fits["constant"], fits["exact"]
    present = ~np.isnan(e.class_contribution_).all(0)
    gap = np.linalg.norm(c.class_contribution_[:, present] - e.class_contribution_[:, present]) / np.linalg.norm(
        e.class_contribution_[:, present])
    return {
        "setting": name, "title": setting.title, "n_train": len(y_noisy), "plain_seconds": plain,
        "relative_difference_class_contribution": float(gap),
        "spearman_contribution": float(spearmanr(c.contribution_, e.contribution_)[0]),
        "spearman_score": float(spearmanr(c.label_quality_, e.label_quality_)[0]),
        **{f"auroc_score_{r}": float(roc_auc_score(noise, -f.label_quality_)) for r, f in fits.items()},
        **{f"auroc_contribution_{r}": float(roc_auc_score(noise, -f.contribution_)) for r, f in fits.items()},
        **{f"time_ratio_{r}": seconds[r] / plain for r in fits},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=sorted(SETTINGS))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    torch.set_num_threads(args.threads)
    rows = [compare(name, args.smoke) for name in args.settings]
    lines = [f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}. "
             f"Command: `python benchmarks/batchnorm_constant.py --settings {' '.join(args.settings)}"
             f"{' --smoke' if args.smoke else ''}`; model and noise seed 0.", "",
             "| setting | rel. difference of C(i, c) | Spearman C(i) | Spearman score | AUROC score: constant / exact "
             "| AUROC C(i): constant / exact | time x plain: constant / exact |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['title']} | {r['relative_difference_class_contribution']:.3f} | "
                     f"{r['spearman_contribution']:.3f} | {r['spearman_score']:.3f} | "
                     f"{r['auroc_score_constant']:.3f} / {r['auroc_score_exact']:.3f} | "
                     f"{r['auroc_contribution_constant']:.3f} / {r['auroc_contribution_exact']:.3f} | "
                     f"{r['time_ratio_constant']:.2f} / {r['time_ratio_exact']:.2f} |")
    emit(lines, args.out, rows)


if __name__ == "__main__":
    main()
