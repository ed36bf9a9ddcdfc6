"""Kill a worker node in the middle of each stage: the job finishes on the survivors
and its output equals an uninterrupted run's.

Each test waits for an event of the job (a shard recorded, a checkpoint, finished
chunks), pauses the actors, checks that work is still left and only then kills the
node, so the fault lands mid-job however slowly the actors start on a busy machine."""

from __future__ import annotations

import logging

import pyarrow.parquet as pq
import pytest

from actclust.io import mask_store as store
from actclust.clustering.distributed import run_cluster
from actclust.config import ClusterConfig, EvaluateConfig, ExtractConfig, build
from actclust.evaluation.evaluate import run_evaluate
from actclust.capture.extract import run_extract
from actclust.capture.verify import verify

from fault_injection import Delay, Together
from helpers import assert_same_layers

from .support import in_background, wait_for

# Tiny models take milliseconds a chunk and a k-means iteration: slow each down so a
# node can be lost while the work is in flight.
SLOW = Delay(0.15)

# A first test pays for starting the cluster; all three together stay far below this
# on a machine whose cores are shared with a busy process each.
pytestmark = [pytest.mark.timeout(1200), pytest.mark.slow]

EXTRACT = dict(model="tiny:opt", corpus="embedded:pydoc", seq_len=32, max_tokens=32 * 80,
               shard_windows=2, workers=2)


def tables(root):
    manifest = store.read_manifest(root)
    return {layer: pq.read_table(store.layer_dir(root, layer)).sort_by(
        [("seq", "ascending"), ("pos", "ascending")]).select(["seq", "pos", "token", "bits"])
        for layer in manifest["layers"]}


def complete(root) -> int:
    try:
        return len(store.complete_shards(store.read_manifest(root)))
    except Exception:  # not written yet
        return 0


def test_extraction_survives_a_lost_node(cluster, tmp_path, caplog):
    reference = str(tmp_path / "ref")
    run_extract(build(ExtractConfig, {**EXTRACT, "out": reference}))
    faulted = str(tmp_path / "faulted")
    # Both actors extract before the node goes: a node whose actor is still starting
    # (minutes on a busy machine) would test a failed start, not a lost worker.
    arrived = tmp_path / "arrived"
    join = in_background(run_extract, build(ExtractConfig, {**EXTRACT, "out": faulted}),
                         Together(0.05, arrived, peers=2))
    wait_for(lambda: complete(faulted) >= 4, what="four shards")
    assert len(list(arrived.iterdir())) == 2
    with cluster.paused():
        assert join.running() and complete(faulted) < 40
        cluster.kill_worker()
    manifest = join()
    assert "an actor died" in caplog.text
    assert complete(faulted) == len(manifest["shards"]) == 40
    assert verify(faulted) == []
    a, b = tables(reference), tables(faulted)
    assert_same_layers(a, b)


@pytest.fixture(scope="module")
def masks(nodes, extract_masks):
    return extract_masks(**{**EXTRACT, "shard_windows": 20})


def test_kmeans_survives_a_lost_node(cluster, masks, tmp_path, caplog):
    values = dict(masks=masks, k=16, workers=2, max_iter=40, tol=0.0)
    reference = run_cluster(build(ClusterConfig, {**values, "out": str(tmp_path / "ref")}), SLOW)
    out = tmp_path / "faulted"
    join = in_background(run_cluster, build(ClusterConfig, {**values, "out": str(out)}), SLOW)
    wait_for(lambda: (out / "checkpoints" / "layer=0.npz").exists(), what="a k-means checkpoint")
    with cluster.paused():
        assert join.running()
        cluster.kill_worker()
    faulted = join()
    assert "rebuilding the group" in caplog.text
    assert faulted["cost"] == reference["cost"]
    assert faulted["iterations"] == reference["iterations"]
    a = pq.read_table(tmp_path / "ref" / "centroids.parquet")
    b = pq.read_table(out / "centroids.parquet")
    assert a.equals(b)


def test_evaluation_survives_a_lost_node(cluster, masks, tmp_path, caplog):
    run_cluster(build(ClusterConfig, dict(masks=masks, k=8, workers=2, out=str(tmp_path / "c"))))
    values = dict(centroids=str(tmp_path / "c"), max_tokens=32 * 60, workers=2, batch_windows=1)
    reference = run_evaluate(build(EvaluateConfig, {**values, "out": str(tmp_path / "ref")}),
                             SLOW)
    caplog.set_level(logging.DEBUG, logger="actclust.runtime.actors")
    arrived = tmp_path / "arrived"
    join = in_background(run_evaluate, build(EvaluateConfig, {**values,
                                                              "out": str(tmp_path / "faulted")}),
                         Together(SLOW.seconds, arrived, peers=2))
    # Both actors working (each waits for the other before its first chunk), and some
    # chunks done (the pool logs every result).
    wait_for(lambda: sum("task done" in r.getMessage() for r in caplog.records) >= 6,
             what="evaluation chunks")
    assert len(list(arrived.iterdir())) == 2
    with cluster.paused():
        assert join.running()
        cluster.kill_worker()
    faulted = join()
    assert "an actor died" in caplog.text
    for key in ("dense_ppl", "oracle_ppl", "cluster_ppl", "random_ppl", "precision", "recall",
                "tokens"):
        assert faulted[key] == reference[key], key
