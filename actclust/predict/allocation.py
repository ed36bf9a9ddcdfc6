"""Per-layer density budgets of activation-mass centroids: the layer errors.

    actclust mass-bits --centroids C --features F --budget 0.5 --out C-budget

The search itself (:func:`actclust.budget.greedy`) is shared with the anchors.
The error of a layer is measured on stored FFN inputs of fitting windows, through the
layer's own FFN, against the residual stream the output is added to (see
:mod:`actclust.evaluation.anchor_allocation` for why not against the FFN's own output):

    error_l(d) = mean ||W_down (a - a * keep_d)||^2 / mean ||r_l||^2

with ``keep_d`` the token's mask at layer density ``d``: its centroid (bits by activation
mass, the token assigned by the clustering's rule against them), ANDed with the token's
true mask in mask mode ``and``; ``r_l`` the residual stream entering layer ``l``, on the
first fitting windows. At density ``d`` every centroid of the layer has ``d * d_ff`` bits
(counts ``equal``), or its fitted bit count scaled so that the layer's mean is ``d * d_ff``
(counts ``fitted``: clusters the fit made denser stay denser).
"""

from __future__ import annotations

import numpy as np

from actclust.budget import GRID
from actclust.io import mask_store
from actclust.kernels import assign_scored

OBJECTIVE = ("FFN output error per layer against the residual stream, mean ||W_down (a - "
             "a keep)||^2 / mean ||r_l||^2 over fitting tokens, summed over layers; greedy by "
             "marginal error per byte saved")


def top_mass_bits(mass: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(K, W) bool: row j sets the ``counts[j]`` neurons of largest ``mass[j]`` (ties to the
    lower index)."""
    order = np.argsort(-mass, axis=1, kind="stable")
    bits = np.zeros(mass.shape, dtype=bool)
    for j, count in enumerate(counts):
        bits[j, order[j, :count]] = True
    return bits


def scaled_counts(fitted: np.ndarray, density: float, width: int) -> np.ndarray:
    """The fitted bit counts (at least 1) times the one factor that makes their mean
    ``density width`` once each is clipped to [1, width], rounded. Density 1 fills every
    centroid; without clipping the factor is ``density width / mean(fitted)``."""
    base = np.maximum(np.asarray(fitted, dtype=np.float64), 1.0)
    target = density * width
    lo, hi = 0.0, width / base.min()  # at hi every count reaches width
    for _ in range(60):  # bisection: the clipped mean rises with the factor
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.clip(base * mid, 1, width).mean() < target else (lo, mid)
    return np.clip(np.rint(base * hi), 1, width).astype(np.int64)


def mass_centroids(mass: np.ndarray, density: float,
                   fitted_counts: np.ndarray | None = None) -> np.ndarray:
    """(K, W) bool centroids by activation mass at layer density ``density``: each of
    ``round(density W)`` bits, or of its fitted count scaled (:func:`scaled_counts`). A
    cluster without members takes the layer's whole mass."""
    k, width = mass.shape
    weights = np.where(mass.sum(axis=1, keepdims=True) > 0, mass, mass.sum(axis=0))
    counts = np.full(k, int(round(density * width))) if fitted_counts is None \
        else scaled_counts(fitted_counts, density, width)
    return top_mass_bits(weights, counts)


def layer_errors(a: np.ndarray, true_bits: np.ndarray, mass: np.ndarray, rule, w_down,
                 grid=GRID, mask_mode: str = "and", fitted_counts: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean squared output errors per token, centroid shares, kept shares), each
    (len(grid),), of one layer on sample tokens: gate and up are read at the centroid
    share, down at the kept share.

    Args:
        a: (N, W) float32 activations entering the down projection.
        true_bits: (N, B) uint8 packed true masks of the same tokens.
        mass: (K, W) per cluster summed |a| of its members.
        rule: the clustering's assignment rule (cluster.json's ``rule``; None: Hamming).
        w_down: (d_model, W) torch tensor, the down projection's weight.
        fitted_counts: (K,) the fitted centroids' bit counts, to scale (None: equal counts).
    """
    import torch

    a_t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    w = w_down.detach().float()
    truth = torch.from_numpy(mask_store.unpack(true_bits, a.shape[1]))
    errors, centroid_shares, kept_shares = [], [], []
    for density in grid:
        cents = mass_centroids(mass, density, fitted_counts)
        labels, _ = assign_scored(true_bits, mask_store.pack(cents), rule)
        keep = torch.from_numpy(cents[labels])
        centroid_shares.append(float(keep.float().mean()))
        if mask_mode == "and":
            keep &= truth
        dropped = a_t * (~keep).to(a_t.dtype)
        errors.append(float((dropped @ w.T).square().sum()) / len(a))
        kept_shares.append(float(keep.float().mean()))
    return np.asarray(errors), np.asarray(centroid_shares), np.asarray(kept_shares)
