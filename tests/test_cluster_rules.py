"""actclust cluster with --theta / --density: the rule and the convergence in cluster.json."""

import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from actclust import hamming, kmeans
from actclust.io import mask_store as store
from actclust.clustering.distributed import run_cluster
from actclust.config import ClusterConfig, build
from actclust.kernels.rules import AssignRule
from helpers import assert_user_error, run_cli


@pytest.fixture(scope="module")
def masks(extract_masks, ray_session):
    return extract_masks(max_tokens=64 * 30, shard_windows=10)


def layer_centroids(out, layer):
    table = pq.read_table(out / "centroids.parquet")
    rows = table.filter(pc.equal(table["layer"], layer)).sort_by("cluster")
    return store.bits_to_numpy(rows.column("bits"))


@pytest.mark.parametrize("algorithm", ["hamming-kmeans", "brb-kmeans", "activation-aware"])
def test_density_gives_every_centroid_the_budget(masks, tmp_path, algorithm):
    meta = run_cluster(build(ClusterConfig, dict(masks=masks, out=str(tmp_path / "c"), k=6,
                                                 density=0.3, algorithm=algorithm, max_iter=8)))
    manifest = store.read_manifest(masks)
    n = round(0.3 * manifest["d_ff"])
    assert meta["rule"] == AssignRule.from_args(density=0.3).to_json()
    assert meta["density"] == 0.3 and meta["theta"] is None
    for layer in manifest["layers"]:
        c = layer_centroids(tmp_path / "c", layer)
        assert (hamming.popcount(c) == n).all()
    on_disk = json.loads((tmp_path / "c" / "cluster.json").read_text())
    assert AssignRule.from_json(on_disk["rule"]).kind == "density"


def test_theta_fit_records_rule_history_and_layers_at_the_cap(masks, tmp_path):
    meta = run_cluster(build(ClusterConfig, dict(masks=masks, out=str(tmp_path / "c"), k=8,
                                                 theta=0.3, max_iter=2, tol=0.0)))
    manifest = store.read_manifest(masks)
    assert AssignRule.from_json(meta["rule"]) == AssignRule.from_args(theta=0.3)
    for layer in manifest["layers"]:
        x = store.read_layer(masks, manifest, layer)["bits"]
        local = kmeans.fit(x, 8, theta=0.3, max_iter=2, tol=0.0, layer=layer)
        np.testing.assert_array_equal(layer_centroids(tmp_path / "c", layer), local.centroids)
        assert meta["history"][str(layer)] == [h["cost"] for h in local.history]
        assert meta["converged"][str(layer)] == local.converged
    assert meta["hit_cap"] == [l for l in manifest["layers"] if not meta["converged"][str(l)]]
    assert meta["hit_cap"]  # two iterations at tol 0 do not settle these masks


def test_theta_and_density_together_is_one_error_line(masks, tmp_path):
    proc = run_cli("cluster", "--masks", masks, "--out", str(tmp_path / "c"), "--k", "4",
                   "--theta", "0.3", "--density", "0.5")
    assert_user_error(proc, "--density")
    for value in ("0", "1.5"):
        proc = run_cli("cluster", "--masks", masks, "--out", str(tmp_path / "d"), "--k", "4",
                       "--density", value)
        assert_user_error(proc, "density must be in (0, 1]")
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_sweep_grid_has_density_points_and_one_static_mask_per_objective():
    from actclust import config as C
    from actclust.errors import UserError
    from actclust.orchestration.sweep import SweepConfig, grid_points

    cfg = C.build(SweepConfig, dict(k=[4, 16], theta=[0.5], density=[0.3, 0.6],
                                    algorithm=["hamming-kmeans", "brb-kmeans"]))
    points = grid_points(cfg)
    assert len(points) == 3 * 2 * 2 + 3  # objectives x algorithms x K, then K = 1 each
    static = [p for p in points if p.k == 1]
    assert [(p.theta, p.density) for p in static] == [(0.5, None), (None, 0.3), (None, 0.6)]
    assert all(p.algorithm == "hamming-kmeans" for p in static)
    names = {p.name for p in points}
    assert len(names) == len(points) and "k=16-density=0.3-brb-kmeans" in names
    assert len(grid_points(C.build(SweepConfig, dict(k=[1, 4], static_point=True)))) == 2
    for bad in (dict(density=[0]), dict(density=[1.2]), dict(theta=[], density=[])):
        with pytest.raises(UserError):
            C.build(SweepConfig, dict(k=[4], **bad))


def test_predictor_targets_follow_the_recorded_rule():
    from actclust import kernels
    from actclust.predict.features import Targets

    rng = np.random.default_rng(0)
    cents = [np.packbits(rng.random((8, 64)) < 0.5, axis=1, bitorder="little") for _ in range(2)]
    bits = np.packbits(rng.random((200, 2, 64)) < 0.4, axis=2, bitorder="little")
    record = AssignRule.from_args(theta=0.3).to_json()
    got = Targets("cluster", cents, 64, record).labels(bits)
    hamming_labels = Targets("cluster", cents, 64).labels(bits)
    for i, c in enumerate(cents):
        layer = np.ascontiguousarray(bits[:, i])
        np.testing.assert_array_equal(got[:, i], kernels.assign_scored(layer, c, theta=0.3)[0])
        np.testing.assert_array_equal(hamming_labels[:, i], kernels.assign(layer, c)[0])
    assert (got != hamming_labels).any()  # the rule changes some targets
