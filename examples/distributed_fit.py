"""A data-parallel fit with torchrun: every process takes its share of each batch.

On one machine with two processes (gloo on CPUs, NCCL when every process has a GPU):

    torchrun --standalone --nproc_per_node=2 examples/distributed_fit.py [--small]

On several machines, start the same command on each with torchrun's rendezvous
(``--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 --rdzv-id=JOB``).
``fit`` runs on every rank; the ranks train one model together (each update is
the single-process update, ``batch_size`` the global batch) and every rank ends
with the same fitted attributes. The data here is scikit-learn's digits with
20% of the labels flipped, so the example runs as written anywhere.
"""

import argparse
import gc
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import roc_auc_score

from hydraclean import HydraLabelCleaner
from hydraclean.datasets import load_digits_images, make_label_noise
from hydraclean.models import SmallCNN


def main(small: bool) -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:  # the machine's cores shared out: more threads than cores make every process wait
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))

    X, y = load_digits_images()
    X_train, y_train, X_val, y_val = X[:1500], y[:1500], X[1500:], y[1500:]
    y_noisy, noisy = make_label_noise(y_train, 0.2, random_state=0)
    cleaner = HydraLabelCleaner(SmallCNN, max_epochs=4 if small else 10, batch_size=64, lr=0.05,
                                device=f"cuda:{torch.cuda.current_device()}" if cuda else "cpu", random_state=0)
    t0 = time.perf_counter()
    cleaner.fit(X_train, y_noisy, X_val=X_val, y_val=y_val)
    seconds = time.perf_counter() - t0
    if rank == 0:
        print(f"{world} processes, {torch.get_num_threads()} threads each: fit in {seconds:.1f} s; "
              f"{cleaner.label_issues_.sum()} flagged, AUROC for the flipped labels "
              f"{roc_auc_score(noisy, -cleaner.label_quality_):.3f}.")
    # every rank holds the same scores
    mine = torch.as_tensor(np.nan_to_num(cleaner.contribution_))
    ranks = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(ranks, mine)
    if rank == 0:
        print("identical contributions on every rank:", all(torch.equal(r, mine) for r in ranks))
    dist.barrier()  # the last collective holds no tensor: gloo then shuts down cleanly
    dist.destroy_process_group()
    # reference cycles (torch.func's closures among them) freed now, not during interpreter shutdown, where
    # gloo's worker threads can abort the process ("terminate called without an active exception")
    gc.collect()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run (tests)")
    main(parser.parse_args().small)
