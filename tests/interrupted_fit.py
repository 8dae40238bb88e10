"""A fit slow enough to interrupt: run as a script by tests/test_checkpoint.py (``python interrupted_fit.py
STRATEGY INPUT CHECKPOINT_DIR OUT THREADS``), or imported for the same fit in the test process.

With ``HYDRACLEAN_SLOW_STEPS`` set, every training step sleeps a little, so that an epoch lasts long enough for a
SIGINT to land inside it; the sleep changes no number.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
from torch import nn

STEP_SECONDS = 0.03
N_TRAIN, BATCH, EPOCHS = 240, 12, 4  # 20 steps an epoch


class SlowNet(nn.Module):
    """A small convolutional net whose training forward pass sleeps STEP_SECONDS."""

    def __init__(self, n_classes: int = 3):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2), nn.Linear(48, n_classes))

    def forward(self, x):
        if self.training and x.shape[0] == BATCH and os.environ.get("HYDRACLEAN_SLOW_STEPS"):
            time.sleep(STEP_SECONDS)
        return self.net(x)


def data():
    rng = np.random.RandomState(0)
    X = rng.randn(N_TRAIN + 60, 1, 6, 6).astype(np.float32)
    y = (X[:, 0, 2:4, 2:4].mean((1, 2)) > 0).astype(int) + (X[:, 0, 0, 0] > 1).astype(int)
    flip = rng.rand(N_TRAIN) < 0.2
    y_noisy = y[:N_TRAIN].copy()
    y_noisy[flip] = (y_noisy[flip] + 1) % 3
    return X[:N_TRAIN], y_noisy, X[N_TRAIN:], y[N_TRAIN:]


def fit(strategy: str, kind: str, checkpoint_dir: str | None):
    from hydraclean import HydraLabelCleaner

    X, y, Xv, yv = data()
    X_in = X if kind == "array" else torch.utils.data.TensorDataset(torch.as_tensor(X), torch.as_tensor(y))
    cleaner = HydraLabelCleaner(SlowNet, strategy=strategy, n_val_features=20, max_epochs=EPOCHS, batch_size=BATCH,
                                lr=0.05, checkpoint_dir=checkpoint_dir, random_state=0)
    return cleaner.fit(X_in, y if kind == "array" else None, X_val=Xv, y_val=yv)


RESULTS = ("contribution_", "class_contribution_", "label_quality_", "label_issues_", "contribution_matrix_",
           "trajectory_loss_", "trajectory_proba_", "trajectory_logit_margin_")


def arrays(cleaner) -> dict:
    return {name: getattr(cleaner, name) for name in RESULTS if getattr(cleaner, name) is not None}


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv.pop()))  # the test process's: the same reduction order, the same bits
    strategy, kind, checkpoint_dir, out = sys.argv[1:]
    try:
        np.savez(out, **arrays(fit(strategy, kind, checkpoint_dir)))
    except KeyboardInterrupt:
        sys.exit(130)
