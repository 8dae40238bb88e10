"""The peers HYDRA is measured against, on the same data, model, training loop and seeds.

Every scorer returns ``scores`` of shape (n_train,), higher = more useful (the
sign convention of ``contribution_``), and optionally its own flags.

* cleanlab: ``find_label_issues`` / ``get_label_quality_scores`` on K-fold
  out-of-sample probabilities of the same torch model and training loop.
* training loss: minus the per-sample loss at the final weights.
* influence functions (Koh and Liang 2017): ``(1/N) <H^-1 grad L_val, grad l_i>``
  at the final weights, ``H^-1`` by LiSSA. Removing sample i changes the
  validation loss by about this much, the quantity HYDRA's C(i) estimates.
* TracInCP (Pruthi et al. 2020): ``sum_k eta_k <grad L_val(w_k), grad l_i(w_k)>``
  over per-epoch checkpoints.
* AUM (Pleiss et al. 2020): the logit margin of the assigned label over the
  largest other logit, averaged over every step of one ordinary training run,
  by the authors' ``aum`` package; its flags by their threshold samples (two
  more runs, each with a different ``N / (c + 1)`` samples moved to a fake
  extra class; flag the samples whose AUM is at most the 99th percentile of the
  threshold samples').

LiSSA and TracInCP are written on hydraclean's torch.func primitives and tested
against dense and brute-force references (tests/test_benchmark_methods.py); the
TracIn test also cross-checks captum's TracInCP. captum's class computes one
gradient per validation sample, which does not fit scoring against the mean
validation loss of 1,000 samples at 10k x 20 checkpoints on a CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from torch import nn

from hydraclean import ExponentialDecay
from hydraclean.gradients import (
    PerSampleLoss,
    directional_derivatives,
    hessian_vector_products,
    parameter_dict,
    per_sample_gradients,
    unflatten,
    validation_gradients,
)
from hydraclean.hypergradient import step_weights
from hydraclean.training import plan_trajectory, replay, run_training, step_rng, train

CE = nn.CrossEntropyLoss(reduction="none")


OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


@dataclass(frozen=True)
class Training:
    """One training recipe shared by every method."""

    max_epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9  # SGD's
    weight_decay: float | None = 0.0  # None: the optimizer's default (AdamW's 1e-2)
    decay: float = 1.0  # learning-rate factor per epoch
    optimizer: str = "sgd"
    cosine: bool = False  # cosine annealing to 0 over the run, every batch

    def schedule(self):
        if self.cosine:
            return "cosine"
        return ExponentialDecay(self.decay) if self.decay < 1 else "constant"

    def plan(self, n: int, seed: int, epochs: int | None = None):
        return plan_trajectory(n, batch_size=self.batch_size, max_epochs=epochs or self.max_epochs, seed=seed,
                               **self.as_params(epochs=False))

    def as_params(self, epochs: bool = True) -> dict:
        """The recipe as HydraLabelCleaner's parameters (``epochs=False``: without epochs and batch size)."""
        params = dict(optimizer=OPTIMIZERS[self.optimizer], lr=self.lr, momentum=self.momentum,
                      weight_decay=self.weight_decay, lr_schedule=self.schedule())
        if epochs:
            params.update(max_epochs=self.max_epochs, batch_size=self.batch_size)
        return params

    def describe(self) -> str:
        """The recipe in words, for the tables."""
        schedule = ", cosine" if self.cosine else (f" x {self.decay}/epoch" if self.decay < 1 else "")
        name = "AdamW" if self.optimizer == "adamw" else "SGD"
        return f"{name}, {self.max_epochs} epochs, batch {self.batch_size}, lr {self.lr}{schedule}"


def init_module(make_module: Callable[[], nn.Module], seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """``make_module()`` initialised under ``seed`` (on the CPU, so that every device starts alike)."""
    with step_rng(seed, torch.device("cpu")):
        return make_module().to(device)


def train_with_checkpoints(make_module, X: torch.Tensor, y: torch.Tensor, recipe: Training, seed: int):
    """Plain training; returns the final model and the per-epoch checkpoints (state dicts)."""
    model = init_module(make_module, seed, X.device)
    traj = recipe.plan(len(y), seed)
    checkpoints = []
    run_training(model, X, y, CE, traj,
            on_epoch_end=lambda e: checkpoints.append(copy.deepcopy(model.state_dict())))
    steps = -(-len(y) // recipe.batch_size)
    lrs = [float(traj.lrs[(e + 1) * steps - 1]) for e in range(recipe.max_epochs)]
    return model.eval(), checkpoints, lrs


@torch.no_grad()
def predict_proba(model: nn.Module, X: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    model.eval()
    return torch.cat([model(X[s : s + batch_size]).softmax(1) for s in range(0, len(X), batch_size)]).double().cpu().numpy()


def out_of_sample_probabilities(make_module, X, y, recipe: Training, seed: int, n_splits: int = 5) -> np.ndarray:
    """K-fold out-of-sample predicted probabilities, shape (n, n_classes)."""
    probs = np.zeros((len(y), int(y.max()) + 1))
    folds = StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(np.zeros(len(y)), y.cpu().numpy())
    for k, (tr, te) in enumerate(folds):
        model = init_module(make_module, seed + k, X.device)
        model, _, _ = train(model, X[tr], y[tr], CE, recipe.plan(len(tr), seed + k))
        probs[te] = predict_proba(model, X[te])
    return probs


def cleanlab_scores(make_module, X, y, recipe: Training, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's label-quality scores and its own flags from 5-fold out-of-sample probabilities."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    probs = out_of_sample_probabilities(make_module, X, y, recipe, seed)
    labels = y.cpu().numpy()
    return get_label_quality_scores(labels, probs), find_label_issues(labels, probs)


class _OneRunRecorder:
    """Reads every training step's logits (the step's own forward pass, before its update) for three one-run
    peers: AUM's margins (fed to an ``aum.AUMCalculator``), Dataset Cartography's probability of the label
    (Swayamdipta et al. 2020), and forgetting events (Toneva et al. 2019: a sample classified correctly at one
    presentation and wrongly at the next)."""

    def __init__(self, calculator, n_samples: int):
        self.calculator, self.logits, self.handle = calculator, None, None
        self.proba_sum = torch.zeros(n_samples, dtype=torch.float64)
        self.presentations = torch.zeros(n_samples, dtype=torch.int64)
        self.correct = torch.zeros(n_samples, dtype=torch.bool)  # at the sample's latest presentation
        self.learned = torch.zeros(n_samples, dtype=torch.bool)  # classified correctly at some presentation
        self.forgettings = torch.zeros(n_samples, dtype=torch.int64)

    def attach(self, model: nn.Module) -> None:
        self.handle = model.register_forward_hook(lambda m, inputs, out: setattr(self, "logits", out.detach()))

    def detach(self) -> None:
        self.handle.remove()

    def record(self, step) -> None:
        self.calculator.update(self.logits, step.yb, step.idx.tolist())
        idx, yb, logits = step.idx.cpu(), step.yb.cpu(), self.logits.cpu()
        self.proba_sum[idx] += torch.softmax(logits.double(), 1).gather(1, yb[:, None])[:, 0]
        self.presentations[idx] += 1
        correct = logits.argmax(1) == yb
        self.forgettings[idx] += (self.correct[idx] & ~correct).long()  # a batch holds each sample once
        self.correct[idx] = correct
        self.learned[idx] |= correct

    def scores(self) -> dict[str, np.ndarray]:
        """Higher = more likely correctly labelled, for each peer. A sample never classified correctly counts
        as forgotten more often than any other (Toneva et al.: infinitely often)."""
        n = len(self.presentations)
        forgettings = torch.where(self.learned, self.forgettings, self.presentations + 1).double()
        return {"AUM": np.array([self.calculator.sums[i] / self.calculator.counts[i] for i in range(n)]),
                "forgetting events": -forgettings.numpy(),
                "Cartography confidence": (self.proba_sum / self.presentations).numpy()}


def one_run_scores(module: nn.Module, X: torch.Tensor, y: torch.Tensor, recipe: Training, seed: int
                   ) -> dict[str, np.ndarray]:
    """AUM (by the ``aum`` package), forgetting events and Cartography's confidence, each of every sample,
    from one plain training run of ``module`` (the ordinary run every method shares)."""
    import tempfile

    from aum import AUMCalculator

    with tempfile.TemporaryDirectory() as d:
        recorder = _OneRunRecorder(AUMCalculator(d, compressed=True), len(y))
        run_training(module, X, y, CE, recipe.plan(len(y), seed), recorder=recorder)
        return recorder.scores()


def _aum_run(module: nn.Module, X: torch.Tensor, y: torch.Tensor, recipe: Training, seed: int) -> np.ndarray:
    """AUM of every sample over one plain training run of ``module``, by the ``aum`` package."""
    return one_run_scores(module, X, y, recipe, seed)["AUM"]


def with_extra_class(module: nn.Module) -> nn.Module:
    """``module`` with one more output: its last ``nn.Linear`` gets a row for AUM's fake class."""
    name, last = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)][-1]
    parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
    wider = nn.Linear(last.in_features, last.out_features + 1, bias=last.bias is not None).to(last.weight)
    setattr(parent, name.rpartition(".")[2], wider)
    return module


def aum_threshold_flags(make_module, X, y, recipe: Training, seed: int, percentile: float = 99.0) -> np.ndarray:
    """AUM's own flags (Pleiss et al. 2020): two more runs, each with a share of the samples relabelled to a
    fake extra class (threshold samples); a sample is flagged when its AUM is at most the ``percentile`` of
    theirs."""
    n_classes = int(y.max()) + 1
    order = np.random.default_rng(seed).permutation(len(y))
    m = len(y) // (n_classes + 1)
    first, second = order[:m], order[m : 2 * m]
    flags = np.zeros(len(y), bool)
    # the first run judges every sample outside its threshold set, the second the first's threshold set
    for threshold_set, judged in ((first, order[m:]), (second, first)):
        fake = y.clone()
        fake[torch.as_tensor(threshold_set, device=y.device)] = n_classes
        with step_rng(seed, torch.device("cpu")):
            module = with_extra_class(make_module()).to(X.device)
        margins = _aum_run(module, X, fake, recipe, seed)
        flags[judged] = margins[judged] <= np.percentile(margins[threshold_set], percentile)
    return flags


def per_sample_dot(model: nn.Module, X: torch.Tensor, y: torch.Tensor, direction: torch.Tensor,
                   batch_size: int = 512) -> np.ndarray:
    """``<grad l_i(w), direction>`` for every sample, at the model's weights (one JVP pass)."""
    loss = PerSampleLoss(model, CE)
    params = parameter_dict(model)
    out = [directional_derivatives(loss, params, X[s : s + batch_size], y[s : s + batch_size], direction[None])[:, 0]
           for s in range(0, len(y), batch_size)]
    return torch.cat(out).double().cpu().numpy()


def training_loss_scores(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Minus each sample's loss at the final weights (high loss = suspicious)."""
    with torch.no_grad():
        return -torch.cat([CE(model(X[s : s + 1024]), y[s : s + 1024]) for s in range(0, len(y), 1024)]).double().cpu().numpy()


def lissa(loss: PerSampleLoss, params, X: torch.Tensor, y: torch.Tensor, v: torch.Tensor, *, damping: float = 0.01,
          scale: float = 25.0, depth: int = 1000, batch_size: int = 64, seed: int = 0) -> torch.Tensor:
    """LiSSA estimate of ``(H + scale * damping * I)^-1 v`` (Koh and Liang 2017, Agarwal et al. 2017).

    ``v`` is one vector (n_params,) or several (K, n_params), solved together.

    ``h <- v + (1 - damping) h - H_batch h / scale`` on random mini-batches (the
    whole data when ``batch_size >= len(y)``); its fixed point is
    ``h = scale (H + scale damping I)^-1 v``.
    """
    g = torch.Generator().manual_seed(seed)
    vs = v if v.ndim == 2 else v[None]
    h = vs.clone()
    full = batch_size >= len(y)
    for _ in range(depth):
        idx = (torch.arange(len(y)) if full else torch.randint(len(y), (batch_size,), generator=g)).to(X.device)
        Hh = hessian_vector_products(loss, params, X[idx], y[idx], h, chunk_size=64)
        h = vs + (1.0 - damping) * h - Hh / scale
    return (h / scale).reshape(v.shape)


def hessian_extremes(loss: PerSampleLoss, params, X, y, *, batch_size=64, n_batches=3, n_iter=30, seed=0):
    """Largest and smallest eigenvalues over a few mini-batch Hessians (the whole data when
    ``batch_size >= len(y)``), by power iteration.

    The first iteration finds the eigenvalue of largest magnitude ``a`` (either
    sign); the second, on ``H - a I``, the other end of the spectrum.
    """
    g = torch.Generator().manual_seed(seed)
    n = sum(p.numel() for p in params.values())
    ref = next(iter(params.values()))
    lam_max, lam_min = 0.0, 0.0
    for _ in range(n_batches if batch_size < len(y) else 1):
        idx = torch.arange(len(y)) if batch_size >= len(y) else torch.randint(len(y), (batch_size,), generator=g)
        idx = idx.to(X.device)
        ends = []
        for shift in (0.0, None):
            shift = ends[0] if shift is None else shift
            v = torch.randn(n, generator=g, dtype=torch.float64).to(ref)
            v /= v.norm()
            for _ in range(n_iter):
                hv = hessian_vector_products(loss, params, X[idx], y[idx], v[None])[0] - shift * v
                lam = float(v @ hv)
                v = hv / hv.norm()
            ends.append(lam + shift)
        lam_max, lam_min = max(lam_max, *ends), min(lam_min, *ends)
    return lam_max, lam_min


def safe_lissa_settings(loss, params, X, y, *, damping=0.01, scale=25.0, batch_size=64, n_iter=30, seed=0):
    """(damping, scale) for which LiSSA's iteration contracts on this model's mini-batch Hessians.

    Needs ``scale > lam_max / 2`` and ``scale * damping > |lam_min|``; a non-convex
    network's negative eigenvalues make Koh and Liang's usual damping 0.01 diverge
    (seen on LeNet-5 / Fashion-MNIST: lam_min about -2, scale * damping = 0.25).
    Margins of 2x on both.
    """
    lam_max, lam_min = hessian_extremes(loss, params, X, y, batch_size=batch_size, n_iter=n_iter, seed=seed)
    scale = max(scale, 2.0 * lam_max)
    damping = max(damping, 2.0 * max(-lam_min, 0.0) / scale)
    return damping, scale


def influence_scores(model: nn.Module, X, y, X_val, y_val, *, damping=0.01, scale=25.0, depth=1000, batch_size=64,
                     seed=0, auto_damping=True) -> np.ndarray:
    """Influence-function estimate of the validation-loss change when removing each sample.

    ``(1/N) <(H + mu I)^-1 grad L_val(w_T), grad l_i(w_T)>`` with ``mu = scale *
    damping``: positive = removing it raises the validation loss = helpful. With
    ``auto_damping``, damping and scale are raised as far as
    :func:`safe_lissa_settings` needs for LiSSA to converge.
    """
    g_val, _ = validation_gradients(model, X_val, y_val, CE)
    loss = PerSampleLoss(model, CE)
    params = parameter_dict(model)
    if auto_damping:
        damping, scale = safe_lissa_settings(loss, params, X, y, damping=damping, scale=scale,
                                             batch_size=batch_size, seed=seed)
    s_test = lissa(loss, params, X, y, g_val, damping=damping, scale=scale, depth=depth, batch_size=batch_size,
                   seed=seed)
    if not torch.isfinite(s_test).all():
        raise FloatingPointError("LiSSA diverged; raise damping or scale.")
    return per_sample_dot(model, X, y, s_test) / len(y)


def tracin_scores(make_module, checkpoints, lrs, X, y, X_val, y_val) -> np.ndarray:
    """TracInCP against the mean validation loss: ``sum_k eta_k <grad L_val(w_k), grad l_i(w_k)>``."""
    model = make_module().to(X.device)
    total = np.zeros(len(y))
    for state, eta in zip(checkpoints, lrs):
        model.load_state_dict(state)
        g_val, _ = validation_gradients(model, X_val, y_val, CE)
        total += eta * per_sample_dot(model, X, y, g_val)
    return total



def replay_statistics(cleaner) -> tuple[np.ndarray, np.ndarray]:
    """Self-influence and the c_t-weighted training loss along a fitted cleaner's recorded run.

    ``self_influence[i] = sum_t c_t (N / b_t) ||grad l_i(w_{t-1})||^2`` over the
    steps that trained on sample i: the Hessian-free first-order effect of
    up-weighting i on its own loss, accumulated over the trajectory (TracIn's
    self-influence with HYDRA's coefficients). ``c_t < 0``, so the most
    self-influential samples score lowest. ``weighted_loss[i] = sum_t c_t (N /
    b_t) l_i(w_{t-1})``: the training loss along the run with the same weights.
    Both have shape (n_samples,), NaN for validation rows; all NaN for an
    optimizer other than SGD, which has no scalar c_t.
    """
    traj = cleaner.trajectory_
    if not traj.rule.linear:  # c_t is SGD's scalar coefficient: not defined for other optimizers
        nan = np.full(cleaner.validation_mask_.size, np.nan)
        return nan, nan.copy()
    X, y = (t.to(cleaner.device_) for t in cleaner._train_data)
    loss = PerSampleLoss(cleaner.module_, cleaner._criterion)
    weights = step_weights(traj)
    influence = torch.zeros(traj.n_samples, dtype=torch.float64, device=X.device)
    weighted = torch.zeros_like(influence)

    like = parameter_dict(cleaner.module_)

    class Statistics:  # a recorder: every replayed step at its weights w_{t-1}
        def attach(self, model):
            pass

        def detach(self):
            pass

        def record(self, step):
            params, t = unflatten(step.w, like), step.t
            with step_rng(traj.seeds[t], X.device):
                g = per_sample_gradients(loss, params, step.xb, step.yb)
            with step_rng(traj.seeds[t], X.device), torch.no_grad():
                losses = loss(params, step.xb, step.yb)
            influence.index_add_(0, step.idx, (g * g).sum(1).double(), alpha=float(weights[t]))
            weighted.index_add_(0, step.idx, losses.double(), alpha=float(weights[t]))

    replay(traj, cleaner.module_, X, y, cleaner._criterion, Statistics())
    out = np.full((2, cleaner.validation_mask_.size), np.nan)
    out[:, ~cleaner.validation_mask_] = torch.stack([influence, weighted]).cpu().numpy()
    return out[0], out[1]
