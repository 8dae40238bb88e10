"""Data-parallel fit on this machine's CPUs: one process with T threads against P processes with T / P each.

LeNet-5 on 10,000 Fashion-MNIST training images (20% symmetric noise), 1,000
validation images, batch 64 (the global batch), the default fit, launched with
torchrun (gloo). Each configuration runs --repeats times, interleaved; the
figure is the median fit time (from fit's start to its end on rank 0, data
already loaded, after a one-epoch warm-up fit on 2,000 images) and the part of
it rank 0 spent in the per-step gradient all-reduce (waiting for the other
ranks included), beside the peak resident memory of each rank and how far the results are from the
one-process run's: relative L2 distance of C(i),
Spearman correlation of the label-quality score, share of flagged samples in
common. One process with one thread is the yardstick for those: float32 sums
in another order (here, another thread count) also move a long run.

    python benchmarks/distributed.py [--threads 2] [--processes 2] [--epochs 3] [--repeats 3] [--out FILE]

``make gpu-check`` also runs it on all the CPUs of the GPU machine
(``--threads $(nproc) --processes 2``): whether data-parallel ranks beat
intra-op threads depends on how many cores the threads must share one batch
between.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
from measure import emit  # noqa: I001  (benchmarks/ is on sys.path when run as a script)
from scipy.stats import spearmanr


def worker(epochs: int, threads: int, out: str) -> None:
    """One rank, launched by torchrun."""
    import torch
    import torch.distributed as dist

    from measure import rss_mib  # noqa: I001  (benchmarks/ is on sys.path when run as a script)
    from overhead import BATCH, LR, data

    from hydraclean import HydraLabelCleaner
    from hydraclean.distributed import Shard
    from hydraclean.models import LeNet5

    reduce_seconds = [0.0]  # time inside the per-step gradient all-reduce, waiting for the other ranks included
    all_reduce_gradients = Shard.all_reduce_gradients

    def timed_all_reduce(self, model):
        t0 = time.perf_counter()
        all_reduce_gradients(self, model)
        reduce_seconds[0] += time.perf_counter() - t0

    Shard.all_reduce_gradients = timed_all_reduce
    warnings.simplefilter("ignore", UserWarning)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo")
    X, y, Xv, yv = data()
    # a warm-up fit, as in overhead.py: first-call costs stay out of the figure
    HydraLabelCleaner(LeNet5, max_epochs=1, batch_size=BATCH, lr=LR, random_state=0).fit(
        X[:2000], y[:2000], X_val=Xv[:200], y_val=yv[:200])
    cleaner = HydraLabelCleaner(LeNet5, max_epochs=epochs, batch_size=BATCH, lr=LR, random_state=0)
    dist.barrier()
    reduce_seconds[0] = 0.0
    t0 = time.perf_counter()
    cleaner.fit(X, y, X_val=Xv, y_val=yv)
    seconds = time.perf_counter() - t0
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, rss_mib("VmHWM"))
    if dist.get_rank() == 0:
        np.savez(out, contribution=cleaner.contribution_, quality=cleaner.label_quality_,
                 issues=cleaner.label_issues_)
        print(json.dumps({"seconds": seconds, "peak_rss_mib": peaks, "all_reduce_seconds": reduce_seconds[0]}))
    dist.barrier()  # the last collective holds no tensor: gloo then shuts down cleanly
    dist.destroy_process_group()
    gc.collect()  # cycles freed before interpreter shutdown, where gloo's threads can abort (examples/distributed_fit.py)


def launch(processes: int, threads: int, epochs: int, out: str) -> dict:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", f"--nproc_per_node={processes}", __file__, "--worker", "--threads",
           str(threads), "--epochs", str(epochs), "--save", out]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="threads in all")
    parser.add_argument("--processes", type=int, default=None,
                        help="processes of the data-parallel setup (default: --threads), each with threads / processes")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.epochs, args.threads, args.save)
        return
    processes = args.processes or args.threads
    if args.threads % processes:
        parser.error(f"--threads {args.threads} is not a multiple of --processes {processes}")
    setups = [(1, args.threads), (processes, args.threads // processes), (1, 1)]
    runs: dict = {s: [] for s in setups}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for p, t in setups:
                path = os.path.join(tmp, f"{p}x{t}.npz")
                runs[(p, t)].append(launch(p, t, args.epochs, path))
                print(f"  {p} x {t}: {runs[(p, t)][-1]}", file=sys.stderr)
        results = {s: dict(np.load(os.path.join(tmp, f"{s[0]}x{s[1]}.npz"))) for s in setups}
    one = np.median([r["seconds"] for r in runs[setups[0]]])
    lines = [f"LeNet-5, Fashion-MNIST 10,000 training images, batch 64, {args.epochs} epochs, default fit; "
             f"{args.threads} threads in all ({os.cpu_count()} CPUs), gloo, median of {args.repeats} runs.", "",
             f"| processes x threads | fit (s) | of which gradient all-reduce (s) | speed-up over 1 x {args.threads} "
             f"| peak RSS per rank (MiB) | C(i) off 1 x {args.threads} (relative) | Spearman of label quality "
             "| flagged in common |",
             "|---|---|---|---|---|---|---|---|"]
    base = results[setups[0]]
    for setup in setups:
        r = results[setup]
        seconds = np.median([x["seconds"] for x in runs[setup]])
        reduce = np.median([x["all_reduce_seconds"] for x in runs[setup]]) if setup[0] > 1 else None
        peak = runs[setup][-1]["peak_rss_mib"]
        diff = np.linalg.norm(r["contribution"] - base["contribution"]) / np.linalg.norm(base["contribution"])
        rho = spearmanr(r["quality"], base["quality"])[0]
        common = (r["issues"] & base["issues"]).sum() / base["issues"].sum()
        lines.append(f"| {setup[0]} x {setup[1]} | {seconds:.1f} | {'-' if reduce is None else f'{reduce:.1f}'} | "
                     f"{one / seconds:.2f} | "
                     f"{', '.join(f'{m:.0f}' for m in peak)} | {diff:.1e} | {rho:.4f} | {common:.1%} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
