"""Cost of HYDRA over plain training: time ratios (one process) and peak memory.

Part 1, digits demo setting (SmallCNN, 15 epochs, batch 32): median over
--repeats of plain training along the same trajectory, then fit with
hessian="free" for strategy="drop" (one direction) and strategy="cluster"
(C(i, j) for 200 validation samples), and hessian="exact" tracking 50 samples.
All times are measured in this one process and reported as ratios to plain
training.

Part 2, memory: each configuration runs in a fresh subprocess and reports its
peak resident memory (VmHWM; ru_maxrss would carry the parent's peak across
fork and exec) and the part above the process's resident size once torch and
the data are loaded. LeNet-5 on random 28x28 inputs with N growing
shows that hessian="free" never holds anything of size N x |w| (at N = 16,384
that would be 4 GB in float32).

    python benchmarks/overhead.py [--repeats 3] [--out docs/_generated/overhead.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import warnings

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn

from measure import rss_mib  # noqa: I001  (benchmarks/ is on sys.path when run as a script)

from hydraclean import ExponentialDecay, HydraLabelCleaner
from hydraclean.datasets import load_digits_images, make_label_noise
from hydraclean.models import LeNet5, SmallCNN
from hydraclean.training import plan_trajectory, train

SETTINGS = dict(max_epochs=15, batch_size=32, lr=0.1, lr_schedule=ExponentialDecay(0.8), momentum=0.9, weight_decay=0.0)


def digits_split(seed=0):
    X, y = load_digits_images()
    X_rest, _, y_rest, _ = train_test_split(X, y, test_size=0.2, stratify=y, random_state=seed)
    X_tr, X_val, y_tr, y_val = train_test_split(X_rest, y_rest, test_size=200, stratify=y_rest, random_state=seed)
    y_noisy, _ = make_label_noise(y_tr, 0.2, random_state=seed)
    return X_tr, y_noisy, X_val, y_val


def plain_training(X, y, seed=0):
    torch.manual_seed(seed)
    module = SmallCNN()
    traj = plan_trajectory(len(y), seed=seed, **SETTINGS)
    train(module, torch.as_tensor(X), torch.as_tensor(y), nn.CrossEntropyLoss(reduction="none"), traj)


CONFIGS = {
    "hessian='free', strategy='drop'": dict(strategy="drop", drop_fraction=0.2),
    "hessian='free', strategy='cluster' (200 val features)": dict(strategy="cluster", n_val_features=200),
    "hessian='exact', 50 tracked samples": dict(hessian="exact", exact_subset=list(range(50))),
}


def timings(repeats: int) -> list[dict]:
    X, y, Xv, yv = digits_split()
    rows = []
    base = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plain_training(X, y)
        base.append(time.perf_counter() - t0)
    plain = float(np.median(base))
    rows.append({"config": "plain training (same trajectory)", "seconds": plain, "ratio": 1.0})
    for name, kw in CONFIGS.items():
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            HydraLabelCleaner(SmallCNN, random_state=0, **SETTINGS, **kw).fit(X, y, X_val=Xv, y_val=yv)
            ts.append(time.perf_counter() - t0)
        rows.append({"config": name, "seconds": float(np.median(ts)), "ratio": float(np.median(ts)) / plain})
    return rows


def peak_memory_child(kind: str, n: int) -> None:
    """Run one configuration and print its peak RSS in MiB (called in a subprocess)."""
    torch.set_num_threads(2)
    rng = np.random.RandomState(0)
    if kind.startswith("digits"):
        X, y, Xv, yv = digits_split()
        module, settings = SmallCNN, SETTINGS
    else:
        X = rng.rand(n, 1, 28, 28).astype(np.float32)
        y = rng.randint(0, 10, n)
        Xv, yv = X[:200], y[:200]
        module, settings = LeNet5, dict(max_epochs=1, batch_size=64, lr=0.01, weight_decay=0.0)
    base = rss_mib("VmRSS")
    if kind.endswith("plain"):
        torch.manual_seed(0)
        traj = plan_trajectory(len(y), seed=0, **{**dict(lr_schedule="constant", momentum=0.9), **settings})
        train(module(), torch.as_tensor(X), torch.as_tensor(y), nn.CrossEntropyLoss(reduction="none"), traj)
    else:
        kw = CONFIGS[kind.split(":", 1)[1]] if ":" in kind else {}
        HydraLabelCleaner(module, random_state=0, **settings, **kw).fit(X, y, X_val=Xv, y_val=yv)
    peak = rss_mib("VmHWM")
    print(json.dumps({"peak_mib": peak, "above_baseline_mib": peak - base}))


def peak_memory(kind: str, n: int = 0) -> str:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--n", str(n)], capture_output=True, text=True,
                         check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return f"{r['peak_mib']:.0f} (+{r['above_baseline_mib']:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    if args.child:
        peak_memory_child(args.child, args.n)
        return
    torch.set_num_threads(2)
    lines = [f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}, Python {platform.python_version()}.", "",
             "### Time, digits demo setting (1,077 training samples, SmallCNN, 15 epochs, batch 32; "
             f"median of {args.repeats}, one process)", "",
             "| configuration | seconds | ratio to plain training |", "|---|---|---|"]
    for r in timings(args.repeats):
        lines.append(f"| {r['config']} | {r['seconds']:.2f} | {r['ratio']:.2f} |")
    lines += ["", "### Peak resident memory (fresh process each; in brackets: above the resident size after "
              "importing torch and loading the data)", "", "| configuration | peak RSS (MiB) |", "|---|---|"]
    lines.append(f"| digits, plain training | {peak_memory('digits-plain')} |")
    for name in CONFIGS:
        lines.append(f"| digits, {name} | {peak_memory('digits:' + name)} |")
    lines += ["", "| LeNet-5 (61,706 parameters), random 28x28 inputs, 1 epoch | plain training (MiB) | "
              "hessian='free', drop (MiB) | N x \\|w\\| in float32 (MiB) |", "|---|---|---|---|"]
    for n in (1024, 4096, 16384):
        nw = n * 61706 * 4 / 2**20
        lines.append(f"| N = {n} | {peak_memory('lenet-plain', n)} | {peak_memory('lenet', n)} | {nw:.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
