"""Per-layer algebra: each sample's gradient of one layer's own parameters, from what a training step computes.

A training step's forward and backward passes compute, for every layer, its
inputs and the gradient of the batch's mean loss with respect to its outputs;
times the batch size, that gradient is each sample's own ``delta_i = d l_i /
d out_i`` wherever the samples do not interact downstream (no BatchNorm in
train mode after the layer; :func:`hydraclean.projection.probe_layers` checks
it on a probe batch). From those alone a layer's per-sample gradients follow
by its own algebra, with no per-sample backward pass. One small class per
layer type (the shape of kronfluence's trackers):

- :class:`LinearAlgebra`: ``delta_i a_i'`` summed over positions; it also has
  compact *factors* ``(a_i, delta_i)``, whose product with a direction ``V`` is
  ``sum_p delta_ip' V a_ip`` without forming the gradient;
- :class:`ConvAlgebra`: Conv1d and Conv2d, groups, string padding, any padding
  mode: the per-sample weight gradient is a correlation of input and output
  gradient;
- :class:`EmbeddingAlgebra`, :class:`EmbeddingBagAlgebra`: no dense gradient
  at all: the factors are the sample's token ids and ``delta``, and
  ``<V, g_i> = sum over the sample's tokens of V[token] . delta``;
- :class:`NormAlgebra`: the affine weights of LayerNorm, GroupNorm,
  InstanceNorm and BatchNorm, elementwise from the normalised input and
  ``delta``;
- :class:`AttentionAlgebra`: ``nn.MultiheadAttention``'s input and output
  projections, caught inside its forward pass as the linear maps they are;
- :class:`ModuleAlgebra`: any other module with parameters of its own, by
  ``torch.func`` per-sample gradients of that module alone.

Every class works on tensors whose batch dimension is first (the probe finds
where it is and :meth:`LayerAlgebra.saved` moves it there) and lays a sample's
gradient out in the order of the layer's own trainable parameters.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp, vmap

__all__ = [
    "AttentionAlgebra",
    "ConvAlgebra",
    "DirectForm",
    "EmbeddingAlgebra",
    "EmbeddingBagAlgebra",
    "GhostFactors",
    "LayerAlgebra",
    "LinearAlgebra",
    "ModuleAlgebra",
    "NormAlgebra",
    "algebra_for",
]


#: Above this many unfolded input values per sample (in_channels x kernel size x output
#: positions), a Conv2d's per-sample gradients use the grouped convolution, below it a
#: strided view and one batched product (measured on 2 CPU cores over LeNet-5 and
#: DenseNet-like shapes: the product wins below about 1e5, the convolution above).
UNFOLD_LIMIT = 100_000

#: At most this many (directions x output positions per sample), a convolution's products with ``K``
#: directions are one matrix product of the directions with the unfolded inputs (``K`` forward passes' work,
#: nothing per sample kept); above it, the per-sample gradients (in blocks of :data:`GRADIENT_CHUNK_BYTES`)
#: times the directions. Measured on one CPU thread over ResNet-18's convolutions on 32x32 images with 1-11
#: directions (benchmarks/conv_products.py, docs/_generated/conv_products.md): the direct products win at
#: ``K x P`` up to 44 by 1.3-25x, the per-sample gradients at 128 and more by 1.4-14x; at 64 the two are
#: within the timings' noise. 1x1 convolutions (a few milliseconds either way) are the exception.
DIRECT_LIMIT = 48

#: Up to this many terms of a convolution's positional pattern (:meth:`ConvAlgebra.ghost_pattern`), the ghost
#: product's Gram matrix adds them one by one (36 at 2x2 under a 3x3 kernel), else it multiplies by the
#: pattern as a matrix (:func:`hydraclean.ghost.ghost_products`).
FEW_TERMS = 64

#: Bytes of a convolution's products with a block of directions formed at once.
CHUNK_BYTES = 64 * 2**20

#: Bytes of per-sample gradients formed at once (:meth:`LayerAlgebra.chunks`): a block that stays in the
#: CPU's cache while the directions read it. On ResNet-18's 4x4 convolutions 1-2 MiB blocks were 1.5-2x
#: faster than 16-64 MiB ones (benchmarks/conv_products.py).
GRADIENT_CHUNK_BYTES = 2 * 2**20


class GhostFactors(NamedTuple):
    """A layer's factors for the ghost product (:mod:`hydraclean.ghost`): ``u`` (b, S, in) and ``delta`` (b, P,
    out), with each sample's weight gradient ``sum_p delta_p u_p'`` (``S = P``; ``in_size`` None), or, for a
    convolution by input positions, ``u`` its input at each of its ``S`` positions and ``in_size`` their
    spatial size (:meth:`ConvAlgebra.ghost_pattern` joins them)."""

    u: torch.Tensor
    delta: torch.Tensor
    in_size: tuple | None = None


class LayerAlgebra:
    """The per-sample gradients of one module's own trainable parameters.

    Parameters
    ----------
    module : nn.Module
    batch_dims : sequence of int, optional
        Where the batch dimension is in the module's tensor inputs and
        outputs (found by the probe; default 0 everywhere).

    Attributes
    ----------
    params : list of nn.Parameter
        The module's own trainable parameters, in ``named_parameters`` order.
    size : int
        Their number of values: the columns of :meth:`gradients`.
    factored : bool
        Whether :meth:`factors` and :meth:`products` exist (a compact form
        whose product with a direction needs no dense gradient).
    dense : bool
        Whether :meth:`gradients` may be called (False where a dense
        per-sample gradient would be absurd: an embedding table per sample).
    """

    module_types: ClassVar[tuple[type, ...]] = ()
    factored: ClassVar[bool] = False
    dense: ClassVar[bool] = True
    #: Whether the forward pass needs :meth:`forward` around it (a pre-hook per call otherwise spared)
    watches_forward: ClassVar[bool] = False
    #: Whether :meth:`saved` reads the keyword arguments of the forward call
    reads_kwargs: ClassVar[bool] = False
    #: Time of one multiply-add of the ghost product (:mod:`hydraclean.ghost`) in units of one of :meth:`cost`'s
    #: (what :func:`hydraclean.ghost.pays` weighs the two by)
    ghost_penalty: ClassVar[float] = 1.0
    #: One sample's first input shape as the probe saw it (:class:`hydraclean.projection.LayerPlan`), if known
    in_shape: tuple | None = None

    def __init__(self, module: nn.Module, in_dim: int = 0, out_dim: int = 0) -> None:
        self.module = module
        self.params = [p for _, p in module.named_parameters(recurse=False) if p.requires_grad]
        self.size = sum(p.numel() for p in self.params)
        self.in_dim, self.out_dim = in_dim, out_dim

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether this class's algebra holds for ``module`` (its options)."""
        return True

    # -- what a forward pass leaves -----------------------------------------------------------------

    @contextlib.contextmanager
    def forward(self) -> object:
        """Entered around the module's forward pass (a place to catch what happens inside it)."""
        yield

    def saved(self, args: tuple, kwargs: dict, output) -> object:
        """What the algebra needs from the forward pass: by default the first input, batch first."""
        x = args[0].detach()
        return x.movedim(self.in_dim, 0) if self.in_dim else x

    def outputs(self, saved, output) -> list[torch.Tensor]:
        """The tensors whose loss gradients the algebra needs (batch at ``out_dim``)."""
        return [output]

    def deltas(self, grads: list[torch.Tensor | None], outputs: list[torch.Tensor], batch: float = 1.0) -> list:
        """The output gradients batch first, times ``batch`` (the batch size gives each sample's own gradient
        from the batch mean loss's; the algebra is linear in them, so callers may fold it in elsewhere)."""
        out = []
        for g, o in zip(grads, outputs):
            g = torch.zeros(o.shape, dtype=o.dtype, device=o.device) if g is None else g if batch == 1 else g * batch
            out.append(g.movedim(self.out_dim, 0) if self.out_dim else g)
        return out

    # -- the algebra -------------------------------------------------------------------------------

    def gradients(self, saved, deltas: list[torch.Tensor]) -> torch.Tensor:
        """Per-sample gradients of the layer's trainable parameters, shape (b, size)."""
        raise NotImplementedError

    def factors(self, saved, deltas: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The compact form of each sample's gradient (batch first)."""
        raise NotImplementedError

    def products(self, factors: tuple[torch.Tensor, ...], V: torch.Tensor) -> torch.Tensor:
        """``<V_k, g_i>`` from the factors, shape (b, K), for ``V`` of shape (K, size)."""
        raise NotImplementedError

    def ghost_factors(self, saved, deltas: list[torch.Tensor]) -> GhostFactors | None:
        """The factors of the ghost product (:mod:`hydraclean.ghost`); None where the layer has no such form."""
        return None

    def cost(self, n_directions: int, positions: int) -> float:
        """Multiply-adds per sample of :meth:`apply` with ``n_directions`` directions."""
        return float(self.size * n_directions)

    def prepare(self, V: torch.Tensor) -> torch.Tensor | DirectForm:
        """The directions (K, size) as :meth:`apply` reads them at every step, formed once per projection (a
        layer whose products would otherwise copy them every step: contiguous, or a :class:`DirectForm`);
        by default ``V`` itself."""
        return V

    def apply(self, saved, deltas: list[torch.Tensor], V: torch.Tensor) -> torch.Tensor:
        """``<V_k, g_i>`` by whichever form the layer has, shape (b, K) (dense gradients formed in chunks); ``V``
        of shape (K, size), or as :meth:`prepare` returned it."""
        if self.factored:
            return self.products(self.factors(saved, deltas), V)
        out = V.new_zeros(deltas[0].shape[0], V.shape[0])
        for rows, g in self.chunks(saved, deltas):
            out[rows] = g @ V.T
        return out

    def chunks(self, saved, deltas: list[torch.Tensor]):
        """Per-sample gradients in blocks of samples of at most :data:`GRADIENT_CHUNK_BYTES`: ``(rows,
        gradients)``."""
        b = deltas[0].shape[0]
        step = max(1, GRADIENT_CHUNK_BYTES // max(1, self.size * deltas[0].element_size()))
        for start in range(0, b, step):
            rows = slice(start, start + step)
            yield rows, self.gradients(_rows(saved, rows), [d[rows] for d in deltas])


def _rows(obj, rows):
    """``obj`` restricted to the samples ``rows`` (tensors batch first; containers element by element)."""
    if isinstance(obj, torch.Tensor):
        return obj[rows]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_rows(o, rows) for o in obj)
    return obj


def _flat(parts: Sequence[torch.Tensor], b: int) -> torch.Tensor:
    if len(parts) == 1:  # no copy
        return parts[0].reshape(b, -1)
    return torch.cat([p.reshape(b, -1) for p in parts], dim=1)


class LinearAlgebra(LayerAlgebra):
    """``nn.Linear``, on inputs of any shape ``(b, ..., in)``: ``g_i = sum_p delta_ip a_ip'`` (and ``sum_p
    delta_ip`` for the bias)."""

    module_types = (nn.Linear,)
    factored = True

    def __init__(self, module: nn.Linear, in_dim: int = 0, out_dim: int = 0) -> None:
        super().__init__(module, in_dim, out_dim)
        self.weight = module.weight.requires_grad
        self.bias = module.bias is not None and module.bias.requires_grad

    def factors(self, saved, deltas):
        a, d = saved, deltas[0]
        b = a.shape[0]
        return a.reshape(b, -1, a.shape[-1]), d.reshape(b, -1, d.shape[-1])

    def ghost_factors(self, saved, deltas):
        return GhostFactors(*self.factors(saved, deltas)) if self.weight else None

    def cost(self, n_directions, positions):
        return float(min(positions * n_directions, positions + n_directions) * self.size)

    def prepare(self, V):
        return V.contiguous()  # the products' reshape of the weight's directions is then a view

    def gradients(self, saved, deltas):
        a, d = self.factors(saved, deltas)
        parts = [torch.einsum("bpo,bpi->boi", d, a)] if self.weight else []
        if self.bias:
            parts.append(d.sum(1))
        return _flat(parts, a.shape[0])

    def products(self, factors, V):
        a, d = factors
        b, positions, n_in = a.shape
        n_out, k = d.shape[-1], V.shape[0]
        out = a.new_zeros(b, k)
        if self.weight:
            W = V[:, : n_out * n_in]
            # a V' first (b P K out in multiply-adds), or the per-sample gradient first (b out in (P + K))
            if positions * k <= positions + k:
                z = (a @ W.reshape(k * n_out, n_in).T).reshape(b, positions, k, n_out)
                out += torch.einsum("bpo,bpko->bk", d, z)
            else:
                out += torch.einsum("bpo,bpi->boi", d, a).reshape(b, -1) @ W.T
        if self.bias:
            out += d.sum(1) @ V[:, -n_out:].T
        return out


class ConvAlgebra(LayerAlgebra):
    """``nn.Conv1d`` and ``nn.Conv2d``: each sample's weight gradient correlates its input with its output
    gradient; the bias's sums the output gradient over positions.

    A Conv2d with ``groups=1``, numeric padding and zero padding takes the fast forms of
    :func:`conv2d_sample_gradients`; every other convolution (groups, string padding,
    reflect or circular padding, Conv1d) takes the weight gradient of its own forward, sample by
    sample under ``vmap``.
    """

    module_types = (nn.Conv1d, nn.Conv2d)
    #: The direct products (one convolution) run about twice as many multiply-adds a second as the ghost
    #: product's matrix products on the unfolded inputs (benchmarks/ghost_choice.py: ResNet-18's 3x3
    #: convolutions at 2x2 and 1x1 output positions, 100-2000 validation rows, one torch thread)
    ghost_penalty = 2.0

    def __init__(self, module, in_dim: int = 0, out_dim: int = 0) -> None:
        super().__init__(module, in_dim, out_dim)
        self.weight = module.weight.requires_grad
        self.bias = module.bias is not None and module.bias.requires_grad
        self.fast = (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
                     and not isinstance(module.padding, str))
        self._patterns: dict[tuple, torch.Tensor] = {}  # (input size, rows' input size) -> ghost_pattern
        self._by_positions: bool | None = None

    def gradients(self, saved, deltas):
        a, d = saved, deltas[0]
        b = a.shape[0]
        parts = []
        if self.weight:
            parts.append(conv2d_sample_gradients(self.module, a, d) if self.fast else self._vmapped(a, d))
        if self.bias:
            parts.append(d.reshape(b, d.shape[1], -1).sum(2))
        return _flat(parts, b)

    def ghost_factors(self, saved, deltas):
        """By the unfolded input, or, where the probe's input is smaller than the kernel's reach
        (:meth:`by_positions`), by the input's positions."""
        m, a, d = self.module, saved, deltas[0]
        if not (self.fast and self.weight):
            return None
        delta = d.reshape(d.shape[0], d.shape[1], -1).transpose(1, 2)
        if self.by_positions():
            return GhostFactors(a.reshape(a.shape[0], a.shape[1], -1).transpose(1, 2), delta, tuple(a.shape[2:]))
        return GhostFactors(F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2), delta)

    def ghost_pattern(self, size: tuple, row_size: tuple) -> torch.Tensor:
        """The ``(p, q, s, r)`` that one tap joins: output position ``p`` to input position ``s`` at the input
        size ``size``, and ``q`` to ``r`` at ``row_size``; shape (terms, 4) (:mod:`hydraclean.ghost`)."""
        key = (size, row_size)
        if key not in self._patterns:
            reads = input_reads(self.module, size, torch.device("cpu"))  # (taps, P)
            row_reads = input_reads(self.module, row_size, torch.device("cpu"))
            terms = []
            for t in range(reads.shape[0]):
                p, q = torch.nonzero(reads[t] >= 0)[:, 0], torch.nonzero(row_reads[t] >= 0)[:, 0]
                pp, qq = torch.meshgrid(p, q, indexing="ij")
                terms.append(torch.stack([pp, qq, reads[t, pp], row_reads[t, qq]], -1).reshape(-1, 4))
            self._patterns[key] = torch.cat(terms)
        return self._patterns[key]

    def by_positions(self) -> bool:
        """Whether the ghost product goes by input positions at the probe's input size: fewer multiply-adds
        per pair of samples (``S^2 in + terms`` against ``P^2 in kh kw``)."""
        if not self.fast or self.in_shape is None:
            return False
        if self._by_positions is None:
            size = tuple(self.in_shape[1:])
            taps, positions = input_reads(self.module, size, torch.device("cpu")).shape
            s, n_in = int(np.prod(size)), self.module.in_channels
            self._by_positions = s**2 * n_in + self.joining_cost(size) < positions**2 * n_in * taps
        return self._by_positions

    def joining_cost(self, size: tuple) -> int:
        """Multiply-adds per pair of samples (both at input size ``size``) to join their input positions'
        and output positions' products by :meth:`ghost_pattern`: its terms one by one when there are at most
        :data:`FEW_TERMS`, else the pattern as a (P^2, S^2) matrix."""
        pattern = self.ghost_pattern(size, size)
        positions, s = int(pattern[:, 0].max()) + 1, int(np.prod(size))
        return pattern.shape[0] if pattern.shape[0] <= FEW_TERMS else positions**2 * s**2

    @staticmethod
    def takes_direct(n_directions: int, positions: int) -> bool:
        """Whether :meth:`apply` takes the direct products (:data:`DIRECT_LIMIT`) for ``n_directions``
        directions and ``positions`` output positions per sample, rather than the per-sample gradients."""
        return n_directions * positions <= DIRECT_LIMIT

    def cost(self, n_directions, positions):
        if self.takes_direct(n_directions, positions):
            return float(n_directions * positions * self.size * self._read_share())
        # the per-sample gradients: formed (P per value) and read, at memory speed (x4, measured)
        return float(4 * (positions + n_directions) * self.size)

    def _read_share(self) -> float:
        """The share of the weight's multiply-adds per output position that the direct products run at the
        probe's input size (:class:`DirectForm`: taps that read only padding skipped); 1 where unknown."""
        if not self.fast or self.in_shape is None:
            return 1.0
        reads = input_reads(self.module, tuple(self.in_shape[1:]), torch.device("cpu"))
        live = int((reads >= 0).any(1).sum())
        return min(live, int(np.prod(self.in_shape[1:]))) / reads.shape[0]

    def prepare(self, V):
        """A :class:`DirectForm` where the direct products will be taken at the probe's input size, else the
        directions contiguous (the per-sample gradients' products read them at every step)."""
        if self.fast and self.weight and self.in_shape is not None:
            size = tuple(self.in_shape[1:])
            if self.takes_direct(V.shape[0], input_reads(self.module, size, V.device).shape[1]):
                return DirectForm.of(self.module, V, size, dense=True)
        return V.contiguous()

    def apply(self, saved, deltas, V):
        """``<V_k, g_i>``: by the per-sample gradients, or, when a sample's output has few positions, by
        the directions applied to the input themselves (``sum_p delta_ip . (V_k * x_i)_p``: ``K`` times the
        layer's forward pass, no per-sample gradient formed), by a :class:`DirectForm` for the fast kind (the
        one :meth:`prepare` made, or one formed for this call), a convolution otherwise."""
        form = V if isinstance(V, DirectForm) else None
        V = V.V if form is not None else V
        a, d = saved, deltas[0]
        b, k = a.shape[0], V.shape[0]
        positions = d[0, 0].numel()
        if not self.takes_direct(k, positions):
            return super().apply(saved, deltas, V)
        out = V.new_zeros(b, k)
        if self.weight and self.fast:
            if form is None or form.in_size != tuple(a.shape[2:]):
                form = DirectForm.of(self.module, V, tuple(a.shape[2:]), dense=False)
            out += form.products(a, d)
        elif self.weight:
            out += self._convolved_products(a, d, V)
        if self.bias:
            out += d.reshape(b, d.shape[1], -1).sum(2) @ V[:, -self.module.out_channels :].T
        return out

    def _convolved_products(self, a: torch.Tensor, d: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """The weight's direct products by the layer's own convolution with the directions as its weights
        (any groups and padding)."""
        m = self.module
        b, k = a.shape[0], V.shape[0]
        g, n_out, positions = m.groups, m.out_channels, d[0, 0].numel()
        out = V.new_empty(b, k)
        step = max(1, CHUNK_BYTES // max(1, b * n_out * positions * d.element_size()))
        flat = d.reshape(b, g, n_out // g, positions)
        for start in range(0, k, step):
            W = V[start : start + step, : m.weight.numel()]
            kk = W.shape[0]
            # output channels grouped as the groups need them: (group, direction, channel of the group)
            W = W.reshape(kk, g, n_out // g, *m.weight.shape[1:]).transpose(0, 1).reshape(
                g * kk * (n_out // g), *m.weight.shape[1:])
            z = m._conv_forward(a, W, None).reshape(b, g, kk, n_out // g, positions)
            out[:, start : start + kk] = torch.einsum("bgkop,bgop->bk", z, flat)
        return out

    def _vmapped(self, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        m, weight = self.module, self.module.weight.detach()

        def one(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
            return vjp(lambda w: m._conv_forward(x.unsqueeze(0), w, None), weight)[1](delta.unsqueeze(0))[0]

        return vmap(one)(a, d)


def conv2d_sample_gradients(m: nn.Conv2d, a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients of a Conv2d's weight (groups 1, numeric zero padding), shape (b, out, in, kh, kw).

    Chosen by shape (the same choice every call, so results are reproducible): a 1x1
    convolution with stride 1 is a Linear layer over positions (one batched product); a small
    unfolded input is a strided view of the padded input, copied once, times the output
    gradients (one batched product); otherwise one grouped convolution (a group per sample,
    stride and dilation exchanged) does all samples without unfolding.
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
    return grad.reshape(b, o, c, kh, kw)


def input_reads(m: nn.Conv2d, in_size: tuple, device) -> torch.Tensor:
    """For each kernel tap and output position of a Conv2d (zero padding) at the input size ``in_size``, the
    input position it reads (row-major), or -1 where it reads padding: shape (kh kw, output positions).
    Geometry only, so worked out once per geometry and size (read-only)."""
    return _input_reads((m.kernel_size, m.dilation, m.padding, m.stride), tuple(in_size)).to(device)


@functools.lru_cache(maxsize=256)
def _input_reads(geometry: tuple, in_size: tuple) -> torch.Tensor:
    index = torch.arange(1, int(np.prod(in_size)) + 1, dtype=torch.float64).reshape(1, 1, *in_size)
    return F.unfold(index, *geometry)[0].long() - 1


@dataclass(frozen=True)
class DirectForm:
    """A Conv2d's weight directions as its direct products take them at one input size, formed once.

    The direct products ``sum_p delta_ip . (V_k * x_i)_p`` are one matrix
    product of the directions with the inputs. Two forms:

    - unfolded (``dense=False``): ``V`` as a (K out, in kh kw) matrix times the
      unfolded input, without the unfolded rows that read only padding at this
      size (:func:`input_reads`);
    - dense (``dense=True``, taken where the input has fewer positions than
      the kernel has taps that read it, as a ResNet's last stages at 2x2 and
      1x1): the convolution at this size is the linear map from the input's
      ``in x P_in`` values to the output's ``out x P_out``, a matrix holding
      ``V``'s taps at the (input, output) position pairs a tap joins and zeros
      elsewhere; one multiply-add per pair, where the unfolded form has one per
      (tap, output position), padding included (at 2x2 with a 3x3 kernel: 16
      against 36).

    Attributes
    ----------
    in_size : tuple
        The input's spatial size the form is for.
    geometry : tuple
        The convolution's kernel size, dilation, padding and stride (:func:`F.unfold`'s arguments).
    dense : bool
    matrix : Tensor
        Dense: (in P_in, K out P_out); unfolded: (K out, live rows).
    rows : Tensor or None
        Unfolded: the unfolded input's rows kept (None: all).
    V : Tensor of shape (K, size)
        The directions the form was made from.
    """

    in_size: tuple
    geometry: tuple
    dense: bool
    matrix: torch.Tensor
    rows: torch.Tensor | None
    V: torch.Tensor

    @classmethod
    def of(cls, m: nn.Conv2d, V: torch.Tensor, in_size: tuple, dense: bool) -> DirectForm:
        """The form of ``V`` (K, size; the weight's columns first) for inputs of spatial size ``in_size``:
        dense where ``dense`` allows and it takes fewer multiply-adds, else unfolded."""
        reads = input_reads(m, in_size, V.device)  # (taps, P_out)
        k, n_out, n_in = V.shape[0], m.out_channels, m.in_channels
        taps, positions = reads.shape
        live = (reads >= 0).any(1)
        weight = V[:, : m.weight.numel()].reshape(k, n_out, n_in, taps)
        n_positions, geometry = int(np.prod(in_size)), (m.kernel_size, m.dilation, m.padding, m.stride)
        if dense and n_positions < int(live.sum()):
            tap, p = torch.nonzero(reads >= 0, as_tuple=True)
            M = V.new_zeros(n_in, n_positions, k, n_out, positions)
            M.permute(1, 4, 0, 2, 3)[reads[tap, p], p] = weight.permute(3, 2, 0, 1)[tap]
            return cls(in_size, geometry, True, M.reshape(n_in * n_positions, k * n_out * positions), None, V)
        rows = None if bool(live.all()) else live.repeat(n_in)
        W = weight.reshape(k * n_out, n_in * taps)
        return cls(in_size, geometry, False, W.contiguous() if rows is None else W[:, rows], rows, V)

    def products(self, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """The weight's ``<V_k, g_i>`` for inputs ``a`` (b, in, *in_size) and output gradients ``d`` (b, out,
        *out_size), shape (b, K), in blocks of directions of at most :data:`CHUNK_BYTES`."""
        b, k = a.shape[0], self.V.shape[0]
        flat = d.reshape(b, -1)  # (b, out P_out)
        out = a.new_empty(b, k)
        if self.dense:
            q, x = flat.shape[1], a.reshape(b, -1)
            step = max(1, CHUNK_BYTES // max(1, b * q * a.element_size()))
            for start in range(0, k, step):
                kk = min(step, k - start)
                z = x @ self.matrix[:, start * q : (start + kk) * q]  # (b, kk out P_out)
                out[:, start : start + kk] = torch.bmm(z.reshape(b, kk, q), flat.unsqueeze(2)).squeeze(2)
            return out
        u = F.unfold(a, *self.geometry)  # (b, in kh kw, P_out)
        u = u[:, self.rows] if self.rows is not None else u
        n_rows, positions = u.shape[1:]
        U = u.transpose(0, 1).reshape(n_rows, b * positions)
        n_out = d.shape[1]
        step = max(1, CHUNK_BYTES // max(1, n_out * b * positions * d.element_size()))
        flat = flat.reshape(b, n_out, positions)
        for start in range(0, k, step):
            kk = min(step, k - start)
            z = (self.matrix[start * n_out : (start + kk) * n_out] @ U).reshape(kk, n_out, b, positions)
            out[:, start : start + kk] = torch.einsum("kobp,bop->bk", z, flat)
        return out


class EmbeddingAlgebra(LayerAlgebra):
    """``nn.Embedding``: no dense gradient (a table per sample); ``<V, g_i> = sum_t V[id_t] . delta_t`` over
    the sample's tokens, ``padding_idx`` tokens excluded (torch gives that row no gradient)."""

    module_types = (nn.Embedding,)
    factored = True
    dense = False

    @classmethod
    def supports(cls, module) -> bool:
        # max_norm renormalises the table in place in the forward pass; scale_grad_by_freq divides by counts
        # over the whole batch (the samples interact); sparse gradients are another layout
        return module.max_norm is None and not module.scale_grad_by_freq and not module.sparse

    def factors(self, saved, deltas):
        ids, d = saved, deltas[0]
        b = ids.shape[0]
        ids, d = ids.reshape(b, -1), d.reshape(b, -1, d.shape[-1])
        if self.module.padding_idx is not None:
            d = d * (ids != self.module.padding_idx).unsqueeze(-1)
        return ids, d

    def products(self, factors, V):
        ids, d = factors
        b, length = ids.shape
        table = _by_row(V, self.module.num_embeddings, self.module.embedding_dim)
        k, dim = V.shape[0], self.module.embedding_dim
        out = d.new_empty(b, k)
        step = max(1, CHUNK_BYTES // max(1, length * k * dim * d.element_size()))
        for start in range(0, b, step):  # each token's row of every direction, a block of samples at a time
            rows = slice(start, start + step)
            looked_up = F.embedding(ids[rows], table).reshape(-1, length, k, dim)
            out[rows] = torch.einsum("btkd,btd->bk", looked_up, d[rows])
        return out


def _by_row(V: torch.Tensor, n_rows: int, dim: int) -> torch.Tensor:
    """The directions' tables ``(K, n_rows * dim)`` as one table of rows ``(n_rows, K * dim)``: token ``t``'s
    row holds every direction's row ``t``, so that one lookup reads all of them."""
    return V.reshape(V.shape[0], n_rows, dim).transpose(0, 1).reshape(n_rows, -1)


class EmbeddingBagAlgebra(LayerAlgebra):
    """``nn.EmbeddingBag`` with 2-D input (one bag per row) and mode "sum" or "mean": ``<V, g_i> =
    sum_t w_t V[id_t] . delta_i``, with ``w_t`` the bag's weight of token ``t`` (1, ``1/len`` or
    ``per_sample_weights``; 0 for ``padding_idx``)."""

    module_types = (nn.EmbeddingBag,)
    factored = True
    dense = False
    reads_kwargs = True

    @classmethod
    def supports(cls, module) -> bool:
        return module.mode in ("sum", "mean") and module.max_norm is None and not module.scale_grad_by_freq \
            and not module.sparse

    def saved(self, args, kwargs, output):
        ids = args[0]
        offsets = args[1] if len(args) > 1 else kwargs.get("offsets")
        weights = args[2] if len(args) > 2 else kwargs.get("per_sample_weights")
        if ids.dim() != 2 or offsets is not None:
            raise ValueError("EmbeddingBagAlgebra takes bags as rows of a 2-D input.")
        return ids.detach(), None if weights is None else weights.detach()

    def factors(self, saved, deltas):
        ids, weights = saved
        w = torch.ones_like(ids, dtype=deltas[0].dtype) if weights is None else weights.to(deltas[0].dtype)
        if self.module.padding_idx is not None:
            w = w * (ids != self.module.padding_idx)
        if self.module.mode == "mean":
            w = w / w.ne(0).sum(1, keepdim=True).clamp(min=1) if weights is None else w / ids.shape[1]
        return ids, w, deltas[0]

    def products(self, factors, V):
        ids, w, d = factors
        k, dim = V.shape[0], self.module.embedding_dim
        table = _by_row(V, self.module.num_embeddings, dim)
        # every direction's weighted bag sum at once: an EmbeddingBag over the directions' rows
        bags = F.embedding_bag(ids, table, per_sample_weights=w.to(table.dtype), mode="sum")
        return torch.einsum("bkd,bd->bk", bags.reshape(-1, k, dim), d)


class NormAlgebra(LayerAlgebra):
    """The affine weights of ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.InstanceNorm*d`` and ``nn.BatchNorm*d``:
    ``g_i(weight) = sum delta_i * xhat_i`` and ``g_i(bias) = sum delta_i`` over everything but the
    parameter's own axes, with ``xhat`` the normalised input (a BatchNorm in train mode normalises with the
    batch's statistics, in eval mode with its running ones)."""

    module_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
                    nn.modules.batchnorm._BatchNorm)

    def __init__(self, module, in_dim: int = 0, out_dim: int = 0) -> None:
        super().__init__(module, in_dim, out_dim)
        self.weight = module.weight is not None and module.weight.requires_grad
        self.bias = module.bias is not None and module.bias.requires_grad

    def saved(self, args, kwargs, output):
        return normalised(self.module, args[0].detach()).movedim(self.in_dim, 0)

    def gradients(self, saved, deltas):
        xhat, d = saved, deltas[0]
        b = d.shape[0]
        if isinstance(self.module, nn.LayerNorm):  # the parameters span the last dimensions
            axes = tuple(range(1, d.dim() - len(self.module.normalized_shape)))
        else:  # one value per channel, axis 1
            axes = (0, *range(2, d.dim()))[1:]
        parts = []
        if self.weight:
            parts.append((d * xhat).sum(axes) if axes else d * xhat)
        if self.bias:
            parts.append(d.sum(axes) if axes else d)
        return _flat(parts, b)


def normalised(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input as normalised by ``m`` before its affine step (statistics as the module's forward takes them),
    by torch's own normalisation kernels without the affine weights."""
    if isinstance(m, nn.LayerNorm):
        return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
    if isinstance(m, nn.GroupNorm):
        return F.group_norm(x, m.num_groups, None, None, m.eps)
    use_batch = m.training or m.running_mean is None
    if isinstance(m, nn.modules.instancenorm._InstanceNorm) and use_batch:  # each sample and channel by itself
        return F.instance_norm(x, eps=m.eps)
    if use_batch:  # BatchNorm: the batch's statistics (the kernel itself: F.batch_norm may be patched in a step)
        return torch.native_batch_norm(x, None, None, None, None, True, 0.0, m.eps)[0]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - m.running_mean.reshape(shape)) / torch.sqrt(m.running_var.reshape(shape) + m.eps)


class AttentionAlgebra(LayerAlgebra):
    """``nn.MultiheadAttention``: its input projection and its output projection are linear maps applied
    inside its forward pass; they are caught there (``F.linear`` watched around the forward), so each
    sample's gradient is ``sum_p delta_ip a_ip'`` for both, with the training step's own attention
    dropout. The rows of ``in_proj_weight`` that a projection call reads (query, key and value may be
    separate calls) get that call's gradient. Inside the forward every sequence tensor is (L, b, E), the
    output projection's input flattened to (L b, E)."""

    module_types = (nn.MultiheadAttention,)
    watches_forward = True

    def __init__(self, module: nn.MultiheadAttention, in_dim: int = 0, out_dim: int = 0) -> None:
        super().__init__(module, in_dim, out_dim)
        self.params = self._trainable()
        self.size = sum(p.numel() for p in self.params)
        self._calls: list = []

    @classmethod
    def supports(cls, module) -> bool:
        return module._qkv_same_embed_dim and module.bias_k is None

    @contextlib.contextmanager
    def forward(self):
        self._calls = []
        weights = {self.module.in_proj_weight: "in", self.module.out_proj.weight: "out"}
        with _LinearCalls(weights, self._calls):
            yield

    def saved(self, args, kwargs, output):
        calls, self._calls = self._calls, []
        length, batch = next(a.shape[:2] for which, _, a, _ in calls if which == "in")
        self._shape = (length, batch)
        self._outputs = [out for *_, out in calls]
        return [(which, rows, a.detach().reshape(length, batch, -1).transpose(0, 1)) for which, rows, a, _ in calls]

    def outputs(self, saved, output):
        outputs, self._outputs = self._outputs, None  # the caught projections' outputs, handed over once
        return outputs

    def deltas(self, grads, outputs, batch=1.0):
        length, b = self._shape
        return [(torch.zeros(o.shape, dtype=o.dtype, device=o.device) if g is None else g if batch == 1 else
                 g * batch).reshape(length, b, -1).transpose(0, 1) for g, o in zip(grads, outputs)]

    def gradients(self, saved, deltas):
        calls = saved
        b = calls[0][2].shape[0]
        m = self.module
        grads = {id(p): torch.zeros(b, *p.shape, dtype=deltas[0].dtype, device=deltas[0].device)
                 for p in self._all()}
        for (which, rows, a), d in zip(calls, deltas):
            weight, bias = (m.in_proj_weight, m.in_proj_bias) if which == "in" else (m.out_proj.weight,
                                                                                     m.out_proj.bias)
            grads[id(weight)][:, rows] += torch.einsum("bpo,bpi->boi", d, a)
            if bias is not None:
                grads[id(bias)][:, rows] += d.sum(1)
        return _flat([grads[id(p)] for p in self.params], b)

    def _all(self) -> list[nn.Parameter]:
        m = self.module
        return [p for p in (m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias) if p is not None]

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self._all() if p.requires_grad]


@contextlib.contextmanager
def _LinearCalls(weights: dict, calls: list):
    """While active, ``F.linear`` calls (as ``F.multi_head_attention_forward`` makes them, through the
    module-level name) whose weight is (a row block of) one of ``weights`` are noted: (which, rows, input,
    output) into ``calls``."""
    original = F.linear
    # the weights may be views of one flat vector (scoring at stored weights): a call's weight is a
    # projection's when it starts inside that projection's span of the storage
    spans = [(w.untyped_storage().data_ptr(), w.data_ptr(), w.data_ptr() + w.numel() * w.element_size(),
              w.stride(0) * w.element_size(), name) for w, name in weights.items()]

    def linear(input, weight, bias=None):
        out = original(input, weight, bias)
        for storage, start, end, row_bytes, name in spans:
            if weight.untyped_storage().data_ptr() == storage and start <= weight.data_ptr() < end:
                first = (weight.data_ptr() - start) // row_bytes
                calls.append((name, slice(first, first + weight.shape[0]), input, out))
                break
        return out

    F.linear = linear
    try:
        yield
    finally:
        F.linear = original


class ModuleAlgebra(LayerAlgebra):
    """Any other module with trainable parameters of its own: ``torch.func`` per-sample gradients of that
    module alone (``vjp`` of its forward on one sample, under ``vmap``), from its inputs and output gradient.

    Holds when the module treats the samples of a batch separately and draws no random numbers (the
    probe checks it against the whole model's per-sample gradients).
    """

    reads_kwargs = True

    def __init__(self, module: nn.Module, in_dim: int = 0, out_dim: int = 0) -> None:
        super().__init__(module, in_dim, out_dim)
        self.names = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]

    def saved(self, args, kwargs, output):
        """The tensor inputs batch first (the first input's batch dimension, for all), the others as they are."""
        return tuple(a.detach().movedim(self.in_dim, 0) if isinstance(a, torch.Tensor) else a for a in args), kwargs

    def gradients(self, saved, deltas):
        args, kwargs = saved
        m, dim = self.module, self.in_dim
        params = {n: p.detach() for n, p in zip(self.names, self.params)}
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

        def one(delta, *sample):
            call = list(args)
            for i, x in zip(tensors, sample):
                call[i] = x.unsqueeze(dim)

            def f(p):
                out = functional_call(m, p, tuple(call), kwargs, strict=False)
                return out.squeeze(self.out_dim)

            grads = vjp(f, params)[1](delta)[0]
            return torch.cat([grads[n].reshape(-1) for n in self.names])

        return vmap(one)(deltas[0], *[args[i] for i in tensors])


_ALGEBRAS = [LinearAlgebra, ConvAlgebra, EmbeddingAlgebra, EmbeddingBagAlgebra, NormAlgebra, AttentionAlgebra]


def algebra_for(module: nn.Module) -> type[LayerAlgebra]:
    """The class for ``module``: its type's, when the type's algebra holds for its options, else
    :class:`ModuleAlgebra`."""
    for cls in _ALGEBRAS:
        if isinstance(module, cls.module_types):
            return cls if cls.supports(module) else ModuleAlgebra
    return ModuleAlgebra


def owns_trainable(module: nn.Module) -> bool:
    """Whether ``module`` has trainable parameters of its own (an ``nn.MultiheadAttention`` owns its
    output projection's too)."""
    if any(p.requires_grad for p in module.parameters(recurse=False)):
        return True
    return isinstance(module, nn.MultiheadAttention) and any(p.requires_grad for p in module.parameters())


def layers_of(model: nn.Module) -> list[nn.Module]:
    """The modules whose algebra covers every trainable parameter, in ``model.modules()`` order: those with
    trainable parameters of their own, an attention module's projection submodule excepted."""
    inside = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return [m for m in model.modules() if id(m) not in inside and owns_trainable(m)]


def column_ranges(model: nn.Module, layer: nn.Module, algebra: LayerAlgebra) -> list[tuple[int, int]]:
    """Where the layer's trainable parameters (its algebra's order) sit in the model's flat parameter vector."""
    offsets, start = {}, 0
    for p in model.parameters():
        if p.requires_grad:
            offsets[id(p)] = (start, start + p.numel())
            start += p.numel()
    return [offsets[id(p)] for p in algebra.params]
