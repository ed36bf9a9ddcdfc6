"""k-means seeding on the shared sample: the sample itself, the initial centroids
(k-means++ or random) and the re-seeding of empty clusters.

Every draw comes from :func:`seeded_rng` over global row indices, so every
worker computes the same sample and the same centroids.
"""
from __future__ import annotations

import logging

import numpy as np

from actclust import kernels

logger = logging.getLogger(__name__)


def seeded_rng(seed: int, layer: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, layer, *keys]))


def shared_sample(dataset, n_total: int, size: int, rng, allreduce) -> np.ndarray:
    """(S, B) uint8 rows at sorted global indices drawn by ``rng``, on every worker.

    Each worker writes the rows it owns into a zero buffer of int64 words (one
    extra word flags the rows written) and the allreduce sums them; the flag
    column checks that the shards tile the global range exactly.
    """
    idx = np.sort(rng.choice(n_total, size=size, replace=False))
    lo, n, b = dataset.global_offset, dataset.count(), dataset.row_bytes()
    mine = (idx >= lo) & (idx < lo + n)
    w = -(-b // 8)
    buf = np.zeros((size, 8 * (w + 1)), dtype=np.uint8)
    buf[mine, :b] = dataset.rows(idx[mine] - lo)
    words = buf.view(np.int64)  # (S, w + 1)
    words[mine, w] = 1
    total = np.ascontiguousarray(np.asarray(allreduce(words), dtype=np.int64))
    if not np.all(total[:, w] == 1):
        raise ValueError("worker shards overlap or leave gaps: check each dataset's global_offset")
    return np.ascontiguousarray(total.view(np.uint8)[:, :b])


def init_kmeanspp(sample: np.ndarray, k: int, rng) -> np.ndarray:
    """Greedy k-means++ under Hamming distance: (k,) int64 sample indices.

    Hamming distance of 0/1 vectors is their squared Euclidean distance, so
    candidates are drawn with probability proportional to the distance to the
    nearest chosen centroid. As in scikit-learn, each step draws
    ``2 + int(ln k)`` candidates and keeps the one that lowers the summed
    distance most (ties: first drawn).
    """
    dist = kernels.OneToAll(sample)
    n_trials = 2 + int(np.log(k))
    picks = [int(rng.integers(len(sample)))]
    dmin = dist.to(picks[0])
    for _ in range(1, k):
        total = int(dmin.sum())
        if total == 0:  # every sample row equals a chosen centroid
            pick = int(rng.integers(len(sample)))
            picks.append(pick)
            continue
        cands = np.searchsorted(np.cumsum(dmin), rng.random(n_trials) * total, side="right")
        cands = np.minimum(cands, len(sample) - 1)
        new_d = [np.minimum(dmin, dist.to(c)) for c in cands]
        best = int(np.argmin([d.sum() for d in new_d]))
        picks.append(int(cands[best]))
        dmin = new_d[best]
    return np.array(picks, dtype=np.int64)


def init_random(sample: np.ndarray, k: int, rng) -> np.ndarray:
    """k distinct sample rows (duplicates only if fewer distinct masks than k)."""
    _, first = np.unique(sample, axis=0, return_index=True)
    distinct = np.sort(first)
    if len(distinct) >= k:
        return rng.choice(distinct, size=k, replace=False)
    return np.r_[distinct, rng.choice(distinct, size=k - len(distinct))]


def reseed_empty(centroids: np.ndarray, empty: np.ndarray, sample: np.ndarray,
                 backend: str, rule=None, width: int | None = None) -> np.ndarray:
    """Give each empty cluster (the rule's centroid of) the sample row of highest cost
    under the current centroids.

    Args:
        centroids: (k, B) uint8, modified copy returned.
        empty: (k,) bool clusters to re-seed.
        sample: (S, B) uint8 shared sample (identical on every worker).
        rule: the fit's AssignRule (None: Hamming); width: real bits per mask.
    """
    from actclust.kernels.rules import AssignRule

    rule = rule or AssignRule.hamming()
    width = width or 8 * sample.shape[1]
    centroids = centroids.copy()
    _, cost = kernels.assign_scored(sample, centroids[~empty], rule, backend=backend)
    for j in np.flatnonzero(empty):
        p = int(np.argmax(cost))  # farthest; ties -> lowest sample index
        centroids[j] = rule.centroids_of_rows(sample[p:p + 1], width)[0]
        _, to_new = kernels.assign_scored(sample, centroids[j:j + 1], rule, backend="numpy")
        cost = np.minimum(cost, to_new)
    logger.debug("re-seeded %d empty clusters", int(empty.sum()))
    return centroids
