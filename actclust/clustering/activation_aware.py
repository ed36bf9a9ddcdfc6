"""Activation-aware clustering of arXiv 2507.14179 ("A Sparsity Predicting Approach
for Large Language Models via Activation Pattern Clustering", Euro-Par 2025).

The activation-aware clustering follows the public artifact's source,
``github.com/nobeldhar/Activation-Aware-Clustering`` at commit d08b3c6:
``clustering/select_centroids.py`` (initialisation) and
``clustering/activation_aware_clustering.py`` (the loop). What it does, and
where we differ:

1. Initialisation with a sparsity floor. k distinct row indices are drawn at
   random and sorted; for each, the first row at or after it (at most
   ``init_window`` = 100 rows on) whose fraction of *zero* bits is
   ``>= sparsity_floor`` (0.4) becomes an initial centroid. The floor is on
   sparsity, i.e. an initial centroid has *at most* 60% of its bits set; it
   is not a floor on set bits. The artifact drops a centroid when no row in
   the window qualifies (leaving fewer than k); we keep k by taking the
   sampled row and clearing randomly chosen set bits until the floor holds.
2. Distance: the miss count ``|m| - m.c``, the token's active bits that the
   centroid lacks (:func:`miss_counts`). It is asymmetric: extra centroid bits
   cost nothing.
3. Capacity-limited greedy assignment, each cluster taking at most
   ``cap = ceil(capacity_factor * N / k)`` members. ``order="cluster"`` (the
   artifact's): clusters in index order each take the ``cap`` unassigned
   tokens closest to them. ``order="token"``: tokens in increasing order of
   their best miss count each take the closest cluster that still has room.
   Ties go to the lowest token / cluster index (the artifact uses the unstable
   ``torch.argsort``). The artifact uses ``floor(N / k)``, which leaves up to
   ``N mod k`` tokens of every chunk unassigned; we round up so that every
   token has a cluster, and reject a capacity too small to place them all.
4. Update: per-bit member frequency ``f``. With ``running_average=True``
   (the artifact) ``f`` is blended with the previous binary centroid ``c`` as
   ``(t * c + f) / (t + 1)`` at iteration ``t = 1, 2, ...`` (its weights
   ``iteration * batch * max_cluster_size`` and ``max_cluster_size`` for one
   chunk per iteration, ``batch = 1``); with ``False`` the centroid is built
   from ``f`` alone. The result ``v`` is binarised at the centroid's own
   quantile: bit i is set iff ``v_i > quantile(v, 0.4)`` (linear
   interpolation, as ``torch.quantile`` and ``numpy.quantile``), strictly
   greater. So at most ~60% of a centroid's bits are set, fewer where values
   tie at the threshold (a one-member cluster whose mask has more than 60% of
   its bits set, with ``running_average=False``, gets no bits at all: all its
   values tie at 1). Clusters without members keep their centroid.
   Since the previous centroid is binary, any weight ``t >= 1`` puts every
   previously set bit (value >= 1/2) above every clear one (<= 1/2): the
   update only ranks bits within those two groups by frequency. Once a
   centroid holds the ~60% its quantile keeps, it no longer changes, so with
   ``running_average=True`` the centroids freeze after about one update
   (measured on planted masks): each is its initial row topped up with (or
   trimmed to) the bits most frequent among its first members.
5. Stop when the assignment no longer changes, or after ``max_iter``.

The artifact's evaluation (``llm-awq/awq/entry.py``, ``cluster()``) gives
each token the centroid of smallest miss count, without capacity:
:func:`assign_miss`. ``.cost`` here is Hamming, as for every algorithm.

Not reproduced: the artifact streams 163 chunks over 8 GPUs and after every
batch of chunks takes the bit-wise majority (mean ``>= 0.5``) of the 8 GPUs'
centroids; here one process sees all rows at once, where that vote is the
identity. Pool the layers first with :func:`pool_layers` for its "one centroid
set for all 32 layers" setting.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from actclust import kernels
from actclust.clustering.baselines import (BaselineResult, _check_int, _check_masks, _result,
                                           top_bits_of)
from actclust.kernels import MissCounter

logger = logging.getLogger(__name__)

ORDERS = ("cluster", "token")
_BLOCK_ELEMS = 2**24  # int32 elements of one distance tile: 64 MiB


def miss_counts(x: np.ndarray, c: np.ndarray, block_rows: int | None = None) -> np.ndarray:
    """Miss-count distance of every row to every centroid.

    ``miss[n, j] = |x_n| - x_n . c_j``: the bits set in row n and clear in
    centroid j. Computed as a float32 GEMM on unpacked 0/1 rows, exact since
    every partial sum is an integer below 2**24 bits.

    Args:
        x: (N, B) uint8 packed rows.
        c: (K, B) uint8 packed centroids.
        block_rows: rows unpacked at once; None picks about 64 MiB per block.
    Returns:
        (N, K) int32.
    """
    mc = MissCounter.from_packed(c)
    _check_rows(x, c)
    out = np.empty((x.shape[0], c.shape[0]), dtype=np.int32)
    rows = mc.default_rows() if block_rows is None else _check_int(block_rows, "block_rows", 1)
    for lo in range(0, x.shape[0], rows):
        out[lo:lo + rows] = mc(x[lo:lo + rows])
    return out


def assign_miss(x: np.ndarray, c: np.ndarray, block_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by miss count, without capacity (the artifact's evaluation rule).

    Args:
        x: (N, B) uint8 packed rows.
        c: (K, B) uint8 packed centroids.
        block_rows: rows unpacked at once; None picks about 64 MiB per block.
    Returns:
        labels: (N,) int64 (ties: lowest centroid index).
        misses: (N,) int32 miss count to that centroid.
    """
    mc = MissCounter.from_packed(c)
    _check_rows(x, c)
    labels = np.empty(x.shape[0], dtype=np.int64)
    misses = np.empty(x.shape[0], dtype=np.int32)
    rows = mc.default_rows() if block_rows is None else _check_int(block_rows, "block_rows", 1)
    for lo in range(0, x.shape[0], rows):
        dist = mc(x[lo:lo + rows])  # (m, K)
        labels[lo:lo + rows] = dist.argmin(axis=1)
        misses[lo:lo + rows] = dist.min(axis=1)
    return labels, misses


def _check_rows(x, c) -> None:
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype != np.uint8 or x.shape[1] != c.shape[1]:
        raise ValueError(f"x must be a (N, {c.shape[1]}) numpy uint8 array to match c, got "
                         f"{getattr(x, 'dtype', '')} {getattr(x, 'shape', type(x).__name__)}")



def _initial_centroids(x, k, d, rng, sparsity_floor, init_window) -> np.ndarray:
    """k initial centroids with at least ``sparsity_floor`` of their d bits clear."""
    n = x.shape[0]
    ones = kernels.popcount(x).astype(np.int64)
    ok = (d - ones) / d >= sparsity_floor  # (N,) rows that meet the floor
    starts = np.sort(rng.choice(n, size=k, replace=False))
    # next_ok[i]: first qualifying row at or after i (n if none).
    next_ok = np.minimum.accumulate(np.where(ok, np.arange(n), n)[::-1])[::-1]
    picks = next_ok[starts]
    found = (picks < n) & (picks - starts <= init_window)
    centroids = x[np.where(found, picks, starts)].copy()
    missing = np.flatnonzero(~found)
    if missing.size:
        logger.warning("activation_aware: %d of %d initial centroids found no row with sparsity >= %g "
                       "within %d rows; thinning the sampled row instead", missing.size, k,
                       sparsity_floor, init_window)
        max_ones = d - math.ceil(sparsity_floor * d)
        while max_ones > 0 and (d - max_ones) / d < sparsity_floor:
            max_ones -= 1
        for j in missing:
            bits = np.unpackbits(centroids[j], count=d, bitorder="little")
            on = np.flatnonzero(bits)
            bits[rng.choice(on, size=on.size - max_ones, replace=False)] = 0
            centroids[j] = np.packbits(bits, bitorder="little")[: x.shape[1]]
    return centroids


def _smallest(values: np.ndarray, count: int) -> np.ndarray:
    """Positions of the ``count`` smallest values, ties to the lowest position; sorted."""
    if values.size <= count:
        return np.arange(values.size)
    kth = np.partition(values, count - 1)[count - 1]
    below = np.flatnonzero(values < kth)
    tied = np.flatnonzero(values == kth)[: count - below.size]
    return np.sort(np.concatenate([below, tied]))


def _assign_by_cluster(x, mc: MissCounter, cap: int) -> np.ndarray:
    """The artifact's order: cluster 0, 1, ... each takes its cap closest unassigned rows."""
    n, k = x.shape[0], mc.k
    labels = np.full(n, -1, dtype=np.int64)
    cols = max(1, min(k, _BLOCK_ELEMS // n))  # a (N, cols) int32 tile of distances
    rows = mc.default_rows()
    for c0 in range(0, k, cols):
        free = np.flatnonzero(labels < 0)
        if free.size == 0:
            break
        sub = mc.columns(c0, c0 + cols)
        dist = np.empty((free.size, sub.k), dtype=np.int32)  # (free rows, cols)
        for lo in range(0, free.size, rows):
            dist[lo:lo + rows] = sub(x[free[lo:lo + rows]])
        alive = np.ones(free.size, dtype=bool)
        for j in range(sub.k):
            pos = np.flatnonzero(alive)
            if pos.size == 0:
                break
            take = pos[_smallest(dist[pos, j], cap)]
            labels[free[take]] = c0 + j
            alive[take] = False
    return labels


def _assign_by_token(x, mc: MissCounter, cap: int) -> np.ndarray:
    """Rows in order of their best miss count each take the closest cluster with room."""
    n, k = x.shape[0], mc.k
    best = np.empty(n, dtype=np.int64)
    best_d = np.empty(n, dtype=np.int32)
    rows = mc.default_rows()
    for lo in range(0, n, rows):
        dist = mc(x[lo:lo + rows])  # (m, K)
        best[lo:lo + rows] = dist.argmin(axis=1)  # ties: lowest cluster index
        best_d[lo:lo + rows] = dist.min(axis=1)
    order = np.argsort(best_d, kind="stable")  # ties: lowest row index
    labels = np.empty(n, dtype=np.int64)
    counts = [0] * k
    full = np.zeros(k, dtype=bool)
    best_list = best.tolist()
    for t in order.tolist():
        j = best_list[t]
        if counts[j] >= cap:  # overflow: closest cluster that still has room
            dist = mc(x[t:t + 1])[0]
            dist[full] = np.iinfo(np.int32).max
            j = int(dist.argmin())
        labels[t] = j
        counts[j] += 1
        if counts[j] == cap:
            full[j] = True
    return labels


def _update(x, labels, k, d, old: np.ndarray, t: int, quantile: float, running_average: bool,
            density: float | None = None) -> np.ndarray:
    """Member frequency (blended with the old centroid) binarised at its own quantile,
    or, with a density, cut to its n highest values (empty clusters: their own top n)."""
    sums, counts = kernels.bit_sums(x, labels, k)  # (k, 8B) int64, (k,) int64
    live = counts > 0
    values = sums[live, :d] / counts[live, None]  # (live, d) member frequency
    if running_average:
        prev = np.unpackbits(old[live], axis=1, count=d, bitorder="little")
        values = (t * prev + values) / (t + 1)
    if density is not None:
        scores = np.unpackbits(old, axis=1, bitorder="little").astype(np.float64)
        scores[live, :d] = values
        return top_bits_of(scores, density, d)
    thresholds = np.quantile(values, quantile, axis=1)  # (live,) linear interpolation
    bits = np.unpackbits(old, axis=1, bitorder="little")  # empty clusters keep theirs
    bits[live, :d] = values > thresholds[:, None]
    return np.packbits(bits, axis=1, bitorder="little")


def activation_aware(x: np.ndarray, k: int, d: int, seed: int = 0, max_iter: int = 20,
                     sparsity_floor: float = 0.4, capacity_factor: float = 1.0,
                     quantile: float = 0.4, order: str = "cluster", running_average: bool = True,
                     init_window: int = 100, density: float | None = None) -> BaselineResult:
    """Activation-aware clustering of arXiv 2507.14179 (see the module docstring).

    Args:
        x: (N, B) uint8 packed masks, ``B = ceil(d / 8)``.
        k: clusters, 1 <= k <= N.
        d: bits per mask.
        seed: seeds the initial-centroid draw.
        max_iter: assignment/update rounds at most.
        sparsity_floor: an initial centroid has at least this fraction of
            its d bits clear, in [0, 1).
        capacity_factor: a cluster takes at most
            ``ceil(capacity_factor * N / k)`` members; that times k must be
            >= N so every row is placed.
        quantile: per-centroid binarisation quantile in [0, 1): bit set iff
            its value exceeds the centroid's ``quantile`` of values.
        order: "cluster" (the artifact's assignment order) or "token".
        running_average: blend the member frequency with the previous
            centroid, weight t:1 at iteration t (the artifact), or not.
        init_window: rows searched after each sampled row for one that meets
            the sparsity floor.
        density: instead of the quantile, every centroid keeps exactly its
            ``round(density * d)`` highest values (the fixed-budget rule).
    Returns:
        BaselineResult; ``labels`` is the capacity-limited assignment from
        which the returned centroids were computed.
    """
    x, k, d = _check_masks(x, k, d)
    seed = _check_int(seed, "seed", 0)
    max_iter = _check_int(max_iter, "max_iter", 1)
    init_window = _check_int(init_window, "init_window", 0)
    if not 0 <= sparsity_floor < 1:
        raise ValueError(f"sparsity_floor must be in [0, 1), got {sparsity_floor}")
    if not 0 <= quantile < 1:
        raise ValueError(f"quantile must be in [0, 1), got {quantile}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    n = x.shape[0]
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    cap = math.ceil(capacity_factor * n / k)
    if cap * k < n:
        raise ValueError(f"capacity_factor={capacity_factor} gives {k} clusters of at most {cap} members, "
                         f"too few for {n} rows; use capacity_factor >= 1")
    x = np.ascontiguousarray(x)

    rng = np.random.default_rng(seed)
    centroids = _initial_centroids(x, k, d, rng, sparsity_floor, init_window)
    assign = _assign_by_cluster if order == "cluster" else _assign_by_token
    labels = None
    converged = False
    for t in range(1, max_iter + 1):
        new_labels = assign(x, MissCounter.from_packed(centroids), cap)
        centroids = _update(x, new_labels, k, d, centroids, t, quantile, running_average, density)
        converged = labels is not None and np.array_equal(labels, new_labels)
        labels = new_labels
        logger.debug("activation_aware: iteration %d, density %.4f", t,
                     kernels.popcount(centroids).mean() / d)
        if converged:
            break
    logger.info("activation_aware: N=%d k=%d d=%d cap=%d order=%s, %d iterations%s", n, k, d, cap,
                order, t, " (converged)" if converged else "")
    return _result(x, centroids, labels, k, t, converged, density)

