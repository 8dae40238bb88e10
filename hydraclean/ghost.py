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
:func:`pays` makes the choice per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import CHUNK_BYTES, LayerAlgebra

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


def pays(alg: LayerAlgebra, factors: tuple[torch.Tensor, torch.Tensor], n_rows: int, n_directions: int) -> bool:
    """Whether the ghost product takes less time per sample than the layer's own product with
    ``n_directions`` directions, for a layer with ghost ``factors`` ``(u, delta)`` of one sample's shape
    ``(P, in)``, ``(P, out)`` against ``n_rows`` validation samples: its multiply-adds, weighted by the
    layer's :attr:`~hydraclean.layers.LayerAlgebra.ghost_penalty`, against the layer's own."""
    u, delta = factors
    positions = u.shape[-2]
    ghost = n_rows * positions**2 * (u.shape[-1] + delta.shape[-1]) + n_rows * n_directions
    return alg.ghost_penalty * ghost < alg.cost(n_directions, positions)


def ghost_products(alg: LayerAlgebra, factors: tuple[torch.Tensor, torch.Tensor],
                   rows: tuple[torch.Tensor, torch.Tensor], mixing: torch.Tensor) -> torch.Tensor:
    """``<V_k, g_i>`` of one layer for ``V = mixing @ G_rows``, shape (b, K).

    Parameters
    ----------
    alg : LayerAlgebra
        The layer's (its bias, if trainable, counts).
    factors : (u, delta) of shapes (b, P, in), (b, P, out)
        The training samples' (:meth:`LayerAlgebra.ghost_factors`).
    rows : (u, delta) of shapes (n, P', in), (n, P', out)
        The validation samples'.
    mixing : Tensor of shape (K, n)
    """
    u, delta = factors
    u_rows, delta_rows = rows
    b, positions = u.shape[:2]
    n, row_positions = u_rows.shape[:2]
    out = u.new_zeros(b, mixing.shape[0])
    step = max(1, CHUNK_BYTES // max(1, 2 * b * positions * row_positions * u.element_size()))
    u_flat, delta_flat = u.reshape(b * positions, -1), delta.reshape(b * positions, -1)
    for start in range(0, n, step):
        part = slice(start, start + step)
        m = u_rows[part].shape[0]
        inputs = (u_flat @ u_rows[part].reshape(m * row_positions, -1).T).reshape(b, positions, m, row_positions)
        grads = (delta_flat @ delta_rows[part].reshape(m * row_positions, -1).T).reshape(b, positions, m,
                                                                                      row_positions)
        gram = torch.einsum("bpmq,bpmq->bm", inputs, grads)
        if alg.bias:
            gram += delta.sum(1) @ delta_rows[part].sum(1).T
        out += gram @ mixing[:, part].T
    return out
