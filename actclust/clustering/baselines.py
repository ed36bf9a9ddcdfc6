"""Clustering baselines that return packed centroids, like :mod:`actclust.kmeans`.

Two algorithms, both on ``(N, B)`` uint8 packed masks (bit order as in
:mod:`actclust.kernels`), both returning a :class:`BaselineResult` whose
``.cost`` is the mean Hamming distance of each mask to its *nearest* centroid,
so they are scored exactly like our Hamming k-means:

- :func:`brb_kmeans` -- BRB-KMeans ("bits to reals, k-means, binarise"), the
  standard binary-clustering baseline: unpack to float32 0/1, run Euclidean
  k-means (Lloyd, or mini-batch, on a torch GEMM), then set a centroid bit
  iff its real coordinate is ``>= 0.5``. (The artifact's own
  ``brbkmeans_same_k.py`` instead rounds the centroids inside every Lloyd
  step with ``torch.round``, which sends 0.5 to 0; we binarise once, at the
  end, as the BRB-KMeans method is usually stated.)
- :func:`actclust.clustering.activation_aware.activation_aware` -- the
  clustering of arXiv 2507.14179 ("A Sparsity Predicting Approach for Large
  Language Models via Activation Pattern Clustering", Euro-Par 2025), in its
  own module; it shares this module's result type and checks.

Example::

    from actclust.clustering.activation_aware import activation_aware, assign_miss

    x = pool_layers([masks_l0, masks_l1, ...], max_rows=200_000, seed=0)
    aa = activation_aware(x, k=256, d=1536, seed=0)
    brb = brb_kmeans(x, k=256, d=1536, seed=0)
    aa.centroids, aa.labels, aa.cost, brb.cost
    labels, misses = assign_miss(x, aa.centroids)      # the artifact's evaluation rule
"""
from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass

import numpy as np

from actclust import kernels
from actclust.kernels.numpy_backend import unpack_float as _unpack
from actclust.clustering.seeding import init_kmeanspp
from actclust.kernels.rules import AssignRule, top_bits

logger = logging.getLogger(__name__)

@dataclass
class BaselineResult:
    """A baseline's fit.

    Attributes:
        centroids: (k, B) uint8 packed binary centroids.
        labels: (N,) int64 cluster of every row under the algorithm's own
            assignment (Euclidean for BRB-KMeans, capacity-limited miss count
            for activation-aware), not necessarily the nearest in Hamming.
        cost: mean Hamming distance of each row to its nearest centroid.
        sizes: (k,) int64 members per cluster under ``labels``.
        iterations: iterations run.
        converged: the assignment stopped changing before ``max_iter``.
    """

    centroids: np.ndarray
    labels: np.ndarray
    cost: float
    sizes: np.ndarray
    iterations: int
    converged: bool


# --------------------------------------------------------------------------
# validation


def _check_int(value, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return int(value)


def _check_masks(x, k, d) -> tuple[np.ndarray, int, int]:
    """Validate packed masks, k and d; returns (x, k, d)."""
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype != np.uint8:
        raise ValueError("x must be a 2-D numpy uint8 array of packed masks (rows, bytes), "
                         f"got {type(x).__name__} {getattr(x, 'dtype', '')} {getattr(x, 'shape', '')}".rstrip())
    n, b = x.shape
    if n == 0 or b == 0:
        raise ValueError(f"x must hold at least one row and one byte, got shape {x.shape}")
    d = _check_int(d, "d", 1)
    if -(-d // 8) != b:
        raise ValueError(f"d={d} bits need {-(-d // 8)} bytes per row, but x has {b}")
    if d % 8 and np.any(x[:, -1] >> np.uint8(d % 8)):
        raise ValueError(f"x has bits set at positions >= d={d}; padding bits must be zero")
    k = _check_int(k, "k", 1, n)
    return x, k, d



def _result(x, centroids, labels, k, iterations, converged, density=None) -> BaselineResult:
    """The result, its cost under Hamming distance (with a density: the miss count
    to the centroid of highest overlap)."""
    _, dist = kernels.assign_scored(x, centroids, density=density)
    return BaselineResult(
        centroids=centroids,
        labels=labels.astype(np.int64, copy=False),
        cost=float(dist.mean(dtype=np.float64)),
        sizes=np.bincount(labels, minlength=k).astype(np.int64),
        iterations=int(iterations),
        converged=bool(converged),
    )


# --------------------------------------------------------------------------
# BRB-KMeans


# BRB-KMeans iterates until its centres move less than this fraction of the data's mean
# per-coordinate variance (scikit-learn's rule and default), or its iteration cap.
BRB_TOL = 1e-4
_BRB_BLOCK_ROWS = 8192  # rows per distance GEMM: an (8192, K) float32 tile


def brb_kmeans(x: np.ndarray, k: int, d: int, seed: int = 0, max_iter: int = 30,
               batch_size: int | None = None, density: float | None = None,
               tol: float = BRB_TOL) -> BaselineResult:
    """BRB-KMeans: bits to reals, Euclidean k-means, binarise at 0.5 (or keep the top bits).

    Lloyd's algorithm on the float32 0/1 rows with a torch GEMM for the distances
    (``||c||^2 - 2 x.c``, ties to the lowest centroid). The update is exact: member sums
    of 0/1 rows are integers. Seeding is greedy k-means++ on the rows (Hamming distance
    is the squared Euclidean distance of 0/1 vectors), on a seeded sample of
    ``max(16 k, 4096)`` rows as hamming-kmeans seeds. An empty cluster keeps its centre.

    Args:
        x: (N, B) uint8 packed masks, ``B = ceil(d / 8)``.
        k: clusters, 1 <= k <= N.
        d: bits per mask.
        seed: seeds the sample and the k-means++ draws.
        max_iter: Lloyd iterations (epochs for mini-batch) at most.
        batch_size: None for full-batch Lloyd; an integer for mini-batch k-means
            (per-centre learning rate 1 / members seen) with batches of that size.
        density: None binarises at 0.5; a fraction in (0, 1] keeps the
            ``round(density * d)`` largest coordinates of every real centroid
            (ties: lowest index), the fixed-budget binarisation.
        tol: stop when the summed squared centre shift of an iteration is at most
            ``tol`` times the mean per-coordinate variance of the rows (or when the
            assignment no longer changes).
    Returns:
        BaselineResult; ``labels`` are the Euclidean-nearest real centres.

    Holds the (N, d) float32 unpacked matrix in memory.
    """
    import torch

    x, k, d = _check_masks(x, k, d)
    seed = _check_int(seed, "seed", 0)
    max_iter = _check_int(max_iter, "max_iter", 1)
    if batch_size is not None:
        batch_size = _check_int(batch_size, "batch_size", 1)
    if not 0 <= tol < 1:
        raise ValueError(f"tol must be in [0, 1), got {tol}")
    n = x.shape[0]
    reals = torch.from_numpy(_unpack(x, d))  # (N, d) float32 0/1
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, max(16 * k, 4096)), replace=False))
    centers = reals[torch.from_numpy(sample[init_kmeanspp(x[sample], k, rng)])].clone()
    stop_shift = tol * float(reals.var(dim=0, unbiased=False).mean())
    if batch_size is None:
        centers, iterations, converged = _lloyd(reals, centers, max_iter, stop_shift)
    else:
        centers, iterations, converged = _minibatch(reals, centers, max_iter, batch_size,
                                                    stop_shift, rng)
    labels = _nearest_real(reals, centers).numpy()
    bits = np.zeros((k, 8 * x.shape[1]), dtype=np.uint8)
    if density is None:
        bits[:, :d] = centers.numpy() >= 0.5
        centroids = np.packbits(bits, axis=1, bitorder="little")
    else:
        values = np.zeros(bits.shape)
        values[:, :d] = centers.numpy()
        centroids = top_bits_of(values, density, d)
    logger.info("brb_kmeans: N=%d k=%d d=%d, %d iterations%s", n, k, d, iterations,
                " (converged)" if converged else "")
    return _result(x, centroids, labels, k, iterations, converged, density)


def _nearest_real(reals, centers):
    """(N,) int64 index of the Euclidean-nearest centre of every row (ties: lowest)."""
    import torch

    norms = (centers * centers).sum(dim=1)
    labels = torch.empty(len(reals), dtype=torch.int64)
    for lo in range(0, len(reals), _BRB_BLOCK_ROWS):
        block = reals[lo:lo + _BRB_BLOCK_ROWS]
        labels[lo:lo + len(block)] = torch.addmm(norms, block, centers.T, alpha=-2).argmin(dim=1)
    return labels


def _member_sums(reals, labels, k: int):
    """Per-centre sums of the member rows (float64) and member counts. float32 sums of
    0/1 rows are exact integers below 2**24 members, so the order of addition is moot."""
    import torch

    sums = torch.zeros((k, reals.shape[1]), dtype=reals.dtype)
    sums.index_add_(0, labels, reals)
    return sums.double(), torch.bincount(labels, minlength=k)


def _lloyd(reals, centers, max_iter: int, stop_shift: float):
    """Full-batch Lloyd iterations: (centres, iterations, converged)."""
    labels = None
    for iteration in range(1, max_iter + 1):
        new_labels = _nearest_real(reals, centers)
        sums, counts = _member_sums(reals, new_labels, len(centers))
        live = counts > 0
        moved = centers.clone()
        moved[live] = (sums[live] / counts[live, None]).to(centers.dtype)
        shift = float(((moved - centers) ** 2).sum())
        same = labels is not None and bool((labels == new_labels).all())
        centers, labels = moved, new_labels
        if same or shift <= stop_shift:
            return centers, iteration, True
    return centers, max_iter, False


def _minibatch(reals, centers, epochs: int, batch_size: int, stop_shift: float, rng):
    """Mini-batch k-means: each centre moves towards its batch members at rate
    1 / (members seen); (centres, epochs, converged)."""
    import torch

    seen = torch.zeros(len(centers), dtype=torch.float64)
    centers = centers.to(torch.float64)
    for epoch in range(1, epochs + 1):
        start = centers.clone()
        order = torch.from_numpy(rng.permutation(len(reals)))
        for lo in range(0, len(reals), batch_size):
            batch = reals[order[lo:lo + batch_size]]
            labels = _nearest_real(batch, centers.to(batch.dtype))
            sums, counts = _member_sums(batch, labels, len(centers))
            live = counts > 0
            seen[live] += counts[live]
            centers[live] += (sums[live] - counts[live, None] * centers[live]) / seen[live, None]
        if float(((centers - start) ** 2).sum()) <= stop_shift:
            return centers.to(reals.dtype), epoch, True
    return centers.to(reals.dtype), epochs, False


def top_bits_of(values: np.ndarray, density: float, d: int) -> np.ndarray:
    """(k, 8B) values -> packed centroids holding the density rule's n top bits each."""
    return top_bits(values, AssignRule.from_args(density=density).centroid_bits(d), d)


# --------------------------------------------------------------------------
# pooling


def pool_layers(per_layer: list[np.ndarray], max_rows: int, seed: int) -> np.ndarray:
    """Pool several layers' masks into one set (the artifact's one centroid set for all layers).

    Rows are concatenated layer after layer; if there are more than
    ``max_rows`` a seeded uniform sample of ``max_rows`` of them is kept,
    in pooled order.

    Args:
        per_layer: list of (N_l, B) uint8 packed masks, the same B for all.
        max_rows: at most this many rows are returned.
        seed: seeds the subsample.
    Returns:
        (min(sum N_l, max_rows), B) uint8.
    """
    if not isinstance(per_layer, (list, tuple)) or not per_layer:
        raise ValueError("per_layer must be a non-empty list of (rows, bytes) uint8 arrays")
    for i, a in enumerate(per_layer):
        if not isinstance(a, np.ndarray) or a.ndim != 2 or a.dtype != np.uint8:
            raise ValueError(f"per_layer[{i}] must be a 2-D numpy uint8 array, got "
                             f"{type(a).__name__} {getattr(a, 'dtype', '')} {getattr(a, 'shape', '')}".rstrip())
        if a.shape[1] != per_layer[0].shape[1]:
            raise ValueError(f"per_layer[{i}] has {a.shape[1]} bytes per row, per_layer[0] has "
                             f"{per_layer[0].shape[1]}; all layers must have the same width")
    max_rows = _check_int(max_rows, "max_rows", 1)
    seed = _check_int(seed, "seed", 0)
    sizes = np.array([a.shape[0] for a in per_layer], dtype=np.int64)
    total = int(sizes.sum())
    if total <= max_rows:
        return np.concatenate(per_layer, axis=0)
    keep = np.sort(np.random.default_rng(seed).choice(total, size=max_rows, replace=False))
    layer = np.searchsorted(np.cumsum(sizes), keep, side="right")  # layer of each kept row
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out = np.empty((max_rows, per_layer[0].shape[1]), dtype=np.uint8)
    for i, a in enumerate(per_layer):
        sel = layer == i
        out[sel] = a[keep[sel] - offsets[i]]
    return out
