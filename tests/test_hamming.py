"""Hamming kernels: every backend against a boolean reference and faiss."""
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actclust import hamming
from actclust.kernels import torch_backend

BACKENDS = hamming.available_backends()  # cupy only where a GPU works
WIDTHS = [1, 7, 8, 63, 64, 65, 200, 1536, 3000]


def pack(bits: np.ndarray) -> np.ndarray:
    return np.packbits(bits.astype(np.uint8), axis=1, bitorder="little")


def unpack(x: np.ndarray, d: int) -> np.ndarray:
    return np.unpackbits(x, axis=1, bitorder="little")[:, :d].astype(bool)


def reference(x, c, d):
    """Brute force: count differing bits, first index of the minimum."""
    dist = (unpack(x, d)[:, None, :] != unpack(c, d)[None, :, :]).sum(axis=2)
    return dist.argmin(axis=1), dist.min(axis=1)


def random_set(rng, n, k, d, density=0.5):
    """Masks and centroids with planted exact ties (duplicate centroids, shared rows)."""
    x = pack(rng.random((n, d)) < density)
    c = pack(rng.random((k, d)) < density)
    if k >= 4:
        c[3] = c[1]  # duplicate centroid: always a tie, must go to 1
        x[: min(n, 5)] = c[2]  # rows equal to a centroid: distance 0
    return x, c


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", WIDTHS)
def test_assign_matches_reference(backend, d):
    rng = np.random.default_rng(d)
    x, c = random_set(rng, 97, 11, d)
    want_labels, want_dist = reference(x, c, d)
    for block_rows in (None, 7):
        labels, dist = hamming.assign(x, c, backend=backend, block_rows=block_rows)
        assert labels.dtype == np.int64 and dist.dtype == np.int32
        np.testing.assert_array_equal(labels, want_labels)
        np.testing.assert_array_equal(dist, want_dist)


@pytest.mark.parametrize("backend", BACKENDS)
def test_assign_ties_go_to_lowest_index(backend):
    d = 70
    x = np.zeros((20, 9), dtype=np.uint8)  # all-zero masks
    one_hot = pack(np.eye(d, dtype=bool)[[5, 3, 60, 1]])  # every centroid at distance 1
    labels, dist = hamming.assign(x, one_hot, backend=backend)
    assert (labels == 0).all() and (dist == 1).all()
    same = np.repeat(pack(np.ones((1, d), bool)), 6, axis=0)  # six identical centroids
    labels, dist = hamming.assign(x, same, backend=backend)
    assert (labels == 0).all() and (dist == d).all()
    # a row between two centroids: bits {1, 2} vs centroids {1} and {2}
    row = pack(np.isin(np.arange(d), [1, 2])[None])
    cents = pack(np.stack([np.isin(np.arange(d), [40, 41, 42]), np.arange(d) == 2, np.arange(d) == 1]))
    labels, dist = hamming.assign(row, cents, backend=backend)
    assert labels.tolist() == [1] and dist.tolist() == [1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [1536, 1500])
def test_assign_matches_faiss(backend, d):
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(7)
    x, c = random_set(rng, 3000, 256, d, density=0.5)
    c[200:210] = c[10]  # more exact ties
    pad = -(-x.shape[1] // 8) * 8  # faiss needs a multiple of 8 bytes
    xp, cp = (np.pad(a, ((0, 0), (0, pad - a.shape[1]))) for a in (x, c))
    index = faiss.IndexBinaryFlat(8 * pad)
    index.add(cp)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # OpenMP spin-waits crawl when the other core is busy
    try:
        want_dist, want_labels = index.search(xp, 1)
    finally:
        faiss.omp_set_num_threads(threads)
    labels, dist = hamming.assign(x, c, backend=backend)
    np.testing.assert_array_equal(labels, want_labels[:, 0])
    np.testing.assert_array_equal(dist, want_dist[:, 0])


def test_torch_float_fallback_is_exact():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x, c = random_set(rng, 40, 13, 3000)
    want_labels, want_dist = reference(x, c, 3000)
    old = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "medium"):  # medium -> float64 GEMM
            torch.set_float32_matmul_precision(precision)
            gemm = torch_backend._TorchGemm(c, torch.device("cpu"), int_mm=False)
            val, idx = gemm.nearest(x, gemm.scratch(len(x)))
            np.testing.assert_array_equal(idx, want_labels)
            np.testing.assert_array_equal(val + hamming.popcount(x), want_dist)
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("int_mm", [True, False])
def test_torch_centroid_chunks_and_tensor_input(int_mm):
    torch = pytest.importorskip("torch")
    if int_mm and not torch_backend.int_mm_works("cpu"):
        pytest.skip("torch._int_mm does not work on this CPU")
    rng = np.random.default_rng(5)
    x, c = random_set(rng, 50, 38, 100)  # chunks of 16, 16 and 6 (a narrower last one)
    c[35] = c[2]  # a tie across chunks: the earlier chunk must win
    want_labels, want_dist = reference(x, c, 100)
    gemm = torch_backend._TorchGemm(c, torch.device("cpu"), int_mm=int_mm, chunk_bytes=16 * 130)  # 16 per chunk
    assert len(gemm.chunks) == 3
    for xb in (x, torch.from_numpy(x)):  # numpy unpack and tensor (device-style) unpack
        val, idx = gemm.nearest(xb, gemm.scratch(len(x)))
        np.testing.assert_array_equal(idx, want_labels)
        np.testing.assert_array_equal(val + hamming.popcount(x), want_dist)
    labels, dist = hamming.assign(torch.from_numpy(x), c, backend="torch")
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_array_equal(dist, want_dist)


@pytest.mark.parametrize("d", WIDTHS)
def test_popcount_and_distances_to(d):
    rng = np.random.default_rng(d)
    x, c = random_set(rng, 31, 2, d)
    np.testing.assert_array_equal(hamming.popcount(x), unpack(x, d).sum(axis=1))
    np.testing.assert_array_equal(hamming.distances_to(x, c[0]), (unpack(x, d) != unpack(c[:1], d)).sum(axis=1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [13, 64, 1536])
def test_bit_sums_matches_reference(backend, d):
    rng = np.random.default_rng(d)
    k = 9
    x = pack(rng.random((700, d)) < 0.4)
    labels = rng.choice([0, 2, 3, 8], size=700, p=[0.9, 0.05, 0.03, 0.02])  # 0 spans many segments
    for block_rows in (None, 64):
        sums, counts = hamming.bit_sums(x, labels, k, backend=backend, block_rows=block_rows)
        want = np.zeros((k, x.shape[1] * 8), dtype=np.int64)
        np.add.at(want, labels, np.unpackbits(x, axis=1, bitorder="little"))
        np.testing.assert_array_equal(sums, want)
        np.testing.assert_array_equal(counts, np.bincount(labels, minlength=k))
        assert sums.dtype == np.int64 and counts.dtype == np.int64
    if backend == "torch":  # the index_add_ kernel used on CUDA devices, run on CPU
        sums, _ = torch_backend.bit_sums(x, labels, k, 64, "cpu")
        np.testing.assert_array_equal(sums, want)


def test_centroids_from_counts_threshold():
    sums = np.array([[2, 1, 3, 0, 4, 0, 0, 0], [3, 2, 10, 4, 0, 0, 0, 0], [0] * 8, [55, 54, 0, 0, 0, 0, 0, 0]])
    counts = np.array([4, 10, 0, 100])
    bits = lambda c: np.unpackbits(c, axis=1, bitorder="little")  # noqa: E731
    half = bits(hamming.centroids_from_counts(sums, counts, 0.5))
    assert half[0, :5].tolist() == [1, 0, 1, 0, 1]  # 2/4 == 0.5 is set (>=)
    assert half[1, :4].tolist() == [0, 0, 1, 0]
    assert not half[2].any()  # empty cluster: all zeros
    low = bits(hamming.centroids_from_counts(sums, counts, 0.3))
    assert low[1, :4].tolist() == [1, 0, 1, 1]  # 3/10 == 0.3 exactly is set
    assert low[0, :5].tolist() == [1, 0, 1, 0, 1]  # 1/4 < 0.3
    # 0.55 * 100 == 55.00000000000001 in floating point; the rule is exact.
    assert bits(hamming.centroids_from_counts(sums, counts, 0.55))[3, :2].tolist() == [1, 0]
    trimmed = bits(hamming.centroids_from_counts(sums, counts, 0.3, d=3))
    assert not trimmed[:, 3:].any() and trimmed[1, :3].tolist() == [1, 0, 1]
    assert hamming.centroids_from_counts(sums, counts, 1.0).shape == (4, 1)
    with pytest.raises(ValueError, match="theta"):
        hamming.centroids_from_counts(sums, counts, 0.0)


def test_errors():
    x = np.zeros((3, 4), np.uint8)
    with pytest.raises(ValueError, match="unknown backend"):
        hamming.assign(x, x, backend="gpu")
    with pytest.raises(ValueError, match="same bytes per row"):
        hamming.assign(x, np.zeros((2, 5), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        hamming.assign(x.astype(np.int32), x)
    with pytest.raises(ValueError, match="2-D"):
        hamming.popcount(np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="labels"):
        hamming.bit_sums(x, np.array([0, 1, 5]), 3)
    if "cupy" not in BACKENDS:
        with pytest.raises(ValueError, match="not available"):
            hamming.resolve_backend("cupy")
    assert hamming.resolve_backend("auto") in BACKENDS
    labels, dist = hamming.assign(x[:0], x)
    assert labels.shape == (0,) and dist.shape == (0,)


def test_import_does_not_load_torch():
    code = "import sys, actclust.hamming, actclust.kmeans; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 300),
    n=st.integers(1, 30),
    k=st.integers(1, 9),
    density=st.sampled_from([0.02, 0.5, 0.98]),
    seed=st.integers(0, 2**32 - 1),
)
def test_backends_agree_property(d, n, k, density, seed):
    rng = np.random.default_rng(seed)
    x, c = random_set(rng, n, k, d, density)
    want_labels, want_dist = reference(x, c, d)
    for backend in BACKENDS:
        labels, dist = hamming.assign(x, c, backend=backend)
        np.testing.assert_array_equal(labels, want_labels)
        np.testing.assert_array_equal(dist, want_dist)
    sums, counts = hamming.bit_sums(x, want_labels, k)
    np.testing.assert_array_equal(counts, np.bincount(want_labels, minlength=k))
    np.testing.assert_array_equal(sums.sum(axis=0)[:d], unpack(x, d).sum(axis=0))
