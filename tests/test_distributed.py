"""Data-parallel fit: two gloo processes give the single-process fit, and agree with each other."""

import gc
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.datasets import load_digits
from torch import nn

from hydraclean import HydraLabelCleaner
from hydraclean.distributed import Shard

ATTRIBUTES = ("contribution_", "class_contribution_", "contribution_matrix_", "trajectory_loss_",
              "trajectory_logit_margin_", "label_quality_")


def data():
    X, y = load_digits(return_X_y=True)
    X = (X[:300] / 16.0).astype(np.float32)
    return X, y[:300]


def mlp():
    return nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))


def cleaner(strategy, batch_size=32, **kw):
    # 240 training rows at batch 32: the last batch of each epoch (16 rows) splits 8 / 8; at batch 31 every
    # batch splits unevenly (16 / 15, and the last 12 / 11)
    return HydraLabelCleaner(mlp, strategy=strategy, n_val_features=30, max_epochs=3, batch_size=batch_size, lr=0.05,
                             random_state=0, **kw)


def fit(cleaner_, X, y):
    return cleaner_.fit(X, y, validation_mask=np.arange(len(y)) >= 240)


def _rank(rank, world, port, out, strategy, batch_size):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fitted = fit(cleaner(strategy, batch_size), *data())
        explained = fitted.explain(*(a[240:245] for a in data()), k=2).contribution_matrix
        history = np.array([fitted.history_[k] for k in sorted(fitted.history_)])
        np.savez(os.path.join(out, f"rank{rank}.npz"), explained=explained, issues=fitted.label_issues_,
                 history=history,
                 **{name: getattr(fitted, name) for name in ATTRIBUTES if getattr(fitted, name) is not None})
    finally:
        dist.barrier()  # no rank tears the group down while another still talks to it
        dist.destroy_process_group()
        gc.collect()  # cycles freed before interpreter shutdown, where gloo's threads can abort


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy,batch_size", [("drop", 32), ("cluster", 32), ("drop", 31)],
                         ids=["drop", "cluster", "drop, uneven split"])
def test_two_gloo_processes_give_the_single_process_fit(strategy, batch_size, tmp_path):
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path), strategy, batch_size), nprocs=2, join=True)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    single = fit(cleaner(strategy, batch_size), *data())
    # history_: the same on every rank, and the single process's (the losses summed in another order)
    history = np.array([single.history_[k] for k in sorted(single.history_)])
    np.testing.assert_array_equal(ranks[1]["history"], ranks[0]["history"])
    np.testing.assert_allclose(ranks[0]["history"], history, rtol=1e-6)
    for name in ATTRIBUTES:
        expected = getattr(single, name)
        if expected is None:
            continue
        for r in ranks:  # every rank ends with the same attributes, those of one process
            np.testing.assert_array_equal(r[name], ranks[0][name], err_msg=name)
        got, keep = ranks[0][name], ~np.isnan(expected)
        assert np.array_equal(np.isnan(got), ~keep)
        assert np.linalg.norm(got[keep] - expected[keep]) <= 1e-5 * np.linalg.norm(expected[keep]), name
    explained = single.explain(*(a[240:245] for a in data()), k=2).contribution_matrix
    keep = ~np.isnan(explained)
    assert np.linalg.norm(ranks[0]["explained"][keep] - explained[keep]) <= 1e-5 * np.linalg.norm(explained[keep])


def test_distributed_true_without_a_process_group_names_the_fix():
    est = cleaner("drop", distributed=True)
    with pytest.raises(ValueError, match="torchrun"):
        fit(est, *data())
    assert not hasattr(est, "contribution_")


@pytest.mark.parametrize("kw, match", [
    ({"hessian": "exact"}, "hessian='exact' runs in one process"),
    ({"module": lambda: nn.Sequential(nn.Linear(64, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 10))},
     "BatchNorm would normalise each share"),
], ids=["exact", "batch norm"])
def test_data_parallel_refusals_name_the_reason(kw, match, monkeypatch):
    """What a data-parallel fit cannot reproduce is refused before any collective, on rank 0 of two."""
    import hydraclean.estimator

    monkeypatch.setattr(hydraclean.estimator, "current_shard", lambda distributed: Shard(0, 2))
    est = cleaner("drop").set_params(**kw)
    with pytest.raises(ValueError, match=match):
        fit(est, *data())
    assert not hasattr(est, "contribution_")
