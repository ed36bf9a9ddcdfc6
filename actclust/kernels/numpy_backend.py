"""The numpy backend: AND + popcount on 64-bit words, blocked over rows and centroids.

Also the host-side kernels that have one implementation only: one-to-all
distances within a sample (the k-means init sampler) and the miss-count GEMM
(the activation-aware baseline).
"""
from __future__ import annotations

import numpy as np

from actclust.kernels.packed import _as_words, _to_numpy, bitcount, popcount


def assign(x, c, block_rows, device):
    """Hamming distance is the scored kernel's (p, q) = (1, 2) case plus |x|:
    |x| + |c| - 2 x.c, the same argmin (ties: lowest index)."""
    labels, best = scored(x, c, 1, 2, block_rows, device)
    return labels, (best + popcount(_to_numpy(x))).astype(np.int32)


def _word_dots(xb: np.ndarray, cwt: np.ndarray, acc_dtype) -> np.ndarray:
    """(m, W) uint64 rows vs (W, kc) uint64 centroid words -> (m, kc) dot products x.c
    (popcounts of AND)."""
    m, kc = xb.shape[0], cwt.shape[1]
    acc = np.zeros((m, kc), dtype=acc_dtype)
    tmp = np.empty((m, kc), dtype=np.uint64)
    cnt = np.empty((m, kc), dtype=np.uint8)
    for t in range(cwt.shape[0]):
        np.bitwise_and(xb[:, t, None], cwt[t][None, :], out=tmp)
        acc += bitcount(tmp, out=cnt)
    return acc



def scored(x, c, p, q, block_rows, device):
    """argmin_j (p |c_j| - q x.c_j) (ties: lowest j) and its value, as (N,) int64 each:
    AND + popcount over 64-bit words, (rows x centroids) tiles kept in cache."""
    xw, cw = _as_words(_to_numpy(x)), _as_words(_to_numpy(c))
    n, k, w = xw.shape[0], cw.shape[0], xw.shape[1]
    bias = p * popcount(_to_numpy(c)).astype(np.int64)  # (K,)
    cols = min(k, 4096)
    rows = block_rows or max(1, 65536 // cols)
    acc_dtype = np.uint16 if 64 * w < 2**16 else np.int32
    cwt = np.ascontiguousarray(cw.T)  # (W, K)
    labels = np.empty(n, dtype=np.int64)
    best = np.empty(n, dtype=np.int64)
    for lo in range(0, n, rows):
        xb = xw[lo:lo + rows]
        best_v = np.full(xb.shape[0], np.iinfo(np.int64).max, dtype=np.int64)
        best_i = np.zeros(xb.shape[0], dtype=np.int64)
        for c0 in range(0, k, cols):
            dots = _word_dots(xb, cwt[:, c0:c0 + cols], acc_dtype)
            scores = bias[c0:c0 + cols] - q * dots.astype(np.int64)  # (rows, cols)
            j = scores.argmin(axis=1)
            v = scores[np.arange(len(j)), j]
            better = v < best_v  # strict: earlier centroid blocks win ties
            best_v[better], best_i[better] = v[better], j[better] + c0
        labels[lo:lo + rows], best[lo:lo + rows] = best_i, best_v
    return labels, best


def bit_sums(x, labels, k, block_rows):
    """Per block: sort rows by label, sum the unpacked rows of each group.

    Unpacked 0/1 bytes are summed eight at a time as uint64 words (SWAR), each
    byte a counter; groups are cut into segments of at most 255 rows so no
    byte overflows, then segment sums are widened to int64 per cluster.
    """
    n, b = x.shape
    d = 8 * b
    sums = np.zeros((k, d), dtype=np.int64)
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    rows = block_rows or max(1, 2**24 // max(d, 1))
    for lo in range(0, n, rows):
        lab = labels[lo:lo + rows]
        order = np.argsort(lab, kind="stable")
        lab_sorted = lab[order]
        seg = _segments(lab_sorted, 255)
        bits = np.unpackbits(x[lo:lo + rows][order], axis=1, bitorder="little")  # (m, d) 0/1
        part = np.add.reduceat(bits.view(np.uint64), seg, axis=0).view(np.uint8)  # (S, d)
        seg_labels = lab_sorted[seg]
        groups = np.flatnonzero(np.r_[True, seg_labels[1:] != seg_labels[:-1]])
        if len(groups) < len(seg):  # some cluster spans several segments
            part = np.add.reduceat(part, groups, axis=0, dtype=np.int64)
        sums[seg_labels[groups]] += part
    return sums, counts


def _segments(sorted_labels: np.ndarray, max_len: int) -> np.ndarray:
    """Start offsets of runs of equal labels, runs cut to at most max_len rows."""
    m = len(sorted_labels)
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    ends = np.r_[starts[1:], m]
    nseg = -(-(ends - starts) // max_len)  # (G,) segments per run
    first = np.repeat(np.cumsum(nseg) - nseg, nseg)
    return np.repeat(starts, nseg) + max_len * (np.arange(nseg.sum()) - first)



class OneToAll:
    """One-to-all Hamming distances within a fixed set of packed rows (a sample).

    The rows' 64-bit words are stored transposed, (W, S), so a distance pass is
    W contiguous XOR + popcount + add sweeps (twice as fast as summing a (S, W)
    popcount array along its short axis).
    """

    def __init__(self, rows: np.ndarray):
        b = rows.shape[1]
        padded = np.zeros((rows.shape[0], -(-b // 8) * 8), dtype=np.uint8)
        padded[:, :b] = rows  # zero bytes do not change distances
        self.words_t = np.ascontiguousarray(padded.view(np.uint64).T)  # (W, S)
        self._tmp = np.empty(rows.shape[0], dtype=np.uint64)
        self._cnt = np.empty(rows.shape[0], dtype=np.uint8)

    def to(self, i: int) -> np.ndarray:
        """(S,) int64 distances of every row to row i."""
        acc = np.zeros(self.words_t.shape[1], dtype=np.int64)
        for words, word in zip(self.words_t, self.words_t[:, i]):
            np.bitwise_xor(words, word, out=self._tmp)
            acc += bitcount(self._tmp, out=self._cnt)
        return acc


# Elements (float32) of one unpacked row block: 64 MiB.
_BLOCK_ELEMS = 2**24


def unpack_float(x: np.ndarray, d: int | None = None) -> np.ndarray:
    """(m, B) packed -> (m, d or 8B) float32 0/1."""
    return np.unpackbits(x, axis=1, count=d, bitorder="little").astype(np.float32)


class MissCounter:
    """Miss counts ``|x| - x.c_j`` (bits set in x and clear in c_j) of packed rows
    against centroids unpacked once as a (D, K) float32 matrix.

    The GEMM is exact: every partial sum is an integer below 2**24.
    """

    def __init__(self, ct: np.ndarray):
        self.ct = ct  # (D, K) float32 0/1
        self.k = ct.shape[1]

    @classmethod
    def from_packed(cls, c: np.ndarray) -> "MissCounter":
        """From (K, B) uint8 packed centroids."""
        if not isinstance(c, np.ndarray) or c.ndim != 2 or c.dtype != np.uint8 or c.shape[0] < 1:
            raise ValueError(f"c must be a (K >= 1, B) numpy uint8 array, got {getattr(c, 'dtype', '')} "
                             f"{getattr(c, 'shape', type(c).__name__)}")
        if 8 * c.shape[1] >= 2**24:
            raise ValueError("masks of 2**24 bits or more are not exact in float32")
        return cls(np.ascontiguousarray(unpack_float(c).T))

    def columns(self, c0: int, c1: int) -> "MissCounter":
        """The counter of centroids c0..c1-1."""
        return MissCounter(np.ascontiguousarray(self.ct[:, c0:c1]))

    def default_rows(self) -> int:
        return max(1, _BLOCK_ELEMS // max(self.ct.shape[0], self.k))

    def __call__(self, xb: np.ndarray) -> np.ndarray:
        """(m, B) packed rows -> (m, K) int32 miss counts."""
        hits = unpack_float(xb) @ self.ct  # (m, K) float32, exact integers
        return popcount(xb)[:, None] - hits.astype(np.int32)
