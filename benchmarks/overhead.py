"""Cost of HYDRA over plain training: time ratios (one process) and peak memory (fresh processes).

Setting of issue 9: LeNet-5 on 10,000 Fashion-MNIST training images with 20%
symmetric label noise, 1,000 trusted validation images, batch 64, SGD (lr 0.01,
momentum 0.9), at 3 and at 20 epochs, on this machine's CPU threads.

Time: every configuration runs once to warm up (one epoch), then --repeats
rounds run all of them in turn (interleaved, so that a slow spell of the
machine hits all alike), all in this one process. Each ratio is the median over
the rounds of the configuration's time over plain training's time in the same
round (the machine's speed drifts between rounds by tens of percent; a ratio
within a round compares runs a few seconds apart); the seconds shown are
medians.

- plain training: a bare torch loop (``torch.optim.SGD``) over the same batches;
  plain AdamW training: the same loop with ``torch.optim.AdamW`` (lr 1e-3), the
  baseline of the AdamW fit;
- strategy="drop": the default fit (scores against every class's validation
  gradient, 10 directions, and their weighted sum, the mean's);
- strategy="drop" with max_memory too small for every step's weights
  (checkpoints every few steps, the steps between recomputed);
- strategy="cluster" with 1,000 validation features (1,010 directions);
- AdamW, strategy="drop": the default fit with ``optimizer=torch.optim.AdamW``
  (per-step layer factors, one backward sweep of the update rule);
- hessian="exact" for every sample (reverse mode), with ``scoring="contribution"``
  (one direction) and with the default score (10 class directions): one round,
  at the shortest run only;
- cleanlab's pipeline: 5-fold cross-validated probabilities of the same model
  and training loop, then ``find_label_issues``.

Memory: each configuration at the longest run (the exact fits at the shortest)
in a fresh subprocess, peak resident memory (VmHWM) and the bound of issue 9:
plain training + max_memory + the N x K float64 results + 300 MB.

``--architectures``: the rows of issue 18 instead (benchmarks/architectures.py:
torchvision's ResNet-18 with BatchNorm and with GroupNorm on 32x32 images, a
frozen ResNet-18 with a linear head, an EmbeddingBag and a two-layer
TransformerEncoder over token ids), one torch thread, each fit's time over the
mean of the plain loops run just before and just after it (median over the
rounds), the AUROC of its score (label_quality_) against the noise mask, and
each row's peak memory against the same bound, in fresh processes. The ResNet-18 rows
also run ``scoring="contribution"`` and ``spill_dir=None`` (checkpoints; the default
keeps their run's layer entries in a temporary directory).

    python benchmarks/overhead.py [--epochs 3 20] [--repeats 5] [--out docs/_generated/overhead.md]
    python benchmarks/overhead.py --architectures [--repeats 2] [--out docs/_generated/overhead_architectures.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from measure import emit, rss_mib  # noqa: I001  (benchmarks/ is on sys.path when run as a script)
from methods import Training, out_of_sample_probabilities
from settings import ensure_fashion_mnist

from hydraclean import HydraLabelCleaner
from hydraclean.datasets import load_fashion_mnist, make_label_noise
from hydraclean.models import LeNet5
from hydraclean.training import plan_trajectory
from hydraclean.run_store import parse_bytes

N_TRAIN, N_VAL, BATCH, LR, ADAMW_LR = 10_000, 1_000, 64, 0.01, 1e-3
MAX_MEMORY = "1GB"


def data():
    ensure_fashion_mnist()
    X, y = load_fashion_mnist(os.environ.get("HYDRACLEAN_DATA"))
    X = X[: N_TRAIN + N_VAL].astype(np.float32).reshape(-1, 1, 28, 28)
    y_noisy, _ = make_label_noise(y[:N_TRAIN], 0.2, random_state=0)
    return X[:N_TRAIN], y_noisy, X[N_TRAIN:], y[N_TRAIN : N_TRAIN + N_VAL]


def plain_training(X, y, epochs: int, optimizer_class=torch.optim.SGD) -> None:
    """A user's own training loop: the same model, batches and optimizer, nothing recorded."""
    torch.manual_seed(0)
    model = LeNet5()
    if optimizer_class is torch.optim.SGD:
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    else:
        optimizer = optimizer_class(model.parameters(), lr=ADAMW_LR)
    criterion = nn.CrossEntropyLoss()
    order = plan_trajectory(len(y), batch_size=BATCH, max_epochs=epochs, seed=0).order
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    for perm in torch.as_tensor(order):
        for idx in perm.split(BATCH):
            loss = criterion(model(X[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def fit(X, y, Xv, yv, epochs: int, **kw) -> HydraLabelCleaner:
    params = dict(max_epochs=epochs, batch_size=BATCH, lr=LR, max_memory=MAX_MEMORY, random_state=0)
    return HydraLabelCleaner(LeNet5, **{**params, **kw}).fit(X, y, X_val=Xv, y_val=yv)


def cleanlab_pipeline(X, y, epochs: int) -> None:
    from cleanlab.filter import find_label_issues

    yt = torch.as_tensor(y)
    probs = out_of_sample_probabilities(LeNet5, torch.as_tensor(X), yt, Training(epochs, BATCH, LR), seed=0)
    find_label_issues(y, probs)


def checkpoint_budget(epochs: int) -> int:
    """A max_memory that holds a quarter of the run's weights: checkpoints every 8 steps."""
    steps = epochs * -(-N_TRAIN // BATCH)
    return steps * 61_706 * 4 // 4


PLAIN, PLAIN_ADAMW = "plain training (torch loop, same batches)", "plain AdamW training (torch loop, same batches)"
CONFIGS = {
    PLAIN: lambda X, y, Xv, yv, e: plain_training(X, y, e),
    "strategy='drop' (default scoring: 10 class directions)": lambda X, y, Xv, yv, e: fit(X, y, Xv, yv, e),
    "strategy='drop', max_memory = 1/4 of the weights (checkpoints)":
        lambda X, y, Xv, yv, e: fit(X, y, Xv, yv, e, max_memory=checkpoint_budget(e), spill_dir=None),
    "strategy='cluster', 1,000 validation features (1,010 directions)":
        lambda X, y, Xv, yv, e: fit(X, y, Xv, yv, e, strategy="cluster", n_val_features=1000),
    "cleanlab: 5-fold cross-validated probabilities + find_label_issues":
        lambda X, y, Xv, yv, e: cleanlab_pipeline(X, y, e),
    PLAIN_ADAMW: lambda X, y, Xv, yv, e: plain_training(X, y, e, torch.optim.AdamW),
    "AdamW, strategy='drop' (default scoring: 10 class directions)":
        lambda X, y, Xv, yv, e: fit(X, y, Xv, yv, e, optimizer=torch.optim.AdamW, lr=ADAMW_LR),
    "hessian='exact', scoring='contribution' (1 direction), every sample":
        lambda X, y, Xv, yv, e: fit(X, y, Xv, yv, e, hessian="exact", scoring="contribution", drop_fraction=0.2),
    "hessian='exact', default scoring (10 class directions), every sample":
        lambda X, y, Xv, yv, e: fit(X, y, Xv, yv, e, hessian="exact"),
}
# the exact fits: one round, at the shortest run only (about 13x plain training at 3 epochs)
SLOW = {name for name in CONFIGS if "exact" in name}


def baseline(name: str) -> str:
    """The plain run a configuration's ratio is taken against: the same optimizer's."""
    return PLAIN_ADAMW if "AdamW" in name else PLAIN


def timings(epochs: int, repeats: int, names: list[str], slow: bool) -> list[dict]:
    X, y, Xv, yv = data()
    for name in names:  # warm-up: first-call costs stay out of the figures
        CONFIGS[name](X[:2000], y[:2000], Xv[:200], yv[:200], 1)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names:
            run = CONFIGS[name]
            if name in SLOW and (r or not slow):
                continue
            t0 = time.perf_counter()
            run(X, y, Xv, yv, epochs)
            seconds[name].append(time.perf_counter() - t0)
            print(f"  {epochs} epochs, round {r + 1}: {name}: {seconds[name][-1]:.2f} s", file=sys.stderr)
    return [{"config": name, "seconds": float(np.median(s)), "rounds": len(s), "baseline": baseline(name),
             "ratio": float(np.median([t / p for t, p in zip(s, seconds[baseline(name)])]))}  # per round, median
            for name, s in seconds.items() if s]


def peak_memory_child(name: str, epochs: int) -> None:
    """Run one configuration and print its peak RSS in MiB (called in a fresh subprocess)."""
    torch.set_num_threads(2)
    warnings.simplefilter("ignore", UserWarning)
    X, y, Xv, yv = data()
    base = rss_mib("VmRSS")
    CONFIGS[name](X, y, Xv, yv, epochs)
    peak = rss_mib("VmHWM")
    print(json.dumps({"peak_mib": peak, "above_baseline_mib": peak - base}))


def peak_memory(name: str, epochs: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", name, "--epochs", str(epochs)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


DEFAULT_FIT, CHECKPOINT_FIT = "default fit (10 class directions)", "default fit with spill_dir=None (checkpoints)"
ARCHITECTURE_FITS = {
    DEFAULT_FIT: {},
    "scoring='contribution' (1 direction)": {"scoring": "contribution", "drop_fraction": 0.2},
    CHECKPOINT_FIT: {"spill_dir": None},
}


def architecture_fits(name: str) -> dict[str, dict]:
    """The fits of one row: every one for the ResNet-18 rows (whose run does not fit in max_memory: the default
    keeps it on disk), the default alone for the others (their layer factors or their steps' gradients fit in
    memory: spill_dir changes nothing)."""
    return ARCHITECTURE_FITS if "ResNet-18, " in name else {DEFAULT_FIT: {}}


def architecture_timings(repeats: int, names: list[str]) -> list[dict]:
    """Per row and fit: median seconds and median ratio to the plain loops just before and after it."""
    import architectures as arch

    out = []
    for name in names:
        row = arch.ROWS[name]
        data = row.data()
        small = tuple(part[:256] for part in data)
        arch.plain_training(row, small)  # warm-up
        arch.fit(row, small)
        fits = architecture_fits(name)
        seconds = {label: [] for label in fits}
        ratios = {label: [] for label in fits}
        plains, aurocs, weights = [], {}, {}
        for r in range(repeats):
            for label, params in fits.items():
                t0 = time.perf_counter()
                arch.plain_training(row, data)
                before = time.perf_counter() - t0
                t0 = time.perf_counter()
                cleaner = arch.fit(row, data, **params)
                seconds[label].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                arch.plain_training(row, data)
                after = time.perf_counter() - t0
                plains += [before, after]
                ratios[label].append(seconds[label][-1] / ((before + after) / 2))
                aurocs[label] = arch.auroc(cleaner, data)
                weights[label] = arch.harm_weight(cleaner, data)
                print(f"  {name}, {label}, round {r + 1}: {seconds[label][-1]:.1f} s, plain {before:.1f} / "
                      f"{after:.1f} s", file=sys.stderr)
        for label in fits:
            out.append({"row": name, "fit": label, "seconds": float(np.median(seconds[label])),
                        "plain_seconds": float(np.median(plains)), "ratio": float(np.median(ratios[label])),
                        "rounds": repeats, "auroc": aurocs[label],
                        "harm_weight": weights[label]})
    return out


def architecture_memory_child(name: str, which: str) -> None:
    """Peak RSS of one row's plain loop, default fit or default fit with spill_dir=None, in MiB, and what the
    fit kept on disk (called in a fresh subprocess)."""
    import architectures as arch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore", UserWarning)
    row = arch.ROWS[name]
    data = row.data()
    base = rss_mib("VmRSS")
    disk = []
    if which == "plain":
        arch.plain_training(row, data)
    else:  # and what the route kept on disk (spill_dir="auto"), read just before it deletes it
        from hydraclean.projection import CapturedRun

        close = CapturedRun.close

        def measured_close(route):
            if route._dir is not None:
                disk.append(sum(f.stat().st_size for f in Path(route._dir.name).iterdir()))
            close(route)

        CapturedRun.close = measured_close
        arch.fit(row, data, max_memory=MAX_MEMORY, **ARCHITECTURE_FITS[CHECKPOINT_FIT if which == "checkpoints"
                                                                       else DEFAULT_FIT])
    print(json.dumps({"peak_mib": rss_mib("VmHWM"), "above_baseline_mib": rss_mib("VmHWM") - base,
                      "results_mib": arch.n_results(row, data) * 8 / 2**20, "disk_mib": sum(disk) / 2**20}))


def architectures_main(args) -> None:
    import architectures as arch

    torch.set_num_threads(1)
    names = [n for n in arch.ROWS if not any(w in n for w in args.skip)]
    rows = architecture_timings(args.repeats, names)
    lines = [f"Machine: {platform.processor() or platform.machine()}, 1 torch thread, torch {torch.__version__}, "
             f"Python {platform.python_version()}. {arch.__doc__.split(chr(10) + chr(10))[1]}", "",
             f"### Time ({args.repeats} rounds in one process: median seconds, median of each fit's ratio to the "
             "plain loops just before and after it)", "",
             "| model | fit | seconds | plain training (s) | ratio to plain training | AUROC (label_quality_) "
             "| m (the default's weight on the harm) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['fit']} | {r['seconds']:.1f} | {r['plain_seconds']:.1f} | {r['ratio']:.2f} "
                     f"| {r['auroc']:.3f} | {r['harm_weight']:.2f} |")
    budget_mib = parse_bytes(MAX_MEMORY) / 2**20
    lines += ["", "### Peak resident memory of the default fit, and of the fit with spill_dir=None (fresh process "
              "each)", "", f"Bound: the plain loop's peak + max_memory ({budget_mib:.0f} MiB) + the N x K results in "
              "float64 + 300 MB. Disk: what the fit kept in its temporary directory (spill_dir='auto'; deleted when "
              "it ends).", "",
              "| model | fit | plain peak (MiB) | fit peak (MiB) | results (MiB) | bound (MiB) | within the bound "
              "| disk (MiB) |", "|---|---|---|---|---|---|---|---|"]
    memory = {}
    for name in names:
        got = {}
        for which in ("plain", "fit", "checkpoints") if CHECKPOINT_FIT in architecture_fits(name) else ("plain", "fit"):
            out = subprocess.run([sys.executable, __file__, "--architectures", "--child", name, "--which", which],
                                 capture_output=True, text=True, check=True)
            got[which] = json.loads(out.stdout.strip().splitlines()[-1])
        bound = got["plain"]["peak_mib"] + budget_mib + got["fit"]["results_mib"] + 300 * 10**6 / 2**20
        memory[name] = {**got, "bound_mib": bound}
        for which in [w for w in ("fit", "checkpoints") if w in got]:
            ok = "yes" if got[which]["peak_mib"] <= bound else "**no**"
            lines.append(f"| {name} | {'default' if which == 'fit' else 'spill_dir=None'} | "
                         f"{got['plain']['peak_mib']:.0f} | {got[which]['peak_mib']:.0f} | "
                         f"{got[which]['results_mib']:.1f} | {bound:.0f} | {ok} | {got[which]['disk_mib']:.0f} |")
    emit(lines, args.out, {"timings": rows, "memory": memory})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[3, 20])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--skip", nargs="*", default=[], help="leave out configurations containing these words")
    parser.add_argument("--architectures", action="store_true", help="the architecture rows of issue 18 instead")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--which", default="fit", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    if args.architectures:
        if args.child:
            architecture_memory_child(args.child, args.which)
        else:
            architectures_main(args)
        return
    if args.child:
        peak_memory_child(args.child, args.epochs[0])
        return
    torch.set_num_threads(2)
    lines = [f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}, Python {platform.python_version()}. LeNet-5, Fashion-MNIST "
             f"{N_TRAIN:,} training images (20% symmetric noise), {N_VAL:,} validation images, batch {BATCH}, "
             f"max_memory={MAX_MEMORY!r}.", ""]
    selected = [n for n in CONFIGS if n in (PLAIN, PLAIN_ADAMW) or not any(w in n for w in args.skip)]
    results = {}
    for epochs in args.epochs:
        rows = timings(epochs, args.repeats, selected, slow=epochs == min(args.epochs))
        results[epochs] = rows
        lines += [f"### Time, {epochs} epochs ({args.repeats} interleaved rounds in one process: median seconds, "
                  "median of the per-round ratios)", "",
                  "| configuration | seconds | ratio to plain training (same optimizer) |", "|---|---|---|"]
        for r in rows:
            rounds = "" if r["rounds"] == args.repeats else f" ({r['rounds']} round)"
            against = " (AdamW)" if r["baseline"] == PLAIN_ADAMW else ""
            lines.append(f"| {r['config']}{rounds} | {r['seconds']:.1f} | {r['ratio']:.2f}{against} |")
        lines.append("")
    # peak memory: every configuration at the longest run, the exact fits at the shortest
    runs = [(n, max(args.epochs)) for n in selected if n not in SLOW and not n.startswith("cleanlab")]
    runs += [(PLAIN, min(args.epochs))] * any(n in SLOW for n in selected) + [(n, min(args.epochs))
                                                                           for n in selected if n in SLOW]
    runs = list(dict.fromkeys(runs))
    mem = {f"{n}, {e} epochs": peak_memory(n, e) for n, e in runs}
    budget_mib = parse_bytes(MAX_MEMORY) / 2**20

    def results_mib(name: str) -> float:
        """N x K float64 results: contribution_, class_contribution_, trajectory_proba_ (N x 11 at most each),
        and contribution_matrix_ (N x 1,000) for the cluster strategy."""
        return N_TRAIN * (3 * 11 + (1000 if "cluster" in name else 0)) * 8 / 2**20

    lines += ["### Peak resident memory (fresh process each)", "",
              f"Bound of issue 9: plain training of as many epochs + max_memory ({budget_mib:.0f} MiB) + the N x K "
              "results in float64 + 300 MB.", "",
              "| configuration | epochs | peak RSS (MiB) | above the data-loaded process (MiB) | N x K results (MiB) "
              "| bound (MiB) | within the bound |",
              "|---|---|---|---|---|---|---|"]
    bounds = {}
    for name, e in runs:
        key, plain_mib = f"{name}, {e} epochs", mem[f"{PLAIN}, {e} epochs"]["peak_mib"]
        m, bounds[key] = mem[key], plain_mib + budget_mib + 300 * 10**6 / 2**20 + results_mib(name)
        ok = "yes" if m["peak_mib"] <= bounds[key] else "**no**"
        lines.append(f"| {name} | {e} | {m['peak_mib']:.0f} | {m['above_baseline_mib']:.0f} | "
                     f"{results_mib(name):.0f} | {bounds[key]:.0f} | {ok} |")
    emit(lines, args.out, {"timings": {str(k): v for k, v in results.items()}, "memory": mem, "bound_mib": bounds})


if __name__ == "__main__":
    main()
