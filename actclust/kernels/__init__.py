"""Bit kernels on packed masks, behind one dispatch: every nearest-centroid,
distance, overlap and bit-sum computation of the library goes through here.

A packed mask set is a ``(N, B)`` uint8 array, ``B = ceil(d / 8)``, neuron
``i`` being bit ``i % 8`` (least significant first) of byte ``i // 8``, i.e.
``numpy.packbits(mask, axis=1, bitorder="little")``. Bits at positions ``>= d``
are zero. ``d_bits = 8 * B`` is the padded width.

Kernels are pure functions with the same signature on every backend:

- ``numpy``: AND + popcount on 64-bit words, blocked over rows and centroids.
- ``torch``: GEMM form ``|x| + |c| - 2 x.c`` on unpacked 0/1 matrices with the
  exact int8 GEMM ``torch._int_mm`` (int32 accumulation), or a float GEMM in
  chunks small enough to stay exact. Runs on CPU or, with ``device="cuda"``,
  on a GPU.
- ``cupy``: AND + ``__popcll`` in a CUDA kernel, centroids staged through
  shared memory.

Every backend returns the same labels and distances: ties go to the lowest
centroid index (the rule faiss uses). Inputs are host arrays (the ``cupy`` and
``torch`` backends also accept device arrays of their own library); outputs
are always numpy arrays.

``import actclust.hamming`` imports numpy only; torch and cupy are imported
when their backend is first used.

:func:`assign_scored` assigns under any clustering rule (:mod:`actclust.kernels.rules`:
theta-weighted or fixed-density centroids), one exact kernel for all of them:
the score ``p |c_j| - q x.c_j`` is a GEMM plus a per-centroid term.

Beyond :func:`assign` and :func:`bit_sums`, what the callers need lives here
too: :func:`assignment_stats` / :func:`stat_sums` (assignment plus overlap
counts, the clustering metrics), :func:`device_centroids` (assignment and
overlap of masks already on a torch device, under the same precision guard as
the torch GEMM), :class:`OneToAll` (one-to-all distances within a sample, the
k-means init) and :class:`MissCounter` (the activation-aware miss counts).

Example::

    labels, dist = assign(x, c)                     # fastest backend here
    labels, dist = assign(x, c, backend="numpy")
    sums, counts = bit_sums(x, labels, k=len(c))
    new_c = centroids_from_counts(sums, counts, theta=0.5, d=1536)
"""
from __future__ import annotations

import logging
from fractions import Fraction

import numpy as np

from actclust.kernels import cupy_backend, numpy_backend, torch_backend
from actclust.kernels.numpy_backend import MissCounter, OneToAll  # noqa: F401
from actclust.kernels.packed import (_check_packed, _is_device_array, _to_numpy,  # noqa: F401
                                     bitcount, distances_to, popcount)

logger = logging.getLogger(__name__)

BACKENDS = ("numpy", "torch", "cupy")
# theta is read as the nearest fraction with a denominator at most this.
THETA_DENOMINATOR = 10**6
# "auto" runs problems under this many 64-bit word comparisons (about a
# millisecond) with numpy: a GEMM launch and its thread wake-ups cost more.
_SMALL_WORK = 2**21


def available_backends() -> list[str]:
    """Backends that work on this machine, in the order ``"auto"`` prefers them."""
    found = []
    if cupy_backend.available():
        found.append("cupy")
    if torch_backend.available():
        found.append("torch")
    found.append("numpy")
    return found


def resolve_backend(name: str = "auto") -> str:
    """Map a backend name to a usable backend.

    ``"auto"`` picks cupy if a GPU works, else torch if ``torch._int_mm`` works
    on this CPU, else numpy. A named backend is returned if it works here.

    Raises:
        ValueError: unknown name, or the named backend is unusable here.
    """
    if name == "auto":
        if cupy_backend.available():
            return "cupy"
        if torch_backend.available() and torch_backend.int_mm_works("cpu"):
            return "torch"
        return "numpy"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")
    if name not in available_backends():
        why = {"torch": "torch is not installed",
               "cupy": "cupy is not installed or no CUDA device works"}[name]
        have = ", ".join(available_backends())
        raise ValueError(f"backend {name!r} is not available here ({why}); available: {have}")
    return name


# --------------------------------------------------------------------------
# assign



def _assignment_backend(x, c, backend: str, block_rows: int | None) -> str:
    """Check an assignment's arguments and pick its backend: small host-side work
    stays on numpy under ``auto`` (starting torch or cupy costs more than it saves)."""
    _check_pair(x, c)
    small = x.shape[0] * c.shape[0] * -(-x.shape[1] // 8) < _SMALL_WORK and not _is_device_array(x)
    if block_rows is not None and block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    return "numpy" if backend == "auto" and small else resolve_backend(backend)

def assign(x, c, backend: str = "auto", block_rows: int | None = None, device=None):
    """Nearest centroid of every row in Hamming distance.

    Args:
        x: (N, B) uint8 packed masks.
        c: (K, B) uint8 packed centroids, K >= 1.
        backend: "auto", "numpy", "torch" or "cupy". "auto" is
            :func:`resolve_backend`'s choice, except that small host problems
            (N * K * ceil(B/8) < 2**21) run on numpy, which answers sooner.
        block_rows: rows processed at once (bounds memory); None picks one.
        device: torch device (e.g. "cuda:0") for the torch backend, CUDA
            device id for cupy; None means the array's own device or CPU.
    Returns:
        labels: (N,) int64, index of the nearest centroid (ties: lowest index).
        distances: (N,) int32 Hamming distance to it.
    """
    backend = _assignment_backend(x, c, backend, block_rows)
    if x.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
    return _ASSIGN[backend](x, c, block_rows, device)


_ASSIGN = {"numpy": numpy_backend.assign, "torch": torch_backend.assign,
           "cupy": cupy_backend.assign}



# --------------------------------------------------------------------------
# assignment under a clustering rule (theta or density, see kernels.rules)


def as_rule(rule=None, theta=None, density=None):
    """An :class:`~actclust.kernels.rules.AssignRule` from a rule, its ``cluster.json``
    record, or theta / density."""
    from actclust.kernels.rules import AssignRule  # lazy: kernels.rules imports this package

    if isinstance(rule, AssignRule):
        if theta is not None or density is not None:
            raise ValueError("give a rule or theta/density, not both")
        return rule
    if isinstance(rule, dict):
        return AssignRule.from_json(rule)
    if rule is not None:
        raise ValueError(f"rule must be an AssignRule or its JSON record, got {type(rule).__name__}")
    return AssignRule.from_args(theta=theta, density=density)


def assign_scored(x, c, rule=None, *, theta=None, density=None, backend: str = "auto",
                  block_rows: int | None = None, device=None):
    """Assigned centroid of every row under a rule, and the row's integer cost.

    Args:
        x: (N, B) uint8 packed masks (numpy; cupy / torch arrays for their backend).
        c: (K, B) uint8 packed centroids, K >= 1.
        rule: an :class:`AssignRule` or its ``cluster.json`` record; or give
            ``theta=`` or ``density=`` instead (nothing: theta = 0.5, Hamming).
        backend, block_rows, device: as for :func:`assign`.
    Returns:
        labels: (N,) int64, ``argmin_j (p |c_j| - q x.c_j)``, ties to the lowest j.
        costs: (N,) int64, ``(q - p) |x| + min_j s_j``; times ``rule.cost_scale``
            it is the cost in bits (the Hamming distance at theta = 1/2, the miss
            count in density mode).
    """
    rule = as_rule(rule, theta, density)
    backend = _assignment_backend(x, c, backend, block_rows)
    if x.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    p, q = rule.weights
    labels, best = _SCORED[backend](x, c, p, q, block_rows, device)
    ones = popcount(_to_numpy(x)).astype(np.int64)
    return labels, (q - p) * ones + best


_SCORED = {"numpy": numpy_backend.scored, "torch": torch_backend.scored,
           "cupy": cupy_backend.scored}


# --------------------------------------------------------------------------
# per-cluster statistics and centroids


def bit_sums(x, labels, k: int, backend: str = "auto", block_rows: int | None = None, device=None):
    """Per-cluster count of set bits per neuron, and member counts.

    Rows are unpacked a block at a time, never all at once.

    Args:
        x: (N, B) uint8 packed masks.
        labels: (N,) integer cluster ids in [0, k).
        k: number of clusters.
        backend, block_rows, device: as for :func:`assign`. The torch backend
            on CPU uses the numpy kernel (the results are integers either way).
    Returns:
        sums: (k, 8*B) int64, ``sums[j, i]`` = members of j with bit i set.
        counts: (k,) int64 members per cluster.
    """
    _check_packed(x, "x")
    backend = resolve_backend(backend)
    labels_np = _to_numpy(labels)
    if labels_np.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {labels_np.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    labels_np = labels_np.astype(np.int64, copy=False)
    if labels_np.size and (labels_np.min() < 0 or labels_np.max() >= k):
        raise ValueError(f"labels must lie in [0, {k})")
    if backend == "cupy":
        return cupy_backend.bit_sums(x, labels_np, k, block_rows, device)
    if backend == "torch" and torch_backend.torch_device(x, device).type != "cpu":
        return torch_backend.bit_sums(x, labels_np, k, block_rows, device)
    return numpy_backend.bit_sums(_to_numpy(x), labels_np, k, block_rows)



def theta_fraction(theta: float) -> Fraction:
    """theta as the exact ratio used by :func:`centroids_from_counts`.

    The nearest fraction with denominator <= ``THETA_DENOMINATOR`` (0.3 is
    read as 3/10, so ``sums == 0.3 * counts`` sets the bit).
    """
    if not 0 < theta <= 1:
        raise ValueError(f"theta must be in (0, 1], got {theta}")
    return Fraction(theta).limit_denominator(THETA_DENOMINATOR)


def centroids_from_counts(sums, counts, theta: float, d: int | None = None) -> np.ndarray:
    """Threshold per-cluster bit frequencies into packed centroids.

    Bit i of centroid j is set iff ``sums[j, i] >= theta * counts[j]``, compared
    exactly in integers (see :func:`theta_fraction`). Clusters with
    ``counts[j] == 0`` get an all-zero centroid (the caller re-seeds them).

    Args:
        sums: (k, d_bits) integer bit counts (d_bits = 8 * B).
        counts: (k,) integer member counts.
        theta: threshold fraction in (0, 1].
        d: number of real bits; positions >= d are zero. None: all d_bits.
    Returns:
        (k, ceil(d_bits / 8)) uint8 packed centroids.
    """
    sums = np.asarray(sums, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    if sums.ndim != 2 or counts.shape != (sums.shape[0],):
        raise ValueError(f"need sums (k, d_bits) and counts (k,), got {sums.shape} and {counts.shape}")
    frac = theta_fraction(theta)
    bits = sums * frac.denominator >= counts[:, None] * frac.numerator
    bits &= (counts > 0)[:, None]
    if d is not None:
        bits[:, d:] = False
    return np.packbits(bits, axis=1, bitorder="little")


# --------------------------------------------------------------------------
# assignment with overlap counts (the clustering metrics)

# Per-layer integer sums: tokens, |m|, |c|, Hamming d, |m AND c|.
STAT_FIELDS = ("tokens", "true_bits", "centroid_bits", "hamming", "overlap")


def stat_sums(true_bits, centroid_bits, overlap) -> np.ndarray:
    """STAT_FIELDS sums from per-row |m|, |c| of the assigned centroid and |m AND c|.

    Inputs are (N,) integer arrays (numpy, or torch tensors on any device);
    the sums come back to the host as one (5,) int64 array.
    """
    t, c, o = (_to_numpy(v).astype(np.int64, copy=False) for v in (true_bits, centroid_bits,
                                                                      overlap))
    return np.array([len(t), t.sum(), c.sum(), (t + c - 2 * o).sum(), o.sum()], dtype=np.int64)


def assignment_stats(bits, centroids, backend: str = "auto", rule=None) -> np.ndarray:
    """STAT_FIELDS sums for packed masks (N, B) against packed centroids (K, B), each mask
    assigned under ``rule`` (an AssignRule or its cluster.json record; None: Hamming)."""
    labels, _ = assign_scored(bits, centroids, rule, backend=backend)
    true_bits = popcount(bits).astype(np.int64)
    cent_bits = popcount(centroids).astype(np.int64)[labels]
    overlap = popcount(np.bitwise_and(_to_numpy(bits), _to_numpy(centroids)[labels])).astype(np.int64)
    return stat_sums(true_bits, cent_bits, overlap)


def device_centroids(packed: np.ndarray, width: int, device="cpu", rule=None):
    """Centroids unpacked once onto a torch ``device``, for masks that live there
    (the evaluation hooks), assigning under ``rule`` (an AssignRule or its
    cluster.json record; None: Hamming): see :class:`torch_backend.UnpackedCentroids`."""
    weights = (1, 2) if rule is None else as_rule(rule).weights
    return torch_backend.UnpackedCentroids(packed, width, device, weights)


def _check_pair(x, c):
    _check_packed(x, "x")
    _check_packed(c, "c")
    if x.shape[1] != c.shape[1]:
        raise ValueError(f"x and c must have the same bytes per row, got {x.shape[1]} and {c.shape[1]}")
    if c.shape[0] < 1:
        raise ValueError("c must hold at least one centroid")
