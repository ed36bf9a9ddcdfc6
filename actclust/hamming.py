"""Hamming-distance kernels on packed bit masks.

A packed mask set is a ``(N, B)`` uint8 array, ``B = ceil(d / 8)``, neuron
``i`` being bit ``i % 8`` (least significant first) of byte ``i // 8``, i.e.
``numpy.packbits(mask, axis=1, bitorder="little")``. Bits at positions ``>= d``
are zero. ``d_bits = 8 * B`` is the padded width.

Kernels are pure functions with the same signature on every backend:

- ``numpy``: XOR + popcount on 64-bit words, blocked over rows and centroids.
- ``torch``: GEMM form ``|x| + |c| - 2 x.c`` on unpacked 0/1 matrices with the
  exact int8 GEMM ``torch._int_mm`` (int32 accumulation), or a float GEMM in
  chunks small enough to stay exact. Runs on CPU or, with ``device="cuda"``,
  on a GPU.
- ``cupy``: XOR + ``__popcll`` in a CUDA kernel, centroids staged through
  shared memory.

Every backend returns the same labels and distances: ties go to the lowest
centroid index (the rule faiss uses). Inputs are host arrays (the ``cupy`` and
``torch`` backends also accept device arrays of their own library); outputs
are always numpy arrays.

``import actclust.hamming`` imports numpy only; torch and cupy are imported
when their backend is first used.

Example::

    labels, dist = assign(x, c)                     # fastest backend here
    labels, dist = assign(x, c, backend="numpy")
    sums, counts = bit_sums(x, labels, k=len(c))
    new_c = centroids_from_counts(sums, counts, theta=0.5, d=1536)
"""
from __future__ import annotations

import functools
import logging
from fractions import Fraction

import numpy as np

logger = logging.getLogger(__name__)

BACKENDS = ("numpy", "torch", "cupy")
# theta is read as the nearest fraction with a denominator at most this.
THETA_DENOMINATOR = 10**6
# Float32 GEMM is exact on integers below 2**24; the GEMM multiplies by -2,
# so keep each reduction chunk at 2**22 bits (|partial| <= 2**23).
_FLOAT_CHUNK_BITS = 2**22
# Padded centroid columns get this norm so they never win the argmin.
_SENTINEL = 2**30
# "auto" runs problems under this many 64-bit word comparisons (about a
# millisecond) with numpy: a GEMM launch and its thread wake-ups cost more.
_SMALL_WORK = 2**21
_HAS_BITWISE_COUNT = hasattr(np, "bitwise_count")
_BYTE_POPCOUNT = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)


# --------------------------------------------------------------------------
# shared helpers


def _check_packed(x, name: str):
    """Check that ``x`` is a 2-D uint8 array-like (numpy, cupy or torch)."""
    if getattr(x, "ndim", None) != 2:
        shape = getattr(x, "shape", None)
        raise ValueError(f"{name} must be a 2-D (rows, bytes) uint8 array, got shape {shape}")
    if str(x.dtype) not in ("uint8", "torch.uint8"):
        raise ValueError(f"{name} must have dtype uint8 (packed bits), got {x.dtype}")
    return x


def _check_pair(x, c):
    _check_packed(x, "x")
    _check_packed(c, "c")
    if x.shape[1] != c.shape[1]:
        raise ValueError(f"x and c must have the same bytes per row, got {x.shape[1]} and {c.shape[1]}")
    if c.shape[0] < 1:
        raise ValueError("c must hold at least one centroid")


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _is_cupy(x) -> bool:
    return type(x).__module__.startswith("cupy")


def _to_numpy(a) -> np.ndarray:
    """numpy view or copy of a numpy, cupy or torch array."""
    if _is_cupy(a):
        return a.get()
    return a.cpu().numpy() if _is_torch(a) else np.asarray(a)


def _is_device_array(x) -> bool:
    return _is_cupy(x) or (_is_torch(x) and x.device.type != "cpu")


def _as_words(x, xp=np):
    """(N, B) uint8 -> (N, ceil(B/8)) uint64, zero-padded, C-contiguous (numpy or cupy ``xp``)."""
    n, b = x.shape
    w = -(-b // 8)
    if b != 8 * w or not x.flags.c_contiguous:
        padded = xp.zeros((n, 8 * w), dtype=xp.uint8)
        padded[:, :b] = x
        x = padded
    return x.view(xp.uint64)


def bitcount(words: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Per-element popcount of a uint64 array -> uint8 array of the same shape.

    ``numpy.bitwise_count`` (numpy >= 2), else a byte lookup table.
    """
    if _HAS_BITWISE_COUNT:
        return np.bitwise_count(words, out=out)
    counts = _BYTE_POPCOUNT[words.view(np.uint8)].reshape(*words.shape, 8).sum(axis=-1, dtype=np.uint8)
    if out is None:
        return counts
    out[...] = counts
    return out


def popcount(x) -> np.ndarray:
    """Number of set bits per row.

    Args:
        x: (N, B) uint8 packed masks.
    Returns:
        (N,) int32.
    """
    x = _check_packed(np.asarray(x), "x")
    return bitcount(_as_words(x)).sum(axis=1, dtype=np.int32)


def distances_to(x, y) -> np.ndarray:
    """Hamming distance of every row of ``x`` to the single mask ``y``.

    Args:
        x: (N, B) uint8 packed masks (no copy is made when B % 8 == 0).
        y: (B,) uint8 packed mask.
    Returns:
        (N,) int32.
    """
    x = _check_packed(np.asarray(x), "x")
    y = np.asarray(y, dtype=np.uint8).reshape(1, -1)
    if y.shape[1] != x.shape[1]:
        raise ValueError(f"y must have {x.shape[1]} bytes, got {y.shape[1]}")
    return bitcount(_as_words(x) ^ _as_words(y)).sum(axis=1, dtype=np.int32)


# --------------------------------------------------------------------------
# backend discovery


@functools.lru_cache(maxsize=None)
def _torch_int_mm_works(device: str = "cpu") -> bool:
    """True if ``torch._int_mm`` runs and is exact on ``device``."""
    try:
        import torch

        rng = np.random.default_rng(0)
        a = rng.integers(0, 2, (32, 64), dtype=np.int8)
        b = rng.integers(0, 2, (64, 16), dtype=np.int8)
        a_dtype = torch.uint8 if device == "cpu" else torch.int8
        got = torch._int_mm(torch.from_numpy(a).to(device, a_dtype), torch.from_numpy(b).to(device))
        return bool(np.array_equal(got.cpu().numpy(), a.astype(np.int32) @ b.astype(np.int32)))
    except Exception as err:  # noqa: BLE001 - any failure means "not usable"
        logger.debug("torch._int_mm unusable on %s: %s", device, err)
        return False


@functools.lru_cache(maxsize=None)
def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _cupy_available() -> bool:
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False
        return int(cupy.arange(3).sum()) == 3
    except Exception as err:  # noqa: BLE001 - no cupy, no driver, no device
        logger.debug("cupy unusable: %s", err)
        return False


def available_backends() -> list[str]:
    """Backends that work on this machine, in the order ``"auto"`` prefers them."""
    found = []
    if _cupy_available():
        found.append("cupy")
    if _torch_available():
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
        if _cupy_available():
            return "cupy"
        if _torch_available() and _torch_int_mm_works("cpu"):
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
    _check_pair(x, c)
    small = x.shape[0] * c.shape[0] * -(-x.shape[1] // 8) < _SMALL_WORK and not _is_device_array(x)
    backend = "numpy" if backend == "auto" and small else resolve_backend(backend)
    if block_rows is not None and block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    if x.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
    return _ASSIGN[backend](x, c, block_rows, device)


def _assign_numpy(x, c, block_rows, device):
    """XOR + popcount over 64-bit words; blocks of rows x centroids."""
    xw, cw = _as_words(_to_numpy(x)), _as_words(_to_numpy(c))
    n, k, w = xw.shape[0], cw.shape[0], xw.shape[1]
    cols = min(k, 4096)
    rows = block_rows or max(1, 65536 // cols)  # a (rows, cols) tile stays in cache
    acc_dtype = np.uint16 if 64 * w < 2**16 else np.int32
    cwt = np.ascontiguousarray(cw.T)  # (W, K): one word of every centroid
    labels = np.empty(n, dtype=np.int64)
    dists = np.empty(n, dtype=np.int32)
    for lo in range(0, n, rows):
        xb = xw[lo:lo + rows]
        best_d = np.full(xb.shape[0], np.iinfo(np.int32).max, dtype=np.int32)
        best_i = np.zeros(xb.shape[0], dtype=np.int64)
        for c0 in range(0, k, cols):
            d = _word_distances(xb, cwt[:, c0:c0 + cols], acc_dtype)  # (rows, cols)
            j = d.argmin(axis=1)
            v = d[np.arange(d.shape[0]), j].astype(np.int32)
            better = v < best_d  # strict: earlier centroid blocks win ties
            best_d[better], best_i[better] = v[better], j[better] + c0
        labels[lo:lo + rows], dists[lo:lo + rows] = best_i, best_d
    return labels, dists


def _word_distances(xb: np.ndarray, cwt: np.ndarray, acc_dtype) -> np.ndarray:
    """(m, W) uint64 rows vs (W, kc) uint64 centroid words -> (m, kc) distances."""
    m, kc = xb.shape[0], cwt.shape[1]
    acc = np.zeros((m, kc), dtype=acc_dtype)
    tmp = np.empty((m, kc), dtype=np.uint64)
    cnt = np.empty((m, kc), dtype=np.uint8)
    for t in range(cwt.shape[0]):
        np.bitwise_xor(xb[:, t, None], cwt[t][None, :], out=tmp)
        acc += bitcount(tmp, out=cnt)
    return acc


def _assign_torch(x, c, block_rows, device):
    """GEMM form on unpacked bits: argmin_j (|c_j| - 2 x.c_j), then + |x|."""
    dev = _torch_device(x, device)
    n = x.shape[0]
    gemm = _TorchGemm(_to_numpy(c), dev)
    rows = min(n, block_rows or gemm.default_rows())
    buf = gemm.scratch(rows)
    labels = np.empty(n, dtype=np.int64)
    dists = np.empty(n, dtype=np.int32)
    for lo in range(0, n, rows):
        xb = x[lo:lo + rows]
        val, idx = gemm.nearest(xb, buf)  # (m,) int32 |c|-2x.c and int64 index
        labels[lo:lo + rows] = idx
        dists[lo:lo + rows] = val + popcount(_to_numpy(xb))
    return labels, dists


def _torch_device(x, device):
    import torch

    if device is not None:
        return torch.device(device)
    return x.device if _is_torch(x) else torch.device("cpu")


class _TorchGemm:
    """Unpacked centroids, prepared once per call, for the torch GEMM form.

    The score of a row x against centroid j is ``s_j = |c_j| - 2 x.c_j``:
    ``d(x, c_j) = |x| + s_j``, so the argmin of s is the nearest centroid.
    Centroids are split into chunks of at most ``_CHUNK_BYTES`` unpacked
    bytes, each a (D + E, kc) matrix, kc a multiple of 8. Rows 0..D-1 hold
    ``-2 * bits(c_j)``. With the int8 GEMM, E "bias" rows hold int8 pieces
    summing to ``|c_j|`` and every unpacked x row ends in E ones, so the GEMM
    yields s directly; padded centroid columns score above any real one.
    The float fallback (``int_mm=False``, or no working ``torch._int_mm``)
    has no bias rows and adds ``|c|`` after the GEMM.
    """

    _CHUNK_BYTES = 2**28

    def __init__(self, c: np.ndarray, dev, int_mm: bool | None = None, chunk_bytes: int | None = None):
        self.dev = dev
        self.cuda = dev.type == "cuda"
        if int_mm is None:  # probe once per device
            int_mm = _torch_int_mm_works(str(dev) if self.cuda else "cpu")
        self.int_mm = int_mm
        self.k, self.b = c.shape
        self.d = 8 * self.b
        # CUDA's _int_mm wants k > 16 and multiples of 8; pad the bit axis.
        self.d_pad = max(self.d, 32) if self.cuda else self.d
        self.bias = 8 * -(-(self.d_pad // 127 + 1) // 8) if int_mm else 0  # E, 127 E > D
        # Packed bytes appended to every x row: zero padding, then E ones.
        self.tail = np.r_[np.zeros((self.d_pad - self.d) // 8, np.uint8),
                          np.full(self.bias // 8, 255, np.uint8)]
        self._packed = None  # (rows, B + tail) scratch for unpack()
        self.float_dtype = self._float_dtype()
        kc = max(8, ((chunk_bytes or self._CHUNK_BYTES) // (self.d_pad + self.bias)) // 8 * 8)
        self.chunks = [self._chunk(c0, c[c0:c0 + kc]) for c0 in range(0, self.k, kc)]

    def _chunk(self, c0: int, part: np.ndarray):
        """(c0, (D + E, kc) matrix, (kc,) int32 norms or None) for centroids part."""
        import torch

        n, cols = part.shape[0], -(-part.shape[0] // 8) * 8
        norm = np.full(cols, _SENTINEL, dtype=np.int64)
        norm[:n] = popcount(part)
        mat = np.zeros((self.d_pad + self.bias, cols), dtype=np.int8)
        mat[: self.d, :n] = np.unpackbits(part, axis=1, bitorder="little").T * np.int8(-2)
        if self.int_mm:
            norm[n:] = 127 * self.bias  # padded columns: above any real score
            pieces = norm[None, :] - 127 * np.arange(self.bias)[:, None]
            mat[self.d_pad:] = np.clip(pieces, 0, 127)  # (E, kc), sums to norm
            return c0, torch.from_numpy(mat).to(self.dev), None
        mat_t = torch.from_numpy(mat).to(self.dev, self.float_dtype)
        return c0, mat_t, torch.from_numpy(norm.astype(np.int32)).to(self.dev)

    def _float_dtype(self):
        import torch

        # Reduced-precision float32 matmul (TF32, bf16 passes) is inexact.
        relaxed = torch.get_float32_matmul_precision() != "highest"
        if self.cuda:
            relaxed = relaxed or torch.backends.cuda.matmul.allow_tf32
        return torch.float64 if relaxed else torch.float32

    def default_rows(self) -> int:
        """Rows per block: a (rows, kc) int32 output tile of about 4 MiB."""
        kc = self.chunks[0][1].shape[1]
        return int(max(64, min(8192, 2**20 // kc, 2**23 // self.d_pad)))

    def unpack(self, xb):
        """(m, B) uint8 packed -> (m, D + E) 0/1 tensor: uint8 on CPU, int8 on CUDA."""
        import torch

        if not self.cuda and not _is_torch(xb):
            m = xb.shape[0]
            if len(self.tail):  # write into a reused packed buffer whose tail is preset
                if self._packed is None or len(self._packed) < m:
                    self._packed = np.empty((m, self.b + len(self.tail)), dtype=np.uint8)
                    self._packed[:, self.b:] = self.tail
                self._packed[:m, : self.b] = xb
                xb = self._packed[:m]
            return torch.from_numpy(np.unpackbits(xb, axis=1, bitorder="little"))
        t = (xb if _is_torch(xb) else torch.from_numpy(np.ascontiguousarray(xb))).to(self.dev)
        if len(self.tail):
            tail = torch.from_numpy(self.tail).to(self.dev).expand(t.shape[0], -1)
            t = torch.cat([t, tail], dim=1)
        shifts = torch.arange(8, dtype=torch.uint8, device=self.dev)
        bits = ((t.unsqueeze(-1) >> shifts) & 1).reshape(t.shape[0], -1)
        return bits.to(torch.int8) if self.cuda else bits

    def _scores(self, bits, mat, norm, buf):
        """(m, D + E) bits x (D + E, kc) -> (m, kc) int32 |c| - 2 x.c, written to buf."""
        import torch

        m, kc = bits.shape[0], mat.shape[1]
        out = buf.view(-1)[: m * kc].view(m, kc)  # contiguous, as _int_mm's out= needs
        if self.int_mm:
            if self.cuda and m <= 16:  # CUDA _int_mm needs more than 16 rows
                padded = torch.nn.functional.pad(bits, (0, 0, 0, 17 - m))
                out.copy_(torch._int_mm(padded, mat)[:m])
            else:
                torch._int_mm(bits, mat, out=out)
            return out
        out.zero_()
        for d0 in range(0, self.d_pad, _FLOAT_CHUNK_BITS):
            part = bits[:, d0:d0 + _FLOAT_CHUNK_BITS].to(mat.dtype) @ mat[d0:d0 + _FLOAT_CHUNK_BITS]
            out += part.to(torch.int32)
        return out.add_(norm)

    def nearest(self, xb, buf):
        """Best (|c| - 2 x.c) value and lowest index per row of a packed block.

        ``buf`` is a reusable (rows, kc) int32 scratch tensor: reusing it
        avoids page-faulting a fresh multi-MiB output for every block.
        Returns (m,) int32 values and (m,) int64 indices as numpy arrays.
        """
        bits = self.unpack(xb)
        best_v = best_i = None
        for c0, mat, norm in self.chunks:
            v, i = self._row_min(self._scores(bits, mat, norm, buf))
            i += c0
            if best_v is None:
                best_v, best_i = v, i
            else:
                better = v < best_v  # strict: earlier chunks win ties
                best_v, best_i = np.where(better, v, best_v), np.where(better, i, best_i)
        return best_v, best_i

    def _row_min(self, scores):
        """(m, kc) int32 tensor -> per-row min and its first index, as numpy."""
        if self.cuda:
            v, i = scores.min(dim=1)  # first index on ties
            return v.cpu().numpy(), i.cpu().numpy()
        s = scores.numpy()  # a view; numpy's SIMD argmin beats torch.min here
        i = s.argmin(axis=1)  # first index on ties
        return s[np.arange(len(i)), i], i

    def scratch(self, rows: int):
        """A (rows, kc) int32 output buffer for :meth:`nearest`."""
        import torch

        kc = self.chunks[0][1].shape[1]
        return torch.empty((rows, kc), dtype=torch.int32, device=self.dev)


_CUPY_KERNEL = r"""
extern "C" __global__
void hamming_nearest(const unsigned long long* __restrict__ x,
                     const unsigned long long* __restrict__ c,
                     const long long n, const int k, const int w, const int tile,
                     long long* __restrict__ labels, int* __restrict__ dists) {
    // One thread per row; centroids staged through shared memory in tiles of
    // `tile` centroids (tile == 0: read them from global memory).
    extern __shared__ unsigned long long sc[];
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long* xi = x + (i < n ? i : 0) * (long long)w;
    int best = 0x7fffffff;
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
                int dsum = 0;
                for (int t = 0; t < w; ++t) dsum += __popcll(xi[t] ^ cj[t]);
                if (dsum < best) { best = dsum; arg = j0 + j; }  // strict: lowest index wins
            }
        }
    }
    if (i < n) { labels[i] = arg; dists[i] = best; }
}
"""
_CUPY_THREADS = 256
_CUPY_SHARED_BYTES = 48 * 1024


@functools.lru_cache(maxsize=None)
def _cupy_kernel():
    import cupy

    return cupy.RawKernel(_CUPY_KERNEL, "hamming_nearest")


def _cupy_words(cupy, a):
    """(N, B) uint8 host or device array -> (N, W) uint64 device array."""
    return _as_words(cupy.asarray(a), cupy)


def _assign_cupy(x, c, block_rows, device):
    """XOR + __popcll on the GPU; rows transferred and processed in blocks."""
    import cupy

    with cupy.cuda.Device(device if device is not None else cupy.cuda.runtime.getDevice()):
        cw = _cupy_words(cupy, c)
        k, w = cw.shape
        tile = min(k, _CUPY_SHARED_BYTES // (8 * w))
        shared = 8 * w * tile
        n = x.shape[0]
        rows = block_rows or 2**22
        labels = np.empty(n, dtype=np.int64)
        dists = np.empty(n, dtype=np.int32)
        for lo in range(0, n, rows):
            xw = _cupy_words(cupy, x[lo:lo + rows])
            m = xw.shape[0]
            lab = cupy.empty(m, dtype=cupy.int64)
            dis = cupy.empty(m, dtype=cupy.int32)
            grid = (-(-m // _CUPY_THREADS),)
            _cupy_kernel()(grid, (_CUPY_THREADS,),
                           (xw, cw, np.int64(m), np.int32(k), np.int32(w), np.int32(tile), lab, dis),
                           shared_mem=shared)
            labels[lo:lo + m] = cupy.asnumpy(lab)
            dists[lo:lo + m] = cupy.asnumpy(dis)
    return labels, dists


_ASSIGN = {"numpy": _assign_numpy, "torch": _assign_torch, "cupy": _assign_cupy}


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
        return _bit_sums_cupy(x, labels_np, k, block_rows, device)
    if backend == "torch" and _torch_device(x, device).type != "cpu":
        return _bit_sums_torch(x, labels_np, k, block_rows, device)
    return _bit_sums_numpy(_to_numpy(x), labels_np, k, block_rows)


def _bit_sums_numpy(x, labels, k, block_rows):
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


def _bit_sums_torch(x, labels, k, block_rows, device):
    """index_add_ of unpacked blocks on a (CUDA) torch device."""
    import torch

    dev = _torch_device(x, device)
    n, b = x.shape
    d = 8 * b
    sums = torch.zeros((k, d), dtype=torch.int64, device=dev)
    shifts = torch.arange(8, dtype=torch.uint8, device=dev)
    rows = block_rows or max(1, 2**23 // max(d, 1))
    for lo in range(0, n, rows):
        xb = x[lo:lo + rows]
        t = (xb if _is_torch(xb) else torch.from_numpy(np.ascontiguousarray(xb))).to(dev)
        bits = ((t.unsqueeze(-1) >> shifts) & 1).reshape(t.shape[0], d).to(torch.int64)
        sums.index_add_(0, torch.from_numpy(labels[lo:lo + rows]).to(dev), bits)
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    return sums.cpu().numpy(), counts


def _bit_sums_cupy(x, labels, k, block_rows, device):
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
