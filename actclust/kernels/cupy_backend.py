"""The cupy backend: AND + ``__popcll`` in a CUDA kernel, centroids staged through
shared memory, and per-cluster bit sums by sorted cumulative sums on the GPU."""
from __future__ import annotations

import functools
import logging

import numpy as np

from actclust.kernels.packed import _as_words, _to_numpy, popcount

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False
        return int(cupy.arange(3).sum()) == 3
    except Exception as err:  # noqa: BLE001 - no cupy, no driver, no device
        logger.debug("cupy unusable: %s", err)
        return False



_CUPY_THREADS = 256
_CUPY_SHARED_BYTES = 48 * 1024


def _words(cupy, a):
    """(N, B) uint8 host or device array -> (N, W) uint64 device array."""
    return _as_words(cupy.asarray(a), cupy)


def assign(x, c, block_rows, device):
    """Hamming distance is the scored kernel's (p, q) = (1, 2) case plus |x|:
    |x| + |c| - 2 x.c, the same argmin (ties: lowest index)."""
    labels, best = scored(x, c, 1, 2, block_rows, device)
    return labels, (best + popcount(_to_numpy(x))).astype(np.int32)


_CUPY_SCORED = r"""
extern "C" __global__
void scored_nearest(const unsigned long long* __restrict__ x,
                    const unsigned long long* __restrict__ c,
                    const long long* __restrict__ bias, const long long q,
                    const long long n, const int k, const int w, const int tile,
                    long long* __restrict__ labels, long long* __restrict__ best_out) {
    // One thread per row; score_j = bias_j - q * popcount(x & c_j), lowest j on ties.
    extern __shared__ unsigned long long sc[];
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long* xi = x + (i < n ? i : 0) * (long long)w;
    long long best = 0x7fffffffffffffffLL;
    long long arg = 0;
    const int step = tile > 0 ? tile : k;
    for (int j0 = 0; j0 < k; j0 += step) {
        const int nt = min(step, k - j0);
        const unsigned long long* cb = c + (long long)j0 * w;
        if (tile > 0) {
            __syncthreads();
            for (int t = threadIdx.x; t < nt * w; t += blockDim.x) sc[t] = cb[t];
            __syncthreads();
            cb = sc;
        }
        if (i < n) {
            for (int j = 0; j < nt; ++j) {
                const unsigned long long* cj = cb + (long long)j * w;
                long long dot = 0;
                for (int t = 0; t < w; ++t) dot += __popcll(xi[t] & cj[t]);
                const long long s = bias[j0 + j] - q * dot;
                if (s < best) { best = s; arg = j0 + j; }  // strict: lowest index wins
            }
        }
    }
    if (i < n) { labels[i] = arg; best_out[i] = best; }
}
"""


@functools.lru_cache(maxsize=None)
def _cupy_scored_kernel():
    import cupy

    return cupy.RawKernel(_CUPY_SCORED, "scored_nearest")


def scored(x, c, p, q, block_rows, device):
    """argmin_j (p |c_j| - q x.c_j) (ties: lowest j) and its value: AND + __popcll."""
    import cupy

    with cupy.cuda.Device(device if device is not None else cupy.cuda.runtime.getDevice()):
        cw = _words(cupy, c)
        k, w = cw.shape
        bias = cupy.asarray(p * popcount(_to_numpy(c)).astype(np.int64))
        tile = min(k, _CUPY_SHARED_BYTES // (8 * w))
        n = x.shape[0]
        rows = block_rows or 2**22
        labels = np.empty(n, dtype=np.int64)
        best = np.empty(n, dtype=np.int64)
        for lo in range(0, n, rows):
            xw = _words(cupy, x[lo:lo + rows])
            m = xw.shape[0]
            lab = cupy.empty(m, dtype=cupy.int64)
            val = cupy.empty(m, dtype=cupy.int64)
            grid = (-(-m // _CUPY_THREADS),)
            _cupy_scored_kernel()(grid, (_CUPY_THREADS,),
                                  (xw, cw, bias, np.int64(q), np.int64(m), np.int32(k),
                                   np.int32(w), np.int32(tile), lab, val),
                                  shared_mem=8 * w * tile)
            labels[lo:lo + m] = cupy.asnumpy(lab)
            best[lo:lo + m] = cupy.asnumpy(val)
    return labels, best


def bit_sums(x, labels, k, block_rows, device):
    """Sorted cumulative sums on the GPU: group sum = cumsum[end] - cumsum[start]."""
    import cupy

    with cupy.cuda.Device(device if device is not None else cupy.cuda.runtime.getDevice()):
        n, b = x.shape
        d = 8 * b
        sums = cupy.zeros((k, d), dtype=cupy.int64)
        shifts = cupy.arange(8, dtype=cupy.uint8)
        rows = block_rows or max(1, 2**24 // max(d, 1))
        for lo in range(0, n, rows):
            lab = cupy.asarray(labels[lo:lo + rows])
            order = cupy.argsort(lab)  # group order only; sums do not depend on it
            lab_sorted = lab[order]
            xb = cupy.asarray(x[lo:lo + rows])[order]
            bits = ((xb[:, :, None] >> shifts) & 1).reshape(xb.shape[0], d)
            csum = cupy.cumsum(bits, axis=0, dtype=cupy.int64)
            csum = cupy.concatenate([cupy.zeros((1, d), cupy.int64), csum])  # (m + 1, d)
            starts = cupy.concatenate([cupy.ones(1, bool), lab_sorted[1:] != lab_sorted[:-1]])
            bounds = cupy.flatnonzero(starts)
            ends = cupy.concatenate([bounds[1:], cupy.asarray([xb.shape[0]])])
            sums[lab_sorted[bounds]] += csum[ends] - csum[bounds]
        return cupy.asnumpy(sums), np.bincount(labels, minlength=k).astype(np.int64)

