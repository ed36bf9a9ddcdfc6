"""Baselines: BRB-KMeans and the paper's activation-aware clustering, on planted masks."""
from __future__ import annotations

import numpy as np
import pytest

from actclust import hamming, kernels
from actclust.clustering import activation_aware as aware
from actclust.clustering import baselines

D = 256


def planted(n_centers=8, n_per=200, d=D, flip=0.05, seed=0):
    """Masks around ``n_centers`` random centers of ~50% density, each bit flipped w.p. ``flip``.

    Returns (x packed (N, B) uint8, centers packed (n_centers, B) uint8, true labels (N,)).
    """
    rng = np.random.default_rng(seed)
    centers = (rng.random((n_centers, d)) < 0.5).astype(np.uint8)
    truth = rng.permutation(np.repeat(np.arange(n_centers), n_per))
    bits = centers[truth] ^ (rng.random((truth.size, d)) < flip).astype(np.uint8)
    pack = lambda a: np.packbits(a, axis=1, bitorder="little")  # noqa: E731
    return pack(bits), pack(centers), truth


def unpack(a, d=D):
    return np.unpackbits(a, axis=1, count=d, bitorder="little").astype(bool)


def recall_precision(x, c, d=D):
    """Micro-averaged recall |m & c| / |m| and precision |m & c| / |c|, Hamming-nearest centroid."""
    labels, _ = hamming.assign(x, c)
    m, cm = unpack(x, d), unpack(c, d)[labels]
    hits = (m & cm).sum()
    return hits / m.sum(), hits / cm.sum()


@pytest.fixture(scope="module")
def clean():
    return planted()


# --------------------------------------------------------------------------
# BRB-KMeans


@pytest.mark.parametrize("batch_size", [None, 256])
def test_brb_recovers_planted_centers(clean, batch_size):
    x, centers, truth = clean
    res = baselines.brb_kmeans(x, k=8, d=D, seed=0, batch_size=batch_size)
    assert res.centroids.shape == centers.shape and res.centroids.dtype == np.uint8
    # Every planted center is a centroid, bit for bit: a majority of 200 members is exact at 5% noise.
    found = {bytes(row) for row in res.centroids}
    assert {bytes(row) for row in centers} == found
    # Cost is the flip rate: 0.05 * 256 = 12.8 bits.
    _, dist = hamming.assign(x, centers)
    assert res.cost == pytest.approx(dist.mean())
    assert abs(res.cost - 0.05 * D) < 0.5
    assert res.labels.shape == (x.shape[0],) and res.labels.dtype == np.int64
    assert sorted(res.sizes.tolist()) == [200] * 8
    assert res.iterations >= 1


def test_brb_is_deterministic(clean):
    x, _, _ = clean
    a = baselines.brb_kmeans(x[:400], k=5, d=D, seed=3)
    b = baselines.brb_kmeans(x[:400], k=5, d=D, seed=3)
    assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.labels, b.labels)


# --------------------------------------------------------------------------
# miss-count distance


def test_miss_counts_match_boolean_brute_force():
    rng = np.random.default_rng(1)
    d = 100  # not a multiple of 8
    m = rng.random((37, d)) < rng.random((37, 1))
    c = rng.random((11, d)) < 0.6
    pack = lambda a: np.packbits(a, axis=1, bitorder="little")  # noqa: E731
    want = (m[:, None, :] & ~c[None, :, :]).sum(axis=2)  # (37, 11): active bits the centroid misses
    got = aware.miss_counts(pack(m), pack(c), block_rows=5)
    assert got.dtype == np.int32
    assert np.array_equal(got, want)
    labels, misses = aware.assign_miss(pack(m), pack(c), block_rows=4)
    assert np.array_equal(labels, want.argmin(axis=1))  # ties: lowest index, as numpy
    assert np.array_equal(misses, want.min(axis=1))
    # Asymmetric: a superset centroid misses nothing.
    assert aware.miss_counts(pack(m[:1]), pack(np.ones((1, d), bool)))[0, 0] == 0


# --------------------------------------------------------------------------
# capacity-limited assignment, against pure-Python references


def _ref_by_cluster(dist, cap):
    n, k = dist.shape
    labels = [-1] * n
    for j in range(k):
        free = sorted((dist[t, j], t) for t in range(n) if labels[t] < 0)
        for _, t in free[:cap]:
            labels[t] = j
    return labels


def _ref_by_token(dist, cap):
    n, k = dist.shape
    labels, sizes = [-1] * n, [0] * k
    for t in sorted(range(n), key=lambda t: (dist[t].min(), t)):
        j = min((dist[t, j], j) for j in range(k) if sizes[j] < cap)[1]
        labels[t], sizes[j] = j, sizes[j] + 1
    return labels


@pytest.mark.parametrize("order", ["cluster", "token"])
def test_capacity_assignment_matches_reference(clean, order):
    x, _, _ = clean
    rng = np.random.default_rng(2)
    x = x[:150]
    c = np.packbits(rng.random((7, D)) < 0.6, axis=1, bitorder="little")
    dist = aware.miss_counts(x, c)
    cap = 25  # 7 * 25 >= 150, and tight enough that clusters overflow
    mc = kernels.MissCounter.from_packed(c)
    if order == "cluster":
        got, want = aware._assign_by_cluster(x, mc, cap), _ref_by_cluster(dist, cap)
    else:
        got, want = aware._assign_by_token(x, mc, cap), _ref_by_token(dist, cap)
    assert got.tolist() == want
    assert np.bincount(got, minlength=7).max() == cap


@pytest.mark.parametrize("order", ["cluster", "token"])
def test_activation_aware_respects_capacity(clean, order):
    x, _, _ = clean
    n, k = x.shape[0], 8
    res = aware.activation_aware(x, k=k, d=D, seed=0, capacity_factor=1.125, order=order)
    assert res.labels.min() >= 0 and res.labels.max() < k  # every row placed
    assert res.sizes.sum() == n and res.sizes.max() <= 225  # ceil(1.125 * 1600 / 8)
    assert np.array_equal(res.sizes, np.bincount(res.labels, minlength=k))
    # capacity_factor = 1 with k dividing N: every cluster is filled to exactly N / k.
    tight = aware.activation_aware(x, k=k, d=D, seed=0, capacity_factor=1.0, order=order)
    assert tight.sizes.tolist() == [n // k] * k
    # A capacity that cannot place every row is refused.
    with pytest.raises(ValueError, match="capacity_factor"):
        aware.activation_aware(x, k=k, d=D, capacity_factor=0.5)


# --------------------------------------------------------------------------
# centroid update: own-quantile binarisation


def _quantile_binarise(values, q):
    """(k, d) values -> (k, d) bool, bit set iff value > that row's q-quantile."""
    return values > np.quantile(values, q, axis=1, keepdims=True)


def test_centroids_are_member_frequency_above_own_quantile(clean):
    x, _, _ = clean
    res = aware.activation_aware(x, k=8, d=D, seed=0, running_average=False)
    m = unpack(x)
    freq = np.stack([m[res.labels == j].mean(axis=0) for j in range(8)])  # (8, d)
    assert np.array_equal(unpack(res.centroids), _quantile_binarise(freq, 0.4))
    # Strictly above the 40th percentile of 256 values: at most 256 - 103 = 153 bits (59.8%).
    ones = hamming.popcount(res.centroids)
    assert ones.max() <= 153 and ones.min() >= 0.55 * D


def test_running_average_blends_with_previous_centroid(clean):
    x, _, _ = clean
    first = aware.activation_aware(x, k=8, d=D, seed=4, max_iter=1)
    second = aware.activation_aware(x, k=8, d=D, seed=4, max_iter=2)
    assert first.iterations == 1 and second.iterations == 2
    m = unpack(x)
    freq = np.stack([m[second.labels == j].mean(axis=0) for j in range(8)])
    # Iteration t = 2: (t * c + f) / (t + 1). c is binary, so any t >= 1 ranks the previous
    # centroid's bits first; this checks the formula, not the particular weight.
    blended = (2 * unpack(first.centroids) + freq) / 3
    assert np.array_equal(unpack(second.centroids), _quantile_binarise(blended, 0.4))
    assert hamming.popcount(second.centroids).max() <= 153


@pytest.mark.parametrize("quantile", [0.25, 0.7])
def test_quantile_sets_density(clean, quantile):
    x, _, _ = clean
    res = aware.activation_aware(x, k=8, d=D, seed=0, quantile=quantile, running_average=False)
    density = hamming.popcount(res.centroids) / D
    assert np.all(density <= 1 - quantile + 1 / D)
    assert np.all(density >= 1 - quantile - 0.1)


# --------------------------------------------------------------------------
# initialisation: the sparsity floor


def test_initial_centroids_meet_sparsity_floor():
    rng = np.random.default_rng(5)
    density = rng.choice([0.3, 0.8], size=(500, 1))  # 80%-dense rows never qualify at floor 0.4
    bits = rng.random((500, D)) < density
    x = np.packbits(bits, axis=1, bitorder="little")
    init = aware._initial_centroids(x, 40, D, np.random.default_rng(0), 0.4, 100)
    assert (D - hamming.popcount(init)).min() >= 0.4 * D
    rows = {bytes(r) for r in x}
    assert all(bytes(r) in rows for r in init)  # qualifying rows exist nearby: real rows

    dense = np.packbits(rng.random((60, D)) < 0.8, axis=1, bitorder="little")  # no row qualifies
    thin = aware._initial_centroids(dense, 6, D, np.random.default_rng(0), 0.4, 100)
    ones = hamming.popcount(thin)
    assert ones.max() <= 0.6 * D and ones.min() >= 0.6 * D - 1  # thinned just to the floor
    assert all((unpack(thin[j:j + 1]) & ~unpack(dense)).sum(axis=1).min() == 0 for j in range(6))


# --------------------------------------------------------------------------
# determinism, validation


def test_activation_aware_is_deterministic(clean):
    x, _, _ = clean
    a = aware.activation_aware(x, k=8, d=D, seed=7)
    b = aware.activation_aware(x, k=8, d=D, seed=7)
    c = aware.activation_aware(x, k=8, d=D, seed=8)
    assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.labels, b.labels)
    assert a.cost == b.cost and a.iterations == b.iterations
    assert not np.array_equal(a.centroids, c.centroids)
    _, dist = hamming.assign(x, a.centroids)
    assert a.cost == pytest.approx(dist.mean())


@pytest.mark.parametrize("fit", [baselines.brb_kmeans, aware.activation_aware])
def test_bad_input_is_rejected(clean, fit):
    x, _, _ = clean
    with pytest.raises(ValueError, match="uint8"):
        fit(x.astype(np.int16), k=4, d=D)
    with pytest.raises(ValueError, match="bytes per row"):
        fit(x, k=4, d=300)
    with pytest.raises(ValueError, match="k must be"):
        fit(x[:3], k=4, d=D)
    with pytest.raises(ValueError, match="padding bits"):
        fit(x, k=4, d=250)  # same 32 bytes, but bits 250..255 are set in some rows


def test_activation_aware_parameter_checks(clean):
    x, _, _ = clean
    for kwargs, fragment in [({"quantile": 1.0}, "quantile"), ({"sparsity_floor": -0.1}, "sparsity_floor"),
                             ({"order": "random"}, "order"), ({"max_iter": 0}, "max_iter")]:
        with pytest.raises(ValueError, match=fragment):
            aware.activation_aware(x, k=4, d=D, **kwargs)


# --------------------------------------------------------------------------
# pooling layers


def test_pool_layers_shapes_and_determinism():
    rng = np.random.default_rng(6)
    layers = [rng.integers(0, 256, (n, 4), dtype=np.uint8) for n in (30, 50, 20)]
    whole = baselines.pool_layers(layers, max_rows=1000, seed=0)
    assert np.array_equal(whole, np.concatenate(layers))
    a = baselines.pool_layers(layers, max_rows=40, seed=1)
    b = baselines.pool_layers(layers, max_rows=40, seed=1)
    c = baselines.pool_layers(layers, max_rows=40, seed=2)
    assert a.shape == (40, 4) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # The sample keeps pooled (layer-major) order: its rows are a subsequence of the pool.
    pool = [bytes(r) for r in whole]
    pos = [pool.index(bytes(r)) for r in a]
    assert pos == sorted(pos) and len(set(pos)) == 40
    with pytest.raises(ValueError, match="same width"):
        baselines.pool_layers([layers[0], layers[1][:, :3]], max_rows=10, seed=0)
    with pytest.raises(ValueError, match="non-empty"):
        baselines.pool_layers([], max_rows=10, seed=0)


# --------------------------------------------------------------------------
# the two algorithms side by side


def test_activation_aware_trades_precision_for_recall():
    """More patterns than clusters (32 planted centers, k = 8), as with real masks.

    BRB's majority-vote centroids are about 50% dense; activation-aware keeps
    the ~60% most frequent bits of each cluster, so it covers more of every
    token's active bits (recall) at the price of precision.
    """
    x, _, _ = planted(n_centers=32, n_per=50, seed=0)
    brb = baselines.brb_kmeans(x, k=8, d=D, seed=0)
    aa = aware.activation_aware(x, k=8, d=D, seed=0)
    brb_recall, brb_precision = recall_precision(x, brb.centroids)
    aa_recall, aa_precision = recall_precision(x, aa.centroids)
    brb_density = hamming.popcount(brb.centroids).mean() / D
    aa_density = hamming.popcount(aa.centroids).mean() / D
    assert aa_density > brb_density + 0.05  # about 0.60 against 0.50
    assert aa_recall > brb_recall + 0.03  # about 0.75 against 0.70
    assert aa_precision < brb_precision - 0.03  # about 0.63 against 0.70
    assert aa.cost > brb.cost  # Hamming, the objective BRB's majority vote minimises
