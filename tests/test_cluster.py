"""Distributed clustering over real Ray actors and a real gloo collective group."""

import io
import json
import os
import signal
import time

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray

from actclust import kmeans
from actclust.io import mask_store as store
from actclust.clustering.distributed import _gather, run_cluster, split_shards
from actclust.config import ClusterConfig, build
from helpers import assert_user_error, run_cli
from fault_injection import CrashOnce


@pytest.fixture(scope="module")
def masks(extract_masks, ray_session):
    return extract_masks(max_tokens=64 * 40, shard_windows=5)


def cluster(masks, out, **kw):
    values = dict(masks=masks, out=str(out), k=8, workers=1, max_iter=15)
    values.update(kw)
    return run_cluster(build(ClusterConfig, values))


def centroids(out):
    return pq.read_table(out / "centroids.parquet").sort_by([("layer", "ascending"),
                                                             ("cluster", "ascending")])


def test_full_batch_is_bit_identical_for_one_and_two_workers(masks, tmp_path):
    one = cluster(masks, tmp_path / "one", workers=1)
    two = cluster(masks, tmp_path / "two", workers=2)
    assert centroids(tmp_path / "one").equals(centroids(tmp_path / "two"))
    assert one["cost"] == two["cost"] and one["iterations"] == two["iterations"]


def test_distributed_equals_local_fit_and_outputs_follow_the_contract(masks, tmp_path):
    meta = cluster(masks, tmp_path / "c", workers=2, theta=0.4, seed=3)
    manifest = store.read_manifest(masks)
    table = centroids(tmp_path / "c")
    assert table.schema.field("bits").type.byte_width == store.row_bytes(manifest["d_ff"])
    assert table.column("layer").to_pylist() == [0] * 8 + [1] * 8
    for layer in manifest["layers"]:
        x = store.read_layer(masks, manifest, layer)["bits"]
        local = kmeans.fit(x, 8, theta=0.4, seed=3, max_iter=15, layer=layer)
        rows = table.filter(pc.equal(table["layer"], layer))
        np.testing.assert_array_equal(store.bits_to_numpy(rows.column("bits")), local.centroids)
        assert rows.column("size").to_pylist() == local.sizes.tolist()
        assert meta["cost"][str(layer)] == pytest.approx(local.cost)
    on_disk = json.loads((tmp_path / "c" / "cluster.json").read_text())
    for key in ("k", "theta", "seed", "iterations", "cost", "model", "sites", "thresholds", "d_ff"):
        assert key in on_disk
    assert on_disk["model"] == "tiny:llama" and on_disk["d_ff"] == 192


def test_worker_killed_mid_fit_resumes_from_checkpoint(masks, tmp_path):
    reference = cluster(masks, tmp_path / "ref", workers=2, layers=[1])
    marker = tmp_path / "fault-fired"
    faulted = run_cluster(build(ClusterConfig, dict(masks=masks, out=str(tmp_path / "faulted"),
                                                    k=8, workers=2, max_iter=15, layers=[1])),
                          faults=CrashOnce(rank=1, layer=1, iteration=3, marker=marker))
    assert marker.exists(), "the fault was not injected"
    assert centroids(tmp_path / "ref").equals(centroids(tmp_path / "faulted"))
    assert faulted["iterations"] == reference["iterations"]


def test_rerun_on_same_out_reuses_finished_layers_and_foreign_config_is_refused(masks, tmp_path):
    cluster(masks, tmp_path / "c")
    first = (tmp_path / "c" / "centroids.parquet").read_bytes()
    cluster(masks, tmp_path / "c")
    assert centroids(tmp_path / "c").equals(pq.read_table(io.BytesIO(first)).sort_by(
        [("layer", "ascending"), ("cluster", "ascending")]))
    proc = run_cli("cluster", "--masks", masks, "--k", "9", "--out", str(tmp_path / "c"))
    assert_user_error(proc, "another configuration", "k")


@pytest.mark.parametrize("batch_size", [None, 256])
def test_streaming_from_parquet_equals_in_memory(masks, tmp_path, batch_size):
    """A worker share above its memory budget streams from Parquet, with the same result."""
    mem = cluster(masks, tmp_path / "mem", workers=2, batch_size=batch_size)
    streamed = cluster(masks, tmp_path / "stream", workers=2, batch_size=batch_size,
                       memory_budget_mb=0.001)
    assert centroids(tmp_path / "mem").equals(centroids(tmp_path / "stream"))
    assert mem["cost"] == streamed["cost"]


def test_split_shards_is_contiguous_and_balanced():
    shards = [{"name": f"s{i}", "rows": 10} for i in range(7)]
    blocks = split_shards(shards, 3)
    assert sum(blocks, []) == [s["name"] for s in shards]
    assert [len(b) for b in blocks] == [3, 2, 2]


@pytest.mark.parametrize("args, fragment", [
    (["--k", "0"], "k must be at least 1"),
    (["--k", "100000"], "larger than the number of masks"),
    (["--k", "4", "--theta", "1.5"], "theta must be in (0, 1]"),
    (["--k", "4", "--workers", "0"], "workers must be at least 1"),
    (["--k", "4", "--backend", "gpu9"], "backend must be one of"),
    (["--k", "4", "--layers", "7"], "layers [7] are not in"),
])
def test_bad_cluster_input(masks, tmp_path, args, fragment):
    proc = run_cli("cluster", "--masks", masks, "--out", str(tmp_path / "o"), *args)
    assert_user_error(proc, fragment)
    assert not (tmp_path / "o" / "centroids.parquet").exists()


def test_corrupt_shard_is_refused_before_use(masks, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(masks, copy)
    manifest = store.read_manifest(copy)
    path = store.layer_files(copy, manifest, 0)[1]
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    proc = run_cli("cluster", "--masks", str(copy), "--k", "4", "--out", str(tmp_path / "o"))
    assert_user_error(proc, "does not match its sha256")


def test_mask_dir_without_manifest_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("cluster", "--masks", str(tmp_path / "empty"), "--k", "4",
                   "--out", str(tmp_path / "o"))
    assert_user_error(proc, "manifest.json is missing")


def test_ctrl_c_while_the_driver_waits_for_a_fit_interrupts_at_once(ray_session, tmp_path):
    # The rank signals the driver once the driver waits on it, then works on: the
    # interrupt must reach the driver while the rank still runs, not when its layer is done.
    @ray.remote(num_cpus=0)
    def rank_that_interrupts_its_driver(driver_pid, waiting):
        while not os.path.exists(waiting):
            time.sleep(0.05)
        os.kill(driver_pid, signal.SIGINT)
        time.sleep(120)  # the layer's fit, still running when the driver must stop

    waiting = tmp_path / "driver-waiting"
    # Python's own Ctrl-C handler, as in a terminal (a shell starts background jobs with
    # SIGINT ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    ref = rank_that_interrupts_its_driver.remote(os.getpid(), str(waiting))
    try:
        with pytest.raises(KeyboardInterrupt):
            waiting.touch()
            _gather([ref])
        ready, _ = ray.wait([ref], timeout=0)
        assert not ready, "the interrupt waited for the rank to finish"
    finally:
        signal.signal(signal.SIGINT, previous)
        ray.cancel(ref, force=True)
