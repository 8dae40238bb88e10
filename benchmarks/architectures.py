"""The architectures of issue 18, for benchmarks/overhead.py's ``--architectures`` rows.

Images: Fashion-MNIST resized to 32x32 and repeated to three channels (RGB-shaped),
2,000 training images with 20% symmetric label noise and 500 validation images;
torchvision's ResNet-18 (10 classes) with BatchNorm, with GroupNorm (8 groups), and
frozen (every parameter of a seeded ResNet-18 fixed, the backbone in eval mode as a
fine-tuning script puts it) under a trainable linear head. Text: synthetic topic
documents (hydraclean.datasets.make_topic_tokens), 4 topics, 20% symmetric noise; an
``nn.EmbeddingBag`` classifier over 20,000 documents of 64 tokens (vocabulary 10,000)
and a two-layer ``nn.TransformerEncoder`` over 4,000 documents of 32 tokens
(vocabulary 1,000). Every model: SGD (momentum 0.9), batch 64, 3 epochs.

Each row's baseline is a plain torch loop over the same batches with the same
optimizer (``torch.optim.SGD`` on the trainable parameters, the modes the model's
submodules are in), nothing recorded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torchvision
from settings import ensure_fashion_mnist
from torch import nn

from hydraclean import HydraLabelCleaner
from hydraclean.datasets import load_fashion_mnist, make_label_noise, make_topic_tokens
from hydraclean.models import BagOfTokens, TokenTransformer
from hydraclean.modes import set_modes, training_modes
from hydraclean.training import plan_trajectory

__all__ = ["BATCH", "EPOCHS", "ROWS", "Row", "auroc", "fit", "harm_weight", "n_results", "plain_training"]

BATCH, EPOCHS = 64, 3


@dataclass(frozen=True)
class Row:
    """One architecture: its model (seeded), its data and its learning rate."""

    name: str
    make_model: Callable[[], nn.Module]
    data: Callable[[], tuple]
    lr: float


def images(n_train: int = 2000, n_val: int = 500):
    """(X_train, y_noisy, X_val, y_val, noise) as 32x32 three-channel float32 images."""
    ensure_fashion_mnist()
    X, y = load_fashion_mnist(os.environ.get("HYDRACLEAN_DATA"))
    X = torch.as_tensor(X[: n_train + n_val].reshape(-1, 1, 28, 28), dtype=torch.float32)
    X = nn.functional.interpolate(X, size=32).repeat(1, 3, 1, 1).numpy()
    y_noisy, noise = make_label_noise(y[:n_train], 0.2, random_state=0)
    return X[:n_train], y_noisy, X[n_train:], y[n_train : n_train + n_val], noise


def tokens(n_train: int, length: int, vocab: int, n_val: int = 500):
    """(X_train, y_noisy, X_val, y_val, noise): topic documents as int64 token ids."""
    X, y = make_topic_tokens(n_train + n_val, n_classes=4, vocab_size=vocab, length=length, random_state=0)
    y_noisy, noise = make_label_noise(y[:n_train], 0.2, random_state=0)
    return X[:n_train], y_noisy, X[n_train:], y[n_train:], noise


def resnet18(norm: str = "batch") -> nn.Module:
    torch.manual_seed(0)
    norm_layer = (lambda c: nn.GroupNorm(8, c)) if norm == "group" else None
    return torchvision.models.resnet18(num_classes=10, norm_layer=norm_layer)


def frozen_resnet18() -> nn.Module:
    """A seeded ResNet-18 (standing in for pretrained weights: nothing downloads), every parameter frozen and
    every submodule in eval mode, under a fresh trainable linear head."""
    model = resnet18()
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    model.fc = nn.Linear(512, 10)
    for m in model.modules():
        if m is not model and m is not model.fc:
            m.eval()
    return model


ROWS = {
    "ResNet-18, BatchNorm": Row("ResNet-18, BatchNorm", resnet18, images, 0.01),
    "ResNet-18, GroupNorm": Row("ResNet-18, GroupNorm", lambda: resnet18("group"), images, 0.01),
    "frozen ResNet-18 + linear head": Row("frozen ResNet-18 + linear head", frozen_resnet18, images, 0.01),
    "EmbeddingBag classifier": Row("EmbeddingBag classifier", lambda: _seeded(BagOfTokens, 10_000, 4),
                                   lambda: tokens(20_000, 64, 10_000), 0.5),
    "TransformerEncoder, 2 layers": Row("TransformerEncoder, 2 layers",
                                        lambda: _seeded(TokenTransformer, 1000, 4, 32),
                                        lambda: tokens(4000, 32, 1000), 0.05),
}


def _seeded(cls, *args) -> nn.Module:
    torch.manual_seed(0)
    return cls(*args)


def plain_training(row: Row, data) -> None:
    """A user's own loop: the same model, modes, batches and optimizer, nothing recorded."""
    X, y = torch.as_tensor(data[0]), torch.as_tensor(data[1])
    model = row.make_model()
    set_modes(model, training_modes(model))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=row.lr, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    order = plan_trajectory(len(y), batch_size=BATCH, max_epochs=EPOCHS, seed=0).order
    for perm in torch.as_tensor(order):
        for idx in perm.split(BATCH):
            loss = criterion(model(X[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def fit(row: Row, data, **params) -> HydraLabelCleaner:
    X, y, Xv, yv, _ = data
    return HydraLabelCleaner(row.make_model(), max_epochs=EPOCHS, batch_size=BATCH, lr=row.lr, random_state=0,
                             **params).fit(X, y, X_val=Xv, y_val=yv)


def auroc(cleaner: HydraLabelCleaner, data) -> float:
    """AUROC of the fit's score (``label_quality_``, the one its flags rank by) against the noise mask."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(data[4], -cleaner.label_quality_))


def harm_weight(cleaner: HydraLabelCleaner, data) -> float:
    """The run's memorisation ``m`` (hydraclean.scoring.memorisation): the default score's weight on the
    class-resolved harm, against ``1 - m`` on the margins (at 0 the default reads no hypergradient)."""
    from hydraclean.scoring import memorisation

    rows = ~cleaner.validation_mask_
    return memorisation(trajectory_proba=cleaner.trajectory_proba_[rows],
                        labels=np.searchsorted(cleaner.classes_, data[1]),
                        train_accuracy=cleaner.history_["train_accuracy"][-1])


def n_results(row: Row, data) -> int:
    """Values of the fitted N x K float64 results: contribution_, class_contribution_, trajectory_proba_."""
    k = int(max(data[1].max(), data[3].max())) + 1
    return len(data[1]) * (1 + 2 * k)

