"""Clean digits inside a scikit-learn Pipeline, then train a classifier on what is kept.

StandardScaler -> reshape to images -> HydraLabelCleaner. The trusted validation
set goes in as rows of X (validation_mask), so the pipeline scales it together
with the training rows.

    python examples/digits_sklearn_pipeline.py [--small]
"""

import argparse
import warnings

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from hydraclean import ExponentialDecay, HydraLabelCleaner
from hydraclean.datasets import load_digits_images, make_label_noise
from hydraclean.evaluation import detection_metrics
from hydraclean.models import SmallCNN


def to_images(X):
    return X.reshape(-1, 1, 8, 8).astype(np.float32)


def main(small: bool) -> None:
    X, y = load_digits_images()
    X = X.reshape(len(X), -1)
    X_rest, X_test, y_rest, y_test = train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)
    X_train, X_val, y_train, y_val = train_test_split(X_rest, y_rest, test_size=200, stratify=y_rest, random_state=0)
    y_noisy, noise = make_label_noise(y_train, 0.2, random_state=0)

    # the trusted rows travel inside X, marked by validation_mask
    X_all = np.concatenate([X_train, X_val])
    y_all = np.concatenate([y_noisy, y_val])
    is_val = np.r_[np.zeros(len(X_train), bool), np.ones(len(X_val), bool)]

    pipe = Pipeline([
        ("scale", StandardScaler()),
        ("images", FunctionTransformer(to_images)),
        ("clean", HydraLabelCleaner(SmallCNN, max_epochs=3 if small else 15, batch_size=32,
                                    lr=0.1, lr_schedule=ExponentialDecay(0.8), random_state=0)),
    ])
    pipe.fit_transform(X_all, y_all, clean__validation_mask=is_val)
    cleaner = pipe.named_steps["clean"]
    m = detection_metrics(noise, cleaner.label_quality_[~is_val], cleaner.label_issues_[~is_val])
    print(f"flagged {m['n_flagged']} of {len(X_train)} training rows: precision {m['precision']:.3f}, "
          f"recall {m['recall']:.3f}, AUROC {m['auroc']:.3f}")

    keep = cleaner.support_
    for name, mask in [("all rows", np.ones_like(keep)), ("kept rows", keep)]:
        clf = LogisticRegression(max_iter=2000).fit(X_all[mask], y_all[mask])
        print(f"logistic regression on {name:9s}: test accuracy {clf.score(X_test, y_test):.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run (CI)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        main(parser.parse_args().small)
