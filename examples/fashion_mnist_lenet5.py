"""Clean Fashion-MNIST with LeNet-5 (the paper's setting, scaled to a CPU).

Reads the IDX files offline (Debian's dataset-fashion-mnist package, or
HYDRACLEAN_DATA); injects symmetric label noise; cleans with both strategies;
saves a histogram of contributions split by the noise mask.

    python examples/fashion_mnist_lenet5.py [--small] [--n-train 10000] [--noise 0.4]
"""

import argparse
import time
import warnings

import numpy as np

from hydraclean import HydraLabelCleaner
from hydraclean.datasets import load_fashion_mnist, make_label_noise
from hydraclean.evaluation import detection_metrics
from hydraclean.models import LeNet5


def main(small: bool, n_train: int, noise: float, out: str) -> None:
    X, y = load_fashion_mnist(split="train")
    X_test, y_test = load_fashion_mnist(split="test")
    rng = np.random.RandomState(0)
    idx = rng.permutation(len(y))[: (2000 if small else n_train)]
    X_train, y_clean = X[idx], y[idx]
    y_noisy, mask = make_label_noise(y_clean, noise, random_state=0)
    val = rng.permutation(len(y_test))[: (200 if small else 1000)]  # trusted, from the test split
    for strategy in ("drop", "cluster"):
        cleaner = HydraLabelCleaner(LeNet5, strategy=strategy, n_val_features=len(val),
                                    max_epochs=4 if small else 20, batch_size=64, lr=0.05 if small else 0.01, momentum=0.9,
                                    random_state=0)
        t0 = time.perf_counter()
        cleaner.fit(X_train, y_noisy, X_val=X_test[val], y_val=y_test[val])
        m = detection_metrics(mask, cleaner.label_quality_, cleaner.label_issues_)
        print(f"{strategy:8s} AUROC {m['auroc']:.3f}  precision {m['precision']:.3f}  recall {m['recall']:.3f}  "
              f"F1 {m['f1']:.3f}  ({time.perf_counter() - t0:.0f} s)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        from hydraclean.plotting import plot_contribution_histogram

        plot_contribution_histogram(cleaner.label_quality_, mask).savefig(out)
        print(f"wrote {out}")
    except ImportError:
        print("matplotlib is not installed: no histogram")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run (CI)")
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--noise", type=float, default=0.4)
    parser.add_argument("--out", default="fashion_mnist_contributions.png")
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        main(args.small, args.n_train, args.noise, args.out)
