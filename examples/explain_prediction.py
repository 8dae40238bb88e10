"""Which training samples helped, and which hurt, one validation prediction?

Fits on digits with 20% noise, then explains a validation sample from the
recorded trajectory (no retraining): its most helpful and most harmful
training images, and the class-to-class contribution map (paper Fig. 2).

    python examples/explain_prediction.py [--small] [--out-dir .]
"""

import argparse
import os
import warnings

import matplotlib
import numpy as np
from sklearn.model_selection import train_test_split

from hydraclean import ExponentialDecay, HydraLabelCleaner
from hydraclean.contribution import class_to_class_contribution
from hydraclean.datasets import load_digits_images, make_label_noise
from hydraclean.models import SmallCNN
from hydraclean.plotting import plot_explanation, plot_inter_class

matplotlib.use("Agg")


def main(small: bool, out_dir: str) -> None:
    X, y = load_digits_images()
    X_train, X_val, y_train, y_val = train_test_split(X, y, test_size=200, stratify=y, random_state=0)
    y_noisy, noise = make_label_noise(y_train, 0.2, random_state=0)
    cleaner = HydraLabelCleaner(SmallCNN, max_epochs=3 if small else 15, batch_size=32, lr=0.1,
                                lr_schedule=ExponentialDecay(0.8), random_state=0)
    cleaner.fit(X_train, y_noisy, X_val=X_val, y_val=y_val)

    j = 0
    ex = cleaner.explain(X_val[j : j + 1], y_val[j : j + 1], k=6)
    print(f"validation sample {j}, label {y_val[j]}")
    for name, idx, scores in [("helpful", ex.helpful[0], ex.helpful_scores[0]),
                              ("harmful", ex.harmful[0], ex.harmful_scores[0])]:
        for i, s in zip(idx, scores):
            flag = f" (label was flipped from {y_train[i]})" if noise[i] else ""
            print(f"  {name}: training row {i:4d}, label {y_noisy[i]}, suggested {cleaner.suggested_label_[i]}, "
                  f"C(i, j) = {s:+.2e}{flag}")
    plot_explanation(ex, X_train, y_noisy, X_val[j : j + 1], y_val[j : j + 1],
                     suggested=cleaner.suggested_label_).savefig(os.path.join(out_dir, "explanation.png"))

    # the inter-class map from the class-resolved contributions every fit computes
    heat = class_to_class_contribution(cleaner.class_contribution_, y_noisy, cleaner.classes_)
    plot_inter_class(heat, title="digits: training class -> validation class").savefig(
        os.path.join(out_dir, "inter_class.png"))
    print(f"diagonal share of |inter-class contribution|: {np.abs(np.diag(heat)).sum() / np.abs(heat).sum():.2f}")
    print(f"wrote {out_dir}/explanation.png and {out_dir}/inter_class.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run (CI)")
    parser.add_argument("--out-dir", default=".")
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        main(args.small, args.out_dir)
