"""On a CUDA machine: cost of HYDRA over plain training on Fashion-MNIST, LeNet-5 and DenseNet-BC-40.

Run by `make gpu-check` after the CUDA tests (tests/test_cuda.py, which check GPU
scoring against float64 on the CPU at the recorded weights). For each model:
plain training (a bare torch loop over the same batches) and the default fit
(strategy="drop", 10 class directions; for LeNet-5 also with autocast="bfloat16",
and how far its scores move) on the 60,000 training images with 20%
symmetric noise and 1,000 validation images, times with the device
synchronised, ratio to plain training, and the peak GPU memory of each.
DenseNet-BC-40 takes the images padded to 32x32; it holds BatchNorm, so its
scoring walks the stored weights with one forward-mode JVP per direction
rather than the layer factors (benchmarks/batchnorm_route.py has its cost on a
CPU). ``--densenet-train`` bounds its training set
(``make gpu-check`` passes 10,000 so that the check surely fits in a short
lease of a GPU machine).

    python benchmarks/gpu_check.py [--epochs 3] [--densenet-epochs 1] [--densenet-train 60000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from measure import emit  # noqa: I001  (benchmarks/ is on sys.path when run as a script)
from settings import ensure_fashion_mnist

from hydraclean import HydraLabelCleaner
from hydraclean.datasets import load_fashion_mnist, make_label_noise
from hydraclean.models import LeNet5, densenet_bc_40
from hydraclean.training import plan_trajectory

BATCH, LR, N_VAL = 64, 0.01, 1_000


def data(pad: bool):
    ensure_fashion_mnist()
    X, y = load_fashion_mnist(os.environ.get("HYDRACLEAN_DATA"))
    Xv, yv = load_fashion_mnist(os.environ.get("HYDRACLEAN_DATA"), split="test")
    X, Xv = (a.astype(np.float32).reshape(-1, 1, 28, 28) for a in (X, Xv[:N_VAL]))
    if pad:
        X, Xv = (np.pad(a, ((0, 0), (0, 0), (2, 2), (2, 2))) for a in (X, Xv))
    y_noisy, _ = make_label_noise(y, 0.2, random_state=0)
    return X, y_noisy, Xv, yv[:N_VAL]


def timed(fn) -> tuple[float, float]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**20


def plain(make, X, y, epochs: int) -> None:
    torch.manual_seed(0)
    model = make().cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    order = plan_trajectory(len(y), batch_size=BATCH, max_epochs=epochs, lr=LR, lr_schedule="constant",
                            momentum=0.9, weight_decay=0.0, seed=0).order
    X, y = torch.as_tensor(X, device="cuda"), torch.as_tensor(y, device="cuda")
    for perm in torch.as_tensor(order, device="cuda"):
        for idx in perm.split(BATCH):
            loss = criterion(model(X[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def check(name: str, make, pad: bool, epochs: int, autocast: str | None = None, n_train: int | None = None) -> dict:
    """One model: plain training, the float32 fit and, with ``autocast``, the mixed-precision fit beside it
    (on the first ``n_train`` training images, default all)."""
    X, y, Xv, yv = data(pad)
    X, y = X[:n_train], y[:n_train]
    plain(make, X[:2048], y[:2048], 1)  # warm-up
    t_plain, m_plain = timed(lambda: plain(make, X, y, epochs))
    rows, base = [], None
    for precision in [None] + ([autocast] if autocast else []):
        cleaner = HydraLabelCleaner(make, max_epochs=epochs, batch_size=BATCH, lr=LR, device="cuda",
                                    max_memory="40GB", autocast=precision, random_state=0)
        t_fit, m_fit = timed(lambda: cleaner.fit(X, y, X_val=Xv, y_val=yv))
        row = {"model": name, "autocast": precision or "none", "epochs": epochs, "n_train": len(y),
               "plain_s": t_plain, "fit_s": t_fit, "ratio": t_fit / t_plain, "plain_peak_mib": m_plain,
               "fit_peak_mib": m_fit, "valid_accuracy": cleaner.history_["valid_accuracy"][-1]}
        if base is None:
            base = cleaner
        else:  # the effect of autocast on the scores: the same seed, another (rounded) run
            row["spearman_contribution"] = float(spearmanr(base.contribution_, cleaner.contribution_)[0])
            row["flagged_overlap"] = float((base.label_issues_ & cleaner.label_issues_).sum()
                                           / max(base.label_issues_.sum(), 1))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--densenet-epochs", type=int, default=1)
    parser.add_argument("--densenet-train", type=int, default=None, help="training images for DenseNet (all)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA device.")
    warnings.simplefilter("ignore", UserWarning)
    rows = (check("LeNet-5", LeNet5, False, args.epochs, autocast="bfloat16")
            + check("DenseNet-BC-40", lambda: densenet_bc_40(in_channels=1), True, args.densenet_epochs,
                    n_train=args.densenet_train))
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}. Fashion-MNIST training images "
             f"(20% symmetric noise), {N_VAL:,} validation images, batch {BATCH}; default fit "
             "(strategy='drop').", "",
             "| model | training images | autocast | epochs | plain training (s) | fit (s) | ratio | peak GPU memory, plain / fit (MiB) |"
             " validation accuracy | Spearman of C(i) with float32 | flagged in common |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        effect = (f"{r['spearman_contribution']:.3f} | {r['flagged_overlap']:.1%}" if "spearman_contribution" in r
                  else "- | -")
        lines.append(f"| {r['model']} | {r['n_train']:,} | {r['autocast']} | {r['epochs']} | {r['plain_s']:.1f} | "
                     f"{r['fit_s']:.1f} | {r['ratio']:.2f} | {r['plain_peak_mib']:.0f} / {r['fit_peak_mib']:.0f} | "
                     f"{r['valid_accuracy']:.3f} | {effect} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
