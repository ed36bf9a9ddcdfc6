"""The torch backend: the GEMM form ``|x| + |c| - 2 x.c`` (or any rule's
``p |c| - q x.c``, :func:`scored`) on unpacked 0/1 matrices.

The exact int8 GEMM ``torch._int_mm`` (int32 accumulation) where it works, else
a float GEMM in chunks small enough to stay exact, in float64 whenever float32
matmul precision is relaxed (TF32, bf16 passes): :func:`exact_float_dtype` is the
precision guard every float GEMM here goes through. Runs on CPU or CUDA.
"""
from __future__ import annotations

import functools
import logging
import time

import numpy as np

from actclust.kernels.packed import _is_torch, _to_numpy, popcount

logger = logging.getLogger(__name__)

# Byte v -> a word whose 8 bytes are v's bits, least significant first: looking
# packed bytes up in it unpacks them (bitorder "little") in one gather.
_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1,
                           bitorder="little").view(np.uint64).ravel()
# Padded centroid columns get this norm so they never win the argmin.
_SENTINEL = 2**30


def int_mm_works(device: str = "cpu") -> bool:
    """True if ``torch._int_mm`` runs and is exact on ``device``."""
    return int_mm_lhs(device) is not None


@functools.lru_cache(maxsize=None)
def int_mm_lhs(device: str = "cpu") -> str | None:
    """The left-operand dtype ("uint8" or "int8") with which ``torch._int_mm`` runs
    and is exact on ``device``, or None. On CPU uint8 is tried first (the u8 x s8
    form of VNNI/AMX); some torch builds accept only int8 there."""
    try:
        import torch
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, (32, 64), dtype=np.int8)
    b = rng.integers(0, 2, (64, 16), dtype=np.int8)
    for name in (("uint8", "int8") if device == "cpu" else ("int8",)):
        try:
            got = torch._int_mm(torch.from_numpy(a).to(device, getattr(torch, name)),
                                torch.from_numpy(b).to(device))
            if np.array_equal(got.cpu().numpy(), a.astype(np.int32) @ b.astype(np.int32)):
                return name
        except Exception as err:  # noqa: BLE001 - any failure means "not usable"
            logger.debug("torch._int_mm with %s unusable on %s: %s", name, device, err)
    return None


@functools.lru_cache(maxsize=None)
def int_mm_pays(device: str = "cpu") -> bool:
    """True if ``torch._int_mm`` works on ``device`` and, on a CPU, is no slower than the
    exact float32 GEMM it replaces. CPUs without int8 dot-product instructions (AVX2
    only) run it tens of times slower. Both give the same integers, so this choice
    changes speed only."""
    lhs = int_mm_lhs(device)
    if lhs is None or device != "cpu":
        return lhs is not None
    import torch

    a = torch.ones(256, 512, dtype=getattr(torch, lhs))
    b = torch.ones(512, 256, dtype=torch.int8)
    af, bf = a.float(), b.float()

    def best(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)
    pays = best(lambda: torch._int_mm(a, b)) <= best(lambda: af @ bf)
    logger.debug("torch._int_mm %s the float32 GEMM on this CPU", "beats" if pays else "trails")
    return pays


@functools.lru_cache(maxsize=None)
def available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True



def exact_float_dtype(device):
    """float32 where float32 matmul is exact on ``device``, else float64.

    Reduced-precision float32 matmul (TF32 on Ampere and later, bf16 passes)
    silently rounds; the GEMMs here hold integers and must not round.
    """
    import torch

    relaxed = torch.get_float32_matmul_precision() != "highest"
    if torch.device(device).type == "cuda":
        relaxed = relaxed or torch.backends.cuda.matmul.allow_tf32
    return torch.float64 if relaxed else torch.float32


def assign(x, c, block_rows, device):
    """GEMM form on unpacked bits: argmin_j (|c_j| - 2 x.c_j), then + |x|."""
    gemm = _TorchGemm(_to_numpy(c), torch_device(x, device))
    val, labels = gemm.nearest_all(x, block_rows)  # (N,) |c|-2x.c and index
    return labels, (val + popcount(_to_numpy(x))).astype(np.int32)


def scored(x, c, p, q, block_rows, device):
    """argmin_j (p |c_j| - q x.c_j) (ties: lowest j) and its value, as (N,) int64 each."""
    gemm = _TorchGemm(_to_numpy(c), torch_device(x, device), weights=(p, q))
    best, labels = gemm.nearest_all(x, block_rows)
    return labels, best


def torch_device(x, device):
    import torch

    if device is not None:
        return torch.device(device)
    return x.device if _is_torch(x) else torch.device("cpu")


class _TorchGemm:
    """Unpacked centroids, prepared once per call, for the torch GEMM form.

    The score of a row x against centroid j is ``s_j = p |c_j| - q x.c_j``
    (``weights=(p, q)``; Hamming: p = 1, q = 2, ``d(x, c_j) = |x| + s_j``;
    see :mod:`actclust.kernels.rules` for the others); the argmin of s (first index
    on ties) is the assigned centroid.
    Centroids are split into chunks of at most ``_CHUNK_BYTES`` unpacked
    bytes, each a (D + E, kc) matrix, kc a multiple of 8. Rows 0..D-1 hold
    ``-q * bits(c_j)``. With the int8 GEMM (q <= 127), E "bias" rows hold int8
    pieces summing to ``p |c_j|`` and every unpacked x row ends in E ones, so
    the GEMM yields s directly; padded centroid columns score above any real
    one. The float fallback (``int_mm=False``, no working ``torch._int_mm``,
    or q > 127) has no bias rows and adds ``p |c|`` after the GEMM, in chunks
    of the bit axis small enough to stay exact.
    """

    _CHUNK_BYTES = 2**28

    def __init__(self, c: np.ndarray, dev, int_mm: bool | None = None, chunk_bytes: int | None = None,
                 weights: tuple[int, int] = (1, 2)):
        self.dev = dev
        self.cuda = dev.type == "cuda"
        self.p, self.q = (int(w) for w in weights)
        if int_mm is None:  # probe once per device
            int_mm = int_mm_pays(str(dev) if self.cuda else "cpu")
        self.int_mm = int_mm and self.q <= 127
        self.lhs = (int_mm_lhs(str(dev) if self.cuda else "cpu") or "uint8") \
            if self.int_mm and not self.cuda else "int8"  # dtype of the unpacked rows
        self.k, self.b = c.shape
        self.d = 8 * self.b
        # CUDA's _int_mm wants k > 16 and multiples of 8; pad the bit axis.
        self.d_pad = max(self.d, 32) if self.cuda else self.d
        # Scores lie in [-q D, p D]; int32 holds them with room for the sentinel.
        self.wide = (self.p + self.q) * self.d_pad >= 2**29
        self.bias = 8 * -(-(self.p * self.d_pad // 127 + 1) // 8) if self.int_mm else 0  # 127 E > p D
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
        norm = np.full(cols, 2**62 if self.wide else _SENTINEL, dtype=np.int64)
        norm[:n] = self.p * popcount(part).astype(np.int64)
        bits = np.unpackbits(part, axis=1, bitorder="little").T
        if not self.int_mm:
            mat = np.zeros((self.d_pad, cols), dtype=self.float_dtype_np)
            mat[: self.d, :n] = bits * -float(self.q)
            score_dtype = torch.int64 if self.wide else torch.int32
            return c0, torch.from_numpy(mat).to(self.dev), torch.from_numpy(norm).to(self.dev, score_dtype)
        mat = np.zeros((self.d_pad + self.bias, cols), dtype=np.int8)
        mat[: self.d, :n] = bits * np.int8(-self.q)
        if self.int_mm:
            norm[n:] = 127 * self.bias  # padded columns: above any real score
            pieces = norm[None, :] - 127 * np.arange(self.bias)[:, None]
            mat[self.d_pad:] = np.clip(pieces, 0, 127)  # (E, kc), sums to norm
        return c0, torch.from_numpy(mat).to(self.dev), None

    def _float_dtype(self):
        import torch

        # float32 holds the products exactly only while q stays small.
        return torch.float64 if self.q >= 2**20 else exact_float_dtype(self.dev)

    @property
    def float_dtype_np(self):
        return np.float64 if str(self.float_dtype) == "torch.float64" else np.float32

    @property
    def float_chunk_bits(self) -> int:
        """Bits per float GEMM reduction chunk: partial sums stay below 2**23 (float32)
        or 2**52 (float64) in magnitude, so they are exact."""
        limit = 2**52 if self.float_dtype_np == np.float64 else 2**23
        return max(8, limit // self.q // 8 * 8)

    def nearest_all(self, x, block_rows: int | None = None, workers: int | None = None):
        """Best score and its lowest index for every row of x, block by block.

        On CPU with a host array the blocks are shared among ``workers``
        threads (default: torch's intra-op thread count), each unpacking,
        multiplying and reducing its own blocks: the unpacking and the argmin
        are single-threaded numpy calls that would otherwise leave cores idle
        beside the GEMM.
        Returns (N,) int64 scores and (N,) int64 indices as numpy arrays.
        """
        import torch

        n = x.shape[0]
        rows = min(n, block_rows or self.default_rows())
        starts = range(0, n, rows)
        best = np.empty(n, dtype=np.int64)
        labels = np.empty(n, dtype=np.int64)
        host = not self.cuda and not _is_torch(x)
        if workers is None:
            workers = torch.get_num_threads() if host else 1
        workers = max(1, min(workers, len(starts)))

        def work(first: int) -> None:
            buf = self.scratch(rows)
            bits = self.bits_buffer(rows) if host else None
            for lo in starts[first::workers]:
                best[lo:lo + rows], labels[lo:lo + rows] = self.nearest(x[lo:lo + rows], buf, bits)

        if workers == 1:
            work(0)
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(work, range(workers)))
        return best, labels

    def bits_buffer(self, rows: int) -> np.ndarray:
        """A (rows, B + tail) uint64 buffer for :meth:`unpack`: one word per packed byte,
        the tail (zero padding, then the E bias ones) already written."""
        buf = np.empty((rows, self.b + len(self.tail)), dtype=np.uint64)
        buf[:, self.b:] = _BYTE_BITS[self.tail]
        return buf

    def default_rows(self) -> int:
        """Rows per block: a (rows, kc) int32 output tile of about 4 MiB."""
        kc = self.chunks[0][1].shape[1]
        return int(max(64, min(8192, 2**20 // kc, 2**23 // self.d_pad)))

    def unpack(self, xb, bits_buf: np.ndarray | None = None):
        """(m, B) uint8 packed -> (m, D + E) 0/1 tensor: int8 on CUDA, on CPU uint8 (or
        int8 where this torch's ``_int_mm`` takes only that).

        With ``bits_buf`` (from :meth:`bits_buffer`, host rows only) each byte is
        looked up as the 8 bytes of its bits and written in place: no allocation.
        """
        import torch

        if bits_buf is not None:
            m = xb.shape[0]
            np.take(_BYTE_BITS, xb, out=bits_buf[:m, : self.b], mode="clip")
            return torch.from_numpy(bits_buf[:m].view(self.lhs))
        if not self.cuda and not _is_torch(xb):
            m = xb.shape[0]
            if len(self.tail):  # write into a reused packed buffer whose tail is preset
                if self._packed is None or len(self._packed) < m:
                    self._packed = np.empty((m, self.b + len(self.tail)), dtype=np.uint8)
                    self._packed[:, self.b:] = self.tail
                self._packed[:m, : self.b] = xb
                xb = self._packed[:m]
            return torch.from_numpy(np.unpackbits(xb, axis=1, bitorder="little").view(self.lhs))
        t = (xb if _is_torch(xb) else torch.from_numpy(np.ascontiguousarray(xb))).to(self.dev)
        if len(self.tail):
            tail = torch.from_numpy(self.tail).to(self.dev).expand(t.shape[0], -1)
            t = torch.cat([t, tail], dim=1)
        shifts = torch.arange(8, dtype=torch.uint8, device=self.dev)
        bits = ((t.unsqueeze(-1) >> shifts) & 1).reshape(t.shape[0], -1)
        return bits.to(torch.int8) if self.cuda or self.lhs == "int8" else bits

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
        step = self.float_chunk_bits
        for d0 in range(0, self.d_pad, step):
            part = bits[:, d0:d0 + step].to(mat.dtype) @ mat[d0:d0 + step]
            out += part.to(out.dtype)
        return out.add_(norm)

    def nearest(self, xb, buf, bits_buf: np.ndarray | None = None):
        """Best score (``p |c| - q x.c``) and lowest index per row of a packed block.

        ``buf`` is a reusable (rows, kc) int32 scratch tensor: reusing it
        avoids page-faulting a fresh multi-MiB output for every block;
        ``bits_buf`` likewise for the unpacked rows (see :meth:`unpack`).
        Returns (m,) int32 values and (m,) int64 indices as numpy arrays.
        """
        bits = self.unpack(xb, bits_buf)
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
        dtype = torch.int64 if self.wide and not self.int_mm else torch.int32
        return torch.empty((rows, kc), dtype=dtype, device=self.dev)


def bit_sums(x, labels, k, block_rows, device):
    """index_add_ of unpacked blocks on a (CUDA) torch device."""
    import torch

    dev = torch_device(x, device)
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



class UnpackedCentroids:
    """Packed centroids unpacked once as 0/1 rows on a torch device, for bool masks
    already there (the evaluation hooks), so nothing crosses to the host per call.

    The GEMM ``m . c_j`` counts overlaps exactly (in float32 below 2**24 bits,
    float64 where :func:`exact_float_dtype` says float32 would round).
    """

    def __init__(self, packed: np.ndarray, width: int, device="cpu", weights=(1, 2)):
        import torch

        self.device = torch.device(device)
        self.p, self.q = (int(w) for w in weights)  # score p |c_j| - q m.c_j (rules.py)
        exact32 = (self.p + self.q) * width < 2**24
        self.dtype = exact_float_dtype(self.device) if exact32 else torch.float64
        bits = np.unpackbits(packed, axis=-1, count=width, bitorder="little")
        self.rows = torch.from_numpy(bits.astype(np.float32)).to(self.device, self.dtype)  # (K, d)
        self.norms = self.rows.sum(dim=1)  # (K,) |c_j|
        self.density = float(self.norms.sum()) / self.rows.numel()

    def nearest(self, m):
        """Assigned centroid (``argmin_j p |c_j| - q m.c_j``; Hamming by default; ties to
        the lowest index) of bool masks m (N, d).

        Returns (labels (N,) int64, overlap |m AND c| (N,)) as tensors on the device.
        """
        dot = m.to(self.dtype) @ self.rows.T  # (N, K) = |m AND c_j|
        labels = (self.p * self.norms[None, :] - self.q * dot).argmin(dim=1)  # |m| constant per row
        return labels, dot.gather(1, labels[:, None]).squeeze(1)

    def stats(self, m, labels, overlap) -> np.ndarray:
        """STAT_FIELDS sums of this assignment, brought to the host."""
        from actclust.kernels import stat_sums  # lazy: actclust.kernels imports this module

        return stat_sums(m.sum(dim=1), self.norms[labels].round().long(), overlap.round().long())
