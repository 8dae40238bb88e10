"""Per-step directional derivatives ``<V_k, grad l_i(w)>``, accumulated over a run, layer by layer.

Scoring adds, at every step ``t`` and for the step's samples ``i``,
``weight_t * <V_k, grad l_i(w_{t-1})>`` into an (N, K) result. A training step's
forward and backward passes already compute every layer's inputs and output
gradients, from which each layer's algebra (:mod:`hydraclean.layers`) gives its
per-sample gradients or their products with directions, without a per-sample
backward pass. :func:`probe_layers` decides, on a probe batch, whether that
holds for a model (every trainable parameter in a layer some class covers, the
samples independent downstream of each layer) and how each layer's factors are
shaped. Then:

- :class:`TrainingFactors` (a linear rule, SGD: every step's weight is a scalar
  known before training) keeps, per layer, the summed per-sample gradients
  (``N x p_layer``) or each step's factors, from the training steps' own passes;
- :class:`StepFactors` (other elementwise rules, Adam) keeps each step's factors
  or per-sample gradients and the run's gradients, and projects in one
  backward sweep of the update rule;
- :class:`LayerFactorProjector` computes the same at given weights (a stored
  run's, walked again);
- :class:`FunctionalProjector` works for any model by ``torch.func``: one
  forward-mode JVP per direction, or per-sample gradients times the directions.

BatchNorm in train mode couples the samples of a batch, so the layer route
fails the probe for the layers upstream of it; with ``constant_stats`` the
model is probed, and its factors computed, with the batch statistics held
constant in the per-sample derivative (:func:`constant_statistics`), an
approximation the documentation measures against the exact route.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.func import functional_call

from .gradients import PerSampleLoss, directional_derivatives, parameter_dict
from .hypergradient import free_factors, step_weights
from .ghost import GhostRows, ghost_products, pays
from .layers import (
    CHUNK_BYTES,
    ConvAlgebra,
    DirectForm,
    GhostFactors,
    LayerAlgebra,
    algebra_for,
    column_ranges,
    layers_of,
)
from .modes import set_modes, training_modes
from .run_store import RunStore
from .spill import spill_location
from .training import Step, Trajectory, autocast, step_rng

__all__ = [
    "CapturedRun",
    "FunctionalProjector",
    "LayerCapture",
    "LayerFactorProjector",
    "LayerPlan",
    "StepFactors",
    "TrainingFactors",
    "constant_statistics",
    "make_projector",
    "probe_layers",
]

#: At most this many bytes of validation samples' ghost factors (GhostRows) are kept for scoring.
ROW_FACTOR_BYTES = 4 * CHUNK_BYTES


class FunctionalProjector:
    """Directional derivatives with ``torch.func``, for any module.

    Parameters
    ----------
    module : nn.Module
        The architecture.
    criterion : nn.Module
        Per-sample loss, ``reduction="none"``.
    directions : Tensor of shape (K, n_params)
    n_samples : int
        ``N``, rows of the result.
    autocast : torch.dtype, optional
        The training run's ``torch.autocast`` dtype: the forward passes use it
        too, the products are accumulated in the directions' dtype.
    modes : dict, optional
        The training run's modes (``Trajectory.train_modes``).
    """

    def __init__(self, module: nn.Module, criterion: nn.Module, directions: torch.Tensor, n_samples: int,
                 autocast: torch.dtype | None = None, modes: dict | None = None) -> None:
        self.loss = PerSampleLoss(module, criterion, modes)
        self.directions = directions
        self.autocast = autocast
        self.out = directions.new_zeros(n_samples, directions.shape[0])

    def add(self, params: dict[str, torch.Tensor], idx: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor,
            weight: float, directions: torch.Tensor | None = None) -> None:
        """``out[idx] += weight * <V, grad l_i(w)>`` at the weights ``params``.

        ``directions`` (K, n_params), when given, replace the projector's own for this step.
        """
        directions = self.directions if directions is None else directions
        with autocast(xb.device, self.autocast):
            d = directional_derivatives(self.loss, params, xb, yb, directions)
        self.out.index_add_(0, idx, d.to(self.out.dtype), alpha=weight)

    def result(self) -> torch.Tensor:
        """The accumulated (N, K) projections."""
        return self.out


# -- BatchNorm with the batch statistics held constant -------------------------------------------------

_CONSTANT_CLASSES: dict[type, type] = {}


def _constant_forward(self, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm's forward with its batch statistics detached (eval mode: the running ones, as usual)."""
    if not (self.training or self.running_mean is None):
        return type(self).__mro__[1].forward(self, x)
    axes = (0, *range(2, x.dim()))
    mean, var = x.mean(axes, keepdim=True).detach(), x.var(axes, unbiased=False, keepdim=True).detach()
    out = (x - mean) / torch.sqrt(var + self.eps)
    if self.affine:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
    return out


def constant_statistics(model: nn.Module) -> nn.Module:
    """Make every BatchNorm of ``model`` (in place) hold its batch statistics constant in the derivative:
    the same outputs, and each sample's loss then depends on the weights only through its own path."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) not in _CONSTANT_CLASSES.values():
            cls = type(m)
            if cls not in _CONSTANT_CLASSES:
                _CONSTANT_CLASSES[cls] = type(f"ConstantStatistics{cls.__name__}", (cls,),
                                              {"forward": _constant_forward})
            m.__class__ = _CONSTANT_CLASSES[cls]
    return model


class _SwitchableBatchNorm(torch.autograd.Function):
    """``F.batch_norm`` in train mode (the same kernels, bit for bit on CPU) whose backward is the exact one,
    or, while ``switch.constant``, the one with the batch statistics held constant (``grad * weight /
    sqrt(var + eps)``): one forward pass serves the training step's gradient and the per-sample derivative."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, switch):
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps, ctx.switch, ctx.has_bias = eps, switch, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        if ctx.switch.constant:
            scale = invstd if weight is None else invstd * weight
            return grad * scale.reshape((1, -1) + (1,) * (x.dim() - 2)), None, None, None, None, None, None, None
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(grad, x, weight, None, None, mean, invstd, True,
                                                               ctx.eps, mask)
        return gx, gw if mask[1] else None, gb if mask[2] else None, None, None, None, None, None


class _Switch:
    constant = False


@contextlib.contextmanager
def _switchable_batch_norm(switch: _Switch):
    """While active, train-mode ``F.batch_norm`` calls (BatchNorm modules make them through the module-level
    name) go through :class:`_SwitchableBatchNorm`."""
    original = F.batch_norm

    def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                   eps=1e-5):
        if not training:
            return original(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return _SwitchableBatchNorm.apply(input, weight, bias, running_mean, running_var, momentum, eps, switch)

    F.batch_norm = batch_norm
    try:
        yield
    finally:
        F.batch_norm = original


def has_batch_statistics(module: nn.Module, modes: dict | None = None) -> bool:
    """Whether a BatchNorm of ``module`` normalises with its batch's statistics during training."""
    modes = modes or training_modes(module)
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and (modes.get(name, True) or m.running_mean is None)
               for name, m in module.named_modules())


def private_copy(module: nn.Module, modes: dict | None, constant_stats: bool) -> nn.Module:
    """A copy of ``module`` in the training run's modes, its BatchNorms holding their statistics constant."""
    model = set_modes(copy.deepcopy(module), modes or training_modes(module))
    return constant_statistics(model) if constant_stats else model


# -- catching what a step computes ----------------------------------------------------------------------


class LayerCapture:
    """Hooks that catch, for every layer in a step, what its algebra needs from the forward pass and the
    gradient of the batch's mean loss at its outputs.

    ``mode="training"``: on the training model, whose backward (for the
    weights' gradients) the hooks ride along (a pre-hook on the node that made
    each output receives its gradient as computed, whatever later in-place
    operations do). ``mode="projection"``: on a private copy; each hooked
    output is handed on as a clone (later in-place operations touch the clone)
    and :meth:`backward` takes the gradients at the originals, no weight
    gradient computed. Evaluation passes (no gradient) are ignored.
    """

    def __init__(self, layers: list[nn.Module], algebras: list[LayerAlgebra], mode: str = "training") -> None:
        self.layers, self.algebras, self.mode = layers, algebras, mode
        self._handles: list = []
        self._captured: dict[int, list] = {}
        self._model_input: tuple = (None, 0)  # the step's batch as the module received it, and its version

    def attach(self, model: nn.Module) -> None:
        self._handles.append(model.register_forward_pre_hook(self._note_model_input))
        for k, (m, alg) in enumerate(zip(self.layers, self.algebras)):
            if alg.watches_forward:
                self._handles.append(m.register_forward_pre_hook(functools.partial(self._enter, alg),
                                                                 with_kwargs=True))
            if alg.reads_kwargs:
                self._handles.append(m.register_forward_hook(functools.partial(self._capture, k), with_kwargs=True))
            else:
                self._handles.append(m.register_forward_hook(functools.partial(self._capture_args, k)))

    def _note_model_input(self, model: nn.Module, inputs: tuple) -> None:
        if inputs and isinstance(inputs[0], torch.Tensor):
            self._model_input = (inputs[0], inputs[0]._version)

    def _enter(self, alg: LayerAlgebra, m: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled():
            alg._context = alg.forward()
            alg._context.__enter__()

    def _capture_args(self, k: int, m: nn.Module, args: tuple, out):
        return self._capture(k, m, args, {}, out)

    def _capture(self, k: int, m: nn.Module, args: tuple, kwargs: dict, out):
        alg = self.algebras[k]
        context = getattr(alg, "_context", None)
        if context is not None:
            alg._context = None
            context.__exit__(None, None, None)
        tensor_out = out if isinstance(out, torch.Tensor) else out[0]
        if not torch.is_grad_enabled() or not tensor_out.requires_grad:  # an evaluation pass, not a step
            return None
        x = args[0] if args else None
        # the layer read the step's batch itself, unchanged (no in-place op since: same version)
        reads_batch = x is self._model_input[0] and x._version == self._model_input[1]
        saved = alg.saved(args, kwargs, out)
        clone = None
        if self.mode == "projection" and isinstance(out, torch.Tensor):
            clone = out.clone()
        watched = alg.outputs(saved, out)
        entry = {"saved": saved, "outputs": watched, "grads": [None] * len(watched), "reads_batch": reads_batch}
        if self.mode == "training":
            # the graph holds the pre-hook, which holds the entry: the entry must not hold the graph (an
            # output tensor), or the cycle, through autograd's own references, is never collected
            entry["outputs"] = [_Like(o) for o in watched]
            if self.second_pass:  # the outputs' places in the graph, for the second pass (which drops them)
                entry["edges"] = [None if o.grad_fn is None else get_gradient_edge(o) for o in watched]
            else:
                for j, o in enumerate(watched):
                    if o.grad_fn is not None:
                        o.grad_fn.register_prehook(functools.partial(_set_gradient, entry, j, o.output_nr))
        self._captured.setdefault(k, []).append(entry)
        return clone

    def backward(self, loss: torch.Tensor) -> None:
        """Projection mode: the gradients of ``loss`` at every caught output (the weights' are not computed)."""
        entries = [e for calls in self._captured.values() for e in calls]
        targets = [(e, j, o) for e in entries for j, o in enumerate(e["outputs"]) if o.requires_grad]
        grads = torch.autograd.grad(loss, [o for *_, o in targets], allow_unused=True)
        for (e, j, _), g in zip(targets, grads):
            e["grads"][j] = g

    def take(self) -> dict[int, list]:
        """``{layer: [call entries]}`` of the step, and forget them."""
        captured, self._captured = self._captured, {}
        return captured

    #: Whether :meth:`after_step` runs a backward pass of its own through the step's graph
    second_pass = False

    def after_step(self, loss: torch.Tensor) -> None:
        """Called after a training step's backward pass (whose gradients the hooks caught): nothing more."""

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._model_input = (None, 0)


class ConstantStatisticsCapture(LayerCapture):
    """A training-mode capture for a model with BatchNorm in train mode whose per-sample derivative holds the
    batch statistics constant: the training step's forward pass serves both its exact backward pass (the
    step's gradient) and a second one, through the same graph with BatchNorm's backward switched to constant
    statistics, to the layers' outputs as the forward pass made them (their gradient edges: nothing below the
    first layer runs, and no weight gradient), whose gradients it keeps.

    The training step must keep its graph (``advance(..., retain_graph=True)``).
    """

    second_pass = True

    def __init__(self, layers: list[nn.Module], algebras: list[LayerAlgebra]) -> None:
        super().__init__(layers, algebras, mode="training")
        self._switch = _Switch()
        self._patch = None

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        self._handles.append(model.register_forward_pre_hook(self._enter_patch))
        self._handles.append(model.register_forward_hook(self._exit_patch))

    def _enter_patch(self, model, inputs) -> None:
        self._patch = _switchable_batch_norm(self._switch)
        self._patch.__enter__()

    def _exit_patch(self, model, inputs, output) -> None:
        patch, self._patch = self._patch, None
        if patch is not None:
            patch.__exit__(None, None, None)

    def after_step(self, loss: torch.Tensor) -> None:
        entries = [e for calls in self._captured.values() for e in calls]
        targets = [(e, j, edge) for e in entries for j, edge in enumerate(e.pop("edges")) if edge is not None]
        self._switch.constant = True
        try:
            grads = torch.autograd.grad(loss, [edge for *_, edge in targets], allow_unused=True)
        finally:
            self._switch.constant = False
        for (e, j, _), g in zip(targets, grads):
            e["grads"][j] = g


class _Like:
    """An output's shape, dtype and device, without the tensor (for a zero gradient where none arrived)."""

    __slots__ = ("shape", "dtype", "device")

    def __init__(self, t: torch.Tensor) -> None:
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device


def _set_gradient(entry: dict, j: int, output_nr: int, grad_outputs: tuple) -> None:
    entry["grads"][j] = grad_outputs[output_nr]


def _deltas(alg: LayerAlgebra, entry: dict, batch: float = 1.0) -> list[torch.Tensor]:
    return alg.deltas(entry["grads"], entry["outputs"], batch)


# -- which layers, and how -------------------------------------------------------------------------------


@dataclass
class LayerPlan:
    """How one layer's per-sample gradients are had (from :func:`probe_layers`).

    Attributes
    ----------
    algebra : type
        Its :class:`hydraclean.layers.LayerAlgebra` class.
    in_dim, out_dim : int
        The batch dimension of its first input and its output.
    calls : int
        How many times a forward pass runs it (shared layers: several).
    size : int
        Trainable parameters it covers.
    factors : list of (shape, dtype) or None
        One sample's factors (:meth:`LayerAlgebra.factors`), when it has a
        compact form and runs once per pass.
    reads_inputs : bool
        A Conv2d of the fast kind that reads the module's input itself,
        unchanged (its per-sample gradients can be formed from summed
        output gradients, when the inputs are the same in every epoch).
    out_shape : tuple
        One sample's output shape.
    kept_bytes : float
        What :class:`CapturedRun` keeps of the layer per sample and step (all
        its calls), measured on the probe batch.
    in_shape : tuple
        One sample's first input shape (batch dimension dropped), as the probe
        saw it first (:attr:`hydraclean.layers.LayerAlgebra.in_shape`).
    """

    algebra: type
    in_dim: int
    out_dim: int
    calls: int
    size: int
    factors: list | None
    reads_inputs: bool
    out_shape: tuple
    kept_bytes: float = 0.0
    in_shape: tuple | None = None

    def make(self, layer: nn.Module) -> LayerAlgebra:
        algebra = self.algebra(layer, self.in_dim, self.out_dim)
        algebra.in_shape = self.in_shape
        return algebra

    @property
    def factor_values(self) -> int:
        return sum(int(np.prod(shape)) for shape, _ in self.factors) if self.factors else 0


def probe_layers(module: nn.Module, criterion: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 modes: dict | None = None, constant_stats: bool = False, data: torch.Tensor | None = None
                 ) -> list[LayerPlan] | None:
    """Every trainable layer's plan, or None when the layer route does not hold for ``module``.

    A few passes over the probe batch ``x, y`` (at least 2 samples; 5 or more
    tell the batch dimension apart from sequence lengths) in the training
    run's modes: one to find each layer's batch dimensions and calls, then the
    layer route's per-sample products with three random directions against
    the whole model's exact ones (``torch.func``). They disagree when the
    samples interact downstream of a layer (BatchNorm in train mode), when a
    parameter is used outside its layer (weights tied by hand), or when a
    module's own forward draws random numbers where :class:`ModuleAlgebra`
    would need it not to: the route is then refused, and scoring takes the
    functional route. ``data`` (the training inputs as one tensor) marks the
    convolutions that read them unchanged.
    """
    model = private_copy(module, modes, constant_stats)
    layers = layers_of(model)
    params = parameter_dict(model)
    covered = {id(p) for m in layers for p in m.parameters() if p.requires_grad}
    if not layers or any(id(p) not in covered for p in parameter_dict(model, detach=False).values()):
        return None
    n = min(x.shape[0], 5)
    sizes = [n - 2, n] if n >= 4 else [n]
    seen: list[dict] = []
    for b in sizes:
        record: dict[int, list] = {}
        xb = x[:b].clone()
        handles = [m.register_forward_hook(functools.partial(_note_shapes, record, k, xb, xb.clone()),
                                           with_kwargs=True) for k, m in enumerate(layers)]
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model(xb)
        except Exception:  # noqa: BLE001  (a module that does not run on the probe: the functional route)
            return None
        finally:
            for h in handles:
                h.remove()
        seen.append(record)
    plans = []
    for k, m in enumerate(layers):
        calls = seen[-1].get(k, [])
        if not calls:
            return None
        in_dim = _batch_dim([s[k][0][0] for s in seen], sizes)
        out_dim = _batch_dim([s[k][0][1] for s in seen], sizes)
        cls = algebra_for(m)
        reads = cls is ConvAlgebra and cls(m).fast and all(c[2] for c in calls) and data is not None
        out_shape = tuple(int(s) for i, s in enumerate(calls[0][1]) if i != out_dim)
        in_shape = tuple(int(s) for i, s in enumerate(calls[0][0]) if i != in_dim)
        plans.append(LayerPlan(cls, in_dim, out_dim, len(calls), sum(p.numel() for p in m.parameters()
                                                                      if p.requires_grad), None, reads, out_shape,
                               in_shape=in_shape))
    yb = y[:n]
    algebras = [p.make(m) for p, m in zip(plans, layers)]
    for p, alg in zip(plans, algebras):
        p.size = alg.size
    capture = LayerCapture(layers, algebras, mode="projection")
    capture.attach(model)
    g = torch.Generator(device="cpu").manual_seed(0)
    ref = next(iter(params.values()))
    V = torch.randn(3, sum(v.numel() for v in params.values()), generator=g, dtype=ref.dtype).to(ref.device)
    try:
        with step_rng(1, x.device), torch.enable_grad():  # on copies: a module may change its input in place
            losses = criterion(functional_call(model, _leaves(params), (x[:n].clone(),)), yb)
            capture.backward(losses.mean())
        captured = capture.take()
        got = torch.zeros(n, 3, dtype=ref.dtype, device=ref.device)
        for k, (m, alg, plan) in enumerate(zip(layers, algebras, plans)):
            cols = _columns(model, m, alg, V.device)
            for entry in captured.get(k, []):
                deltas = _deltas(alg, entry, n)
                got += alg.apply(entry["saved"], deltas, V[:, cols])
                plan.kept_bytes += _nbytes(_kept(alg, entry["saved"], deltas)) / n
                if alg.factored and plan.calls == 1:
                    plan.factors = [(tuple(f.shape[1:]), f.dtype) for f in alg.factors(entry["saved"], deltas)]
        expected = _brute_products(model, criterion, params, x[:n].clone(), yb, V)
    except Exception:  # noqa: BLE001  (an algebra that does not hold here: the functional route)
        return None
    finally:
        capture.detach()
    tolerance = 1e-9 if ref.dtype == torch.float64 else 1e-4
    if float((got - expected).norm()) > tolerance * float(expected.norm()) + 1e-30:
        return None
    return plans


def _brute_products(model: nn.Module, criterion: nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor,
                    V: torch.Tensor) -> torch.Tensor:
    """``<V_k, grad l_i>`` by one backward pass per sample through one forward pass of the batch (under seed 1,
    as the layer route's probe pass): the exact per-sample gradients, batch coupling and dropout included."""
    leaves = _leaves(params)
    with step_rng(1, x.device), torch.enable_grad():
        losses = criterion(functional_call(model, leaves, (x,)), y)
        rows = []
        for i in range(x.shape[0]):  # one sample's gradient at a time: a few model-sized buffers, not n
            grads = torch.autograd.grad(losses[i], list(leaves.values()), retain_graph=True, allow_unused=True)
            rows.append(V @ torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                       for g, p in zip(grads, leaves.values())]))
    return torch.stack(rows)


def _note_shapes(record: dict, k: int, x_probe: torch.Tensor, x_values: torch.Tensor, m: nn.Module, args: tuple,
                 kwargs: dict, out) -> None:
    """Probe hook: the shapes of the first input and the output, and whether the input is the module's own,
    unchanged."""
    x = args[0] if args else None
    o = out if isinstance(out, torch.Tensor) else out[0]
    shape_in = tuple(x.shape) if isinstance(x, torch.Tensor) else ()
    reads = x is x_probe and torch.equal(x, x_values)
    record.setdefault(k, []).append((shape_in, tuple(o.shape), reads))


def _batch_dim(shapes: list[tuple], sizes: list[int]) -> int:
    """The dimension whose size follows the probe's batch size (0 when it cannot be told apart)."""
    if not shapes[0]:
        return 0
    for d in range(len(shapes[0])):
        if all(len(s) > d and s[d] == b for s, b in zip(shapes, sizes)):
            return d
    return 0


def _columns(model: nn.Module, layer: nn.Module, alg: LayerAlgebra, device) -> slice | torch.Tensor:
    """The layer's columns of the flat parameter vector: a slice where they are contiguous (the usual case;
    indexing a direction by it is a view, not a copy), else their indices."""
    ranges = column_ranges(model, layer, alg)
    if all(b0 == a1 for (_, b0), (a1, _) in zip(ranges, ranges[1:])):
        return slice(ranges[0][0], ranges[-1][1])
    return torch.cat([torch.arange(a, b, device=device) for a, b in ranges])


def _leaves(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights as fresh leaves that require a gradient, so that every layer's output has one."""
    return {k: v.detach().requires_grad_() for k, v in params.items()}


def _local_sizes(trajectory: Trajectory) -> np.ndarray:
    sizes = trajectory.batch_sizes()
    return sizes if trajectory.shard is None else trajectory.shard.local_sizes(sizes)


# -- products at given weights ----------------------------------------------------------------------------


class LayerFactorProjector:
    """Directional derivatives at given weights, layer by layer (a model :func:`probe_layers` accepts).

    A forward pass of a private copy at the weights (under the step's seed,
    the caller's) and one backward pass to the layer outputs give every
    layer's factors; each layer's algebra then gives ``<V, g_i>``. With
    ``ghost`` (the directions as combinations of validation samples' own
    gradients), a layer where it costs less takes the ghost product
    (:mod:`hydraclean.ghost`). Out of ``accumulate_bytes``, first every other
    layer's directions as its products read them at every step
    (:meth:`hydraclean.layers.LayerAlgebra.prepare`: a convolution's
    :class:`hydraclean.layers.DirectForm`, formed once instead of every step),
    then, for a remaining layer without compact factors, its per-sample
    gradients summed into an ``N x p_layer`` buffer with the step's weight
    (when the directions are the projector's own); else its per-sample
    gradients are multiplied by the directions every step.

    Parameters
    ----------
    module : nn.Module
    criterion : nn.Module
    directions : Tensor of shape (K, n_params)
    n_samples : int
    plan : list of LayerPlan
        From :func:`probe_layers` (with the same ``constant_stats``).
    ghost : GhostRows, optional
        How the directions combine validation samples' eval-mode gradients.
    accumulate_bytes : int, default=0
    autocast : torch.dtype, optional
        Of the forward passes at the given weights; products in the
        directions' dtype.
    modes : dict, optional
        The training run's modes.
    constant_stats : bool, default=False
        BatchNorm's batch statistics held constant.
    """

    def __init__(self, module: nn.Module, criterion: nn.Module, directions: torch.Tensor, n_samples: int,
                 plan: list[LayerPlan], ghost: GhostRows | None = None, accumulate_bytes: int = 0,
                 autocast: torch.dtype | None = None, modes: dict | None = None, constant_stats: bool = False) -> None:
        self.model = private_copy(module, modes, constant_stats)
        self.criterion, self.autocast, self.plan = criterion, autocast, plan
        self.constant_stats = constant_stats
        self.layers = layers_of(self.model)
        self.algebras = [p.make(m) for p, m in zip(plan, self.layers)]
        self.capture = LayerCapture(self.layers, self.algebras, mode="projection")
        self.capture.attach(self.model)
        self.columns = [_columns(self.model, m, a, directions.device) for m, a in zip(self.layers, self.algebras)]
        self.directions = directions
        self.out = directions.new_zeros(n_samples, directions.shape[0])
        self.row_factors: dict[int, GhostFactors] = {}
        self.mixing = None
        if ghost is not None:
            self.mixing = ghost.mixing.to(directions.dtype)
            self.row_factors = self._row_factors(modes, constant_stats, ghost)
        # the other layers' directions as their products read them every step, formed once where they fit
        # (first: a form saves time at every step), then the sums of the remaining dense layers
        self.prepared: dict[int, object] = {}
        self.sums: dict[int, torch.Tensor] = {}  # dense layers' summed per-sample gradients
        for k, (alg, cols) in enumerate(zip(self.algebras, self.columns)):
            if k in self.row_factors or not accumulate_bytes:
                continue
            prepared = alg.prepare(directions[:, cols])
            held = _new_bytes(prepared, directions)
            if 0 < held <= accumulate_bytes:
                accumulate_bytes -= held
                self.prepared[k] = prepared
        for k, alg in enumerate(self.algebras):
            held = n_samples * alg.size * directions.element_size()
            if (k not in self.row_factors and k not in self.prepared and not alg.factored and alg.dense
                    and held <= accumulate_bytes):
                accumulate_bytes -= held
                self.sums[k] = directions.new_zeros(n_samples, alg.size)

    def capture_at(self, params: dict, xb: torch.Tensor, yb: torch.Tensor) -> dict[int, list]:
        """Every layer's caught entries for the batch at ``params`` (forward under the projector's autocast)."""
        params = _leaves(params)
        with torch.enable_grad():
            with autocast(xb.device, self.autocast):
                losses = self.criterion(functional_call(self.model, params, (xb,)), yb)
            self.capture.backward(losses.mean())
        return self.capture.take()

    def _row_factors(self, modes, constant_stats, ghost: GhostRows, batch_size: int = 64,
                     budget: int = ROW_FACTOR_BYTES) -> dict:
        """The validation samples' eval-mode ghost factors ``(u_j, delta_j)`` at ``ghost.model``'s weights,
        for the layers (called once per pass) where the ghost product pays, as long as they fit in ``budget``
        bytes."""
        # the trained model itself (its BatchNorms' running statistics are w_T's, not the architecture's)
        evaluator = private_copy(ghost.model, modes, constant_stats).eval()
        layers = layers_of(evaluator)
        algebras = [p.make(m) for p, m in zip(self.plan, layers)]
        capture = LayerCapture(layers, algebras, mode="projection")
        capture.attach(evaluator)
        params = _leaves(parameter_dict(ghost.model))
        dtype = self.directions.dtype
        n, n_directions = ghost.y.shape[0], self.directions.shape[0]
        parts: dict[int, list] = {}
        chosen = None  # decided on the first batch
        try:
            for start in range(0, n, batch_size):
                xr, yr = ghost.X[start : start + batch_size], ghost.y[start : start + batch_size]
                with torch.enable_grad():
                    capture.backward(self.criterion(functional_call(evaluator, params, (xr,)), yr).mean())
                for k, entries in capture.take().items():
                    alg = algebras[k]
                    if len(entries) != 1 or (chosen is not None and k not in chosen):
                        continue
                    deltas = [d.to(dtype) for d in _deltas(alg, entries[0], xr.shape[0])]
                    factors = alg.ghost_factors(_cast(entries[0]["saved"], dtype), deltas)
                    if factors is None:
                        continue
                    if chosen is None:  # the first batch: does it pay, and do all samples' factors fit?
                        held = n * (factors.u[0].numel() + factors.delta[0].numel()) * factors.u.element_size()
                        one = GhostFactors(factors.u[0], factors.delta[0], factors.in_size)
                        if held > budget or not pays(alg, one, n, n_directions):
                            continue
                        budget -= held
                    parts.setdefault(k, []).append(factors)
                chosen = set(parts)
        finally:
            capture.detach()
        return {k: GhostFactors(torch.cat([f.u for f in v]), torch.cat([f.delta for f in v]), v[0].in_size)
                for k, v in parts.items()}

    def add(self, params: dict[str, torch.Tensor], idx: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor,
            weight: float, directions: torch.Tensor | None = None) -> None:
        """``out[idx] += weight * <V, grad l_i(w)>`` at the weights ``params``; ``directions``, when given,
        replace the projector's own for this step (no ghost rows then)."""
        self.add_captured(self.capture_at(params, xb, yb), idx, weight, directions)

    def training_capture(self, model: nn.Module) -> LayerCapture:
        """A capture for ``model`` (the same architecture, in the run's modes) that rides along its training
        steps: what it catches goes to :meth:`add_captured` with ``algebras=capture.algebras``. With the batch
        statistics held constant, a :class:`ConstantStatisticsCapture`."""
        layers = layers_of(model)
        algebras = [p.make(m) for p, m in zip(self.plan, layers)]
        capture = ConstantStatisticsCapture(layers, algebras) if self.constant_stats else LayerCapture(
            layers, algebras, mode="training")
        capture.attach(model)
        return capture

    def add_captured(self, captured: dict[int, list], idx: torch.Tensor, weight: float,
                     directions: torch.Tensor | None = None, algebras: list[LayerAlgebra] | None = None) -> None:
        """:meth:`add` from entries already caught (a recomputed step's own passes), by the algebras that
        caught them (the projector's own by default)."""
        algebras = algebras or self.algebras
        b = idx.shape[0]
        self.add_kept({k: [(entry["saved"], _deltas(algebras[k], entry, b)) for entry in entries]
                       for k, entries in captured.items()}, idx, weight, directions, algebras)

    def add_kept(self, kept: dict[int, list], idx: torch.Tensor, weight: float,
                 directions: torch.Tensor | None = None, algebras: list[LayerAlgebra] | None = None) -> None:
        """:meth:`add_captured` from what :class:`CapturedRun` kept of each call of a layer: ``(saved,
        deltas)`` (each sample's own output gradients, batch first) or the per-sample gradients, (b, size)."""
        own = directions is None
        V = self.directions if own else directions
        d = V.new_zeros(idx.shape[0], V.shape[0])
        for k, (alg, cols) in enumerate(zip(algebras or self.algebras, self.columns)):
            for item in kept.get(k, []):  # in the directions' dtype, also under autocast
                if isinstance(item, torch.Tensor):
                    if own and k in self.sums:
                        self.sums[k].index_add_(0, idx, item.to(V.dtype), alpha=weight)
                    else:
                        d += item.to(V.dtype) @ V[:, cols].T
                    continue
                saved = _cast(item[0], V.dtype)
                deltas = [delta.to(V.dtype) for delta in item[1]]
                if own and k in self.sums:
                    for rows, g in alg.chunks(saved, deltas):
                        self.sums[k].index_add_(0, idx[rows], g.to(V.dtype), alpha=weight)
                elif own and k in self.row_factors:
                    d += ghost_products(alg, alg.ghost_factors(saved, deltas), self.row_factors[k], self.mixing)
                else:
                    d += alg.apply(saved, deltas, self.prepared.get(k, V[:, cols]) if own else V[:, cols])
        self.out.index_add_(0, idx, d, alpha=weight)

    def result(self) -> torch.Tensor:
        """The accumulated (N, K) projections."""
        out = self.out
        for k, sums in self.sums.items():
            out = out + sums @ self.directions[:, self.columns[k]].T
        return out


def make_projector(module: nn.Module, criterion: nn.Module, directions: torch.Tensor, n_samples: int,
                   plan: list[LayerPlan] | None, ghost: GhostRows | None = None, accumulate_bytes: int = 0,
                   autocast: torch.dtype | None = None, modes: dict | None = None, constant_stats: bool = False):
    """:class:`LayerFactorProjector` with a plan, else :class:`FunctionalProjector`."""
    if plan is not None:
        return LayerFactorProjector(module, criterion, directions, n_samples, plan, ghost, accumulate_bytes,
                                    autocast, modes, constant_stats)
    return FunctionalProjector(module, criterion, directions, n_samples, autocast, modes)


# -- what the training run keeps -------------------------------------------------------------------------


class _StepFactorsBase:
    """Shared by the two recorders: the layers, their capture on the training model (or, with the batch
    statistics held constant, on a private copy at each step's weights), and the per-layer buffers."""

    def __init__(self, module: nn.Module, criterion: nn.Module, plan: list[LayerPlan], trajectory: Trajectory,
                 constant_stats: bool) -> None:
        self.module, self.criterion, self.trajectory, self.plan = module, criterion, trajectory, plan
        self.autocast = trajectory.autocast
        self.n_samples = trajectory.n_samples
        self.global_sizes = trajectory.batch_sizes()
        self.batch_sizes = _local_sizes(trajectory)  # this rank's share of each batch in a data-parallel run
        self.starts = np.concatenate([[0], np.cumsum(self.batch_sizes)[:-1]])
        self.rows = int(self.batch_sizes.sum())
        arch = layers_of(module)
        self.algebras = [p.make(m) for p, m in zip(plan, arch)]  # the architecture's: shapes and columns
        device = next(p for p in module.parameters() if p.requires_grad).device
        self.columns = [_columns(module, m, a, device) for m, a in zip(arch, self.algebras)]
        self.constant_stats = constant_stats
        self.capture = None
        self.recompute = None  # a projector that recomputes each step's factors (batch statistics constant)
        self._params = parameter_dict(module)

    def attach(self, model: nn.Module) -> None:
        if self.constant_stats:
            ref = next(iter(self._params.values()))
            self.recompute = LayerFactorProjector(self.module, self.criterion, ref.new_zeros(1, 1), 0, self.plan,
                                                  autocast=self.autocast, modes=self.trajectory.train_modes,
                                                  constant_stats=True)
            return
        layers = layers_of(model)
        algebras = [p.make(m) for p, m in zip(self.plan, layers)]
        self.capture = LayerCapture(layers, algebras, mode="training")
        self.capture.attach(model)
        self.algebras = algebras

    def _entries(self, step: Step) -> dict[int, list]:
        if self.recompute is None:
            return self.capture.take()
        from .gradients import unflatten

        with step_rng(self.trajectory.step_seed(step.t), step.xb.device):
            return self.recompute.capture_at(_leaves(unflatten(step.w, self._params)), step.xb, step.yb)

    def detach(self) -> None:
        if self.capture is not None:
            self.capture.detach()


def _plan_modes(plan: list[LayerPlan], n_rows: int, n_samples: int, itemsize: int, summed: bool) -> list[str]:
    """Per layer: ``"factors"`` (each sample-step's compact form) or ``"dense"`` (per-sample gradients:
    summed, ``N x p``, or kept per step, ``rows x p``), whichever is smaller."""
    modes = []
    for p in plan:
        dense_values = (n_samples if summed else n_rows) * p.size
        factor_values = n_rows * p.factor_values if p.factors else None
        if not p.algebra.dense:
            modes.append("factors" if p.factors else None)
        elif factor_values is not None and factor_values < dense_values:
            modes.append("factors")
        else:
            modes.append("dense")
    return modes


class TrainingFactors(_StepFactorsBase):
    """What the training run's own steps give, summed, for a linear rule (SGD): no second pass.

    Under SGD, the Hessian-free hypergradient is
    ``nabla_{T,i} = sum_t c_t (N / b_t) grad l_i(w_{t-1})`` with scalars
    ``c_t`` known before training (:func:`hydraclean.hypergradient.step_weights`),
    so each layer's share can be weighted as it goes (:class:`LayerCapture`
    catches it from the training step):

    - ``"dense"``: the per-sample gradients are formed at once and summed with
      the step's coefficient into each sample's hypergradient restricted to the
      layer (``N x p_layer``);
    - ``"input_conv"``: a Conv2d reading the training inputs themselves
      (``data``, the same rows in every epoch): its input ``x_i`` does not change
      over the run, so ``sum_t delta_{i,t} x_i'`` is ``(sum_t delta_{i,t}) x_i'``:
      the output gradients are summed (``N x`` its outputs) and the per-sample
      gradients formed once, at the end (:meth:`finish`). A step whose layer
      input is not the batch itself, unchanged (a module that transforms its
      input in training mode), takes the dense route;
    - ``"factors"``: the layer's compact factors of every sample and step (a
      Linear layer's ``a_i`` and ``c_t (N / b_t) delta_i``, an embedding's token
      ids and output gradients), when smaller than ``N x p_layer``.

    :meth:`project` then gives ``<V_k, nabla_{T,i}>`` for any directions from
    these alone. Build with :meth:`plan`; pass as the ``recorder`` of
    :func:`hydraclean.training.train`.

    Attributes
    ----------
    nbytes : int
        Memory held.
    """

    def __init__(self, module, criterion, plan, trajectory, coefficients: np.ndarray, kinds: list[str],
                 dtype: torch.dtype, device: torch.device, data: torch.Tensor | None = None,
                 constant_stats: bool = False) -> None:
        super().__init__(module, criterion, plan, trajectory, constant_stats)
        self.kinds, self.data, self.coefficients = kinds, data, coefficients
        n = self.n_samples
        self.sums = {k: torch.zeros(n, p.size, dtype=dtype, device=device)
                     for k, (p, kind) in enumerate(zip(plan, kinds)) if kind in ("dense", "input_conv")}
        self.output_sums = {k: torch.zeros(n, *p.out_shape, dtype=dtype, device=device)
                            for k, (p, kind) in enumerate(zip(plan, kinds)) if kind == "input_conv"}
        self.factors = {k: [torch.empty(self.rows, *shape, dtype=dtype if f.is_floating_point else f, device=device)
                            for shape, f in p.factors]
                        for k, (p, kind) in enumerate(zip(plan, kinds)) if kind == "factors"}
        self.index = torch.empty(self.rows, dtype=torch.long, device=device)
        self.nbytes = self.footprint(plan, kinds, trajectory, torch.empty(0, dtype=dtype).element_size())

    @classmethod
    def plan(cls, module: nn.Module, criterion: nn.Module, x_probe: torch.Tensor, y_probe: torch.Tensor,
             trajectory: Trajectory, coefficients: np.ndarray, max_memory: int, data: torch.Tensor | None = None,
             constant_stats: bool = False, layer_plan: list[LayerPlan] | None = None) -> TrainingFactors | None:
        """The recorder when the layer route holds for ``module`` (:func:`probe_layers`) and fits in
        ``max_memory``, else None. ``data``, the training inputs when they are one tensor (not a Dataset,
        whose items may be augmented anew every epoch), lets the convolutions that read them sum their
        output gradients instead (see above), where that fits."""
        plan = layer_plan if layer_plan is not None else probe_layers(
            module, criterion, x_probe, y_probe, constant_stats=constant_stats, data=data)
        if plan is None:
            return None
        ref = next(p for p in module.parameters() if p.requires_grad)
        rows, n = int(_local_sizes(trajectory).sum()), trajectory.n_samples
        kinds = _plan_modes(plan, rows, n, ref.element_size(), summed=True)
        if None in kinds:
            return None
        sums_inputs = [("input_conv" if p.reads_inputs and kind == "dense" and not constant_stats and data is not None
                        else kind) for p, kind in zip(plan, kinds)]
        for candidate in (sums_inputs, kinds):
            if cls.footprint(plan, candidate, trajectory, ref.element_size()) <= max_memory:
                return cls(module, criterion, plan, trajectory, coefficients, candidate, ref.dtype, ref.device,
                           data, constant_stats)
        return None

    @staticmethod
    def footprint(plan: list[LayerPlan], kinds: list[str], trajectory: Trajectory, itemsize: int) -> int:
        """Bytes the buffers take: ``N x p`` per dense layer (and ``N x`` the outputs of an input convolution),
        the factors of every sample-step, an index per sample-step."""
        rows, n = int(_local_sizes(trajectory).sum()), trajectory.n_samples
        values = sum(n * p.size for p, k in zip(plan, kinds) if k in ("dense", "input_conv"))
        values += sum(n * int(np.prod(p.out_shape)) for p, k in zip(plan, kinds) if k == "input_conv")
        values += sum(rows * p.factor_values for p, k in zip(plan, kinds) if k == "factors")
        return values * itemsize + rows * 8

    def record(self, step: Step) -> None:
        """Keep the step's share: gradients of its mean loss times ``b_t c_t N / b_t``."""
        t, idx = step.t, step.idx
        b, start = int(self.batch_sizes[t]), int(self.starts[t])
        # c_t N / b_t for each sample's own gradient, times b_t: the (global) batch's mean loss has delta / b_t
        weight = float(self.coefficients[t]) * float(self.global_sizes[t])
        captured = self._entries(step)
        for k, kind in enumerate(self.kinds):
            alg = self.algebras[k]
            entries = captured.get(k, [])
            if kind == "factors" and not entries:  # the layer did not run this step: no gradient
                for buffer in self.factors[k]:
                    buffer[start : start + b] = 0
                continue
            if kind == "factors":
                factors = alg.factors(entries[0]["saved"], _deltas(alg, entries[0]))
                for buffer, f in zip(self.factors[k], factors):
                    buffer[start : start + b] = f
                self.factors[k][-1][start : start + b] *= weight  # the last factor is linear in delta
                continue
            dtype = self.sums[k].dtype
            if kind == "input_conv" and len(entries) == 1 and entries[0]["reads_batch"]:
                delta = _deltas(alg, entries[0])[0]
                self.output_sums[k].index_add_(0, idx, delta.to(dtype), alpha=weight)
                continue
            for entry in entries:  # in the buffer's dtype, also under autocast
                deltas = [d.to(dtype) for d in _deltas(alg, entry)]
                for rows, g in alg.chunks(_cast(entry["saved"], dtype), deltas):
                    self.sums[k].index_add_(0, idx[rows], g, alpha=weight)
        self.index[start : start + b] = idx

    def finish(self) -> None:
        """After the run: the input convolutions' per-sample gradients from their summed output gradients,
        ``sum_t delta_{i,t} x_i' = (sum_t delta_{i,t}) x_i'``, into their ``N x p`` buffers; frees the sums."""
        for k, sums in self.output_sums.items():
            alg = self.algebras[k]
            for start in range(0, sums.shape[0], 128):  # a chunk's unfolded inputs stay in cache (LeNet-5: 10 MB)
                rows = slice(start, start + 128)
                self.sums[k][rows] += alg.gradients(self.data[rows].to(sums.dtype), [sums[rows]])
        self.output_sums = {}

    def state_dict(self) -> dict:
        return {"sums": self.sums, "output_sums": self.output_sums, "factors": self.factors, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        for name in ("sums", "output_sums"):
            for k, tensor in state[name].items():
                getattr(self, name)[k].copy_(tensor)
        for k, tensors in state["factors"].items():
            for buffer, tensor in zip(self.factors[k], tensors):
                buffer.copy_(tensor)
        self.index.copy_(state["index"])

    def project(self, directions: torch.Tensor, ghost: GhostRows | None = None, progress=None,
                chunk: int = 8192) -> torch.Tensor:
        """``P[i, k] = <V_k, nabla_{T,i}>``, shape (N, K) (after :meth:`finish`); ``ghost`` as in
        :class:`LayerFactorProjector`. No walk over the run: ``progress`` is not used."""
        if self.output_sums:
            raise RuntimeError("TrainingFactors.project needs finish() first.")
        cols = self.columns
        row_factors, mixing = {}, None
        if ghost is not None:
            projector = LayerFactorProjector(self.module, self.criterion, directions, 0, self.plan, ghost,
                                             modes=self.trajectory.train_modes, constant_stats=self.constant_stats)
            row_factors, mixing = projector.row_factors, projector.mixing
        out = directions.new_zeros(self.n_samples, directions.shape[0])
        for k, sums in self.sums.items():
            out += sums @ directions[:, cols[k]].T
        for k, buffers in self.factors.items():
            alg = self.algebras[k]
            for start in range(0, self.rows, chunk):
                part = slice(start, start + chunk)
                factors = tuple(f[part] for f in buffers)
                if k in row_factors:
                    d = ghost_products(alg, factors, row_factors[k], mixing)
                else:
                    d = alg.products(factors, directions[:, cols[k]])
                out.index_add_(0, self.index[part], d)
        return out

    def close(self) -> None:
        """Free the buffers."""
        self.sums, self.factors, self.index = {}, {}, None


class StepFactors(_StepFactorsBase):
    """What each training step gives, kept per step, for an elementwise rule (Adam, AdamW): no second pass.

    Under such a rule the Hessian-free adjoint of step ``t``'s gradient is
    ``V * d_t``, with a factor vector ``d_t`` known only once the run is over
    (:func:`hydraclean.hypergradient.free_factors`, a backward sweep of the
    update rule over the stored gradients). So each step's share is kept as
    it is: a layer's compact factors (Linear, embeddings) or its per-sample
    gradients, whichever is smaller; the run's gradients go to a
    :class:`hydraclean.run_store.RunStore`. :meth:`project` sweeps back over
    the run once and, at every step, adds ``(N / b_t) <V_k * d_t, grad l_i>``
    layer by layer; dense layers' terms ``g_i * d_t`` are summed over the run
    and projected once.

    Build with :meth:`plan`; pass as the ``recorder`` of
    :func:`hydraclean.training.train`.
    """

    def __init__(self, module, criterion, plan, trajectory, kinds: list[str], store: RunStore, dtype, device,
                 constant_stats: bool = False) -> None:
        super().__init__(module, criterion, plan, trajectory, constant_stats)
        self.kinds, self.store = kinds, store
        self.dense = {k: torch.empty(self.rows, p.size, dtype=dtype, device=device)
                      for k, (p, kind) in enumerate(zip(plan, kinds)) if kind == "dense"}
        self.factors = {k: [torch.empty(self.rows, *shape, dtype=dtype if f.is_floating_point else f, device=device)
                            for shape, f in p.factors]
                        for k, (p, kind) in enumerate(zip(plan, kinds)) if kind == "factors"}
        self.index = torch.empty(self.rows, dtype=torch.long, device=device)
        self.nbytes = self.footprint(plan, kinds, trajectory, torch.empty(0, dtype=dtype).element_size()) + store.nbytes

    @classmethod
    def plan(cls, module: nn.Module, criterion: nn.Module, x_probe: torch.Tensor, y_probe: torch.Tensor,
             trajectory: Trajectory, max_memory: int, constant_stats: bool = False,
             layer_plan: list[LayerPlan] | None = None) -> StepFactors | None:
        """The recorder when the layer route holds and it and every step's gradient fit in ``max_memory``."""
        plan = layer_plan if layer_plan is not None else probe_layers(module, criterion, x_probe, y_probe,
                                                                      constant_stats=constant_stats)
        if plan is None:
            return None
        params = [p for p in module.parameters() if p.requires_grad]
        ref, n_params = params[0], sum(p.numel() for p in params)
        rows = int(_local_sizes(trajectory).sum())
        kinds = _plan_modes(plan, rows, trajectory.n_samples, ref.element_size(), summed=False)
        if None in kinds:
            return None
        budget = max_memory - cls.footprint(plan, kinds, trajectory, ref.element_size())
        if RunStore.memory_footprint(trajectory, n_params, ref.dtype, reverse=True) > budget:
            return None
        store = RunStore(trajectory, n_params, ref.dtype, ref.device, budget, reverse=True)
        return cls(module, criterion, plan, trajectory, kinds, store, ref.dtype, ref.device, constant_stats)

    @staticmethod
    def footprint(plan: list[LayerPlan], kinds: list[str], trajectory: Trajectory, itemsize: int) -> int:
        """Bytes of the kept factors or per-sample gradients of every sample-step, an index, and the ``N x p``
        sums of the dense layers' terms that :meth:`project` forms."""
        rows, n = int(_local_sizes(trajectory).sum()), trajectory.n_samples
        values = sum(rows * p.factor_values if k == "factors" else (rows + n) * p.size for p, k in zip(plan, kinds))
        return values * itemsize + rows * 8

    def record(self, step: Step) -> None:
        """Keep the step's share (each sample's own gradient: the mean loss's times ``b_t``) and its gradient."""
        t = step.t
        b, start = int(self.batch_sizes[t]), int(self.starts[t])
        scale = float(self.global_sizes[t])
        captured = self._entries(step)
        for k, kind in enumerate(self.kinds):
            alg, entries = self.algebras[k], captured.get(k, [])
            if kind == "factors" and not entries:  # the layer did not run this step: no gradient
                for buffer in self.factors[k]:
                    buffer[start : start + b] = 0
                continue
            if kind == "factors":
                for buffer, f in zip(self.factors[k], alg.factors(entries[0]["saved"], _deltas(alg, entries[0], scale))):
                    buffer[start : start + b] = f
                continue
            dense = self.dense[k][start : start + b]
            dense.zero_()
            for entry in entries:
                deltas = [d.to(dense.dtype) for d in _deltas(alg, entry, scale)]
                for rows, g in alg.chunks(_cast(entry["saved"], dense.dtype), deltas):
                    dense[rows] += g
        self.index[start : start + b] = step.idx
        self.store.record(step)

    def finish(self) -> None:
        """Nothing to complete after training."""

    def state_dict(self) -> dict:
        return {"dense": self.dense, "factors": self.factors, "index": self.index, "store": self.store.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for k, tensor in state["dense"].items():
            self.dense[k].copy_(tensor)
        for k, tensors in state["factors"].items():
            for buffer, tensor in zip(self.factors[k], tensors):
                buffer.copy_(tensor)
        self.index.copy_(state["index"])
        self.store.load_state_dict(state["store"])

    def project(self, directions: torch.Tensor, ghost: GhostRows | None = None, progress=None) -> torch.Tensor:
        """``P[i, k] = <V_k, nabla_{T,i}>`` for every sample, shape (N, K): one backward sweep over the run.

        ``ghost`` does not apply: the per-step factors ``d_t`` scale each
        parameter by itself, so the directions are no longer combinations of
        validation gradients; every direction is dense here.
        """
        traj = self.trajectory
        n = traj.n_samples
        cols = self.columns
        out = directions.new_zeros(n, directions.shape[0])
        sums = {k: directions.new_zeros(n, self.algebras[k].size) for k in self.dense}
        steps = self.store.walk(reverse=True)
        if progress is not None:
            steps = iter(progress(steps, "scoring", traj.n_steps))
        for step, d in free_factors(traj, steps):
            t = step.t
            part = slice(int(self.starts[t]), int(self.starts[t] + self.batch_sizes[t]))
            weight = n / traj.batch_size_at(t)
            idx = self.index[part]
            products = out.new_zeros(idx.shape[0], out.shape[1])
            for k, buffers in self.factors.items():
                products += self.algebras[k].products(tuple(f[part] for f in buffers),
                                                      directions[:, cols[k]] * d[cols[k]])
            out.index_add_(0, idx, products, alpha=weight)
            for k, dense in self.dense.items():
                sums[k].index_add_(0, idx, dense[part] * d[cols[k]], alpha=weight)
        for k, s in sums.items():
            out += s @ directions[:, cols[k]].T
        return out

    def close(self) -> None:
        self.dense, self.factors, self.index = {}, {}, None
        self.store.close()


class CapturedRun(_StepFactorsBase):
    """What every training step's own passes caught, kept as caught, for a linear rule (SGD): no second walk.

    For a model whose layers need more than ``N x p_layer`` sums
    (:class:`TrainingFactors` does not fit: a ResNet's convolutions) the
    stored run (:class:`hydraclean.routes.StoredRun`) walks the run again to
    recompute each step's layer inputs and output gradients, a forward and a
    backward pass per step. This route keeps them from the training run instead
    (each layer call's input and each sample's own output gradients, or its
    per-sample gradients where those are smaller: a normalisation layer's
    affine weights), and :meth:`project` feeds them to
    :meth:`LayerFactorProjector.add_kept`: the same products as the walk's,
    from the same tensors (bit for bit on CPU), with no pass over the model.
    They stay in memory when they fit in ``max_memory``, else, with
    ``spill_dir``, one file per step there (deleted by :meth:`close`).

    Build with :meth:`plan`; pass as the ``recorder`` of
    :func:`hydraclean.training.train`.

    Attributes
    ----------
    location : {"memory", "disk"}
    nbytes : int
        Bytes held in memory (estimated from the probe batch; 0 on disk).
    disk_bytes : int
        Bytes written to ``spill_dir`` (estimated; 0 in memory).
    """

    def __init__(self, module, criterion, plan, trajectory, constant_stats: bool, nbytes: int,
                 spill_dir=None, accumulate_bytes: int = 0) -> None:
        super().__init__(module, criterion, plan, trajectory, constant_stats)
        self.weights = step_weights(trajectory)
        self.location = "memory" if spill_dir is None else "disk"
        self.nbytes, self.disk_bytes = (nbytes, 0) if spill_dir is None else (0, nbytes)
        self.accumulate_bytes = accumulate_bytes
        self._dir = None if spill_dir is None else tempfile.TemporaryDirectory(prefix="hydraclean-steps-",
                                                                              dir=spill_dir)
        self._steps: dict[int, tuple] = {}  # t -> (idx, kept layers) in memory
        #: with the batch statistics held constant, the training step's graph serves a second backward pass
        self.second_pass = constant_stats

    def attach(self, model: nn.Module) -> None:
        """Hooks on the training model; with the batch statistics held constant, a
        :class:`ConstantStatisticsCapture` whose second backward pass each step runs (no pass of its own)."""
        if not self.constant_stats:
            super().attach(model)
            return
        layers = layers_of(model)
        self.algebras = [p.make(m) for p, m in zip(self.plan, layers)]
        self.capture = ConstantStatisticsCapture(layers, self.algebras)
        self.capture.attach(model)

    def after_step(self, loss: torch.Tensor) -> None:
        self.capture.after_step(loss)

    @classmethod
    def plan(cls, module: nn.Module, criterion: nn.Module, trajectory: Trajectory, layer_plan: list[LayerPlan],
             max_memory: int, spill_dir=None, constant_stats: bool = False, reserve: int = 0) -> CapturedRun | None:
        """The recorder for a linear rule in one process, kept in memory when what every step keeps
        (:attr:`LayerPlan.kept_bytes`, from the probe) fits in ``max_memory - reserve``, else on disk where
        ``spill_dir`` allows (:func:`hydraclean.spill.spill_location`); None otherwise."""
        if not trajectory.rule.linear or trajectory.shard is not None:
            return None
        per_row = sum(p.kept_bytes for p in layer_plan) + 8  # and its sample's index
        nbytes = int(per_row * int(_local_sizes(trajectory).sum()))
        if nbytes <= max_memory - reserve:
            return cls(module, criterion, layer_plan, trajectory, constant_stats, nbytes, None,
                       max_memory - reserve - nbytes)
        folder = spill_location(spill_dir, nbytes)
        if folder is None:
            return None
        return cls(module, criterion, layer_plan, trajectory, constant_stats, nbytes, folder,
                   max(0, max_memory - reserve))

    def record(self, step: Step) -> None:
        """Keep what the step's passes caught, each layer call's own (the run's tensors, not copies)."""
        b = step.idx.shape[0]
        kept = {k: [_kept(self.algebras[k], entry["saved"], _deltas(self.algebras[k], entry, b)) for entry in entries]
                for k, entries in self._entries(step).items()}
        if self._dir is None:
            self._steps[step.t] = (step.idx.clone(), kept)
        else:  # one file a step; a view is cloned so that it drags no larger storage along (a storage two
            # layers share, such as a block's input, is written once)
            torch.save((step.idx.clone(), _map_tensors(kept, _own_storage)), self._path(step.t))

    def _path(self, t: int) -> str:
        return os.path.join(self._dir.name, f"step-{t}.pt")

    def _load(self, t: int) -> tuple:
        if self._dir is None:
            return self._steps[t]
        # an attention layer's entries name its projections' rows by slices (inert, so allowed)
        with torch.serialization.safe_globals([slice]):
            return torch.load(self._path(t), map_location=self.device, mmap=self.device.type == "cpu",
                              weights_only=True)

    @property
    def device(self) -> torch.device:
        return next(iter(self._params.values())).device

    def finish(self) -> None:
        """Nothing to complete after training."""

    def state_dict(self) -> dict:
        return {"steps": {t: self._load(t) for t in range(self.trajectory.n_steps) if self._has(t)}}

    def _has(self, t: int) -> bool:
        return t in self._steps if self._dir is None else os.path.exists(self._path(t))

    def load_state_dict(self, state: dict) -> None:
        for t, (idx, kept) in state["steps"].items():
            if self._dir is None:
                self._steps[t] = (idx.to(self.device), _map_tensors(kept, lambda x: x.to(self.device)))
            else:
                torch.save((idx, kept), self._path(t))

    def project(self, directions: torch.Tensor, ghost: GhostRows | None = None, progress=None) -> torch.Tensor:
        """``P[i, k] = <V_k, nabla_{T,i}>`` for every sample, shape (N, K): the kept steps' products, the
        walk's own (:class:`LayerFactorProjector`, ghost products where they cost less)."""
        traj = self.trajectory
        projector = LayerFactorProjector(self.module, self.criterion, directions, traj.n_samples, self.plan, ghost,
                                         self.accumulate_bytes, self.autocast, traj.train_modes, self.constant_stats)
        steps = range(traj.n_steps)
        for t in (steps if progress is None else progress(steps, "scoring", traj.n_steps)):
            idx, kept = self._load(t)
            projector.add_kept(kept, idx, float(self.weights[t]), algebras=self.algebras)
        return projector.result()

    def close(self) -> None:
        """Free what is kept (and delete the files)."""
        self._steps = {}
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def _kept(alg: LayerAlgebra, saved, deltas: list[torch.Tensor]):
    """What :class:`CapturedRun` keeps of one layer call: its per-sample gradients (b, size) when they are
    smaller than the call's saved inputs and (each sample's own) output gradients, else ``(saved, deltas)``."""
    if alg.dense and alg.size * deltas[0].shape[0] < sum(t.numel() for t in _tensors((saved, deltas))):
        dtype = alg.params[0].dtype  # the weights', also under autocast (as the products are taken)
        return torch.cat([g for _, g in alg.chunks(_cast(saved, dtype), [d.to(dtype) for d in deltas])])
    return saved, deltas


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _nbytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def _new_bytes(obj, base: torch.Tensor) -> int:
    """Bytes of ``obj``'s tensors (a :class:`DirectForm`'s included) that do not share ``base``'s storage."""
    if isinstance(obj, DirectForm):
        obj = [obj.matrix, obj.V]
    ptr = base.untyped_storage().data_ptr()
    return sum(t.numel() * t.element_size() for t in _tensors(obj) if t.untyped_storage().data_ptr() != ptr)


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    return obj


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` where it spans its whole storage, else a compact clone."""
    whole = t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes
    return t if whole else t.clone()


def _cast(saved, dtype: torch.dtype):
    """Floating tensors of ``saved`` in ``dtype`` (autocast's low-precision inputs, for the products)."""
    return _map_tensors(saved, lambda t: t.to(dtype) if t.is_floating_point() else t)
