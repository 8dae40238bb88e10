"""HydraSampler inside an imbalanced-learn Pipeline, tuned with GridSearchCV.

The sampler drops flagged rows when the pipeline is fitted; the final
classifier never sees them. imbalanced-learn <= 0.14.2 passes a sampler's fit
parameters only with scikit-learn's metadata routing enabled, so this example
enables it; HydraSampler requests X_val and y_val by default.

    python examples/digits_imblearn_pipeline.py [--small]
"""

import argparse
import warnings

import sklearn
from imblearn.pipeline import Pipeline
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, train_test_split

from hydraclean import ExponentialDecay, HydraSampler
from hydraclean.datasets import load_digits_images, make_label_noise
from hydraclean.models import MLP


def mlp(n_features, n_classes):
    return MLP(n_features, n_classes, hidden=(64,))


def main(small: bool) -> None:
    sklearn.set_config(enable_metadata_routing=True)
    X, y = load_digits_images()
    X = X.reshape(len(X), -1)
    X_rest, X_test, y_rest, y_test = train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)
    X_train, X_val, y_train, y_val = train_test_split(X_rest, y_rest, test_size=200, stratify=y_rest, random_state=0)
    y_noisy, _ = make_label_noise(y_train, 0.3, random_state=0)

    pipe = Pipeline([
        ("clean", HydraSampler(mlp, max_epochs=2 if small else 10, batch_size=32, lr=0.1,
                               lr_schedule=ExponentialDecay(0.8), random_state=0)),
        ("clf", LogisticRegression(max_iter=1000)),
    ])
    search = GridSearchCV(pipe, {"clean__drop_fraction": [0.0, 0.15, 0.3]}, cv=2 if small else 3)
    search.fit(X_train, y_noisy, X_val=X_val, y_val=y_val)
    for fraction, score in zip(search.cv_results_["param_clean__drop_fraction"],
                               search.cv_results_["mean_test_score"]):
        refit = pipe.set_params(clean__drop_fraction=fraction).fit(X_train, y_noisy, X_val=X_val, y_val=y_val)
        print(f"drop_fraction={fraction:<5} CV accuracy on noisy labels {score:.3f}   "
              f"test accuracy on true labels {refit.score(X_test, y_test):.3f}")
    print(f"GridSearchCV picked {search.best_params_}. Its folds score against the noisy labels, which rewards "
          "keeping the noise: judge cleaning on trusted labels, as the last column does.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run (CI)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        main(parser.parse_args().small)
