"""HYDRA against its peers on the same data, model, training recipe and seeds, in one process.

For each symmetric noise rate: HYDRA (drop, cluster), cleanlab (5-fold
out-of-sample probabilities of the same model and loop), ranking by final
training loss, influence functions (LiSSA) and TracInCP. Reports AUROC of the
scores against the noise mask, precision at k = number of flips, F1 and Jaccard
of each method's flags (ranking methods flag their k lowest), wall time and peak
memory as ratios to one plain training run measured in the same process, and
the test accuracy of the same model retrained from scratch on the kept samples
with their noisy labels for the same number of steps (mean ± sd over seeds).
At noise 0.8 (paper Table 3) it also retrains with the kept samples' true
labels, the protocol of the original HYDRA code, labelled as such.

    python benchmarks/suite.py --setting digits  [--noise 0.2 0.4 0.8] [--seeds 3]
    python benchmarks/suite.py --setting fashion [--n-train 10000]
    python benchmarks/suite.py --smoke      # every method at tiny size (make bench-smoke)
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import Meter  # noqa: E402
from methods import (  # noqa: E402
    Training,
    cleanlab_scores,
    influence_scores,
    init_module,
    tracin_scores,
    train_with_checkpoints,
    training_loss_scores,
)

from hydraclean import HydraLabelCleaner  # noqa: E402
from hydraclean.datasets import load_digits_images, load_fashion_mnist, make_label_noise  # noqa: E402
from hydraclean.evaluation import detection_metrics, retrain_accuracy  # noqa: E402
from hydraclean.models import LeNet5, SmallCNN  # noqa: E402


def ensure_fashion_mnist() -> None:
    try:
        load_fashion_mnist(split="test")
    except FileNotFoundError:
        print("Fashion-MNIST is missing: installing Debian's dataset-fashion-mnist", file=sys.stderr)
        subprocess.run("apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist", shell=True, check=True)


def load_setting(name: str, n_train: int, smoke: bool, seed: int = 0):
    """(make_module, recipe, X_train, y_train, X_val, y_val, X_test, y_test) with clean labels."""
    if name == "digits":
        X, y = load_digits_images()
        X_rest, X_test, y_rest, y_test = train_test_split(X, y, test_size=0.2, stratify=y, random_state=seed)
        X_tr, X_val, y_tr, y_val = train_test_split(X_rest, y_rest, test_size=200, stratify=y_rest, random_state=seed)
        if smoke:
            X_tr, y_tr = X_tr[:300], y_tr[:300]
        recipe = Training(max_epochs=2 if smoke else 15, batch_size=32, lr=0.1, decay=0.8)
        return SmallCNN, recipe, X_tr, y_tr, X_val, y_val, X_test, y_test
    ensure_fashion_mnist()
    X, y = load_fashion_mnist(split="train")
    X_te, y_te = load_fashion_mnist(split="test")
    rng = np.random.RandomState(seed)
    tr = rng.permutation(len(y))[: (500 if smoke else n_train)]
    order = rng.permutation(len(y_te))
    val, test = order[:1000], order[1000:]  # trusted validation from the test split; the rest tests
    recipe = Training(max_epochs=2 if smoke else 20, batch_size=64, lr=0.01)
    return LeNet5, recipe, X[tr], y[tr], X_te[val], y_te[val], X_te[test], y_te[test]


def run_rate(make_module, recipe: Training, data, rate: float, seeds: int, smoke: bool, log) -> dict:
    X_tr, y_clean, X_val, y_val, X_test, y_test = data
    y_noisy, noise = make_label_noise(y_clean, rate, random_state=0)
    k = int(noise.sum())
    Xt, yt = torch.as_tensor(X_tr), torch.as_tensor(y_noisy)
    Xv, yv = torch.as_tensor(X_val), torch.as_tensor(y_val)
    n_steps = recipe.max_epochs * -(-len(y_noisy) // recipe.batch_size)
    rows: dict[str, dict] = {}

    # one untimed epoch first, so that torch's one-off start-up costs do not land on the baseline
    train_with_checkpoints(make_module, Xt, yt, Training(1, recipe.batch_size, recipe.lr), seed=0)
    with Meter() as plain:
        model, checkpoints, lrs = train_with_checkpoints(make_module, Xt, yt, recipe, seed=0)
    base = {"seconds": plain.seconds, "peak_mib": plain.peak}
    log(f"  plain training {plain.seconds:.1f} s")

    def record(name, meter, scores, flags=None, extra_seconds=0.0):
        if flags is None:  # ranking methods flag their k lowest
            flags = np.zeros(len(scores), bool)
            flags[np.argsort(scores, kind="stable")[:k]] = True
        m = detection_metrics(noise, scores, flags)
        seconds = meter.seconds + extra_seconds
        rows[name] = {**m, "seconds": seconds, "time_ratio": seconds / plain.seconds, "peak_mib": meter.peak,
                      "memory_ratio": meter.peak / max(plain.peak, 1.0), "flags": flags}
        log(f"  {name:16s} AUROC {m['auroc']:.3f} P@k {m['precision_at_k']:.3f} F1 {m['f1']:.3f} "
            f"({seconds:.1f} s, {seconds / plain.seconds:.1f}x)")

    for strategy in ("drop", "cluster"):
        cleaner = HydraLabelCleaner(init_module(make_module, 0), strategy=strategy, drop_fraction=k / len(y_noisy),
                                    n_val_features=min(1000, len(y_val)), random_state=0, **recipe.as_params())
        with Meter() as m:
            cleaner.fit(X_tr, y_noisy, X_val=X_val, y_val=y_val)
        record(f"HYDRA {strategy}", m, cleaner.contribution_, cleaner.label_issues_)
    with Meter() as m:
        scores, flags = cleanlab_scores(make_module, Xt, yt, recipe, seed=0)
    record("cleanlab", m, scores, flags)
    with Meter() as m:
        scores = training_loss_scores(model, Xt, yt)
    record("training loss", m, scores, extra_seconds=plain.seconds)
    with Meter() as m:
        scores = influence_scores(model, Xt, yt, Xv, yv, depth=20 if smoke else 1000, seed=0)
    record("influence (LiSSA)", m, scores, extra_seconds=plain.seconds)
    with Meter() as m:
        scores = tracin_scores(make_module, checkpoints, lrs, Xt, yt, Xv, yv)
    record("TracInCP", m, scores, extra_seconds=plain.seconds)

    def accuracy(keep, labels):
        accs = [retrain_accuracy(make_module, X_tr[keep], labels[keep], X_test, y_test, n_steps=n_steps,
                                 batch_size=recipe.batch_size, lr=recipe.lr, momentum=recipe.momentum,
                                 total_decay=recipe.decay ** recipe.max_epochs, seed=s)
                for s in range(seeds)]
        return float(np.mean(accs)), float(np.std(accs))

    everyone = np.ones(len(y_noisy), bool)
    rows["no cleaning"] = {"retrain": accuracy(everyone, y_noisy)}
    rows["oracle (drop the flipped)"] = {"retrain": accuracy(~noise, y_noisy)}
    for name in [r for r in rows if "flags" in rows[r]]:
        rows[name]["retrain"] = accuracy(~rows[name]["flags"], y_noisy)
        if rate >= 0.8 and name in ("HYDRA drop", "influence (LiSSA)"):
            # paper Table 3's methods: the original code retrained with the true labels
            rows[name]["retrain_true_labels"] = accuracy(~rows[name]["flags"], y_clean)
    if rate >= 0.8:
        rows["no cleaning"]["retrain_true_labels"] = accuracy(everyone, y_clean)
    for r in rows.values():
        r.pop("flags", None)
    summary = ", ".join(f"{n}: {r['retrain'][0]:.3f}" for n, r in rows.items())
    log(f"  retraining done ({summary})")
    return {"rate": rate, "n_flipped": k, "n_train": len(y_noisy), "plain": base, "methods": rows}


def markdown(results: list[dict], header: str) -> str:
    cols = ["method", "AUROC", "P@k", "flagged", "F1", "Jaccard", "retrain acc (noisy labels)", "time s",
            "time x plain", "peak MiB", "memory x plain"]
    out = [header]
    for res in results:
        true_label = any("retrain_true_labels" in r for r in res["methods"].values())
        c = cols + (["retrain acc (true labels, original code's protocol)"] if true_label else [])
        out += ["", f"**Symmetric noise {res['rate']}** ({res['n_flipped']} of {res['n_train']} labels flipped; "
                f"plain training {res['plain']['seconds']:.1f} s, peak +{res['plain']['peak_mib']:.0f} MiB)", "",
                "| " + " | ".join(c) + " |", "|" + "---|" * len(c)]
        for name, r in res["methods"].items():
            acc = f"{r['retrain'][0]:.3f} ± {r['retrain'][1]:.3f}"
            cells = [name] + ([f"{r['auroc']:.3f}", f"{r['precision_at_k']:.3f}", str(r["n_flagged"]), f"{r['f1']:.3f}",
                               f"{r['jaccard']:.3f}", acc, f"{r['seconds']:.1f}", f"{r['time_ratio']:.2f}",
                               f"{r['peak_mib']:.0f}", f"{r['memory_ratio']:.2f}"] if "auroc" in r
                              else ["", "", "", "", "", acc, "", "", "", ""])
            if true_label:
                t = r.get("retrain_true_labels")
                cells.append(f"{t[0]:.3f} ± {t[1]:.3f}" if t else "")
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=["digits", "fashion"], default="digits")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.2, 0.4, 0.8])
    parser.add_argument("--seeds", type=int, default=3, help="retraining seeds")
    parser.add_argument("--n-train", type=int, default=10_000, help="Fashion-MNIST training subset")
    parser.add_argument("--smoke", action="store_true", help="every method at tiny size")
    parser.add_argument("--out", help="markdown output (a .json with every number is written beside it)")
    args = parser.parse_args()
    if args.smoke:
        args.noise, args.seeds = [0.2], 1
    torch.set_num_threads(2)
    warnings.simplefilter("ignore", UserWarning)
    make_module, recipe, X_tr, y_tr, X_val, y_val, X_test, y_test = load_setting(args.setting, args.n_train, args.smoke)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    results = []
    for rate in args.noise:
        log(f"{args.setting}, noise {rate}")
        results.append(run_rate(make_module, recipe, (X_tr, y_tr, X_val, y_val, X_test, y_test), rate, args.seeds,
                                args.smoke, log))
    total = time.perf_counter() - t0
    import cleanlab

    header = (
        f"Command: `python benchmarks/suite.py --setting {args.setting} --noise {' '.join(map(str, args.noise))} "
        f"--seeds {args.seeds}{' --smoke' if args.smoke else ''}`. Data: {len(y_tr)} training samples, "
        f"{len(y_val)} trusted validation samples, {len(y_test)} test samples; model {make_module.__name__}; "
        f"SGD {recipe.max_epochs} epochs, batch {recipe.batch_size}, lr {recipe.lr}"
        f"{f' x {recipe.decay}/epoch' if recipe.decay < 1 else ''}, momentum {recipe.momentum}; noise and model "
        f"seed 0, retraining seeds 0..{args.seeds - 1}. Machine: {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}, torch {torch.__version__}, "
        f"scikit-learn {sklearn.__version__}, cleanlab {cleanlab.__version__}. Whole run: {total / 60:.1f} min. "
        "Times and peak memory above the starting point are also given as ratios to one plain training run "
        "measured in the same process; training loss, influence functions and TracInCP include that training run."
    )
    text = markdown(results, header)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
