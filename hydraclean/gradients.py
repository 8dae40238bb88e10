"""Per-sample losses, gradients, directional derivatives and Hessian-vector products.

Everything here is a pure function of a parameter dict, built on ``torch.func``.
Parameters travel either as a dict ``{name: tensor}`` (for ``functional_call``)
or flattened into one vector of length ``n_params`` in ``named_parameters`` order;
:func:`flatten` and :func:`unflatten` convert.

"Per-sample gradient" means what DESIGN.md §1 fixes: the gradient of sample
``i``'s own loss term as computed in that training step's forward pass. With
BatchNorm in train mode, ``l_i`` depends on the whole batch through the batch
statistics, so the per-sample gradients are the rows of the Jacobian of the
batch's loss vector (:func:`per_sample_gradients` uses ``jacrev`` then).
Dropout masks are those of the step, provided the caller runs these functions
under the step's seed (:func:`hydraclean.training.step_rng`).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

from .modes import set_modes, training_modes

__all__ = [
    "PerSampleLoss",
    "directional_derivatives",
    "eval_separable",
    "flatten",
    "hessian_and_loss_tangents",
    "hessian_vector_products",
    "is_sample_separable",
    "without_second_derivative",
    "parameter_dict",
    "per_sample_gradients",
    "per_sample_validation_gradients",
    "unflatten",
    "class_validation_gradients",
    "validation_gradients",
]

Params = dict[str, torch.Tensor]

with warnings.catch_warnings():
    # torch's own jvp decompositions call the deprecated torch.jit.script when
    # first imported (lazily, by the first jvp); keep that internal notice quiet.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    import torch._decomp.decompositions_for_jvp  # noqa: F401


def parameter_dict(model: nn.Module, detach: bool = True) -> Params:
    """The trainable parameters of ``model`` as a dict, detached unless ``detach=False`` (no copy)."""
    return {k: p.detach() if detach else p for k, p in model.named_parameters() if p.requires_grad}


def without_second_derivative(model: nn.Module) -> list[str]:
    """Submodules with a trainable parameter that torch has no forward mode and no second derivative for.

    ``nn.EmbeddingBag``: neither a JVP nor double backward goes through
    ``_embedding_bag`` (torch 2.14), so no Hessian-vector product can (an
    ``nn.Embedding`` followed by a mean or sum has both).
    """
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.EmbeddingBag) and any(p.requires_grad for p in m.parameters(recurse=False))]


def flatten(tensors: Params, batch_dims: int = 0) -> torch.Tensor:
    """Concatenate a parameter-shaped dict into shape ``(*batch, n_params)``."""
    parts = [t.reshape(*t.shape[:batch_dims], -1) for t in tensors.values()]
    return torch.cat(parts, dim=batch_dims)


def unflatten(flat: torch.Tensor, like: Params) -> Params:
    """Inverse of :func:`flatten`: split the last axis of ``flat`` into ``like``'s shapes."""
    out, start = {}, 0
    batch = flat.shape[:-1]
    for name, ref in like.items():
        out[name] = flat[..., start : start + ref.numel()].reshape(*batch, *ref.shape)
        start += ref.numel()
    return out


def is_sample_separable(module: nn.Module) -> bool:
    """Whether each sample's training loss depends on that sample alone, deterministically.

    False when the module holds a BatchNorm or Dropout that runs in train
    mode during training (batch statistics couple the samples; the step's
    random mask must be reproduced for the whole batch at once). Separable
    modules get per-sample gradients by ``vmap(grad)`` in one pass; others by
    the batch Jacobian, which costs one backward pass per sample in the batch
    (see :func:`directional_derivatives` for when a JVP per direction
    replaces it).
    """
    coupled = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    modes = training_modes(module)
    return not any(isinstance(m, coupled) and modes[name] for name, m in module.named_modules())


def eval_separable(module: nn.Module) -> bool:
    """Whether each sample's eval-mode loss depends on that sample alone.

    False only for BatchNorm without running statistics
    (``track_running_stats=False``), which normalises with the batch's
    statistics in eval mode too.
    """
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
                   for m in module.modules())


class PerSampleLoss:
    """Train-mode per-sample losses as a pure function ``(params, x, y) -> (b,)``.

    Parameters
    ----------
    module : nn.Module
        Architecture to evaluate. A private copy is kept in the training run's
        modes (``modes``, or :func:`hydraclean.modes.training_modes` of
        ``module``), its train-mode BatchNorms without running statistics,
        so calls use the batch statistics (as the training step does) and
        never mutate buffers, which also makes the function safe under
        ``vmap``.
    criterion : nn.Module
        Loss with ``reduction="none"``.
    modes : dict of str to bool, optional
        The training run's modes (``Trajectory.train_modes``).
    """

    def __init__(self, module: nn.Module, criterion: nn.Module, modes: dict[str, bool] | None = None) -> None:
        modes = modes or training_modes(module)
        self.module = set_modes(copy.deepcopy(module), modes)
        for m in self.module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                m.running_mean = m.running_var = m.num_batches_tracked = None
                m.track_running_stats = False
        self.buffers = dict(self.module.named_buffers())
        self.criterion = criterion
        self.separable = is_sample_separable(self.module)
        self.forward_mode = not without_second_derivative(self.module)

    def __call__(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.criterion(functional_call(self.module, (params, self.buffers), (x,)), y)

    def mean(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self(params, x, y).mean()

    def single(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self(params, x.unsqueeze(0), y.unsqueeze(0)).squeeze(0)


def per_sample_gradients(
    loss: PerSampleLoss, params: Params, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Gradients of each sample's loss term, shape ``(b, n_params)``.

    Separable modules: ``vmap(grad)``; otherwise the rows of the Jacobian of
    the batch's loss vector (``jacrev``), which is exact for BatchNorm and
    Dropout.
    """
    if loss.separable:
        grads = vmap(grad(loss.single), in_dims=(None, 0, 0))(params, x, y)
    else:
        grads = jacrev(loss)(params, x, y)
    return flatten(grads, batch_dims=1)


def directional_derivatives(
    loss: PerSampleLoss,
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    directions: torch.Tensor,
) -> torch.Tensor:
    """``D[i, k] = <grad l_i(w), V_k>`` for every sample of the batch.

    Parameters
    ----------
    directions : Tensor of shape (K, n_params)

    Returns
    -------
    D : Tensor of shape (b, K)

    Notes
    -----
    A direction is one forward-mode JVP of the batch's loss vector (about two
    forward passes, exact for any module). Several directions use the
    per-sample gradients and one matrix product, except for a module whose
    samples interact (BatchNorm, Dropout) with fewer directions than samples:
    its per-sample gradients are the rows of the batch Jacobian, ``b``
    backward passes, so one JVP per direction is cheaper (a tenth of the time
    for DenseNet-BC-40 in ``benchmarks/batchnorm_route.py``). Each JVP starts
    from the caller's random state, so all draw the same dropout masks. A
    module torch has no forward mode for (a trainable ``nn.EmbeddingBag``,
    :func:`without_second_derivative`) always takes the per-sample gradients.
    """
    k = directions.shape[0]
    if loss.forward_mode and (k == 1 or (not loss.separable and k < x.shape[0])):
        forks = {"devices": [x.device] if x.device.type == "cuda" else [], "device_type": x.device.type}
        columns = []
        for v in directions:
            with torch.random.fork_rng(**forks):  # restores the state: the next JVP draws the same masks
                columns.append(jvp(lambda p: loss(p, x, y), (params,), (unflatten(v, params),))[1])
        return torch.stack(columns, 1)
    return per_sample_gradients(loss, params, x, y) @ directions.T


def hessian_vector_products(
    loss: PerSampleLoss,
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    vectors: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``H v`` for each row ``v`` of ``vectors``, ``H`` the Hessian of the batch's mean loss.

    Forward-over-reverse (``jvp`` of ``grad``), vectorised over the vectors
    with ``vmap``; one dropout mask is shared by all of them
    (``randomness="same"``), the step's own under the step's seed.

    Parameters
    ----------
    vectors : Tensor of shape (K, n_params)
    chunk_size : int, optional
        Vectors per vectorised call, to bound memory.

    Returns
    -------
    Hv : Tensor of shape (K, n_params)
    """
    gradient = grad(loss.mean)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        _, out = jvp(lambda p: gradient(p, x, y), (params,), (unflatten(v, params),))
        return flatten(out)

    return vmap(hvp, randomness="same", chunk_size=chunk_size)(vectors)


def hessian_and_loss_tangents(
    loss: PerSampleLoss,
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    vectors: torch.Tensor,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``H v`` and ``<grad l_i, v>`` for each row ``v`` of ``vectors``, from one forward-over-reverse pass.

    ``H`` is the Hessian of the batch's mean loss and ``l_i`` the loss of
    sample ``i`` in the batch's forward pass (its batch statistics, its
    dropout mask): the ``jvp`` of ``(grad mean loss, losses)`` along ``v``,
    vectorised over the vectors with one shared dropout mask.

    Parameters
    ----------
    vectors : Tensor of shape (K, n_params)
    chunk_size : int, optional
        Vectors per vectorised call, to bound memory.

    Returns
    -------
    Hv : Tensor of shape (K, n_params)
    D : Tensor of shape (K, b)
        ``D[k, i] = <grad l_i, v_k>``.
    """

    def mean_and_losses(p: Params) -> tuple[torch.Tensor, torch.Tensor]:
        losses = loss(p, x, y)
        return losses.mean(), losses

    gradient = grad(mean_and_losses, has_aux=True)

    def tangents(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, (hv, dl) = jvp(gradient, (params,), (unflatten(v, params),))
        return flatten(hv), dl

    return vmap(tangents, randomness="same", chunk_size=chunk_size)(vectors)


def validation_gradients(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    criterion: nn.Module,
    rows: torch.Tensor | None = None,
    batch_size: int = 256,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of the validation loss at the model's weights, in eval mode.

    Parameters
    ----------
    model : nn.Module
        Trained model (``w_T``); evaluated in eval mode on a copy.
    X, y : Tensor
        Validation inputs and integer targets.
    criterion : nn.Module
        Per-sample loss with ``reduction="none"``.
    rows : Tensor of int, optional
        Validation samples ``j`` whose own gradients ``G_j`` are wanted.
    batch_size : int
        Samples per vectorised call.
    out : Tensor of shape (len(rows), n_params), optional
        Where to write ``G``.

    Returns
    -------
    mean_gradient : Tensor of shape (n_params,)
        ``grad L_val(w_T)`` with ``L_val`` the mean validation loss.
    G : Tensor of shape (len(rows), n_params) or None
        ``grad l_j^val(w_T)`` for each requested row.
    """
    params, batch_loss, per_sample_grad = _eval_losses(model, criterion)
    ref = next(iter(params.values()))  # the weights' dtype: the inputs may be integer token ids
    total = torch.zeros(sum(p.numel() for p in params.values()), dtype=ref.dtype, device=ref.device)
    for start in range(0, X.shape[0], batch_size):
        total += flatten(grad(batch_loss)(params, X[start : start + batch_size], y[start : start + batch_size]))
    per_sample = None
    if rows is not None:
        per_sample = _per_sample_rows(per_sample_grad, params, X, y, rows, batch_size, out)
    return total / X.shape[0], per_sample


def per_sample_validation_gradients(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    criterion: nn.Module,
    rows: torch.Tensor,
    batch_size: int = 256,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``G_j = grad l_j^val(w_T)`` for the validation rows ``j``, in eval mode.

    :func:`validation_gradients` without the mean gradient's pass.

    Parameters
    ----------
    model, X, y, criterion, rows, batch_size, out
        As in :func:`validation_gradients`.

    Returns
    -------
    G : Tensor of shape (len(rows), n_params)
    """
    params, _, per_sample_grad = _eval_losses(model, criterion)
    return _per_sample_rows(per_sample_grad, params, X, y, rows, batch_size, out)


def _per_sample_rows(per_sample_grad, params, X, y, rows, batch_size, out):
    n_params = sum(p.numel() for p in params.values())
    ref = next(iter(params.values()))
    per_sample = ref.new_empty(len(rows), n_params) if out is None else out
    for start in range(0, len(rows), batch_size):  # written in place: no list and no copy of (rows, n_params)
        r = rows[start : start + batch_size]
        per_sample[start : start + len(r)] = per_sample_grad(params, X[r], y[r])
    return per_sample


def class_validation_gradients(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    criterion: nn.Module,
    n_classes: int,
    batch_size: int = 256,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``G^c = grad L_val^c(w_T)`` for every class, ``L_val^c`` the mean loss over class ``c``.

    Eval mode, like :func:`validation_gradients`. Each class's summed loss is
    differentiated batch by batch (one backward pass per batch, no per-sample
    gradients), then divided by the class count (DESIGN.md §5). The mean
    validation gradient is ``sum_c n_c G^c / n_val``.

    Parameters
    ----------
    model, X, y, criterion, batch_size
        As in :func:`validation_gradients`; ``y`` holds codes in ``0..n_classes-1``.
    n_classes : int
    out : Tensor of shape (n_classes, n_params), optional
        Where to write ``G`` (no other model-sized buffer is made).

    Returns
    -------
    G : Tensor of shape (n_classes, n_params)
        Rows of classes with no validation sample are NaN.
    """
    model = copy.deepcopy(model).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    G = out if out is not None else params[0].new_empty(n_classes, n_params)
    order = torch.argsort(y, stable=True)
    counts = torch.bincount(y, minlength=n_classes).tolist()  # one host sync for all classes
    start = 0
    for c, count in enumerate(counts):
        if not count:
            G[c] = float("nan")
            continue
        G[c] = 0.0
        views = [v.view_as(p) for v, p in zip(G[c].split([p.numel() for p in params]), params)]
        rows = order[start : start + count]
        for k in range(0, count, batch_size):
            r = rows[k : k + batch_size]
            with torch.enable_grad():
                grads = torch.autograd.grad(criterion(model(X[r]), y[r]).sum(), params, allow_unused=True,
                                            materialize_grads=True)
            torch._foreach_add_(views, grads)
        G[c] /= count
        start += count
    return G


def _eval_losses(model: nn.Module, criterion: nn.Module):
    """Parameters, the summed batch loss and flat per-sample gradients of an eval-mode copy."""
    model = copy.deepcopy(model).eval()
    params = parameter_dict(model)
    buffers = dict(model.named_buffers())

    def batch_loss(p: Params, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return criterion(functional_call(model, (p, buffers), (xb,)), yb).sum()

    def single_loss(p: Params, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return batch_loss(p, xi.unsqueeze(0), yi.unsqueeze(0))

    vmapped = vmap(grad(single_loss), in_dims=(None, 0, 0))

    def per_sample_grad(p: Params, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return flatten(vmapped(p, xb, yb), batch_dims=1)

    return params, batch_loss, per_sample_grad
