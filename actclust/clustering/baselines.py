"""Clustering baselines that return packed centroids, like :mod:`actclust.kmeans`.

Two algorithms, both on ``(N, B)`` uint8 packed masks (bit order as in
:mod:`actclust.kernels`), both returning a :class:`BaselineResult` whose
``.cost`` is the mean Hamming distance of each mask to its *nearest* centroid,
so they are scored exactly like our Hamming k-means:

- :func:`brb_kmeans` -- BRB-KMeans ("bits to reals, k-means, binarise"), the
  standard binary-clustering baseline: unpack to float32 0/1, run
  scikit-learn's ``KMeans`` (or ``MiniBatchKMeans``), then set a centroid bit
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


# scikit-learn's own cap: BRB-KMeans runs to scikit-learn's convergence tolerance.
BRB_MAX_ITER = 300


def brb_kmeans(x: np.ndarray, k: int, d: int, seed: int = 0, max_iter: int = BRB_MAX_ITER,
               batch_size: int | None = None, density: float | None = None) -> BaselineResult:
    """BRB-KMeans: bits to reals, k-means, binarise at 0.5 (or keep the top bits).

    Args:
        x: (N, B) uint8 packed masks, ``B = ceil(d / 8)``.
        k: clusters, 1 <= k <= N.
        d: bits per mask.
        seed: ``random_state`` of the scikit-learn estimator (k-means++ init).
        max_iter: Lloyd iterations (epochs for mini-batch).
        batch_size: None for ``KMeans`` (full batch, ``n_init=1``); an integer
            for ``MiniBatchKMeans`` with that batch size.
        density: None binarises at 0.5; a fraction in (0, 1] keeps the
            ``round(density * d)`` largest coordinates of every real centroid
            (ties: lowest index), the fixed-budget binarisation.
    Returns:
        BaselineResult; ``labels`` are scikit-learn's (Euclidean nearest real
        centroid), ``iterations`` its ``n_iter_``.

    Holds the (N, d) float32 unpacked matrix in memory (scikit-learn needs it).
    """
    x, k, d = _check_masks(x, k, d)
    seed = _check_int(seed, "seed", 0)
    max_iter = _check_int(max_iter, "max_iter", 1)
    if batch_size is not None:
        batch_size = _check_int(batch_size, "batch_size", 1)
    try:
        from sklearn.cluster import KMeans, MiniBatchKMeans
    except ImportError as err:  # a dev extra, not a runtime dependency
        raise ImportError("brb_kmeans needs scikit-learn: pip install scikit-learn") from err

    reals = _unpack(x, d)  # (N, d) float32 0/1
    if batch_size is None:
        est = KMeans(n_clusters=k, n_init=1, random_state=seed, max_iter=max_iter)
    else:
        est = MiniBatchKMeans(n_clusters=k, n_init=1, random_state=seed, max_iter=max_iter,
                              batch_size=batch_size)
    est.fit(reals)
    bits = np.zeros((k, 8 * x.shape[1]), dtype=np.uint8)
    if density is None:
        bits[:, :d] = est.cluster_centers_ >= 0.5
        centroids = np.packbits(bits, axis=1, bitorder="little")
    else:
        centers = np.zeros(bits.shape)
        centers[:, :d] = est.cluster_centers_
        centroids = top_bits_of(centers, density, d)
    labels = np.asarray(est.labels_, dtype=np.int64)
    n_iter = int(est.n_iter_)
    logger.info("brb_kmeans: N=%d k=%d d=%d, %d iterations", x.shape[0], k, d, n_iter)
    return _result(x, centroids, labels, k, n_iter, n_iter < max_iter, density)


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
