"""Assignment under theta and density rules: every backend against a brute-force reference."""
from fractions import Fraction

import numpy as np
import pytest

from actclust import hamming
from actclust.kernels import torch_backend
from actclust.kernels.rules import AssignRule, top_bits
from actclust.kernels import assign_scored

BACKENDS = hamming.available_backends()  # cupy only where a GPU works
RULES = [dict(theta=0.5), dict(theta=0.3), dict(theta=0.7), dict(theta=1.0),
         dict(theta=1 / 3),  # 333333/1000000: weights too large for int8, exact float path
         dict(density=0.5), dict(density=0.2)]


def pack(bits):
    return np.packbits(np.asarray(bits, dtype=np.uint8), axis=1, bitorder="little")


def reference(x, c, theta=None, density=None):
    """Brute force in Python integers: the weighted cost of every pair, first index of the min."""
    d = 8 * x.shape[1]
    m = np.unpackbits(x, axis=1, bitorder="little")[:, :d].astype(np.int64)
    cb = np.unpackbits(c, axis=1, bitorder="little")[:, :d].astype(np.int64)
    misses = m.sum(1)[:, None] - m @ cb.T  # (N, K) mask bits the centroid lacks
    false_alarms = cb.sum(1)[None, :] - m @ cb.T
    if density is not None:
        cost = misses
        scale = 1
    else:
        t = Fraction(theta).limit_denominator(10**6)
        # q * ((1 - t) misses + t false alarms), exact in integers
        cost = (t.denominator - t.numerator) * misses + t.numerator * false_alarms
        scale = Fraction(2, t.denominator)
    labels = cost.argmin(axis=1)
    return labels, cost[np.arange(len(labels)), labels], scale


def planted_ties(rng, n, k, d):
    x = pack(rng.random((n, d)) < 0.4)
    c = pack(rng.random((k, d)) < 0.4)
    c[3] = c[1]  # duplicate centroid: ties must go to 1
    c[5] = 0  # an empty centroid
    x[:4] = c[2]
    x[4] = 0  # an empty mask: every centroid ties in density mode
    return x, c


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", RULES, ids=lambda r: "-".join(f"{k}={v:.3g}" for k, v in r.items()))
def test_every_backend_matches_reference(backend, rule):
    rng = np.random.default_rng(1)
    for n, k, d in ((300, 37, 200), (64, 9, 1536), (100, 8, 24)):
        x, c = planted_ties(rng, n, k, d)
        want_labels, want_cost, scale = reference(x, c, **rule)
        labels, costs = assign_scored(x, c, backend=backend, **rule)
        np.testing.assert_array_equal(labels, want_labels)
        np.testing.assert_array_equal(costs, want_cost)
        assert AssignRule.from_args(**rule).cost_scale == pytest.approx(float(scale))


def test_torch_int8_float_and_chunked_paths_agree():
    torch = pytest.importorskip("torch")
    torch_backend.int_mm_lhs.cache_clear()
    rng = np.random.default_rng(2)
    x, c = planted_ties(rng, 200, 40, 300)
    for rule in (AssignRule.from_args(theta=0.3), AssignRule.from_args(density=0.4)):
        want, _, _ = reference(x, c, theta=rule.theta, density=rule.density)
        for int_mm in (True, False)[0 if torch_backend.int_mm_works("cpu") else 1:]:
            gemm = torch_backend._TorchGemm(c, torch.device("cpu"), int_mm=int_mm, chunk_bytes=16 * 200,
                                      weights=rule.weights)
            assert len(gemm.chunks) >= 3  # several chunks: ties across them go to the earlier
            _, idx = gemm.nearest(x, gemm.scratch(len(x)))
            np.testing.assert_array_equal(idx, want)


def test_theta_half_is_plain_hamming():
    rng = np.random.default_rng(3)
    x, c = planted_ties(rng, 500, 64, 1536)
    for backend in BACKENDS:
        labels, dist = hamming.assign(x, c, backend=backend)
        got_labels, costs = hamming.assign_scored(x, c, theta=0.5, backend=backend)
        np.testing.assert_array_equal(got_labels, labels)
        np.testing.assert_array_equal(costs, dist)


def test_rule_records_round_trip_and_errors():
    for rule in (AssignRule.from_args(theta=0.35), AssignRule.from_args(density=0.25),
                 AssignRule.hamming()):
        assert AssignRule.from_json(rule.to_json()) == rule
    assert AssignRule.from_json(None).is_hamming  # cluster.json written before rules existed
    assert AssignRule.from_args(theta=0.35).weights == (7, 20)
    with pytest.raises(ValueError, match="not both"):
        AssignRule.from_args(theta=0.3, density=0.5)
    for bad in (dict(theta=0), dict(theta=1.5), dict(density=0), dict(density=2)):
        with pytest.raises(ValueError, match="must be in"):
            AssignRule.from_args(**bad)


def test_top_bits_keeps_most_frequent_lowest_index_on_ties():
    scores = np.array([[3, 1, 3, 0, 2, 2, 0, 0, 9, 9], [0] * 10])
    got = np.unpackbits(top_bits(scores, 4, width=8), axis=1, bitorder="little")
    # bits 8, 9 are beyond the width; ties 0/2 and 4/5 go to the lower index
    np.testing.assert_array_equal(got[0, :10], [1, 0, 1, 0, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(got[1, :10], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])


def test_density_centroids_have_exactly_n_bits():
    rule = AssignRule.from_args(density=0.3)
    rng = np.random.default_rng(4)
    sums = rng.integers(0, 5, (6, 104))
    c = rule.centroids(sums, np.full(6, 5), width=100)
    assert (hamming.popcount(c) == 30).all()
    assert not np.unpackbits(c, axis=1, bitorder="little")[:, 100:].any()
    rows = pack(rng.random((5, 104)) < 0.5)
    rows[0] = 0
    own = rule.centroids_of_rows(rows, width=100)
    assert (hamming.popcount(own) == 30).all()
    # a row with 30 or more of its bits below the width keeps only its own bits
    full = np.unpackbits(rows, axis=1, bitorder="little")[:, :100]
    back = np.unpackbits(own, axis=1, bitorder="little")[:, :100]
    for r, b in zip(full, back):
        if r.sum() >= 30:
            assert (b <= r).all()
        else:
            assert (b >= r).all()


def test_torch_cuda_matches_reference():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here; benchmarks/gpu_check.sh runs this on a GPU machine")
    rng = np.random.default_rng(6)
    x, c = planted_ties(rng, 700, 70, 1536)
    for rule in RULES:
        want_labels, want_cost, _ = reference(x, c, **rule)
        for xs in (x, torch.from_numpy(x).cuda()):
            labels, costs = assign_scored(xs, c, backend="torch", device="cuda", **rule)
            np.testing.assert_array_equal(labels, want_labels)
            np.testing.assert_array_equal(costs, want_cost)


def test_int8_rows_where_torch_takes_no_uint8(monkeypatch):
    """Some torch builds' CPU _int_mm takes only int8 rows: the same answers with those."""
    torch = pytest.importorskip("torch")
    if not torch_backend.int_mm_works("cpu"):
        pytest.skip("torch._int_mm does not work on this CPU")
    monkeypatch.setattr(torch_backend, "int_mm_lhs", lambda device="cpu": "int8")
    rng = np.random.default_rng(7)
    x, c = planted_ties(rng, 300, 20, 200)
    gemm = torch_backend._TorchGemm(c, torch.device("cpu"), int_mm=True, weights=(3, 10))
    assert gemm.int_mm and gemm.unpack(x).dtype == torch.int8
    want, _, _ = reference(x, c, theta=0.3)
    for workers in (1, 2):
        _, labels = gemm.nearest_all(x, block_rows=64, workers=workers)
        np.testing.assert_array_equal(labels, want)


def test_device_centroids_and_stats_follow_the_rule():
    torch = pytest.importorskip("torch")
    from actclust import kernels

    rng = np.random.default_rng(8)
    x, c = planted_ties(rng, 400, 30, 200)
    m = torch.from_numpy(np.unpackbits(x, axis=1, bitorder="little")[:, :200].astype(bool))
    for rule in RULES:
        want, _, _ = reference(x, c, **rule)
        record = AssignRule.from_args(**rule).to_json()
        labels, overlap = kernels.device_centroids(c, 200, rule=record).nearest(m)
        np.testing.assert_array_equal(labels.numpy(), want)
        stats = kernels.assignment_stats(x, c, rule=record)
        ones, cbits = hamming.popcount(x), hamming.popcount(c)[want]
        dots = hamming.popcount(x & c[want])
        np.testing.assert_array_equal(overlap.round().long().numpy(), dots)
        assert stats.tolist() == [len(x), ones.sum(), cbits.sum(), (ones + cbits - 2 * dots).sum(),
                                  dots.sum()]


def test_the_int8_gemm_is_used_only_where_it_pays():
    """CPUs without int8 dot products run torch._int_mm far slower than float32: the
    default GEMM takes it only where it is no slower (the answers are the same)."""
    torch = pytest.importorskip("torch")
    pays = torch_backend.int_mm_pays("cpu")
    assert pays in (True, False) and (not pays or torch_backend.int_mm_works("cpu"))
    rng = np.random.default_rng(9)
    x, c = planted_ties(rng, 200, 12, 200)
    gemm = torch_backend._TorchGemm(c, torch.device("cpu"))
    assert gemm.int_mm == pays
    want, _, _ = reference(x, c, theta=0.5)
    np.testing.assert_array_equal(gemm.nearest_all(x, block_rows=64, workers=1)[1], want)
