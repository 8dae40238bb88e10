"""Ghost products: ``<V_k, g_i>`` for directions made of validation samples' own gradients.

Every direction HYDRA projects on is a combination of validation samples'
eval-mode gradients at ``w_T``: a class's validation gradient is the mean of
its samples' (DESIGN.md §5), the mean validation gradient the mean of all, and
a validation row's (``C(i, j)``) its own. Writing ``V_k = sum_j M_kj G_j``,

    <V_k, g_i> = sum_j M_kj <G_j, g_i>,

and for a layer whose per-sample gradient is a sum over positions of outer
products (Linear: ``sum_p delta_ip a_ip'``; Conv2d: the same over the
unfolded input ``u_ip``), the inner product of two samples' gradients needs
neither gradient (the "ghost" product of ghost clipping, Li et al. 2022):

    <g_j, g_i> = sum_{p,q} (delta_jq . delta_ip)(u_jq . u_ip)   (+ (sum_q delta_jq) . (sum_p delta_ip), the bias).

Per training sample that is ``n_val P^2 (in + out)`` multiply-adds against
``K P in out`` for the directions themselves: far fewer for a wide layer at few
positions (a ResNet's last stages, a classifier head under many directions).
A convolution at an input smaller than its kernel's reach (2x2 and 1x1 under a
3x3 kernel) takes the inputs' positions instead of the unfolded input, whose
``in kh kw`` columns are mostly padding or repeats there: with ``a_is`` the
input at position ``s`` and ``R`` the pattern of the tap joining output
position ``p`` to input position ``s`` and ``q`` to ``r``,

    <g_j, g_i> = sum_{p,q,s,r} R[(p,q),(s,r)] (delta_jq . delta_ip)(a_jr . a_is),

``n_val (S^2 in + P^2 out + terms)`` multiply-adds with ``S`` input
positions (16 in + 16 out + 36 at 2x2 against 16 (9 in + out)).
:func:`pays` makes the choice per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import CHUNK_BYTES, FEW_TERMS, GhostFactors, LayerAlgebra

__all__ = ["GhostRows", "ghost_products", "pays"]


@dataclass
class GhostRows:
    """The directions as combinations of validation samples' own gradients.

    Attributes
    ----------
    model : nn.Module
        The trained model (``w_T``); the gradients are eval mode.
    X, y : Tensor
        The validation samples ``j``.
    mixing : Tensor of shape (K, n)
        ``V_k = sum_j mixing[k, j] grad l_j(w_T)`` for every direction ``k``.
    """

    model: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    mixing: torch.Tensor


def pays(alg: LayerAlgebra, factors: GhostFactors, n_rows: int, n_directions: int) -> bool:
    """Whether the ghost product takes less time per sample than the layer's own product with
    ``n_directions`` directions, for a layer with ghost ``factors`` of one sample (``u`` of shape ``(S,
    in)``, ``delta`` of shape ``(P, out)``) against ``n_rows`` validation samples like it: its
    multiply-adds, weighted by the layer's :attr:`~hydraclean.layers.LayerAlgebra.ghost_penalty`, against
    the layer's own."""
    u, delta, in_size = GhostFactors(*factors)
    s, positions = u.shape[-2], delta.shape[-2]
    joining = 0 if in_size is None else alg.joining_cost(in_size)
    pairs = s**2 * u.shape[-1] + positions**2 * delta.shape[-1] + joining
    ghost = n_rows * pairs + n_rows * n_directions
    return alg.ghost_penalty * ghost < alg.cost(n_directions, positions)


def ghost_products(alg: LayerAlgebra, factors: GhostFactors, rows: GhostFactors, mixing: torch.Tensor
                   ) -> torch.Tensor:
    """``<V_k, g_i>`` of one layer for ``V = mixing @ G_rows``, shape (b, K).

    Parameters
    ----------
    alg : LayerAlgebra
        The layer's (its bias, if trainable, counts).
    factors : GhostFactors
        The training samples' (:meth:`LayerAlgebra.ghost_factors`): ``u`` (b, S, in), ``delta`` (b, P, out).
    rows : GhostFactors
        The validation samples', of the same form: (n, S', in), (n, P', out).
    mixing : Tensor of shape (K, n)
    """
    u, delta, in_size = GhostFactors(*factors)
    u_rows, delta_rows, row_size = GhostFactors(*rows)
    b, s, positions = u.shape[0], u.shape[1], delta.shape[1]
    n, row_s, row_positions = u_rows.shape[0], u_rows.shape[1], delta_rows.shape[1]
    # by input positions: which (output position, input position) pairs of the two samples one tap joins
    pattern = None if in_size is None else alg.ghost_pattern(in_size, row_size)
    if pattern is not None and pattern.shape[0] > FEW_TERMS:  # as a matrix (P P', S S')
        joins = u.new_zeros(positions * row_positions, s * row_s)
        joins[pattern[:, 0] * row_positions + pattern[:, 1], pattern[:, 2] * row_s + pattern[:, 3]] = 1.0
    out = u.new_zeros(b, mixing.shape[0])
    widest = max(s * row_s, positions * row_positions)
    step = max(1, CHUNK_BYTES // max(1, 2 * b * widest * u.element_size()))
    u_flat, delta_flat = u.reshape(b * s, -1), delta.reshape(b * positions, -1)
    for start in range(0, n, step):
        part = slice(start, start + step)
        m = u_rows[part].shape[0]
        inputs = (u_flat @ u_rows[part].reshape(m * row_s, -1).T).reshape(b, s, m, row_s)
        grads = (delta_flat @ delta_rows[part].reshape(m * row_positions, -1).T).reshape(b, positions, m,
                                                                                      row_positions)
        if pattern is None:
            gram = torch.einsum("bpmq,bpmq->bm", inputs, grads)
        elif pattern.shape[0] <= FEW_TERMS:
            gram = inputs.new_zeros(b, m)
            for p, q, i, j in pattern.tolist():
                gram.addcmul_(grads[:, p, :, q], inputs[:, i, :, j])
        else:
            joined = grads.permute(0, 2, 1, 3).reshape(b, m, -1) @ joins  # (b, m, S S')
            gram = (joined * inputs.permute(0, 2, 1, 3).reshape(b, m, -1)).sum(2)
        if alg.bias:
            gram += delta.sum(1) @ delta_rows[part].sum(1).T
        out += gram @ mixing[:, part].T
    return out
