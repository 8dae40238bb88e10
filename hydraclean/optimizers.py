"""Each optimizer's step as one pure function of flat tensors: training runs it, torch.func differentiates it.

A training step is a map of the weights, the optimizer state and the step's
gradient (DESIGN.md §7)::

    (w_t, s_t) = U_t(w_{t-1}, s_{t-1}, g_t)

with ``g_t`` the gradient of the batch's mean loss at ``w_{t-1}`` and ``U_t``
exactly the torch optimizer's step at that step's hyperparameters. An
:class:`UpdateRule` is that map, written once, without in-place operations
(the shape of optax's ``update``): :func:`hydraclean.training.run_training`
applies it to the flat trainable parameters, and the hypergradient code takes
its ``vjp`` (reverse mode) or ``jvp`` (forward mode) with ``torch.func``, so
``hessian="free"`` and ``hessian="exact"`` come from the same function for
every optimizer, with nothing derived by hand per optimizer.

Every rule here is *elementwise*: coordinate ``j`` of ``(w_t, s_t)`` depends
only on coordinate ``j`` of ``(w_{t-1}, s_{t-1}, g_t)``. SGD is moreover
*linear*, with coefficients that do not depend on the point, so its
Hessian-free hypergradient reduces to one scalar per step
(:func:`hydraclean.hypergradient.scalar_coefficients`).

The rules follow torch's single-tensor implementations operation by operation
(``torch.optim.SGD``, ``Adam``, ``AdamW`` as of torch 2.14), so that ``lr``,
``weight_decay`` and the other hyperparameters mean what torch means. Two
deliberate differences: a trainable parameter that gets no gradient in a step
is stepped with a zero gradient (torch skips it, which differs only under
weight decay, or where momentum is still moving it), and Adam's ``sqrt`` of the
second moment has derivative 0 where the moment is exactly 0 (a coordinate
that never had a gradient), instead of an infinite one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import ClassVar, Protocol

import torch

__all__ = ["SUPPORTED", "SGD", "Adam", "AdamW", "State", "UpdateRule", "make_rule", "step_in_place"]

#: The optimizer state: flat tensors of the parameters' shape (n_params,).
State = tuple[torch.Tensor, ...]


class UpdateRule(Protocol):
    """One optimizer's step, ``(w, s) -> U_t(w, s, g)``, as a pure elementwise function of flat tensors.

    Attributes
    ----------
    torch_class : type
        The ``torch.optim`` class whose step this is.
    scheduled : tuple of str
        The hyperparameters a torch scheduler may set per step, as the keys
        of ``hyper`` in :meth:`step`: ``"lr"`` and SGD's ``"momentum"`` or
        Adam's ``"beta1"`` (OneCycleLR cycles them).
    linear : bool
        Whether ``U_t`` is linear in ``(w, s, g)`` with coefficients that do
        not depend on the point (SGD), so that its Hessian-free hypergradient
        is one scalar per step.
    """

    torch_class: ClassVar[type]
    scheduled: ClassVar[tuple[str, ...]]
    linear: ClassVar[bool]

    def init(self, w: torch.Tensor) -> State:
        """The state before the first step (zeros), for flat weights ``w``."""

    def step(self, w: torch.Tensor, state: State, g: torch.Tensor, t: int, hyper: Mapping[str, float]
             ) -> tuple[torch.Tensor, State]:
        """``(w_t, s_t)`` from ``(w_{t-1}, s_{t-1})`` and the gradient ``g_t``; ``t`` counts steps from 1."""

    def torch_options(self, hyper: Mapping[str, float]) -> dict:
        """Keyword arguments of ``torch_class`` for these hyperparameters (a stand-in for schedulers)."""


@dataclass(frozen=True)
class SGD:
    """``torch.optim.SGD``: momentum, dampening, Nesterov and L2 weight decay.

    With momentum ``p_t`` and weight decay ``lam``::

        d_t = g_t + lam w_{t-1};   v_t = p_t v_{t-1} + (1 - dampening) d_t   (v_1 = d_1)
        w_t = w_{t-1} - eta_t (d_t + p_t v_t  if nesterov  else  v_t)
    """

    weight_decay: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False

    torch_class: ClassVar[type] = torch.optim.SGD
    scheduled: ClassVar[tuple[str, ...]] = ("lr", "momentum")
    linear: ClassVar[bool] = True

    def init(self, w: torch.Tensor) -> State:
        return (torch.zeros_like(w),)

    def step(self, w, state, g, t, hyper):
        lr, p = hyper["lr"], hyper["momentum"]
        d = g.add(w, alpha=self.weight_decay) if self.weight_decay else g
        (buf,) = state
        if p:
            # torch creates the buffer as a copy of the first step's d_t (no dampening on it)
            buf = d if t == 1 else buf.mul(p).add(d, alpha=1 - self.dampening)
            d = d.add(buf, alpha=p) if self.nesterov else buf
        return w.add(d, alpha=-lr), (buf,)

    def step_(self, w, state, g, t, hyper) -> None:
        """:meth:`step` written into ``w`` and ``state``: the same operations in the same order, in place (bit
        for bit), without its weight-sized temporaries (as ``torch.optim.SGD`` updates)."""
        lr, p = hyper["lr"], hyper["momentum"]
        d = g.add(w, alpha=self.weight_decay) if self.weight_decay else g
        (buf,) = state
        if p:
            if t == 1:
                buf.copy_(d)
            else:
                buf.mul_(p).add_(d, alpha=1 - self.dampening)
            d = d.add(buf, alpha=p) if self.nesterov else buf
        w.add_(d, alpha=-lr)

    def torch_options(self, hyper):
        return dict(lr=hyper["lr"], momentum=hyper["momentum"], dampening=self.dampening, nesterov=self.nesterov,
                    weight_decay=self.weight_decay)


@dataclass(frozen=True)
class Adam:
    """``torch.optim.Adam`` (L2 weight decay added to the gradient), with bias correction::

        g'  = g_t + lam w_{t-1};   m_t = b1 m + (1 - b1) g';   v_t = b2 v + (1 - b2) g'^2
        w_t = w_{t-1} - eta_t m_t / (1 - b1^t) / (sqrt(v_t / (1 - b2^t)) + eps)

    ``b1`` is per step (``hyper["beta1"]``, as OneCycleLR may cycle it);
    ``amsgrad`` divides by the running maximum of ``v_t`` instead.
    """

    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False

    torch_class: ClassVar[type] = torch.optim.Adam
    scheduled: ClassVar[tuple[str, ...]] = ("lr", "beta1")
    linear: ClassVar[bool] = False
    decoupled: ClassVar[bool] = False

    def init(self, w: torch.Tensor) -> State:
        return tuple(torch.zeros_like(w) for _ in range(3 if self.amsgrad else 2))

    def step(self, w, state, g, t, hyper):
        lr, b1, b2 = hyper["lr"], hyper["beta1"], self.beta2
        if self.weight_decay:
            if self.decoupled:
                w = w.mul(1 - lr * self.weight_decay)
            else:
                g = g.add(w, alpha=self.weight_decay)
        m, v, *peak = state
        m = m.lerp(g, 1 - b1)
        v = v.mul(b2).addcmul(g, g, value=1 - b2)
        step_size = lr / (1 - b1**t)
        bias_correction2_sqrt = (1 - b2**t) ** 0.5
        if self.amsgrad:
            peak = [torch.maximum(peak[0], v)]
        denom = (_sqrt(peak[0] if self.amsgrad else v) / bias_correction2_sqrt).add(self.eps)
        return w.addcdiv(m, denom, value=-step_size), (m, v, *peak)

    def torch_options(self, hyper):
        return dict(lr=hyper["lr"], betas=(hyper["beta1"], self.beta2), eps=self.eps,
                    weight_decay=self.weight_decay, amsgrad=self.amsgrad)


@dataclass(frozen=True)
class AdamW(Adam):
    """``torch.optim.AdamW``: :class:`Adam` with decoupled weight decay, ``w *= 1 - eta_t lam`` first."""

    weight_decay: float = 1e-2

    torch_class: ClassVar[type] = torch.optim.AdamW
    decoupled: ClassVar[bool] = True


class _Sqrt(torch.autograd.Function):
    """``sqrt(v)`` whose derivative is 0 where ``v == 0`` (torch's would be infinite, and 0 * inf NaN).

    The forward is torch's ``sqrt`` itself (training runs it every step); the derivative, in both modes and
    under ``torch.func``'s transforms, is ``1 / (2 sqrt(v))`` where ``v > 0``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(v: torch.Tensor) -> torch.Tensor:
        return v.sqrt()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (root,) = ctx.saved_tensors
        return torch.where(root > 0, grad / (2 * root), 0.0)

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        (root,) = ctx.saved_tensors
        return torch.where(root > 0, tangent / (2 * root), 0.0)


_sqrt = _Sqrt.apply


#: The optimizers with a rule, by torch class.
SUPPORTED: dict[type, type] = {torch.optim.SGD: SGD, torch.optim.Adam: Adam, torch.optim.AdamW: AdamW}

#: Options that change how torch runs the step, not what it computes (hydraclean runs the step itself).
_IMPLEMENTATION = {"foreach", "fused", "capturable", "differentiable"}


#: Values per block of :func:`step_in_place`: small enough that the update's temporaries are reused by the
#: allocator instead of being mapped afresh (and page-faulted) every step, as a whole model's would be.
STEP_BLOCK = 2**20


def step_in_place(rule: UpdateRule, w: torch.Tensor, state: State, g: torch.Tensor, t: int,
                  hyper: Mapping[str, float]) -> None:
    """``(w, state) <- rule.step(w, state, g, t, hyper)``, written into ``w`` and ``state``.

    The rule is elementwise, so it is applied block by block of
    :data:`STEP_BLOCK` values: bit for bit the pure step, without a model-sized
    temporary per operation; a rule with an in-place form of its step
    (``rule.step_(w, state, g, t, hyper)``, :class:`SGD`) writes each block
    itself. ``g`` is only read.
    """
    in_place = getattr(rule, "step_", None)
    for start in range(0, w.numel(), STEP_BLOCK):
        block = slice(start, start + STEP_BLOCK)
        if in_place is not None:
            in_place(w[block], tuple(s[block] for s in state), g[block], t, hyper)
            continue
        w_new, state_new = rule.step(w[block], tuple(s[block] for s in state), g[block], t, hyper)
        w[block].copy_(w_new)
        for s, new in zip(state, state_new):
            s[block].copy_(new)


def make_rule(optimizer: type, options: Mapping[str, object], *, momentum: float, lr: float | None,
              weight_decay: float | None) -> tuple[UpdateRule, dict[str, float]]:
    """The update rule for a torch optimizer class and its options, and the base per-step hyperparameters.

    Parameters
    ----------
    optimizer : type
        ``torch.optim.SGD``, ``torch.optim.Adam`` or ``torch.optim.AdamW``.
    options : mapping
        The optimizer's other keyword arguments (the estimator's
        ``optimizer__*`` parameters): SGD's ``dampening`` and ``nesterov``;
        Adam's ``betas``, ``eps`` and ``amsgrad``.
    momentum : float
        SGD's momentum (ignored by Adam and AdamW, whose ``beta1`` is the
        first of ``betas``).
    lr, weight_decay : float or None
        None takes the default: SGD 0.01 and 0; Adam and AdamW torch's own
        (1e-3, and 0 or 1e-2).

    Returns
    -------
    rule : UpdateRule
    base : dict of str to float
        The hyperparameters of :attr:`UpdateRule.scheduled` before any
        schedule: ``{"lr", "momentum"}`` or ``{"lr", "beta1"}``.

    Raises
    ------
    ValueError
        For another optimizer, or an option the rule does not take, naming
        what is supported.
    """
    if not (isinstance(optimizer, type) and optimizer in SUPPORTED):
        name = getattr(optimizer, "__name__", repr(optimizer))
        raise ValueError(
            f"optimizer={name} is not supported. Pass torch.optim.SGD, torch.optim.Adam or torch.optim.AdamW (the "
            "class, not an instance): the hypergradient follows each step's update rule, and hydraclean has the "
            "rule of these three."
        )
    cls = SUPPORTED[optimizer]
    options = dict(options)
    for key in ("lr", "weight_decay", "momentum", "params"):
        if key in options:
            top = {"params": "the module's parameters are trained", "momentum": "pass momentum="}.get(key, f"pass {key}=")
            raise ValueError(f"optimizer__{key} is not an option here: {top} (it is a parameter of the cleaner itself).")
    unknown = set(options) - {f.name for f in fields(cls)} - {"betas"} - _IMPLEMENTATION
    if "betas" in options and cls is SGD:
        unknown.add("betas")
    if set(options) & _IMPLEMENTATION or unknown:
        bad = sorted(set(options) & _IMPLEMENTATION | unknown)
        allowed = {SGD: "dampening, nesterov", Adam: "betas, eps, amsgrad", AdamW: "betas, eps, amsgrad"}[cls]
        raise ValueError(
            f"optimizer__{bad[0]} is not supported for {optimizer.__name__}; its options here are {allowed} (with lr, "
            "weight_decay" + (" and momentum" if cls is SGD else "") + " as the cleaner's own parameters). "
            "hydraclean runs the update itself, so torch's implementation switches (foreach, fused, ...) do not apply."
        )
    defaults = {SGD: (0.01, 0.0)}.get(cls, (1e-3, cls.weight_decay))
    lr = defaults[0] if lr is None else float(lr)
    weight_decay = defaults[1] if weight_decay is None else float(weight_decay)
    if cls is SGD:
        rule = SGD(weight_decay=weight_decay, dampening=float(options.get("dampening", 0.0)),
                   nesterov=bool(options.get("nesterov", False)))
        if rule.nesterov and (momentum <= 0 or rule.dampening != 0):
            raise ValueError("Nesterov momentum needs momentum > 0 and dampening 0 (as torch.optim.SGD requires).")
        return rule, {"lr": lr, "momentum": float(momentum)}
    beta1, beta2 = options.get("betas", (0.9, 0.999))
    for name, value in (("betas[0]", beta1), ("betas[1]", beta2)):
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"optimizer__betas: {name}={value} must lie in [0, 1).")
    rule = cls(beta2=float(beta2), eps=float(options.get("eps", 1e-8)), weight_decay=weight_decay,
               amsgrad=bool(options.get("amsgrad", False)))
    return rule, {"lr": lr, "beta1": float(beta1)}
