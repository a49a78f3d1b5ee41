"""Training objectives on triplet batches, and the reconstruction head.

A training batch is encoded as one tensor of 3B rows (anchors, then neighbors, then distant patches);
the encoder gives the head outputs :math:`h` (before normalisation) and the unit vectors
:math:`z = h / \\lVert h \\rVert`. With :math:`a_i, p_i, n_i` the rows of anchor i, its neighbor and its
distant patch (``train.objective``):

* ``triplet`` (Tile2Vec): :math:`\\max(0, \\lVert a - p \\rVert_2 - \\lVert a - n \\rVert_2 + m)` on unit
  vectors, margin ``train.margin``;
* ``infonce`` (SimCLR / CLIP style, in-batch negatives): with temperature :math:`\\tau`
  (``train.temperature``), the anchor's positive is its neighbor and its negatives are every other
  neighbor and every distant patch of the batch,

  .. math::

      L = \\tfrac12 \\big[ \\mathrm{CE}(a P^\\top / \\tau, i) + \\mathrm{CE}(p A^\\top / \\tau, i) \\big],
      \\quad P = [p_1 \\dots p_B, n_1 \\dots n_B]

* ``vicreg`` (Bardes et al. 2022) on the head outputs :math:`h` of anchors and neighbors: invariance
  (mean squared difference), variance (hinge :math:`\\max(0, 1 - \\sqrt{\\mathrm{Var}_j + 10^{-4}})` per
  dimension) and covariance (squared off-diagonal covariances / d), weighted 25 / 25 / 1.

Reconstruction (``train.reconstruction`` > 0 adds it with that weight): a linear head predicts, from the
unit vector :math:`z`, the spatial mean of every encoded input channel of the patch at every scale, and of
the local patch's central quarter (about the cell's own footprint): the class fractions of the categorical
layers and the band means and valid fractions of the continuous ones (targets standardised per batch). It
makes the embedding carry what a histogram baseline carries, so that the contrastive part can add what it
cannot (AlphaEarth and Presto reconstruct their inputs too).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Objective = Literal["triplet", "infonce", "vicreg"]

VICREG_WEIGHTS = (25.0, 25.0, 1.0)
"""Invariance, variance and covariance weights of VICReg (the paper's defaults)."""


def triplet_loss(z: torch.Tensor, margin: float) -> torch.Tensor:
    """Triplet margin loss of stacked unit vectors (3B, d)."""
    a, p, n = z.float().chunk(3)
    return F.triplet_margin_loss(a, p, n, margin=margin)


def infonce_loss(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE of anchors and neighbors, distant patches as extra negatives (see the module doc)."""
    a, p, n = z.float().chunk(3)
    target = torch.arange(a.shape[0], device=z.device)
    forward = F.cross_entropy(a @ torch.cat([p, n]).T / temperature, target)
    backward = F.cross_entropy(p @ a.T / temperature, target)
    return 0.5 * (forward + backward)


def vicreg_loss(h: torch.Tensor) -> torch.Tensor:
    """VICReg of anchors and neighbors from stacked head outputs (3B, d) (see the module doc)."""
    a, p, _ = h.float().chunk(3)
    w_inv, w_var, w_cov = VICREG_WEIGHTS
    inv = F.mse_loss(a, p)
    var = torch.zeros((), device=h.device)
    cov = torch.zeros((), device=h.device)
    d = a.shape[1]
    for e in (a, p):
        e = e - e.mean(dim=0)
        var = var + F.relu(1.0 - torch.sqrt(e.var(dim=0) + 1e-4)).mean()
        c = (e.T @ e) / max(e.shape[0] - 1, 1)
        off = c - torch.diag(torch.diagonal(c))
        cov = cov + off.pow(2).sum() / d
    return w_inv * inv + w_var * var + w_cov * cov


def objective_loss(
    objective: Objective, z: torch.Tensor, h: torch.Tensor, *, margin: float, temperature: float
) -> torch.Tensor:
    """The loss of ``objective`` from unit vectors ``z`` and head outputs ``h`` (both (3B, d))."""
    if objective == "triplet":
        return triplet_loss(z, margin)
    if objective == "infonce":
        return infonce_loss(z, temperature)
    return vicreg_loss(h)


def reconstruction_targets(x: torch.Tensor, local_channels: int) -> torch.Tensor:
    """Class fractions, band means and valid fractions: (N, S·C + C).

    The spatial mean of every encoded input channel of ``x`` (N, S·C, P, P), then the mean of the first
    ``local_channels`` (the local patch) over its central P/4 × P/4 pixels (about the cell's footprint).
    """
    p = x.shape[-1]
    w = max(1, p // 4)
    a = (p - w) // 2
    centre = x[:, :local_channels, a : a + w, a : a + w].float().mean(dim=(2, 3))
    return torch.cat([x.float().mean(dim=(2, 3)), centre], dim=1)


class ReconstructionHead(nn.Module):
    """A linear map from the embedding to the standardised :func:`reconstruction_targets`."""

    def __init__(self, embedding_dim: int, channels: int, n_scales: int) -> None:
        super().__init__()
        self.local_channels = channels
        self.linear = nn.Linear(embedding_dim, channels * (n_scales + 1))

    def loss(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the prediction from ``z`` against the batch-standardised targets of ``x``."""
        t = reconstruction_targets(x, self.local_channels)
        t = (t - t.mean(dim=0)) / (t.std(dim=0) + 1e-3)
        return F.mse_loss(self.linear(z.float()), t.detach())


def effective_rank(embeddings: torch.Tensor) -> float:
    """Effective rank (Roy & Vetterli 2007): :math:`\\exp(-\\sum_i p_i \\log p_i)`, :math:`p = s / \\sum s`.

    ``s`` are the singular values of the centred embeddings; 1 for collapsed vectors, d for isotropic ones.
    """
    x = embeddings.double()
    x = x - x.mean(dim=0)
    s = torch.linalg.svdvals(x)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))
