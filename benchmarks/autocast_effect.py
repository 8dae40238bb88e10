"""How mixed precision (autocast) moves the contributions and the detection, on this machine's CPU.

LeNet-5 on 10,000 Fashion-MNIST training images with 20% symmetric label noise,
1,000 trusted validation images, batch 64, 5 epochs (the setting of
benchmarks/overhead.py). The same fit runs in float32 and with
autocast="bfloat16" and "float16", all from random_state=0. Each low-precision run
is its own training run (rounded forward passes take other steps), so the
yardstick is float32 from another random_state (another batch order and
initialisation): a difference no larger than that one is within the run-to-run
variation every user already lives with.

Reported per run: Spearman rank correlation of C(i) and of the default
label-quality score with the float32 run; the share of the float32 run's flagged
samples also flagged; AUROC of the label-quality score for finding the flipped
labels; fit time as a ratio to the float32 fit (CPUs without bfloat16 units
emulate it, so the GPU figures in docs/benchmarks.md are the ones that speak
for speed).

    python benchmarks/autocast_effect.py [--epochs 5] [--out docs/_generated/autocast.md]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from measure import emit  # noqa: I001  (benchmarks/ is on sys.path when run as a script)
from overhead import BATCH, LR, N_TRAIN, N_VAL, data

from hydraclean import HydraLabelCleaner
from hydraclean.datasets import load_fashion_mnist, make_label_noise
from hydraclean.models import LeNet5

RUNS = [("float32", None, 0), ("bfloat16", "bfloat16", 0), ("float16", "float16", 0),
        ("float32, random_state=1 (yardstick)", None, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    torch.set_num_threads(2)
    X, y, Xv, yv = data()
    _, noisy = make_label_noise(load_fashion_mnist(os.environ.get("HYDRACLEAN_DATA"))[1][:N_TRAIN], 0.2, random_state=0)
    for autocast in (None, "bfloat16", "float16"):  # warm-up: first-call costs stay out of the times
        HydraLabelCleaner(LeNet5, max_epochs=1, autocast=autocast, random_state=0).fit(X[:2000], y[:2000],
                                                                                      X_val=Xv[:200], y_val=yv[:200])
    fits = {}
    for name, autocast, seed in RUNS:
        cleaner = HydraLabelCleaner(LeNet5, max_epochs=args.epochs, batch_size=BATCH, lr=LR, autocast=autocast,
                                    random_state=seed)
        t0 = time.perf_counter()
        cleaner.fit(X, y, X_val=Xv, y_val=yv)
        fits[name] = (cleaner, time.perf_counter() - t0)
    base, t_base = fits["float32"]
    rows = []
    for name, (c, seconds) in fits.items():
        rows.append({
            "run": name,
            "spearman_contribution": float(spearmanr(base.contribution_, c.contribution_)[0]),
            "spearman_label_quality": float(spearmanr(base.label_quality_, c.label_quality_)[0]),
            "flagged_in_common": float((base.label_issues_ & c.label_issues_).sum() / base.label_issues_.sum()),
            "auroc": float(roc_auc_score(noisy, -c.label_quality_)),
            "valid_accuracy": c.history_["valid_accuracy"][-1],
            "time_ratio": seconds / t_base,
        })
    lines = [f"LeNet-5, Fashion-MNIST {N_TRAIN:,} training images (20% symmetric noise), {N_VAL:,} validation "
             f"images, batch {BATCH}, {args.epochs} epochs, default fit; {torch.get_num_threads()} CPU threads, "
             f"torch {torch.__version__}. Compared with the float32 run (random_state=0).", "",
             "| run | Spearman of C(i) | Spearman of label quality | flagged in common | AUROC (flipped labels) "
             "| validation accuracy | fit time / float32 fit |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['spearman_contribution']:.3f} | {r['spearman_label_quality']:.3f} | "
                     f"{r['flagged_in_common']:.1%} | {r['auroc']:.3f} | {r['valid_accuracy']:.3f} | "
                     f"{r['time_ratio']:.2f} |")
    emit(lines, args.out)
    if args.out:
        with open(args.out.replace(".md", ".json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
