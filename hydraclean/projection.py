"""Per-step directional derivatives ``<V_k, grad l_i(w)>``, accumulated over a run.

Scoring adds, at every step ``t`` and for the step's samples ``i``,
``weight_t * <V_k, grad l_i(w_{t-1})>`` into an (N, K) result. Two projectors
do that, with the same numbers up to rounding:

:class:`FunctionalProjector` works for any module (``torch.func``): one
forward-mode JVP for one direction, else per-sample gradients times the
directions, a (b x n_params) by (n_params x K) product every step.

:class:`LayerFactorProjector` serves models whose trainable parameters all sit
in ``nn.Linear`` and ``nn.Conv2d`` layers and whose samples do not interact
(no BatchNorm). One forward pass records each layer's input ``a_i`` and one
backward pass to the layer outputs gives ``delta_i = d l_i / d out``; then a
sample's gradient is ``delta_i a_i'`` (summed over positions) and per layer:

- Linear, a dense direction ``V``: ``<V, delta_i a_i'> = delta_i' V a_i``,
  ``b K out in`` multiply-adds, with nothing of size b x n_params formed.
- Linear, a direction that is itself one validation sample's gradient
  ``delta_j a_j'`` (the rows of ``C(i, j)``): the "ghost" product
  ``(delta_i . delta_j)(a_i . a_j + 1)``, ``b K (in + out)`` instead of
  ``b K in out`` (520 against 48,000 per pair for LeNet-5's first fully
  connected layer).
- Conv2d: convolutions share weights over positions, so the per-sample
  gradient is formed (``b out in k^2 P`` multiply-adds, by a strided view and one
  batched product, or one grouped convolution for large layers) and kept: either
  summed into each sample's hypergradient restricted to the
  convolutions (an N x p_conv buffer, when the memory budget holds it; one
  product with the directions at the end), or multiplied by the directions
  every step.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .gradients import PerSampleLoss, directional_derivatives, parameter_dict
from .hypergradient import free_factors
from .run_store import RunStore
from .training import Step, Trajectory, autocast

__all__ = [
    "FunctionalProjector",
    "LayerCapture",
    "LayerFactorProjector",
    "StepFactors",
    "TrainingFactors",
    "make_projector",
    "probe_layers",
    "supports_layer_factors",
]


def supports_layer_factors(module: nn.Module) -> bool:
    """Whether :class:`LayerFactorProjector` can serve ``module``.

    True when no BatchNorm couples the samples and every trainable parameter
    is the weight or bias of an ``nn.Linear`` or of an ``nn.Conv2d`` with
    ``groups=1``, zero padding given as numbers. (A layer called twice in one
    forward pass is detected at the first step, which then falls back.)
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return False
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if isinstance(m, nn.Conv2d):
            if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                return False
        elif not isinstance(m, nn.Linear):
            return False
    return True


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
    """

    def __init__(self, module: nn.Module, criterion: nn.Module, directions: torch.Tensor, n_samples: int,
                 autocast: torch.dtype | None = None) -> None:
        self.loss = PerSampleLoss(module, criterion)
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


class LayerFactorProjector:
    """Directional derivatives from layer inputs and output gradients (Linear and Conv2d models).

    Parameters
    ----------
    module : nn.Module
        The architecture (see :func:`supports_layer_factors`).
    criterion : nn.Module
        Per-sample loss, ``reduction="none"``.
    directions : Tensor of shape (K, n_params)
    n_samples : int
        ``N``, rows of the result.
    rows : (model, X_rows, y_rows), optional
        When the last ``len(X_rows)`` directions are the eval-mode gradients of
        these validation samples at ``model``'s weights, their Linear parts use
        ghost products.
    accumulate_bytes : int, default=0
        Memory allowed for the N x p_conv buffer of convolution hypergradients;
        when it does not fit, the convolution gradients are projected every step.
    autocast : torch.dtype, optional
        The training run's ``torch.autocast`` dtype, used by the forward passes
        at the stored weights (not by the validation rows'); the layer factors
        are cast to the directions' dtype before any product.
    """

    def __init__(
        self,
        module: nn.Module,
        criterion: nn.Module,
        directions: torch.Tensor,
        n_samples: int,
        rows: tuple[nn.Module, torch.Tensor, torch.Tensor] | None = None,
        accumulate_bytes: int = 0,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.module = copy.deepcopy(module).train()
        self.criterion = criterion
        self.autocast = autocast
        self.out = directions.new_zeros(n_samples, directions.shape[0])
        self.fallback: FunctionalProjector | None = None
        self._fallback_args = (module, criterion, directions, n_samples, autocast)
        self.layers = _trainable_layers(self.module)
        # columns of each layer's weight and bias in the flat parameter vector
        offsets, start = {}, 0
        for p in self.module.parameters():
            if p.requires_grad:
                offsets[id(p)] = (start, start + p.numel())
                start += p.numel()
        self.columns = {m: [offsets[id(p)] for p in (m.weight, m.bias) if p is not None and p.requires_grad]
                        for m in self.layers}
        self.n_dense = directions.shape[0] - (0 if rows is None else rows[1].shape[0])
        # the hooks write into this dict, keyed by layer position; they hold no reference to the
        # projector or the modules, so dropping the projector frees its tensors without a cycle
        self._captured: dict[int, list] = {}
        evaluator = copy.deepcopy(self.module).eval()  # before any hook
        for k, (m, m_eval) in enumerate(zip(self.layers, _trainable_layers(evaluator))):
            m.register_forward_hook(functools.partial(_capture_output, self._captured, k))
            m_eval.register_forward_hook(functools.partial(_capture_output, self._captured, k))
        self.row_factors = self._row_factors(evaluator, *rows) if rows is not None else {}
        # each Linear layer's block of the dense directions (all directions without ghost rows), contiguous
        self.linear_directions = {}
        for m in self.layers:
            if isinstance(m, nn.Linear):
                (w0, w1), *bias = self.columns[m]
                k = self.n_dense if m in self.row_factors else directions.shape[0]
                self.linear_directions[m] = (
                    directions[:k, w0:w1].reshape(k * m.out_features, m.in_features).contiguous(),
                    directions[:k, bias[0][0] : bias[0][1]].contiguous() if bias else None,
                )
        convs = [m for m in self.layers if isinstance(m, nn.Conv2d)]
        conv_cols = [torch.arange(a, b, device=directions.device) for m in convs for a, b in self.columns[m]]
        self.conv_directions = directions[:, torch.cat(conv_cols)] if conv_cols else None
        p_conv = 0 if self.conv_directions is None else self.conv_directions.shape[1]
        self.conv_sum = None
        if p_conv and n_samples * p_conv * directions.element_size() <= accumulate_bytes:
            self.conv_sum = directions.new_zeros(n_samples, p_conv)

    def _factors(self, module: nn.Module, params: dict, xb: torch.Tensor, yb: torch.Tensor,
                 dtype: torch.dtype | None = None):
        """``(a, delta)`` of every layer for the batch (forward under autocast to ``dtype``, factors in
        the directions' dtype), or None when a layer ran other than once."""
        self._captured.clear()
        with torch.enable_grad():
            with autocast(xb.device, dtype):
                losses = self.criterion(functional_call(module, params, (xb,)), yb)
            if any(len(self._captured.get(k, ())) != 1 for k in range(len(self.layers))):
                self._captured.clear()
                return None
            inputs = [self._captured[k][0][0] for k in range(len(self.layers))]
            outs = [self._captured[k][0][1] for k in range(len(self.layers))]
            self._captured.clear()
            # the gradient of the mean loss, as the training step takes it: under autocast, the output
            # gradients are then rounded as in training, and every route sees the same factors
            deltas = torch.autograd.grad(losses.mean(), outs, allow_unused=True)
        out, b = self.out.dtype, xb.shape[0]
        return {m: (a.to(out), torch.zeros_like(o, dtype=out) if d is None else d.to(out) * b)
                for m, a, o, d in zip(self.layers, inputs, outs, deltas)}

    def _row_factors(self, evaluator: nn.Module, model: nn.Module, X_rows: torch.Tensor, y_rows: torch.Tensor,
                     batch_size: int = 256) -> dict:
        """Eval-mode ``(a_j, delta_j)`` at ``model``'s weights of the Linear layers with 2-D inputs."""
        params = parameter_dict(model)
        parts: dict[nn.Module, list] = {}
        for start in range(0, X_rows.shape[0], batch_size):
            factors = self._factors(evaluator, params, X_rows[start : start + batch_size],
                                    y_rows[start : start + batch_size])
            if factors is None:
                return {}
            for m, (a, delta) in factors.items():
                if isinstance(m, nn.Linear) and a.dim() == 2:
                    parts.setdefault(m, []).append((a, delta))
        return {m: (torch.cat([a for a, _ in v]), torch.cat([d for _, d in v])) for m, v in parts.items()}

    def add(self, params: dict[str, torch.Tensor], idx: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor,
            weight: float) -> None:
        """``out[idx] += weight * <V, grad l_i(w)>`` at the weights ``params``."""
        if self.fallback is None:
            factors = self._factors(self.module, params, xb, yb, self.autocast)
            if factors is None:  # a layer ran twice (shared weights): per-sample products are not rank one
                self.fallback = FunctionalProjector(*self._fallback_args)
        if self.fallback is not None:
            self.fallback.add(params, idx, xb, yb, weight)
            return
        d = xb.new_zeros(xb.shape[0], self.out.shape[1], dtype=self.out.dtype)
        conv_grads = []
        for m in self.layers:
            a, delta = factors[m]
            if isinstance(m, nn.Linear):
                self.add_linear(m, a, delta, d)
            else:
                conv_grads.append(_conv_sample_gradients(m, a, delta))
        if conv_grads:
            g = torch.cat(conv_grads, dim=1)
            if self.conv_sum is not None:
                self.conv_sum.index_add_(0, idx, g, alpha=weight)
            else:
                d += g @ self.conv_directions.T
        self.out.index_add_(0, idx, d, alpha=weight)

    def add_linear(self, m: nn.Linear, a: torch.Tensor, delta: torch.Tensor, d: torch.Tensor) -> None:
        """``d += <V, delta_i a_i'>`` for a Linear layer's inputs ``a`` and output gradients ``delta``."""
        b = a.shape[0]
        a, delta = a.reshape(b, -1, a.shape[-1]), delta.reshape(b, -1, delta.shape[-1])
        weight, bias = self.linear_directions[m]
        dense = slice(0, weight.shape[0] // m.out_features)
        z = (a @ weight.T).reshape(b, a.shape[1], -1, m.out_features)
        d[:, dense] += torch.einsum("bpo,bpko->bk", delta, z)
        if bias is not None:
            d[:, dense] += delta.sum(1) @ bias.T
        if m in self.row_factors:
            a_rows, delta_rows = self.row_factors[m]
            inputs = a[:, 0] @ a_rows.T
            if bias is not None:
                inputs += 1.0
            d[:, self.n_dense :] += (delta[:, 0] @ delta_rows.T) * inputs

    def result(self) -> torch.Tensor:
        """The accumulated (N, K) projections."""
        if self.fallback is not None:
            return self.out + self.fallback.result()
        if self.conv_sum is not None:
            return self.out + self.conv_sum @ self.conv_directions.T
        return self.out


def probe_layers(module: nn.Module, x_probe: torch.Tensor, data: torch.Tensor | None) -> dict[int, tuple] | None:
    """The kind and size of every trainable layer's factors, from one eval-mode pass over a few inputs.

    Returns None when the model cannot be served by layer factors: a layer
    that is not Linear or plain Conv2d (:func:`supports_layer_factors`), that
    runs other than once, or a Linear layer whose input is not 2-D. Otherwise
    ``{layer position: ("linear", in, out) | ("conv", p_layer) | ("input_conv",
    p_layer, one sample's output shape)}``, the last for a convolution that
    reads the module's input itself, unchanged, when ``data`` (the training
    inputs as one tensor) is given.
    """
    if not supports_layer_factors(module):
        return None
    probe = copy.deepcopy(module).eval()
    layers = _trainable_layers(probe)
    seen: dict[int, list] = {}
    handles = [m.register_forward_hook(functools.partial(_note_input, seen, k, x_probe, x_probe.clone()))
               for k, m in enumerate(layers)]
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        probe(x_probe)
    for h in handles:
        h.remove()
    shapes = {}
    for k, m in enumerate(layers):
        if len(seen.get(k, ())) != 1:
            return None
        dim, reads_inputs, out_shape = seen[k][0]
        if isinstance(m, nn.Linear):
            if dim != 2:
                return None
            shapes[k] = ("linear", m.in_features, m.out_features)
        else:
            p = sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad)
            shapes[k] = ("input_conv", p, out_shape) if reads_inputs and data is not None else ("conv", p)
    return shapes


class LayerCapture:
    """Hooks on the training model that catch every trainable layer's input and output gradient in a step.

    The training step's forward and backward already compute both: the
    layer's input ``a_i`` and the gradient of the batch's mean loss with
    respect to its output, ``delta_i / b_t`` (a pre-hook on the node that made
    the output receives it as computed, whatever later in-place operations do
    to the output). Evaluation passes between epochs are ignored.
    """

    def __init__(self) -> None:
        self.layers: list[nn.Module] = []
        self._handles: list = []
        self._captured: dict[int, list] = {}
        self._model_input: tuple = (None, 0)  # the step's batch as the module received it, and its version

    def attach(self, model: nn.Module) -> None:
        self._handles.append(model.register_forward_pre_hook(self._note_model_input))
        self.layers = _trainable_layers(model)
        for k, m in enumerate(self.layers):
            self._handles.append(m.register_forward_hook(functools.partial(self._capture, k)))

    def _note_model_input(self, model: nn.Module, inputs: tuple) -> None:
        self._model_input = (inputs[0], inputs[0]._version)

    def _capture(self, k: int, m: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if not out.requires_grad:  # an evaluation pass between epochs, not a training step
            return None
        x = inputs[0]
        # the layer read the step's batch itself, unchanged (no in-place op since: same version)
        reads_batch = x is self._model_input[0] and x._version == self._model_input[1]
        entry = [x.detach(), None, reads_batch]
        out.grad_fn.register_prehook(functools.partial(_set_output_gradient, entry, out.output_nr))
        self._captured[k] = entry
        return None

    def take(self) -> dict[int, list]:
        """``{layer position: [input, gradient of the batch's mean loss at the output, reads the batch]}``."""
        captured, self._captured = self._captured, {}
        return captured

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._model_input = (None, 0)


class TrainingFactors:
    """Layer factors summed over the training run's own steps, for a linear rule (SGD): no second pass.

    Under SGD, the Hessian-free hypergradient is
    ``nabla_{T,i} = sum_t c_t (N / b_t) grad l_i(w_{t-1})`` with scalars
    ``c_t`` known before training (:func:`hydraclean.hypergradient.step_weights`),
    so what each step computes can be weighted as it goes
    (:class:`LayerCapture` catches it):

    - Conv2d: the per-sample gradients are formed at once and summed with the
      step's coefficient into each sample's hypergradient restricted to the
      convolutions, ``sum_t c_t (N / b_t) grad_conv l_i(w_{t-1})`` (N x p_conv);
    - Conv2d reading the training inputs themselves (``data``, the same rows
      in every epoch): its input ``x_i`` does not change over the run, so
      ``sum_t delta_{i,t} x_i'`` is ``(sum_t delta_{i,t}) x_i'``: the output
      gradients are summed (N x out_channels x positions, when that fits in
      ``max_memory``) and the per-sample gradients formed once, at the end
      (:meth:`finish`). A step whose layer input is not the batch itself,
      unchanged (a module that transforms its input in training mode), takes
      the route above;
    - Linear (2-D inputs): ``a_i`` and ``c_t (N / b_t) delta_i`` of every sample
      and step, ``n_epochs N (in + out)`` values.

    :meth:`project` then gives ``<V_k, nabla_{T,i}>`` for any directions from
    these alone. Build with :meth:`plan`; pass as the ``recorder`` of
    :func:`hydraclean.training.train`.

    Attributes
    ----------
    nbytes : int
        Memory held.
    """

    def __init__(self, module: nn.Module, criterion: nn.Module, shapes: dict[int, tuple], trajectory: Trajectory,
                 coefficients: np.ndarray, dtype: torch.dtype, device: torch.device,
                 data: torch.Tensor | None = None) -> None:
        # layer position -> ("linear", in, out), ("conv", p_layer) or ("input_conv", p_layer, output shape)
        self.module, self.criterion, self.autocast = module, criterion, trajectory.autocast
        self.shapes = shapes
        self.data = data
        self.coefficients = coefficients
        self.global_sizes = trajectory.batch_sizes()
        self.batch_sizes = _local_sizes(trajectory)  # this rank's share of each batch in a data-parallel run
        self.starts = np.concatenate([[0], np.cumsum(self.batch_sizes)[:-1]])
        n, rows = trajectory.n_samples, int(self.batch_sizes.sum())
        self.n_samples = n
        convs = [k for k, v in shapes.items() if v[0] != "linear"]
        p_conv = sum(shapes[k][1] for k in convs)
        bounds = np.cumsum([0] + [shapes[k][1] for k in convs])
        self.conv_columns = {k: slice(lo, hi) for k, lo, hi in zip(convs, bounds[:-1], bounds[1:])}
        self.conv_sum = torch.zeros(n, p_conv, dtype=dtype, device=device) if p_conv else None
        self.output_sums = {k: torch.zeros(n, *v[2], dtype=dtype, device=device)
                            for k, v in shapes.items() if v[0] == "input_conv"}
        self.inputs = {k: torch.empty(rows, v[1], dtype=dtype, device=device)
                       for k, v in shapes.items() if v[0] == "linear"}
        self.deltas = {k: torch.empty(rows, v[2], dtype=dtype, device=device)
                       for k, v in shapes.items() if v[0] == "linear"}
        self.index = torch.empty(rows, dtype=torch.long, device=device)
        self.nbytes = self.footprint(shapes, trajectory, torch.empty(0, dtype=dtype).element_size())
        self.capture = LayerCapture()
        self.layers = _trainable_layers(module)  # their shapes and strides (the architecture's)

    @classmethod
    def plan(cls, module: nn.Module, criterion: nn.Module, x_probe: torch.Tensor, trajectory: Trajectory,
             coefficients: np.ndarray, max_memory: int, data: torch.Tensor | None = None) -> TrainingFactors | None:
        """The recorder for ``module`` when layer factors serve it (:func:`probe_layers`) and fit in
        ``max_memory``, else None. ``data``, the training inputs when they are one tensor (not a Dataset,
        whose items may be augmented anew every epoch), lets the convolutions that read them sum their
        output gradients instead (see above), where that fits."""
        shapes = probe_layers(module, x_probe, data)
        if shapes is None:
            return None
        ref = next(p for p in module.parameters() if p.requires_grad)
        if cls.footprint(shapes, trajectory, ref.element_size()) > max_memory:  # per-step gradients instead
            shapes = {k: ("conv", v[1]) if v[0] == "input_conv" else v for k, v in shapes.items()}
        if cls.footprint(shapes, trajectory, ref.element_size()) > max_memory:
            return None
        return cls(module, criterion, shapes, trajectory, coefficients, ref.dtype, ref.device, data)

    @staticmethod
    def footprint(shapes: dict[int, tuple], trajectory: Trajectory, itemsize: int) -> int:
        """Bytes the buffers take: N x p_conv, N x outputs of the input convolutions, and (in + out) values
        and an index per sample and step."""
        rows, n = int(_local_sizes(trajectory).sum()), trajectory.n_samples
        values = sum(rows * (v[1] + v[2]) if v[0] == "linear" else n * v[1] for v in shapes.values())
        values += sum(n * int(np.prod(v[2])) for v in shapes.values() if v[0] == "input_conv")
        return values * itemsize + rows * torch.empty(0, dtype=torch.long).element_size()

    def attach(self, model: nn.Module) -> None:
        """Hook the training model's layers."""
        self.capture.attach(model)

    def record(self, step: Step) -> None:
        """Keep the step's factors: the gradients of its mean loss times ``b_t c_t N / b_t``."""
        t, idx = step.t, step.idx
        b, start = int(self.batch_sizes[t]), int(self.starts[t])
        # c_t (N / b_t) times b_t: the gradient of the (global) batch's mean loss is delta / b_t
        weight = float(self.coefficients[t]) * float(self.global_sizes[t])
        captured = self.capture.take()
        for k, (kind, *_) in self.shapes.items():
            a, g, reads_batch = captured[k]
            if kind == "input_conv" and reads_batch:  # per-sample gradients at the end, from the summed outputs
                self.output_sums[k].index_add_(0, idx, g.to(self.conv_sum.dtype), alpha=weight)
            elif kind != "linear":  # in the buffer's dtype, also under autocast
                dtype = self.conv_sum.dtype
                self.conv_sum[:, self.conv_columns[k]].index_add_(
                    0, idx, _conv_sample_gradients(self.layers[k], a.to(dtype), g.to(dtype)), alpha=weight)
            else:
                self.inputs[k][start : start + b] = a
                delta = self.deltas[k][start : start + b]
                delta.copy_(g)  # cast first: under autocast the product must not round to g's dtype
                delta.mul_(weight)
        self.index[start : start + b] = idx

    def detach(self) -> None:
        """Remove the hooks from the training model."""
        self.capture.detach()

    def finish(self) -> None:
        """After the run: the input convolutions' per-sample gradients from their summed output gradients,
        ``sum_t delta_{i,t} x_i' = (sum_t delta_{i,t}) x_i'``, into the N x p_conv buffer; frees the sums."""
        for k, sums in self.output_sums.items():
            for start in range(0, sums.shape[0], 128):  # a chunk's unfolded inputs stay in cache (LeNet-5: 10 MB)
                rows = slice(start, start + 128)
                self.conv_sum[rows, self.conv_columns[k]] += _conv_sample_gradients(
                    self.layers[k], self.data[rows].to(sums.dtype), sums[rows])
        self.output_sums = {}

    def state_dict(self) -> dict:
        return {"conv_sum": self.conv_sum, "output_sums": self.output_sums, "inputs": self.inputs,
                "deltas": self.deltas, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            current = getattr(self, name)
            if isinstance(current, dict):
                for k, tensor in value.items():
                    current[k].copy_(tensor)
            elif current is not None:
                current.copy_(value)

    def project(self, directions: torch.Tensor, rows: tuple[nn.Module, torch.Tensor, torch.Tensor] | None = None,
                progress=None, chunk: int = 8192) -> torch.Tensor:
        """``P[i, k] = <V_k, nabla_{T,i}>``, shape (N, K) (after :meth:`finish`); ``rows`` as in
        :class:`LayerFactorProjector` (ghost products). No walk over the run: ``progress`` is not used."""
        if self.output_sums:
            raise RuntimeError("TrainingFactors.project needs finish() first.")
        projector = LayerFactorProjector(self.module, self.criterion, directions, self.n_samples, rows,
                                         autocast=self.autocast)
        out = projector.out  # zeros: the projector has seen no step
        linear = [(k, projector.layers[k]) for k, v in self.shapes.items() if v[0] == "linear"]
        for start in range(0, self.index.shape[0], chunk):
            part = slice(start, start + chunk)
            d = out.new_zeros(self.index[part].shape[0], out.shape[1])
            for k, m in linear:
                projector.add_linear(m, self.inputs[k][part], self.deltas[k][part], d)
            out.index_add_(0, self.index[part], d)
        if self.conv_sum is not None:
            out += self.conv_sum @ projector.conv_directions.T
        return out

    def close(self) -> None:
        """Free the buffers."""
        self.conv_sum = self.inputs = self.deltas = self.index = None


class StepFactors:
    """Layer factors kept per step, for an elementwise rule (Adam, AdamW): no second pass over the model.

    Under such a rule the Hessian-free adjoint of step ``t``'s gradient is
    ``V * d_t``, with a factor vector ``d_t`` known only once the run is over
    (:func:`hydraclean.hypergradient.free_factors`, a backward sweep of the
    update rule over the stored gradients). So each step's factors are kept
    as they are (:class:`LayerCapture`): a Linear layer's ``a_i`` and
    ``delta_i``, a convolution's per-sample gradients; the run's gradients go
    to a :class:`hydraclean.run_store.RunStore`. :meth:`project` sweeps back
    over the run once and, at every step, adds
    ``(N / b_t) <V_k * d_t, grad l_i(w_{t-1})>`` from the kept factors: per
    Linear layer ``delta_i' (V_k * D_t) a_i``, per convolution the per-sample
    gradients times ``d_t``, summed over the run and projected once.

    Build with :meth:`plan`; pass as the ``recorder`` of
    :func:`hydraclean.training.train`.
    """

    def __init__(self, module: nn.Module, criterion: nn.Module, shapes: dict[int, tuple], trajectory: Trajectory,
                 store: RunStore, dtype: torch.dtype, device: torch.device) -> None:
        self.module, self.criterion, self.trajectory, self.store = module, criterion, trajectory, store
        self.shapes = shapes
        self.batch_sizes = _local_sizes(trajectory)
        self.starts = np.concatenate([[0], np.cumsum(self.batch_sizes)[:-1]])
        rows = int(self.batch_sizes.sum())
        self.p_conv = sum(v[1] for v in shapes.values() if v[0] == "conv")
        self.inputs = {k: torch.empty(rows, v[1], dtype=dtype, device=device)
                       for k, v in shapes.items() if v[0] == "linear"}
        self.deltas = {k: torch.empty(rows, v[2], dtype=dtype, device=device)
                       for k, v in shapes.items() if v[0] == "linear"}
        self.conv_grads = torch.empty(rows, self.p_conv, dtype=dtype, device=device) if self.p_conv else None
        self.index = torch.empty(rows, dtype=torch.long, device=device)
        self.nbytes = self.footprint(shapes, trajectory, torch.empty(0, dtype=dtype).element_size()) + store.nbytes
        self.capture = LayerCapture()
        self.layers = _trainable_layers(module)

    @classmethod
    def plan(cls, module: nn.Module, criterion: nn.Module, x_probe: torch.Tensor, trajectory: Trajectory,
             max_memory: int) -> StepFactors | None:
        """The recorder when layer factors serve ``module`` and they and every step's gradient fit in
        ``max_memory``, else None."""
        shapes = probe_layers(module, x_probe, None)
        if shapes is None:
            return None
        params = [p for p in module.parameters() if p.requires_grad]
        ref, n_params = params[0], sum(p.numel() for p in params)
        budget = max_memory - cls.footprint(shapes, trajectory, ref.element_size())
        if RunStore.memory_footprint(trajectory, n_params, ref.dtype, reverse=True) > budget:
            return None
        store = RunStore(trajectory, n_params, ref.dtype, ref.device, budget, reverse=True)
        return cls(module, criterion, shapes, trajectory, store, ref.dtype, ref.device)

    @staticmethod
    def footprint(shapes: dict[int, tuple], trajectory: Trajectory, itemsize: int) -> int:
        """Bytes of the kept factors: (in + out) values per Linear layer and p_conv per sample and step, an
        index, and the N x p_conv sum of the convolutions' terms that :meth:`project` forms."""
        rows, n = int(_local_sizes(trajectory).sum()), trajectory.n_samples
        values = sum(rows * (v[1] + v[2]) if v[0] == "linear" else (rows + n) * v[1] for v in shapes.values())
        return values * itemsize + rows * torch.empty(0, dtype=torch.long).element_size()

    def attach(self, model: nn.Module) -> None:
        self.capture.attach(model)

    def record(self, step: Step) -> None:
        """Keep the step's factors (output gradients times ``b_t``: each sample's own) and its gradient."""
        t = step.t
        b, start = int(self.batch_sizes[t]), int(self.starts[t])
        scale = float(self.trajectory.batch_size_at(t))
        captured = self.capture.take()
        column = 0
        for k, (kind, *sizes) in self.shapes.items():
            a, g, _ = captured[k]
            if kind == "linear":
                self.inputs[k][start : start + b] = a
                delta = self.deltas[k][start : start + b]
                delta.copy_(g)
                delta.mul_(scale)
            else:
                dtype = self.conv_grads.dtype
                self.conv_grads[start : start + b, column : column + sizes[0]] = _conv_sample_gradients(
                    self.layers[k], a.to(dtype), g.to(dtype) * scale)
                column += sizes[0]
        self.index[start : start + b] = step.idx
        self.store.record(step)

    def detach(self) -> None:
        self.capture.detach()

    def finish(self) -> None:
        """Nothing to complete after training."""

    def state_dict(self) -> dict:
        return {"inputs": self.inputs, "deltas": self.deltas, "conv_grads": self.conv_grads, "index": self.index,
                "store": self.store.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for k, tensor in state["inputs"].items():
            self.inputs[k].copy_(tensor)
        for k, tensor in state["deltas"].items():
            self.deltas[k].copy_(tensor)
        if self.conv_grads is not None:
            self.conv_grads.copy_(state["conv_grads"])
        self.index.copy_(state["index"])
        self.store.load_state_dict(state["store"])

    def project(self, directions: torch.Tensor, rows: tuple | None = None, progress=None) -> torch.Tensor:
        """``P[i, k] = <V_k, nabla_{T,i}>`` for every sample, shape (N, K): one backward sweep over the run.

        ``rows`` (ghost products) do not apply: the per-step factors ``d_t``
        break their rank-one shape, so every direction is dense here.
        """
        traj = self.trajectory
        n = traj.n_samples
        projector = LayerFactorProjector(self.module, self.criterion, directions, n)
        out = projector.out
        columns = projector.columns
        linear = [(k, projector.layers[k]) for k, v in self.shapes.items() if v[0] == "linear"]
        conv_cols = torch.cat([torch.arange(a, b, device=directions.device)
                               for k, v in self.shapes.items() if v[0] == "conv"
                               for a, b in columns[projector.layers[k]]]) if self.p_conv else None
        conv_sum = directions.new_zeros(n, self.p_conv) if self.p_conv else None
        steps = self.store.walk(reverse=True)
        if progress is not None:
            steps = iter(progress(steps, "scoring", traj.n_steps))
        for step, d in free_factors(traj, steps):
            t = step.t
            part = slice(int(self.starts[t]), int(self.starts[t] + self.batch_sizes[t]))
            weight = n / traj.batch_size_at(t)
            idx = self.index[part]
            products = out.new_zeros(idx.shape[0], out.shape[1])
            for k, m in linear:
                (w0, w1), *bias = columns[m]
                block = (directions[:, w0:w1] * d[w0:w1]).reshape(-1, m.in_features)
                z = (self.inputs[k][part] @ block.T).reshape(idx.shape[0], -1, m.out_features)
                products += torch.einsum("bo,bko->bk", self.deltas[k][part], z)
                if bias:
                    b0, b1 = bias[0]
                    products += self.deltas[k][part] @ (directions[:, b0:b1] * d[b0:b1]).T
            out.index_add_(0, idx, products, alpha=weight)
            if conv_sum is not None:
                conv_sum.index_add_(0, idx, self.conv_grads[part] * d[conv_cols], alpha=weight)
        if conv_sum is not None:
            out += conv_sum @ directions[:, conv_cols].T
        return out

    def close(self) -> None:
        self.inputs = self.deltas = self.conv_grads = self.index = None
        self.store.close()


def _local_sizes(trajectory: Trajectory) -> np.ndarray:
    sizes = trajectory.batch_sizes()
    return sizes if trajectory.shard is None else trajectory.shard.local_sizes(sizes)


def _capture_output(captured: dict, k: int, m: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
    """Forward hook of :class:`LayerFactorProjector`: keep layer ``k``'s input and (differentiable) output."""
    if not out.requires_grad:
        out.requires_grad_()
    captured.setdefault(k, []).append((inputs[0].detach(), out))
    return out.clone()  # later in-place ops must not touch the tensor whose gradient is taken


def _note_input(seen: dict, k: int, x_probe: torch.Tensor, x_values: torch.Tensor, m: nn.Module, inputs: tuple,
                out: torch.Tensor) -> None:
    """Probe hook of :func:`probe_layers`: the input's dimensions, whether it is the module's own
    input, unchanged, and the shape of one sample's output."""
    x = inputs[0]
    reads_inputs = x is x_probe and torch.equal(x, x_values)
    seen.setdefault(k, []).append((x.dim(), reads_inputs, tuple(out.shape[1:])))


def _set_output_gradient(entry: list, output_nr: int, grad_outputs: tuple) -> None:
    entry[1] = grad_outputs[output_nr]


def _trainable_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            and any(p.requires_grad for p in m.parameters(recurse=False))]


#: Above this many unfolded input values per sample (in_channels x kernel size x output
#: positions), a layer's per-sample gradients use the grouped convolution, below it a
#: strided view and one batched product (measured on 2 CPU cores over LeNet-5 and
#: DenseNet-like shapes: the product wins below about 1e5, the convolution above).
UNFOLD_LIMIT = 100_000


def _conv_sample_gradients(m: nn.Conv2d, a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients of a Conv2d's weight and bias, shape (b, p_layer).

    Sample ``i``'s weight gradient correlates its input with its output
    gradient. Chosen by shape (the same choice every call, so results are
    reproducible): a 1x1 convolution with stride 1 is a Linear layer over
    positions (one batched product); a small unfolded input is a strided view
    of the padded input, copied once, times the output gradients (one batched
    product); otherwise one grouped convolution (a group per sample, stride
    and dilation exchanged) does all samples without unfolding.
    """
    b, c = a.shape[:2]
    o, (kh, kw) = m.out_channels, m.kernel_size
    oh, ow = delta.shape[2:]
    if (kh, kw) == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0):
        grad = torch.bmm(delta.reshape(b, o, -1), a.reshape(b, c, -1).transpose(1, 2))
    elif c * kh * kw * oh * ow <= UNFOLD_LIMIT:
        (ph, pw), (sh, sw), (dh, dw) = m.padding, m.stride, m.dilation
        padded = F.pad(a, (pw, pw, ph, ph)) if ph or pw else a.contiguous()
        s = padded.stride()
        windows = padded.as_strided((b, c, kh, kw, oh, ow), (s[0], s[1], s[2] * dh, s[3] * dw, s[2] * sh, s[3] * sw))
        grad = torch.bmm(delta.reshape(b, o, -1), windows.reshape(b, c * kh * kw, oh * ow).transpose(1, 2))
    else:
        grad = F.conv2d(a.transpose(0, 1), delta.reshape(b * o, 1, oh, ow),
                        stride=m.dilation, padding=m.padding, dilation=m.stride, groups=b)
        grad = grad[:, :, :kh, :kw].reshape(c, b, o, kh, kw).permute(1, 2, 0, 3, 4)
    parts = [grad.reshape(b, -1)]
    if m.bias is not None and m.bias.requires_grad:
        parts.append(delta.sum((2, 3)))
    return torch.cat(parts, dim=1)


def make_projector(
    module: nn.Module,
    criterion: nn.Module,
    directions: torch.Tensor,
    n_samples: int,
    rows: tuple[nn.Module, torch.Tensor, torch.Tensor] | None = None,
    accumulate_bytes: int = 0,
    autocast: torch.dtype | None = None,
) -> FunctionalProjector | LayerFactorProjector:
    """:class:`LayerFactorProjector` where it applies, else :class:`FunctionalProjector`."""
    if supports_layer_factors(module):
        return LayerFactorProjector(module, criterion, directions, n_samples, rows, accumulate_bytes, autocast)
    return FunctionalProjector(module, criterion, directions, n_samples, autocast)
