"""Mini-batch training that records its own trajectory, and replays it.

One loop, :func:`run_training`, serves the training run and every later
replay. The optimizer's step is the pure update rule of
:mod:`hydraclean.optimizers` applied to the flat trainable parameters, so the
training run, its replays and the hypergradient all use one function::

    (w_t, s_t) = U_t(w_{t-1}, s_{t-1}, g_t),   g_t = mean_{i in B_t} grad l_i(w_{t-1})

Replaying the same :class:`Trajectory` (initial weights, batch order,
per-step hyperparameters and per-step random seed) through the same code
visits the same weights ``w_0 .. w_T``: bit-identical on CPU. Each step's
forward pass runs under its own seed inside :func:`step_rng`, so dropout masks
can be drawn again by any later computation that needs "the gradient as
computed in that step". What scoring keeps from the run is a
:class:`Recorder`'s business: the loop hands it every :class:`Step`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from .batches import Inputs, step_inputs
from .distributed import Shard
from .gradients import flatten, parameter_dict
from .checkpoint import Checkpoints
from .modes import set_modes, training_modes
from .optimizers import State, UpdateRule, make_rule, step_in_place
from .schedules import resolve_schedule

__all__ = [
    "Recorder",
    "SampleTrace",
    "Step",
    "Trajectory",
    "advance",
    "autocast",
    "evaluate_model",
    "LearningShortfallWarning",
    "learning_shortfall",
    "plan_trajectory",
    "replay",
    "run_training",
    "step_rng",
    "train",
]

# progress(iterable, desc, total) -> iterable: a bar over the steps, e.g. tqdm's (it touches no tensor).
Progress = Callable[[Iterable, str, int], Iterable]


@dataclass
class Trajectory:
    """Everything needed to replay a training run step by step.

    Attributes
    ----------
    order : ndarray of shape (n_epochs, n_samples), int64
        The sample order of each epoch; step ``t`` of an epoch takes the next
        ``batch_size`` entries (the last batch may be smaller).
    batch_size : int
    seeds : ndarray of shape (n_steps,), int64
        Seed of each step's forward pass (dropout masks).
    rule : UpdateRule
        The optimizer's step (:mod:`hydraclean.optimizers`), with its fixed
        hyperparameters (weight decay, betas[1], ...).
    hyper : dict of str to ndarray of shape (n_steps,), float64
        The scheduled hyperparameters of every step, keyed by
        ``rule.scheduled``: ``"lr"`` and ``"momentum"`` (SGD) or ``"beta1"``
        (Adam, AdamW).
    initial_state : dict of str to Tensor
        ``state_dict`` of the module at ``w_0`` (on CPU), set by :func:`train`.
    train_modes : dict of str to bool
        Every submodule's train/eval mode during training
        (:func:`training_modes`), set by :func:`train`.
    autocast : torch.dtype or None
        Lower-precision dtype the training steps' forward passes ran under
        (``torch.autocast``), or None for the module's own dtype.
    shard : Shard or None
        This process's share of every batch in a data-parallel run
        (:mod:`hydraclean.distributed`), or None for one process.
    """

    order: np.ndarray
    batch_size: int
    seeds: np.ndarray
    rule: UpdateRule
    hyper: dict[str, np.ndarray]
    initial_state: dict[str, torch.Tensor] = field(default_factory=dict)
    train_modes: dict[str, bool] = field(default_factory=dict)
    autocast: torch.dtype | None = None
    shard: Shard | None = None

    @property
    def n_samples(self) -> int:
        return int(self.order.shape[1])

    @property
    def n_steps(self) -> int:
        return int(self.seeds.shape[0])

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.n_samples // self.batch_size)

    @property
    def lrs(self) -> np.ndarray:
        """``eta_t`` of every step, shape (n_steps,)."""
        return self.hyper["lr"]

    def hyper_at(self, t: int) -> dict[str, float]:
        """The scheduled hyperparameters of step ``t`` (0-based)."""
        return {k: float(v[t]) for k, v in self.hyper.items()}

    def batch_size_at(self, t: int) -> int:
        """``b_t``, the global batch size of step ``t``."""
        return min(self.batch_size, self.n_samples - (t % self.steps_per_epoch) * self.batch_size)

    def step_seed(self, t: int) -> int:
        """The seed of step ``t``'s forward pass in this process (each rank's own in a data-parallel run)."""
        return int(self.seeds[t]) if self.shard is None else self.shard.step_seed(self.seeds[t])

    def batch_sizes(self) -> np.ndarray:
        """Actual batch size ``b_t`` of every step, shape (n_steps,)."""
        n, bs = self.n_samples, self.batch_size
        per_epoch = [min(bs, n - s) for s in range(0, n, bs)]
        return np.tile(np.asarray(per_epoch, dtype=np.int64), self.order.shape[0])


def plan_trajectory(
    n_samples: int,
    *,
    batch_size: int,
    max_epochs: int,
    seed: int,
    optimizer: type = torch.optim.SGD,
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float | None = None,
    lr_schedule="constant",
    optimizer_options: Mapping[str, object] | None = None,
    schedule_options: Mapping[str, object] | None = None,
    schedule_interval: str = "auto",
    autocast: torch.dtype | None = None,
    shard: Shard | None = None,
) -> Trajectory:
    """Draw the batch order and step seeds of a training run from one seed, and resolve its schedule.

    Parameters
    ----------
    n_samples, batch_size, max_epochs : int
    seed : int
        Draws every epoch's order and every step's seed.
    optimizer, lr, momentum, weight_decay, optimizer_options
        The optimizer class and its hyperparameters
        (:func:`hydraclean.optimizers.make_rule`).
    lr_schedule, schedule_options, schedule_interval
        The schedule (:func:`hydraclean.schedules.resolve_schedule`).
    autocast : torch.dtype, optional
        ``torch.bfloat16`` or ``torch.float16``: every step's forward pass and
        loss run under ``torch.autocast`` (see :func:`advance`).
    shard : Shard, optional
        Makes it a data-parallel run (:mod:`hydraclean.distributed`).

    Returns
    -------
    trajectory : Trajectory
        Without ``initial_state``; :func:`train` fills it in.
    """
    rng = np.random.default_rng(seed)
    order = np.stack([rng.permutation(n_samples) for _ in range(max_epochs)])
    rule, base = make_rule(optimizer, optimizer_options or {}, momentum=momentum, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = [-(-n_samples // batch_size)] * max_epochs
    hyper = resolve_schedule(lr_schedule, rule=rule, base=base, steps_per_epoch=steps_per_epoch,
                             options=schedule_options, interval=schedule_interval)
    seeds = rng.integers(0, 2**62, size=sum(steps_per_epoch), dtype=np.int64)
    return Trajectory(order, int(batch_size), seeds, rule, hyper, autocast=autocast, shard=shard)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; nothing for None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@dataclass
class Step:
    """One training step as the loop saw it, before its update: what a :class:`Recorder` receives.

    Attributes
    ----------
    t : int
        The step, counted from 0.
    idx : Tensor of int
        The batch's samples (this rank's share in a data-parallel run).
    xb, yb : Tensor
        Their inputs and label codes.
    w : Tensor of shape (n_params,)
        ``w_{t-1}``, the flat trainable parameters the step started from.
    state : tuple of Tensor
        ``s_{t-1}``, the optimizer state (flat).
    g : Tensor of shape (n_params,)
        ``g_t``, the gradient of the (global) batch's mean loss at ``w_{t-1}``.
    captured : dict, optional
        What a layer capture caught in the pass that computed ``g_t`` (a
        walk that recomputes steps, asked to).
    """

    t: int
    idx: torch.Tensor
    xb: torch.Tensor
    yb: torch.Tensor
    w: torch.Tensor
    state: State
    g: torch.Tensor
    captured: dict | None = None


class Recorder(Protocol):
    """Keeps what scoring needs from the training run (layer factors, gradients, tangents...).

    :func:`run_training` calls :meth:`attach` before the first step,
    :meth:`record` at every step after the gradient and before the update
    (the model still holds ``w_{t-1}``), and :meth:`detach` at the end, also
    when training fails. They must not modify the model or the step, and must
    copy what they keep of its tensors: the run updates ``w``, the state and
    ``g`` in place for the next step.
    :meth:`state_dict` and :meth:`load_state_dict` serve checkpoints only.

    A recorder whose ``second_pass`` attribute is True runs a backward pass of
    its own through each step's graph (kept for it): after the step's
    gradient, the run calls ``recorder.after_step(loss)``
    (:class:`hydraclean.projection.ConstantStatisticsCapture`'s protocol).
    """

    def attach(self, model: nn.Module) -> None: ...

    def record(self, step: Step) -> None: ...

    def detach(self) -> None: ...

    def state_dict(self) -> dict:
        """What the recorder kept so far (tensors, numbers, lists, dicts), for a checkpoint."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s result (a resumed run)."""


@dataclass
class SampleTrace:
    """How the training run treated each sample, averaged over the epochs.

    Both come from the training steps' own forward passes (train mode, the
    step's dropout mask and batch statistics), at no extra cost.

    Attributes
    ----------
    loss : Tensor of shape (n_samples,)
        Mean training loss of each sample.
    proba : Tensor of shape (n_samples, n_outputs)
        Mean softmax of the module's outputs for each sample.
    margin : Tensor of shape (n_samples,)
        Mean logit margin of each sample: its label's logit minus the largest
        other logit, at the forward pass of the step that trained on it (the
        area under the margin of Pleiss et al., 2020; log-softmax outputs give
        the same margins).
    """

    loss: torch.Tensor
    proba: torch.Tensor
    margin: torch.Tensor


def logit_margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's logit of its label minus its largest other logit, shape ``(b,)`` (negative: misclassified)."""
    own = logits.gather(1, labels[:, None])
    return own[:, 0] - logits.scatter(1, labels[:, None], float("-inf")).amax(1)


@contextlib.contextmanager
def step_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the body under ``seed`` without disturbing the caller's RNG state."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type=device.type):
        # torch.manual_seed would also queue seeds for every uninitialised accelerator
        # backend, formatting a stack trace each time: seed just the generators in use
        torch.default_generator.manual_seed(int(seed))
        if cuda:
            torch.cuda.default_generators[device.index or torch.cuda.current_device()].manual_seed(int(seed))
        yield


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train, in :func:`hydraclean.gradients.parameter_dict`'s order."""
    return list(parameter_dict(model, detach=False).values())


def write_parameters(params: list[nn.Parameter], w: torch.Tensor) -> None:
    """Copy the flat vector ``w`` into the parameters (one foreach copy)."""
    views = [v.view_as(p) for v, p in zip(w.split([p.numel() for p in params]), params)]
    with torch.no_grad():
        torch._foreach_copy_(params, views)


def advance(
    model: nn.Module,
    params: list[nn.Parameter],
    criterion: nn.Module,
    trajectory: Trajectory,
    t: int,
    xb: torch.Tensor,
    yb: torch.Tensor,
    retain_graph: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step ``t``'s forward and backward pass at the weights ``model`` holds (``retain_graph``: the graph is
    kept for another backward pass through it; ``out``: where ``g_t`` is written).

    The forward pass runs under the step's seed (and, with
    ``trajectory.autocast``, under ``torch.autocast``: no gradient scaling,
    whose skipped steps would leave the recorded schedule; parameters,
    gradients and the update stay in the module's dtype). In a data-parallel
    run ``xb`` is this rank's share of the batch, its loss is scaled by the
    global batch size, and the flat gradient is summed across ranks.

    Returns
    -------
    logits, losses, loss : Tensor
        The outputs, per-sample losses and their mean (this rank's share of
        it in a data-parallel run).
    g : Tensor of shape (n_params,)
        ``g_t``; zero for a parameter that got no gradient.
    """
    with step_rng(trajectory.step_seed(t), xb.device), autocast(xb.device, trajectory.autocast):
        logits = model(xb)
        losses = criterion(logits, yb)
    shard = trajectory.shard
    # a rank's share of the global batch's mean loss; the all-reduce sums the shares' gradients
    loss = losses.mean() if shard is None else losses.sum() / trajectory.batch_size_at(t)
    grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True, retain_graph=retain_graph)
    g = torch.cat([gr.reshape(-1) for gr in grads], out=out)
    if shard is not None:
        shard.all_reduce(g)
    return logits, losses, loss, g


def run_training(
    model: nn.Module,
    X: Inputs,
    y: torch.Tensor,
    criterion: nn.Module,
    trajectory: Trajectory,
    *,
    recorder: Recorder | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    progress: Progress | None = None,
    desc: str = "training",
    checkpoint: Checkpoints | None = None,
    extra: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, SampleTrace]:
    """Train ``model`` in place along ``trajectory``.

    Parameters
    ----------
    model : nn.Module
        Holds ``w_0`` on entry and ``w_T`` on return; trained in train mode.
    X : Tensor or DatasetInputs
        All training inputs on the model's device, or a Dataset that loads
        them batch by batch (:mod:`hydraclean.batches`).
    y : Tensor
        Integer targets of every training sample, on the model's device.
    criterion : nn.Module
        Per-sample loss with ``reduction="none"``.
    trajectory : Trajectory
    recorder : Recorder, optional
        Receives every step (see :class:`Recorder`).
    on_epoch_end : callable, optional
        ``on_epoch_end(epoch)`` after the last step of each epoch.
    progress : callable, optional
        ``progress(steps, desc, n_steps)`` wraps the iterator over the run's
        steps (a progress bar, advanced every step without a host sync).
    desc : str
        Label for the progress bar.
    checkpoint : Checkpoints, optional
        Saves the run (with the recorder's state and ``extra``) at the end of
        every epoch but the last and when interrupted (Ctrl-C: after the step
        under way, then ``KeyboardInterrupt``); a run it loaded at the
        ``"training"`` stage continues from its step.
    extra : dict, optional
        The caller's state, saved and restored with the run (``train``'s history).

    Returns
    -------
    step_loss : Tensor of shape (n_steps,)
        Mean training loss of each step's batch, on the model's device.
    step_correct : Tensor of shape (n_steps,)
        Number of correctly classified samples in each batch.
    trace : SampleTrace
        Each sample's loss and softmax output averaged over the epochs, on
        the model's device.

    Raises
    ------
    ValueError
        When a step's loss is not finite, naming the epoch and step (checked
        once per epoch so that the GPU is not synchronised at every step).
    """
    set_modes(model, trajectory.train_modes or training_modes(model))
    device, dtype = y.device, next(p for p in model.parameters() if p.is_floating_point()).dtype
    params = trainable_parameters(model)
    rule = trajectory.rule
    w = flatten(parameter_dict(model)).clone()
    state = rule.init(w)
    g_buffer = torch.empty_like(w)  # every step's gradient, in place (recorders copy what they keep)
    step_loss = torch.empty(trajectory.n_steps, dtype=dtype, device=device)
    step_correct = torch.empty(trajectory.n_steps, dtype=torch.int64, device=device)
    sample_loss = torch.zeros(trajectory.n_samples, dtype=dtype, device=device)
    sample_margin = torch.zeros_like(sample_loss)
    sample_proba = None
    per_epoch, start = trajectory.steps_per_epoch, 0
    extra = {} if extra is None else extra
    saved = None if checkpoint is None else checkpoint.loaded
    if saved is not None and saved["stage"] == "training":  # continue where the saved run stopped
        model.load_state_dict(saved["model"])
        w, state = saved["w"].to(device), tuple(s.to(device) for s in saved["state"])
        for name, tensor in (("step_loss", step_loss), ("step_correct", step_correct), ("sample_loss", sample_loss),
                             ("sample_margin", sample_margin)):
            tensor.copy_(saved[name])
        sample_proba = saved["sample_proba"].to(device)
        if recorder is not None:
            recorder.load_state_dict(saved["recorder"])
        extra.update(saved["extra"])
        start = saved["step"]

    def snapshot(t: int) -> dict:
        """The run after ``t`` steps."""
        return {"stage": "training", "step": t, "model": model.state_dict(), "w": w, "state": list(state),
                "step_loss": step_loss, "step_correct": step_correct, "sample_loss": sample_loss,
                "sample_margin": sample_margin, "sample_proba": sample_proba, "recorder": {} if recorder is None else recorder.state_dict(),
                "extra": extra}

    # one iterator over the run's steps: one DataLoader for a Dataset
    steps = step_inputs(X, trajectory, range(start, trajectory.n_steps) if start else None)
    if progress is not None:
        steps = iter(progress(steps, desc, trajectory.n_steps - start))
    if recorder is not None:
        recorder.attach(model)
    second_pass = getattr(recorder, "second_pass", False)
    try:
        with checkpoint.interruptible() if checkpoint is not None else contextlib.nullcontext():
            for t, idx, xb in steps:
                yb = y[idx]
                logits, losses, loss, g = advance(model, params, criterion, trajectory, t, xb, yb,
                                                  retain_graph=second_pass, out=g_buffer)
                if second_pass:
                    recorder.after_step(loss)
                if recorder is not None:
                    recorder.record(Step(t, idx, xb, yb, w, state, g))
                step_in_place(rule, w, state, g, t + 1, trajectory.hyper_at(t))
                write_parameters(params, w)
                sample_loss.index_add_(0, idx, losses.detach().to(dtype))
                if sample_proba is None:
                    sample_proba = sample_loss.new_zeros(trajectory.n_samples, logits.shape[1])
                z = logits.detach().to(dtype)
                sample_proba.index_add_(0, idx, z.softmax(1))
                sample_margin.index_add_(0, idx, logit_margins(z, yb))
                step_loss[t] = loss.detach()
                step_correct[t] = (logits.detach().argmax(1) == yb).sum()
                if (t + 1) % per_epoch == 0:
                    epoch, first = divmod(t, per_epoch)[0], t + 1 - per_epoch
                    if trajectory.shard is not None:  # the shares of each step's loss and accuracy, once an epoch
                        trajectory.shard.all_reduce(step_loss[first : t + 1])
                        trajectory.shard.all_reduce(step_correct[first : t + 1])
                    _check_finite(step_loss[first : t + 1], epoch, first, trajectory)
                    if on_epoch_end is not None:
                        on_epoch_end(epoch)
                    if checkpoint is not None and t + 1 < trajectory.n_steps:
                        checkpoint.save(snapshot(t + 1))
                if checkpoint is not None and checkpoint.interrupted:
                    checkpoint.save(snapshot(t + 1))
                    raise KeyboardInterrupt
    finally:
        if recorder is not None:
            recorder.detach()
    n_epochs = trajectory.order.shape[0]
    if trajectory.shard is not None:
        trajectory.shard.all_reduce(sample_loss)
        trajectory.shard.all_reduce(sample_proba)
        trajectory.shard.all_reduce(sample_margin)
    return step_loss, step_correct, SampleTrace(sample_loss / n_epochs, sample_proba / n_epochs,
                                                sample_margin / n_epochs)


def _check_finite(losses: torch.Tensor, epoch: int, first: int, trajectory: Trajectory) -> None:
    bad = torch.nonzero(~torch.isfinite(losses))
    if bad.numel():
        t = first + int(bad[0])
        raise ValueError(
            f"The training loss became non-finite at epoch {epoch + 1}, step {t + 1} "
            f"(learning rate {trajectory.lrs[t]:.3g}). Lower lr (or weight_decay / "
            "momentum), or scale the inputs."
        )


def train(
    module: nn.Module,
    X: Inputs,
    y: torch.Tensor,
    criterion: nn.Module,
    trajectory: Trajectory,
    *,
    recorder: Recorder | None = None,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: Progress | None = None,
    checkpoint: Checkpoints | None = None,
) -> tuple[nn.Module, dict[str, list[float]], SampleTrace]:
    """Train a copy of ``module`` along ``trajectory`` and record ``w_0``.

    Parameters
    ----------
    module : nn.Module
        Untouched; its weights are ``w_0``. Must already be on ``y.device``.
    X, y, criterion, trajectory, recorder, progress, checkpoint
        As in :func:`run_training` (the history is saved with the run).
    validation : (X_val, y_val), optional
        Evaluated in eval mode after every epoch for the history.

    Returns
    -------
    model : nn.Module
        The trained copy (``w_T``).
    history : dict of str to list of float
        Per-epoch ``train_loss``, ``train_accuracy`` and, with ``validation``,
        ``valid_loss`` and ``valid_accuracy``.
    trace : SampleTrace
        Each sample's training loss and softmax output averaged over the epochs.
    """
    model = copy.deepcopy(module)
    trajectory.initial_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    trajectory.train_modes = training_modes(module)
    history: dict[str, list[float]] = {"valid_loss": [], "valid_accuracy": []}

    def evaluate(epoch: int) -> None:
        if validation is None:
            return
        loss, acc = evaluate_model(model, *validation, criterion, shard=trajectory.shard)
        history["valid_loss"].append(loss)
        history["valid_accuracy"].append(acc)
        set_modes(model, trajectory.train_modes)

    step_loss, step_correct, trace = run_training(
        model, X, y, criterion, trajectory, recorder=recorder, on_epoch_end=evaluate, progress=progress,
        checkpoint=checkpoint, extra=history,
    )
    sizes = torch.as_tensor(trajectory.batch_sizes(), device=y.device)
    n_epochs = trajectory.order.shape[0]
    history["train_loss"] = (
        (step_loss * sizes).reshape(n_epochs, -1).sum(1) / trajectory.n_samples
    ).tolist()
    history["train_accuracy"] = (
        step_correct.reshape(n_epochs, -1).sum(1).double() / trajectory.n_samples
    ).tolist()
    if validation is None:
        del history["valid_loss"], history["valid_accuracy"]
    return model, history, trace


class LearningShortfallWarning(UserWarning):
    """The trained model did not learn: its contributions and scores are not meaningful."""


def learning_shortfall(history: dict[str, list[float]], y_val: np.ndarray, margin: float = 0.1) -> str | None:
    """Say so when the trained model is not clearly better than predicting the majority class.

    Judged on the trusted validation set: final validation accuracy below
    ``rate + margin * (1 - rate)``, with ``rate`` the share of the most frequent
    validation class. Training accuracy is reported but does not decide, since
    under heavy label noise it is low even for a model that learned the true
    classes.

    Parameters
    ----------
    history : dict
        :func:`train`'s per-epoch ``valid_accuracy`` and ``train_accuracy``.
    y_val : ndarray of shape (n_val,)
        Validation labels as codes.
    margin : float, default=0.1
        Share of the gap between the majority rate and 1 that the model must close.

    Returns
    -------
    message : str or None
        None when the model learned.
    """
    rate = float(np.bincount(np.asarray(y_val)).max() / len(y_val))
    accuracy = history["valid_accuracy"][-1]
    bar = rate + margin * (1.0 - rate)
    if accuracy >= bar:
        return None
    return (
        f"The trained model did not learn: its validation accuracy is {accuracy:.3f}, against {rate:.3f} for "
        f"always predicting the most frequent class (training accuracy {history['train_accuracy'][-1]:.3f}), so "
        "its contributions and label-quality scores are not meaningful. Train longer, change the learning rate "
        "or scale the inputs (history_ holds the per-epoch figures)."
    )


@torch.no_grad()
def evaluate_model(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, criterion: nn.Module, batch_size: int = 1024,
    shard: Shard | None = None,
) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` in eval mode (each rank evaluates its share, with ``shard``)."""
    model.eval()
    rows = torch.arange(X.shape[0], device=y.device)
    if shard is not None:
        rows = shard.split(rows)
    sums = torch.zeros(2, dtype=torch.float64, device=y.device)  # loss, correct
    for start in range(0, rows.shape[0], batch_size):
        r = rows[start : start + batch_size]
        logits = model(X[r])
        sums[0] += criterion(logits, y[r]).sum().double()
        sums[1] += (logits.argmax(1) == y[r]).sum()
    if shard is not None:
        shard.all_reduce(sums)
    loss, correct = sums.tolist()  # one host sync
    return loss / X.shape[0], correct / X.shape[0]


def replay(
    trajectory: Trajectory,
    module: nn.Module,
    X: Inputs,
    y: torch.Tensor,
    criterion: nn.Module,
    recorder: Recorder,
    progress: Progress | None = None,
) -> nn.Module:
    """Walk the recorded trajectory again from ``w_0``, handing every step to ``recorder``.

    ``module`` supplies the architecture; its weights are replaced by the
    recorded ``w_0``. On CPU the replayed steps are bit for bit those of the
    original run. Returns the replayed model (``w_T``).
    """
    model = copy.deepcopy(module)
    model.load_state_dict(trajectory.initial_state)
    run_training(model, X, y, criterion, trajectory, recorder=recorder, progress=progress, desc="replaying")
    return model
