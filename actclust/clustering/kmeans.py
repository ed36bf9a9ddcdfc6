"""Hamming k-means on packed bit masks, full-batch (Lloyd) or mini-batch.

The loop is written SPMD-ready, after faiss ``contrib/clustering.py``: it
never touches the data directly. Each worker runs :func:`fit` on its own shard
through a dataset (:class:`actclust.clustering.datasets.MaskDataset`), and every
number that crosses workers goes through one ``allreduce(array) -> array``
function that sums numpy int64 arrays over all workers (the identity for one process; a ``ray.util.collective`` allreduce in
the distributed driver). All randomness is drawn from generators seeded by
``(seed, layer, purpose, iteration)`` over the *global* row range, so the
result is bit-identical for any number of workers.

Algorithm (definitions in docs/method.md):

1. Shared sample: ``min(N, max(16 k, 4096))`` global row indices drawn with
   the seed; each worker fills in the rows it owns and one allreduce gives
   every worker the same (S, B) sample.
2. Init on the sample: greedy k-means++ under Hamming distance (which equals
   the squared Euclidean distance of 0/1 vectors, so points are drawn with
   probability proportional to their distance), or ``init="random"``: k
   distinct sample rows. If the sample holds fewer than k distinct masks the
   remaining centroids are duplicates drawn uniformly from the sample with the
   same generator (deterministic; duplicates then stay empty, see 4).
3. Iterate. Full batch: assign every row under the fit's rule (theta or
   density, :mod:`actclust.kernels.rules`), allreduce per-cluster bit sums,
   member counts and cost; new centroids from the rule (bit = member frequency
   >= theta, or the n most frequent bits), so a full-batch fit is a descent of
   its own cost.
   Mini-batch (``batch_size=b``): every worker draws the same ``b`` global
   indices (uniform, with replacement, from a generator seeded by seed, layer
   and iteration) and uses the rows it owns, so this mode too gives the same
   result for any number of workers; sums and counts accumulate over
   iterations (cumulative, like sklearn's MiniBatchKMeans counts) and
   centroids threshold the accumulated frequencies.
4. Empty clusters (zero members, accumulated in mini-batch), in increasing
   cluster index: the centroid becomes the shared-sample row farthest from
   its nearest non-empty centroid (ties: lowest sample index); the distances are
   then lowered by the distance to that new centroid, so two empty clusters
   never take the same row unless all remaining distances are 0 (fewer
   distinct masks than k: the cluster gets sample row 0's mask, a duplicate
   that stays empty).
5. Stop when the fraction of centroid bits that changed is <= tol, or after
   max_iter iterations. A final pass assigns every row; cost (mean Hamming
   distance) and sizes are global.

Example::

    res = fit(x, k=256, theta=0.5, seed=0)             # x: (N, B) uint8
    res.centroids, res.labels, res.cost
    res = fit(x, k=256, density=0.5, width=1536)       # 768 bits per centroid
"""
from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from actclust import kernels
from actclust.kernels.rules import AssignRule, valid_k
from actclust.clustering.datasets import ArrayDataset, MaskDataset
from actclust.clustering.seeding import (init_kmeanspp, init_random, reseed_empty, seeded_rng,
                                         shared_sample)

logger = logging.getLogger(__name__)

INITS = ("k-means++", "random")
STATE_FORMAT = 1
# Generator streams (the third seed word) so no two purposes share draws.
_INIT_SAMPLE, _INIT_CENTERS, _BATCH = 0, 1, 2


@dataclass
class KMeansResult:
    """Output of :func:`fit`.

    centroids: (k, B) uint8 packed centroids.
    labels: (n,) int64 nearest centroid of each local row.
    distances: (n,) int64 integer cost of each local row under the rule (the Hamming
        distance at theta = 0.5); times ``rule.cost_scale`` it is the cost in bits.
    cost: mean cost in bits over all rows of all workers, under the fit's rule
        (mean Hamming distance at theta = 0.5, mean miss count in density mode).
    sizes: (k,) int64 members per cluster over all workers.
    iterations: iterations run (resumed ones included).
    converged: True if the changed-bit fraction fell to tol.
    history: one dict per iteration: ``iteration``, ``cost`` (mean distance
        of the iteration's rows to the centroids they were assigned to) and
        ``changed`` (fraction of centroid bits that changed).
    """

    centroids: np.ndarray
    labels: np.ndarray
    distances: np.ndarray
    cost: float
    sizes: np.ndarray
    iterations: int
    converged: bool
    history: list = field(default_factory=list)
    rule: AssignRule = field(default_factory=AssignRule.hamming)


def local_allreduce(array: np.ndarray) -> np.ndarray:
    """The allreduce of a single process: a copy of its input."""
    return np.array(array, copy=True)


# --------------------------------------------------------------------------
# argument checks


def _check_args(k, seed, init, batch_size, max_iter, tol, rank, world_size, layer):
    if not valid_k(k):
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    for name, value in (("seed", seed), ("layer", layer), ("rank", rank), ("max_iter", max_iter)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if batch_size is not None and (not isinstance(batch_size, numbers.Integral) or batch_size < 1):
        raise ValueError(f"batch_size must be None (full batch) or an integer >= 1, got {batch_size!r}")
    if not isinstance(tol, numbers.Real) or tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if not isinstance(world_size, numbers.Integral) or world_size < 1 or rank >= world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")


def _global_offset(n_local: int, rank: int, world_size: int, allreduce) -> int:
    """Exclusive prefix sum of the workers' row counts, in rank order."""
    if world_size == 1:
        return 0
    counts = np.zeros(world_size, dtype=np.int64)
    counts[rank] = n_local
    counts = np.asarray(allreduce(counts), dtype=np.int64)
    return int(counts[:rank].sum())


def _global_shape(dataset, k: int, allreduce) -> int:
    """Total rows over all workers; checks B agrees and k <= N everywhere."""
    n, b = dataset.count(), dataset.row_bytes()
    tot = np.asarray(allreduce(np.array([n, b, b * b, 1], dtype=np.int64)), dtype=np.int64)
    n_total, workers = int(tot[0]), int(tot[3])
    if tot[1] * tot[1] != tot[2] * workers:  # all equal iff (sum b)^2 == W sum b^2
        raise ValueError("all workers' masks must have the same number of bytes per row")
    if b < 1:
        raise ValueError("masks must have at least one byte per row")
    if k > n_total:
        raise ValueError(f"k={k} exceeds the number of masks ({n_total}); lower k or add data")
    return n_total


def _changed_fraction(old: np.ndarray, new: np.ndarray) -> float:
    return float(kernels.popcount(old ^ new).sum(dtype=np.int64)) / (8.0 * old.size)


# --------------------------------------------------------------------------
# the loop


def fit(
    x: np.ndarray | None,
    k: int,
    theta: float | None = None,
    seed: int = 0,
    init: str = "k-means++",
    batch_size: int | None = None,
    max_iter: int = 50,
    tol: float = 1e-3,
    backend: str = "auto",
    dataset: MaskDataset | None = None,
    allreduce: Callable[[np.ndarray], np.ndarray] | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    progress: Callable[[int, float, float], None] | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    layer: int = 0,
    init_sample: int | None = None,
    density: float | None = None,
    width: int | None = None,
) -> KMeansResult:
    """Cluster packed masks into k centroids by k-means under a theta or density objective.

    Args:
        x: (n, B) uint8 packed masks of this worker, or None with ``dataset``.
        k: number of clusters, 1 <= k <= total rows.
        theta: theta mode, in (0, 1]: a miss costs 1 - theta, a false alarm
            theta; centroid bit = member frequency >= theta. None (and no
            density): 0.5, plain Hamming k-means.
        density: density mode instead, in (0, 1]: every centroid has exactly
            ``round(density * width)`` bits, the most frequent among its
            members; assignment maximises ``m . c``. At most one of theta and
            density.
        width: real bits per mask (d_ff); None: 8 B. Bits at positions
            >= width stay clear in every centroid.
        seed: seed of every random draw (with ``layer``).
        init: "k-means++" or "random".
        batch_size: None for full-batch Lloyd, else the global mini-batch size.
        max_iter: maximum iterations (0: init and final pass only).
        tol: stop when the fraction of changed centroid bits is <= tol.
        backend: hamming backend ("auto", "numpy", "torch", "cupy").
        dataset: a dataset object (:class:`~actclust.clustering.datasets.MaskDataset`) instead of x.
        allreduce: sums an int64 array over workers; None for one process.
        checkpoint: called with a state dict after every iteration.
        resume: a state dict from ``checkpoint`` to continue from; the result
            equals the uninterrupted run's bit for bit.
        progress: called as ``progress(iteration, cost, changed_fraction)``.
        rank, world_size: this worker's place (only used to find its
            global offset when ``x`` is given).
        layer: mixed into the seed so layers draw independent samples.
        init_sample: size S of the shared init sample (at least k, at most
            N); default ``max(16 k, 4096)``. k-means++ costs O(k S) distances.
    Returns:
        KMeansResult; labels and distances are for this worker's rows.
    """
    rule = AssignRule.from_args(theta=theta, density=density)
    _check_args(k, seed, init, batch_size, max_iter, tol, rank, world_size, layer)
    allreduce = allreduce or local_allreduce
    if (x is None) == (dataset is None):
        raise ValueError("give the masks either as x or as dataset (exactly one of them)")
    if dataset is None:
        x = np.asarray(x)
        dataset = ArrayDataset(x, 0)  # validates dtype and shape
        dataset.global_offset = _global_offset(dataset.count(), rank, world_size, allreduce)
    n_total = _global_shape(dataset, k, allreduce)
    width = 8 * dataset.row_bytes() if width is None else width
    if isinstance(width, bool) or not isinstance(width, numbers.Integral) \
            or not 0 < width <= 8 * dataset.row_bytes():
        raise ValueError(f"width must be an integer in [1, {8 * dataset.row_bytes()}], got {width!r}")
    kernels.resolve_backend(backend)  # fail early; "auto" stays "auto" (small calls go to numpy)
    size = min(n_total, max(init_sample or max(16 * k, 4096), k))
    sample = shared_sample(dataset, n_total, size, seeded_rng(seed, layer, _INIT_SAMPLE), allreduce)
    params = dict(k=int(k), theta=None if rule.theta is None else float(rule.theta),
                  seed=int(seed), layer=int(layer), init=init, batch_size=batch_size,
                  row_bytes=dataset.row_bytes(), n_total=n_total, init_sample=size)
    if rule.kind == "density" or width != 8 * dataset.row_bytes():
        params.update(density=rule.density, width=int(width))  # absent: older checkpoints match
    state = _start_state(params, sample, resume, rule, width)
    step = _Step(dataset, params, backend, allreduce, sample, tol, rule, width)
    while state["iteration"] < max_iter and not state["converged"]:
        state = step(state)
        if checkpoint is not None:
            checkpoint(_copy_state(state))
        last = state["history"][-1]
        if progress is not None:
            progress(last["iteration"], last["cost"], last["changed"])
        logger.debug("layer %d iteration %d: cost %.4f changed %.5f",
                     layer, last["iteration"], last["cost"], last["changed"])
    return _final_pass(dataset, state, int(k), n_total, backend, allreduce, rule)


def _start_state(params: dict, sample: np.ndarray, resume: dict | None, rule: AssignRule,
                 width: int) -> dict:
    """Initial state from the init rule, or a checked copy of ``resume``."""
    if resume is not None:
        if resume.get("format") != STATE_FORMAT:
            raise ValueError(f"resume state has format {resume.get('format')!r}, "
                             f"expected {STATE_FORMAT}")
        diff = {key: (resume["params"].get(key), value) for key, value in params.items()
                if resume["params"].get(key) != value}
        if diff:
            raise ValueError(f"resume state does not match this fit (state, now): {diff}")
        return _copy_state(resume)
    rng = seeded_rng(params["seed"], params["layer"], _INIT_CENTERS)
    k = params["k"]
    init = init_kmeanspp if params["init"] == "k-means++" else init_random
    picks = init(sample, k, rng)
    d_bits = 8 * params["row_bytes"]
    mini = params["batch_size"] is not None
    return {
        "format": STATE_FORMAT,
        "params": dict(params),
        "iteration": 0,
        "converged": False,
        "centroids": np.ascontiguousarray(rule.centroids_of_rows(sample[picks], width)),
        "sums": np.zeros((k, d_bits), dtype=np.int64) if mini else None,
        "counts": np.zeros(k, dtype=np.int64) if mini else None,
        "history": [],
    }


def _copy_state(state: dict) -> dict:
    out = dict(state)
    out["params"] = dict(state["params"])
    out["history"] = [dict(h) for h in state["history"]]
    for key in ("centroids", "sums", "counts"):
        if out.get(key) is not None:
            out[key] = np.array(out[key], copy=True)
    return out


class _Step:
    """One k-means iteration over a dataset; state in, new state out."""

    def __init__(self, dataset, params: dict, backend: str, allreduce, sample: np.ndarray, tol: float,
                 rule: AssignRule, width: int):
        self.dataset, self.params, self.backend = dataset, params, backend
        self.allreduce, self.sample, self.tol = allreduce, sample, tol
        self.k, self.rule, self.width = params["k"], rule, width

    def _reduce(self, sums, counts, cost_sum, n_rows):
        """One allreduce of [sums..., counts..., cost, rows] as int64."""
        flat = np.concatenate([sums.ravel(), counts, [cost_sum, n_rows]]).astype(np.int64)
        flat = np.asarray(self.allreduce(flat), dtype=np.int64)
        sums_out = flat[: sums.size].reshape(sums.shape)
        return sums_out, flat[sums.size:sums.size + self.k], int(flat[-2]), int(flat[-1])

    def __call__(self, state: dict) -> dict:
        it = state["iteration"]
        old = state["centroids"]
        if self.params["batch_size"] is None:
            sums, counts, cost = self.dataset.assign_stats(old, self.k, self.backend, self.rule)
            sums, counts, cost, rows = self._reduce(sums, counts, cost, self.dataset.count())
        else:
            rng = seeded_rng(self.params["seed"], self.params["layer"], _BATCH, it)
            sums, counts, cost, rows = self.dataset.batch_stats(
                rng, self.params["batch_size"], self.params["n_total"], old, self.k, self.backend,
                self.rule)
            sums, counts, cost, rows = self._reduce(sums, counts, cost, rows)
            sums, counts = state["sums"] + sums, state["counts"] + counts
        new = self.rule.centroids(sums, counts, self.width)
        empty = counts == 0
        if empty.any():
            new = reseed_empty(new, empty, self.sample, self.backend, self.rule, self.width)
        changed = _changed_fraction(old, new)
        out = dict(state)
        record = {"iteration": it + 1, "cost": cost * self.rule.cost_scale / max(rows, 1),
                  "changed": changed}
        out.update(iteration=it + 1, centroids=new, converged=changed <= self.tol,
                   history=state["history"] + [record])
        if self.params["batch_size"] is not None:
            out.update(sums=sums, counts=counts)
        return out


def _final_pass(dataset, state: dict, k: int, n_total: int, backend: str, allreduce,
                rule: AssignRule) -> KMeansResult:
    """Assign every row to the final centroids under the rule; global sizes and cost."""
    centroids = state["centroids"]
    labels, dists = dataset.assign(centroids, backend, rule)
    local = np.r_[np.bincount(labels, minlength=k), dists.sum(dtype=np.int64)].astype(np.int64)
    total = np.asarray(allreduce(local), dtype=np.int64)
    cost = float(total[k]) * rule.cost_scale / n_total
    logger.info("k-means: k=%d, %d iterations, converged=%s, cost %.4f",
                k, state["iteration"], state["converged"], cost)
    return KMeansResult(
        centroids=centroids, labels=labels, distances=dists, cost=cost, sizes=total[:k],
        iterations=state["iteration"], converged=bool(state["converged"]), history=state["history"],
        rule=rule,
    )
