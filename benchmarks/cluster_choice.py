"""Which clustering splits the sign vectors of C(i, j) best? (the choice in hydraclean.cleaning)

Digits, SmallCNN, symmetric noise 0.2 and 0.5, three seeds. One HYDRA fit per
(noise, seed) gives C(i, j) over all 200 validation samples; each method then
splits every class in two and flags the group with the lower mean C(i). No
ground truth is used to name the group. Writes a markdown table.

    python benchmarks/cluster_choice.py [--out docs/_generated/cluster_choice.md]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.model_selection import train_test_split

from hydraclean import HydraLabelCleaner
from hydraclean.datasets import load_digits_images, make_label_noise
from hydraclean.evaluation import detection_metrics
from hydraclean.models import SmallCNN

METHODS = {
    "k-means, signs (Euclidean = 2 sqrt(Hamming))": lambda S, seed: KMeans(2, n_init=10, random_state=seed).fit_predict(S),
    "agglomerative, Hamming, average linkage": lambda S, seed: AgglomerativeClustering(
        2, metric="hamming", linkage="average").fit_predict(S),
    "agglomerative, Ward on signs": lambda S, seed: AgglomerativeClustering(2, linkage="ward").fit_predict(S),
}


def split_flags(matrix, labels, scores, method, seed):
    signs = np.where(matrix >= 0, 1.0, -1.0)
    flagged = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        groups = method(signs[idx], seed)
        low = int(np.argmin([scores[idx[groups == g]].mean() for g in (0, 1)]))
        flagged[idx[groups == low]] = True
    return flagged


def per_class_jaccard(noise_mask, flagged, labels):
    out = []
    for c in np.unique(labels):
        idx = labels == c
        inter = (noise_mask[idx] & flagged[idx]).sum()
        union = (noise_mask[idx] | flagged[idx]).sum()
        out.append(inter / union if union else 1.0)
    return float(np.mean(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the markdown table here too")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    X, y = load_digits_images()
    X_rest, _, y_rest, _ = train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)
    X_tr, X_val, y_tr, y_val = train_test_split(X_rest, y_rest, test_size=200, stratify=y_rest, random_state=0)
    results = {}
    for noise in (0.2, 0.5):
        for seed in range(args.seeds):
            y_noisy, mask = make_label_noise(y_tr, noise, random_state=seed)
            cleaner = HydraLabelCleaner(SmallCNN, strategy="cluster", n_val_features=200, max_epochs=15,
                                        batch_size=32, lr=0.05, random_state=seed)
            cleaner.fit(X_tr, y_noisy, X_val=X_val, y_val=y_val)
            for name, method in METHODS.items():
                t0 = time.perf_counter()
                flags = split_flags(cleaner.contribution_matrix_, y_noisy, cleaner.contribution_, method, seed)
                elapsed = time.perf_counter() - t0
                m = detection_metrics(mask, cleaner.contribution_, flags)
                row = results.setdefault((noise, name), {"f1": [], "jaccard": [], "class_jaccard": [], "time": []})
                row["f1"].append(m["f1"])
                row["jaccard"].append(m["jaccard"])
                row["class_jaccard"].append(per_class_jaccard(mask, flags, y_noisy))
                row["time"].append(elapsed)
    lines = [
        "| noise | method | F1 | Jaccard | Jaccard, mean over classes | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for (noise, name), r in results.items():
        f = lambda v: f"{np.mean(v):.3f} ± {np.std(v):.3f}"  # noqa: E731
        lines.append(f"| {noise} | {name} | {f(r['f1'])} | {f(r['jaccard'])} | {f(r['class_jaccard'])} | "
                     f"{np.mean(r['time']):.2f} |")
    table = "\n".join(lines)
    header = (f"Digits, SmallCNN, 15 epochs, 200 validation features, {args.seeds} seeds "
              f"(mean ± sd); torch {torch.__version__}.\n\n")
    print(header + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + table + "\n")


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        main()
