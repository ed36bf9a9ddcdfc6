"""Hamming k-means: recovery, determinism, workers, resume, degenerate data."""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from actclust import hamming, kmeans
from actclust.clustering.datasets import ArrayDataset, block_stats
from actclust.kernels.rules import AssignRule


def planted(n=2000, k=8, d=300, flip=0.03, density=0.3, seed=0):
    """Masks around k random centers with each bit flipped with prob. flip."""
    rng = np.random.default_rng(seed)
    centers = rng.random((k, d)) < density
    truth = rng.integers(0, k, n)
    bits = centers[truth] ^ (rng.random((n, d)) < flip)
    return np.packbits(bits, axis=1, bitorder="little"), truth


def overlapping(seed=6):
    """30 heavily overlapping clusters: Lloyd with k=10 needs 10+ iterations."""
    return planted(n=2000, k=30, d=200, flip=0.3, density=0.5, seed=seed)[0]


class BarrierAllreduce:
    """Test-harness reducer for workers running as threads of one process.

    Each rank drops its array in a slot; after a barrier every rank sums the
    slots in rank order; a second barrier keeps slots until all have read.
    """

    def __init__(self, world: int):
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots = [None] * world

    def for_rank(self, rank: int):
        def allreduce(array):
            self.slots[rank] = np.array(array, dtype=np.int64, copy=True)
            self.barrier.wait()
            total = self.slots[0].copy()
            for other in self.slots[1:]:
                total += other
            self.barrier.wait()
            return total

        return allreduce


def run_workers(shards, use_dataset=False, **kwargs):
    """fit() on each shard in its own thread; results in rank order."""
    reducer = BarrierAllreduce(len(shards))
    offsets = np.cumsum([0] + [len(s) for s in shards])

    def work(rank):
        if use_dataset:
            data = kmeans.ArrayDataset(shards[rank], global_offset=int(offsets[rank]))
            return kmeans.fit(None, dataset=data, allreduce=reducer.for_rank(rank), **kwargs)
        return kmeans.fit(shards[rank], allreduce=reducer.for_rank(rank), rank=rank,
                          world_size=len(shards), **kwargs)

    with ThreadPoolExecutor(len(shards)) as pool:
        return list(pool.map(work, range(len(shards))))


def assert_same(a: kmeans.KMeansResult, b: kmeans.KMeansResult):
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.distances, b.distances)
    np.testing.assert_array_equal(a.sizes, b.sizes)
    assert (a.cost, a.iterations, a.converged, a.history) == (b.cost, b.iterations, b.converged, b.history)


@pytest.mark.parametrize("batch_size", [None, 400])
def test_planted_clusters_are_recovered(batch_size):
    x, truth = planted()
    res = kmeans.fit(x, 8, seed=1, batch_size=batch_size)
    assert res.cost < 1.1 * 0.03 * 300  # close to the flip rate
    for j in range(8):  # every planted cluster lands in a single found cluster
        assert len(np.unique(res.labels[truth == j])) == 1
    assert res.sizes.sum() == len(x) and res.centroids.shape == (8, x.shape[1])
    assert res.labels.dtype == np.int64 and res.distances.dtype == np.int64
    np.testing.assert_array_equal(hamming.assign(x, res.centroids)[0], res.labels)


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_full_batch_is_deterministic(init):
    x, _ = planted(flip=0.2, seed=3)
    a = kmeans.fit(x, 10, seed=5, init=init, tol=0, max_iter=8)
    b = kmeans.fit(x, 10, seed=5, init=init, tol=0, max_iter=8)
    assert_same(a, b)
    for backend in hamming.available_backends():  # identical assignments on every backend
        assert_same(a, kmeans.fit(x, 10, seed=5, init=init, tol=0, max_iter=8, backend=backend))


@pytest.mark.parametrize("batch_size", [None, 300])
@pytest.mark.parametrize("use_dataset", [False, True])
@pytest.mark.parametrize("cuts", [[611], [0, 700]])  # 2 workers; 3 workers, one empty
def test_workers_match_one(batch_size, use_dataset, cuts):
    x = overlapping(seed=4)
    kwargs = dict(k=12, theta=0.4, seed=2, batch_size=batch_size, tol=0, max_iter=6)
    one = kmeans.fit(x, **kwargs)
    parts = run_workers(np.split(x, cuts), use_dataset=use_dataset, **kwargs)
    for part in parts:
        np.testing.assert_array_equal(part.centroids, one.centroids)
        np.testing.assert_array_equal(part.sizes, one.sizes)
        assert (part.cost, part.history) == (one.cost, one.history)
    np.testing.assert_array_equal(np.concatenate([p.labels for p in parts]), one.labels)


def test_overlapping_shards_are_rejected():
    x, _ = planted(n=300)
    reducer = BarrierAllreduce(2)

    def work(rank):
        data = kmeans.ArrayDataset(x[:200] if rank == 0 else x[100:], global_offset=0 if rank == 0 else 50)
        return kmeans.fit(None, 4, dataset=data, allreduce=reducer.for_rank(rank))

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(work, r) for r in range(2)]
        for f in futures:
            with pytest.raises(ValueError, match="overlap"):
                f.result()


@pytest.mark.parametrize("batch_size", [None, 256])
def test_checkpoint_resume_equals_uninterrupted(batch_size):
    x = overlapping()
    kwargs = dict(k=10, seed=3, batch_size=batch_size, tol=0, max_iter=7)
    states, seen = [], []
    full = kmeans.fit(x, checkpoint=states.append, progress=lambda *a: seen.append(a), **kwargs)
    assert [s["iteration"] for s in states] == list(range(1, full.iterations + 1))
    assert [a[0] for a in seen] == list(range(1, full.iterations + 1))
    assert full.iterations == 7
    resumed = kmeans.fit(x, resume=states[2], **kwargs)
    assert_same(full, resumed)
    with pytest.raises(ValueError, match="does not match"):
        kmeans.fit(x, resume=states[2], **{**kwargs, "seed": 4})


def test_converged_checkpoint_resumes_to_same_result():
    x, _ = planted(seed=8)
    states = []
    full = kmeans.fit(x, 8, seed=0, checkpoint=states.append)
    assert full.converged and states[-1]["converged"]
    assert_same(full, kmeans.fit(x, 8, seed=0, resume=states[-1]))


@pytest.mark.parametrize("init", ["k-means++", "random"])
@pytest.mark.parametrize("batch_size", [None, 128])
def test_degenerate_duplicates(init, batch_size):
    rng = np.random.default_rng(0)
    distinct = np.packbits(rng.random((5, 100)) < 0.5, axis=1, bitorder="little")
    x = distinct[rng.integers(0, 5, 1000)]  # 5 distinct masks, k = 8
    runs = [kmeans.fit(x, 8, seed=1, init=init, batch_size=batch_size) for _ in range(2)]
    assert_same(*runs)
    res = runs[0]
    assert res.cost == 0.0 and (res.distances == 0).all()
    assert (res.sizes > 0).sum() == 5 and res.sizes.sum() == 1000
    assert {bytes(r) for r in res.centroids} == {bytes(r) for r in distinct}
    same = kmeans.fit(np.repeat(distinct[:1], 50, axis=0), 3, seed=0, init=init)
    assert same.cost == 0.0 and same.sizes.tolist() == [50, 0, 0]


def test_cost_never_increases_in_lloyd():
    res = kmeans.fit(overlapping(seed=11), 10, theta=0.5, seed=0, tol=0, max_iter=30)
    costs = [h["cost"] for h in res.history]
    assert len(costs) >= 8
    assert all(b <= a for a, b in zip(costs, costs[1:])), costs
    assert res.cost <= costs[-1]


def test_max_iter_zero_is_init_plus_final_pass():
    x, _ = planted(n=500)
    res = kmeans.fit(x, 8, max_iter=0)
    assert res.iterations == 0 and res.history == [] and not res.converged
    assert res.sizes.sum() == 500


def test_argument_errors():
    x, _ = planted(n=50)
    bad = [
        (dict(k=0), "k must be"),
        (dict(k=51), "exceeds"),
        (dict(k=2, theta=0), "theta"),
        (dict(k=2, theta=1.5), "theta"),
        (dict(k=2, init="kmeans||"), "init"),
        (dict(k=2, batch_size=0), "batch_size"),
        (dict(k=2, tol=-1), "tol"),
        (dict(k=2, seed=-1), "seed"),
        (dict(k=2, rank=1), "rank"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            kmeans.fit(x, **kwargs)
    with pytest.raises(ValueError, match="uint8"):
        kmeans.fit(x.astype(np.int16), 2)
    with pytest.raises(ValueError, match="2-D"):
        kmeans.fit(x[0], 2)
    with pytest.raises(ValueError, match="exactly one"):
        kmeans.fit(None, 2)
    with pytest.raises(ValueError, match="unknown backend"):
        kmeans.fit(x, 2, backend="tpu")


@pytest.mark.parametrize("rule", [None, AssignRule.from_args(theta=0.3),
                                  AssignRule.from_args(density=0.25)])
def test_full_pass_sums_of_moved_rows_equal_a_recount(rule):
    # An in-memory dataset re-sums only the rows whose cluster changed since its last pass.
    rng = np.random.default_rng(3)
    x = np.packbits(rng.random((3000, 256)) < 0.3, axis=1, bitorder="little")
    data = ArrayDataset(x)
    centroids = x[rng.choice(len(x), 16, replace=False)]
    moved = []
    for step in range(4):  # each step replaces 3 centroids: some rows move, most stay
        centroids = centroids.copy()
        centroids[rng.choice(16, 3, replace=False)] = x[rng.choice(len(x), 3, replace=False)]
        before = None if data._last_pass is None else data._last_pass[0]
        got = data.assign_stats(centroids, 16, rule=rule)
        want = block_stats(x, centroids, 16, "numpy", rule)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        assert got[2] == want[2] and want[1].sum() == len(x)
        if before is not None:
            moved.append(int((data._last_pass[0] != before).sum()))
    assert all(0 < m < len(x) for m in moved), moved
