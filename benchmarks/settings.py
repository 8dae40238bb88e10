"""The benchmark settings: data, label noise, model and training recipe, by name.

Every benchmark script (the suite, the score ablation) takes its settings from
here, so that a setting means the same data, noise, model and recipe everywhere.

Noise kinds:

* ``sym-R``: symmetric, a fraction R of every class flipped uniformly to the
  other classes (DESIGN.md §4);
* ``pairs``: the look-alike pairs the HYDRA paper names (digits (3,5), (2,7),
  (4,9); Fashion-MNIST (Pullover, Coat), (T-shirt, Shirt), (Sneaker, Ankle
  boot)), 40% of each paired class flipped to its partner;
* ``cc``: class-conditional sparse noise from cleanlab's noise-matrix
  generator (average noise 0.3, half the off-diagonal rates zero);
* ``instance``: instance-dependent noise: a reference model trained on the clean
  labels (logistic regression on the pixels, 5-fold out-of-sample
  probabilities) names, for each sample, its most probable wrong class; a
  fraction R of the samples is drawn with probability proportional to that
  class's probability (the samples that look most like another class) and
  relabelled as it;
* ``adamw-...``: the dataset's model trained with AdamW (torch's default weight
  decay 1e-2) and cosine annealing to 0 over the run, stepped every batch;
* ``memorise``: digits with an MLP trained until it fits its noisy labels
  (training accuracy >= 0.99), symmetric 0.25; ``memorise-perm``: the same
  model memorising one systematic confusion per class (a random permutation
  of the classes, 20% of each class).

Architectures practitioners train (issue 18): ``resnet``, a small BatchNorm
ResNet (hydraclean.models.ResNet, 77,754 parameters) on digits and on
Fashion-MNIST; ``topics``, synthetic topic documents as token ids
(hydraclean.datasets.make_topic_tokens, four topics: nothing downloads) with a
two-layer TransformerEncoder (``topics-...``) or an EmbeddingBag classifier
(``topics-bag-...``).

The ``tabular`` settings are the held-out check of the score ablation (a
synthetic tabular problem and an MLP), run only once a choice was made.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
from methods import Training
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split

from hydraclean.datasets import load_digits_images, load_fashion_mnist, make_label_noise, make_topic_tokens
from hydraclean.models import MLP, BagOfTokens, LeNet5, ResNet, SmallCNN, TokenTransformer

DIGITS_PAIRS = [(3, 5), (2, 7), (4, 9)]
FASHION_PAIRS = [(2, 4), (0, 6), (7, 9)]  # (Pullover, Coat), (T-shirt, Shirt), (Sneaker, Ankle boot)


@dataclass(frozen=True)
class Setting:
    """One benchmark setting."""

    name: str
    dataset: str  # "digits", "fashion", "topics" or "tabular"
    noise: str  # "symmetric", "pairs", "cc", "instance" or "permutation"
    rate: float
    model: str  # "default" (the dataset's model), "memorise" (an MLP fitting its labels), "resnet", "bag"
    title: str
    recipe: str = "sgd"  # "sgd" (the dataset's recipe) or "adamw" (AdamW with cosine annealing)

    def make_noise(self, y: np.ndarray, X: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(y_noisy, noise_mask) for clean labels ``y`` of inputs ``X``."""
        if self.noise == "instance":
            return instance_noise(X, y, self.rate, seed)
        if self.noise == "cc":
            from cleanlab.benchmarking.noise_generation import generate_noise_matrix_from_trace, generate_noisy_labels

            k = int(y.max()) + 1
            prior = np.bincount(y, minlength=k) / len(y)
            matrix = generate_noise_matrix_from_trace(k, k * (1 - self.rate), py=prior, frac_zero_noise_rates=0.5,
                                                      valid_noise_matrix=True, seed=seed)
            np.random.seed(seed)  # generate_noisy_labels draws from numpy's global generator
            noisy = np.asarray(generate_noisy_labels(y, matrix))
            return noisy, noisy != y
        pairs = {"digits": DIGITS_PAIRS, "fashion": FASHION_PAIRS}.get(self.dataset) if self.noise == "pairs" else None
        return make_label_noise(y, self.rate, kind=self.noise, random_state=seed, pairs=pairs)


def instance_noise(X: np.ndarray, y: np.ndarray, rate: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Instance-dependent noise (the ``instance`` kind above): (y_noisy, noise_mask)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    flat = np.asarray(X, dtype=np.float64).reshape(len(y), -1)
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
    proba = cross_val_predict(reference, flat, y, cv=5, method="predict_proba")
    proba[np.arange(len(y)), y] = 0.0
    wrong = proba.argmax(1)
    weight = proba.max(1) + 1e-12
    chosen = np.random.default_rng(seed).choice(len(y), size=int(round(rate * len(y))), replace=False,
                                                p=weight / weight.sum())
    noisy = y.copy()
    noisy[chosen] = wrong[chosen]
    return noisy, noisy != y


def _settings() -> dict[str, Setting]:
    out = {}
    for dataset, title in (("digits", "digits"), ("fashion", "Fashion-MNIST")):
        for rate in (0.2, 0.4, 0.8):
            out[f"{dataset}-sym-{rate}"] = Setting(f"{dataset}-sym-{rate}", dataset, "symmetric", rate, "default",
                                                   f"{title}, symmetric noise {rate}")
        out[f"{dataset}-pairs"] = Setting(f"{dataset}-pairs", dataset, "pairs", 0.4, "default",
                                          f"{title}, look-alike pairs 0.4")
        out[f"{dataset}-cc"] = Setting(f"{dataset}-cc", dataset, "cc", 0.3, "default",
                                       f"{title}, class-conditional sparse noise 0.3")
        if dataset == "digits":
            out["digits-memorise"] = Setting("digits-memorise", "digits", "symmetric", 0.25, "memorise",
                                             "digits, MLP memorising symmetric noise 0.25")
            out["digits-memorise-perm"] = Setting("digits-memorise-perm", "digits", "permutation", 0.2, "memorise",
                                                  "digits, MLP memorising a systematic confusion 0.2")
    for dataset, title in (("digits", "digits"), ("fashion", "Fashion-MNIST")):
        out[f"{dataset}-instance"] = Setting(f"{dataset}-instance", dataset, "instance", 0.3, "default",
                                             f"{title}, instance-dependent noise 0.3")
    for dataset, title in (("digits", "digits"), ("fashion", "Fashion-MNIST")):
        out[f"{dataset}-adamw-sym-0.4"] = Setting(f"{dataset}-adamw-sym-0.4", dataset, "symmetric", 0.4, "default",
                                                  f"{title}, AdamW + cosine, symmetric noise 0.4", "adamw")
        out[f"{dataset}-adamw-pairs"] = Setting(f"{dataset}-adamw-pairs", dataset, "pairs", 0.4, "default",
                                                f"{title}, AdamW + cosine, look-alike pairs 0.4", "adamw")
    out["digits-resnet-sym-0.4"] = Setting("digits-resnet-sym-0.4", "digits", "symmetric", 0.4, "resnet",
                                           "digits, BatchNorm ResNet, symmetric noise 0.4")
    out["fashion-resnet-sym-0.2"] = Setting("fashion-resnet-sym-0.2", "fashion", "symmetric", 0.2, "resnet",
                                            "Fashion-MNIST (4,000 images), BatchNorm ResNet, symmetric noise 0.2")
    out["topics-sym-0.2"] = Setting("topics-sym-0.2", "topics", "symmetric", 0.2, "default",
                                    "topic documents (token ids), TransformerEncoder, symmetric noise 0.2")
    out["topics-bag-sym-0.4"] = Setting("topics-bag-sym-0.4", "topics", "symmetric", 0.4, "bag",
                                        "topic documents (token ids), EmbeddingBag, symmetric noise 0.4")
    out["tabular-cc"] = Setting("tabular-cc", "tabular", "cc", 0.3, "default",
                                "tabular (held out), class-conditional sparse noise 0.3")
    out["tabular-sym-0.4"] = Setting("tabular-sym-0.4", "tabular", "symmetric", 0.4, "default",
                                     "tabular (held out), symmetric noise 0.4")
    return out


SETTINGS = _settings()
SELECTION = [name for name in SETTINGS if not name.startswith("tabular")]  # the settings that choose a score
HELD_OUT = [name for name in SETTINGS if name.startswith("tabular")]


def ensure_fashion_mnist() -> None:
    try:
        load_fashion_mnist(split="test")
    except FileNotFoundError:
        print("Fashion-MNIST is missing: installing Debian's dataset-fashion-mnist", file=sys.stderr)
        subprocess.run("apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist", shell=True, check=True)


def load_data(setting: Setting, smoke: bool = False, n_train: int = 10_000, seed: int = 0):
    """(make_module, recipe, X_train, y_train, X_val, y_val, X_test, y_test), labels clean."""
    if setting.dataset == "topics":
        bag = setting.model == "bag"
        n, length, vocab = (8000, 64, 10_000) if bag else (4000, 32, 1000)
        n = 400 if smoke else n
        X, y = make_topic_tokens(n + 500 + 2000, n_classes=4, vocab_size=vocab, length=length, random_state=seed)
        X_tr, y_tr, X_val, y_val = X[:n], y[:n], X[n : n + 500], y[n : n + 500]
        X_test, y_test = X[n + 500 :], y[n + 500 :]
        epochs = 2 if smoke else 5
        if bag:
            make_module, recipe = partial(BagOfTokens, vocab, 4), Training(max_epochs=epochs, batch_size=64, lr=0.5)
        else:
            make_module = partial(TokenTransformer, vocab, 4, length)
            recipe = Training(max_epochs=epochs, batch_size=64, lr=0.1)
        return make_module, recipe, X_tr, y_tr, X_val, y_val, X_test, y_test
    if setting.model == "resnet" and setting.dataset == "fashion":
        n_train = 4000
    if setting.dataset == "digits":
        X, y = load_digits_images()
        X_rest, X_test, y_rest, y_test = train_test_split(X, y, test_size=0.2, stratify=y, random_state=seed)
        X_tr, X_val, y_tr, y_val = train_test_split(X_rest, y_rest, test_size=200, stratify=y_rest,
                                                    random_state=seed)
        if smoke:
            X_tr, y_tr = X_tr[:300], y_tr[:300]
        if setting.model == "memorise":
            make_module: Callable = partial(MLP, 64, 10, hidden=(256,))
            recipe = Training(max_epochs=3 if smoke else 150, batch_size=32, lr=0.05)
        elif setting.model == "resnet":
            make_module, recipe = partial(ResNet, 10, 1), Training(max_epochs=2 if smoke else 15, batch_size=32,
                                                                   lr=0.05)
        elif setting.recipe == "adamw":
            make_module, recipe = SmallCNN, Training(max_epochs=2 if smoke else 15, batch_size=32, lr=3e-3,
                                                     weight_decay=None, optimizer="adamw", cosine=True)
        else:
            make_module, recipe = SmallCNN, Training(max_epochs=2 if smoke else 15, batch_size=32, lr=0.1, decay=0.8)
        return make_module, recipe, X_tr, y_tr, X_val, y_val, X_test, y_test
    if setting.dataset == "tabular":
        X, y = make_classification(n_samples=4000, n_features=20, n_informative=12, n_redundant=4, n_classes=6,
                                   n_clusters_per_class=2, class_sep=1.5, random_state=seed)
        X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
        X_rest, X_test, y_rest, y_test = train_test_split(X, y, test_size=1000, stratify=y, random_state=seed)
        X_tr, X_val, y_tr, y_val = train_test_split(X_rest, y_rest, test_size=300, stratify=y_rest,
                                                    random_state=seed)
        if smoke:
            X_tr, y_tr = X_tr[:300], y_tr[:300]
        recipe = Training(max_epochs=2 if smoke else 30, batch_size=32, lr=0.05, decay=0.9)
        return partial(MLP, 20, 6, hidden=(64, 64)), recipe, X_tr, y_tr, X_val, y_val, X_test, y_test
    ensure_fashion_mnist()
    X, y = load_fashion_mnist(split="train")
    X_te, y_te = load_fashion_mnist(split="test")
    rng = np.random.RandomState(seed)
    tr = rng.permutation(len(y))[: (500 if smoke else n_train)]
    order = rng.permutation(len(y_te))
    val, test = order[:1000], order[1000:]  # trusted validation from the test split; the rest tests
    if setting.model == "resnet":
        recipe = Training(max_epochs=2 if smoke else 8, batch_size=64, lr=0.05)
        return partial(ResNet, 10, 1), recipe, X[tr], y[tr], X_te[val], y_te[val], X_te[test], y_te[test]
    if setting.recipe == "adamw":
        recipe = Training(max_epochs=2 if smoke else 10, batch_size=64, lr=1e-3, weight_decay=None, optimizer="adamw",
                          cosine=True)
    else:
        recipe = Training(max_epochs=2 if smoke else 20, batch_size=64, lr=0.01)
    return LeNet5, recipe, X[tr], y[tr], X_te[val], y_te[val], X_te[test], y_te[test]
