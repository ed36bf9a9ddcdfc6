"""actclust mass-bits: centroid bits chosen by their members' activation mass, checked
against an independent full forward of the fitting windows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from actclust import kernels
from actclust.capture.extract import run_extract
from actclust.capture.hooks import captured, mask_of
from actclust.clustering.distributed import run_cluster
from actclust.config import ClusterConfig, ExtractConfig, MassBitsConfig, build
from actclust.errors import UserError
from actclust.io import mask_store, predictor_store
from actclust.io.centroid_store import load_centroids
from actclust.io.corpus import load_windows
from actclust.io.models import load_model, load_tokenizer
from actclust.kernels.rules import AssignRule
from actclust.predict import allocation as A
from actclust.predict import features as F
from actclust.predict.mass import bits_by_mass, run_mass_bits
from helpers import assert_user_error, run_cli

SEQ = 64
MODEL = "tiny:llama"


def test_bits_by_mass_keeps_each_count_and_takes_the_largest_mass():
    width = 16
    bits = np.zeros((3, width), bool)
    bits[0, :4] = True  # 4 bits
    bits[1, 8:10] = True  # 2 bits
    bits[2, 3] = True  # 1 bit, a cluster without members
    mass = np.zeros((3, width))
    mass[0, [15, 14, 2, 1, 7]] = [5, 4, 3, 3, 1]  # ties (2 and 1) go to the lower index
    mass[1, [0, 5]] = [2, 1]
    got = mask_store.unpack(bits_by_mass(mask_store.pack(bits), mass, width), width)
    assert got.sum(axis=1).tolist() == [4, 2, 1]
    assert np.flatnonzero(got[0]).tolist() == [1, 2, 14, 15]
    assert np.flatnonzero(got[1]).tolist() == [0, 5]
    assert np.flatnonzero(got[2]).tolist() == [3]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, ray_session):
    """Masks, a density-mode and a theta-mode clustering of them, and the predictor features
    of their fitting windows."""
    root = tmp_path_factory.mktemp("mass")
    run_extract(build(ExtractConfig, dict(model=MODEL, seq_len=SEQ, max_tokens=SEQ * 24,
                                          sparsity=0.5, out=str(root / "masks"))))
    run_cluster(build(ClusterConfig, dict(masks=str(root / "masks"), k=6, density=0.3,
                                          out=str(root / "c"))))
    run_cluster(build(ClusterConfig, dict(masks=str(root / "masks"), k=6,
                                          out=str(root / "c-theta"))))
    meta, _ = load_centroids(root / "c")
    windows = load_windows(meta["corpus"], load_tokenizer(MODEL), SEQ, split="train",
                           max_tokens=meta["tokens"], heldout_every=meta["heldout_every"])
    spec = F.FeatureSpec(root=str(root / "features"), model=MODEL, site="intermediate",
                         layers=tuple(meta["layers"]), thresholds=tuple(meta["thresholds"]),
                         d_model=64, width=meta["d_ff"], shard_windows=5)
    predictor_store.open_features(spec.root, {
        "model": MODEL, "corpus": meta["corpus"], "text_column": meta["text_column"],
        "seq_len": SEQ, "heldout_every": meta["heldout_every"], "sites": "intermediate",
        "thresholds": meta["thresholds"], "first_seq": int(windows.seq[0]),
        "last_seq": int(windows.seq[-1]), "windows": len(windows), "shard_windows": 5,
        "layers": list(meta["layers"])})
    F.write_missing(spec, windows.seq, windows.ids)
    return root, windows


def independent_mass(root, windows) -> list[np.ndarray]:
    """Summed |a| per cluster from a whole-model forward, members by the fitted rule."""
    meta, centroids = load_centroids(root / "c")
    model = load_model(MODEL).model
    rule = AssignRule.from_json(meta["rule"])
    mass = [np.zeros((meta["k"], meta["d_ff"])) for _ in meta["layers"]]
    with torch.inference_mode(), captured(model) as acts:
        model(torch.tensor(windows.ids))
        for i, (layer, tau) in enumerate(zip(meta["layers"], meta["thresholds"])):
            a = acts[layer].reshape(-1, meta["d_ff"])
            labels, _ = kernels.assign_scored(mask_store.pack(mask_of(a, tau).numpy()),
                                              centroids[i], rule)
            np.add.at(mass[i], labels, a.abs().double().numpy())
    return mass


def test_mass_bits_moves_bits_to_the_largest_member_activations(fitted):
    root, windows = fitted
    record = run_mass_bits(build(MassBitsConfig, dict(centroids=str(root / "c"),
                                                      features=str(root / "features"),
                                                      out=str(root / "mass"))))
    old_meta, old = load_centroids(root / "c")
    meta, new = load_centroids(root / "mass")
    assert meta == record and meta["bits_by"] == "activation_mass"
    assert meta["bits_from"] == str(root / "c") and meta["sizes"] == old_meta["sizes"]
    width, budget = meta["d_ff"], round(0.3 * meta["d_ff"])
    expected = independent_mass(root, windows)
    moved = 0
    for a, b, mass in zip(old, new, expected):
        before, after = mask_store.unpack(a, width), mask_store.unpack(b, width)
        assert (after.sum(axis=1) == budget).all()  # the density budget is kept exactly
        moved += int((before != after).sum())
        for j in range(len(after)):
            if mass[j].sum() == 0:
                continue
            # Every kept neuron carries at least the mass of every dropped one (up to the
            # float16 rounding of the stored FFN inputs).
            top = mass[j].max()
            assert mass[j][after[j]].min() >= mass[j][~after[j]].max() - 1e-2 * top
    assert moved > 0
    # A rerun finds the finished directory; other features are refused.
    assert run_mass_bits(build(MassBitsConfig, dict(
        centroids=str(root / "c"), features=str(root / "features"),
        out=str(root / "mass")))) == record
    with pytest.raises(UserError, match="features"):
        run_mass_bits(build(MassBitsConfig, dict(centroids=str(root / "c"),
                                                 features=str(root / "other"),
                                                 out=str(root / "mass"))))


def test_mass_bits_refuses_bad_input_in_one_line(fitted, tmp_path):
    root, _ = fitted
    assert_user_error(run_cli("mass-bits", "--centroids", str(root / "c"), "--out",
                              str(tmp_path / "o")), "--features DIR")
    assert_user_error(run_cli("mass-bits", "--centroids", str(root / "c"), "--features",
                              str(tmp_path), "--out", str(tmp_path / "o")),
                      "holds no predictor features")
    record = json.loads((root / "features" / "features.json").read_text())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "features.json").write_text(json.dumps({**record, "seq_len": 32}))
    assert_user_error(run_cli("mass-bits", "--centroids", str(root / "c"), "--features",
                              str(foreign), "--out", str(tmp_path / "o")), "seq_len 32")
    assert not (tmp_path / "o" / "centroids.parquet").exists()


def test_mass_bits_at_a_density_and_at_a_per_layer_budget(fitted, tmp_path):
    root, _ = fitted
    common = dict(centroids=str(root / "c"), features=str(root / "features"))
    width = load_centroids(root / "c")[0]["d_ff"]
    record = run_mass_bits(build(MassBitsConfig, dict(common, density=0.5,
                                                      out=str(tmp_path / "d"))))
    _, packed = load_centroids(tmp_path / "d")
    assert record["bits_density"] == [0.5] * len(packed) and record["allocation"] is None
    assert record["bits_counts"] == "equal"
    for c in packed:
        assert (mask_store.unpack(c, width).sum(axis=1) == round(0.5 * width)).all()

    record = run_mass_bits(build(MassBitsConfig, dict(common, budget=0.6, sample_tokens=512,
                                                      out=str(tmp_path / "b"))))
    allocation = record["allocation"]
    assert allocation["budget"] == 0.6 and allocation["mask_mode"] == "and"
    assert allocation["sample_tokens"] == 512 and allocation["dense_prefix"] == 1
    assert allocation["ffn_bytes_fraction"] <= 0.6
    assert set(record["bits_density"]) <= set(allocation["grid"])
    _, packed = load_centroids(tmp_path / "b")
    for c, density in zip(packed, record["bits_density"]):
        assert (mask_store.unpack(c, width).sum(axis=1) == round(density * width)).all()
    # Counted in mask mode replace (down read at the density too) it buys no more neurons.
    replace = run_mass_bits(build(MassBitsConfig, dict(common, budget=0.6, mask_mode="replace",
                                                       sample_tokens=512,
                                                       out=str(tmp_path / "r"))))
    assert sum(replace["bits_density"]) <= sum(record["bits_density"])

    # Counts fitted: each centroid's fitted count, scaled to the layer's density.
    common["centroids"] = str(root / "c-theta")
    _, theta_centroids = load_centroids(root / "c-theta")
    record = run_mass_bits(build(MassBitsConfig, dict(common, density=0.5, counts="fitted",
                                                      out=str(tmp_path / "f"))))
    assert record["bits_counts"] == "fitted"
    assert record["bits_density"] == [0.5] * len(theta_centroids)
    _, packed = load_centroids(tmp_path / "f")
    for before, after in zip(theta_centroids, packed):
        counts = mask_store.unpack(before, width).sum(axis=1)
        assert len(set(counts.tolist())) > 1  # the fit left the clusters of unequal size
        assert (mask_store.unpack(after, width).sum(axis=1)
                == A.scaled_counts(counts, 0.5, width)).all()
    record = run_mass_bits(build(MassBitsConfig, dict(common, budget=0.6, counts="fitted",
                                                      sample_tokens=512,
                                                      out=str(tmp_path / "fb"))))
    assert record["allocation"]["ffn_bytes_fraction"] <= 0.6
    _, packed = load_centroids(tmp_path / "fb")
    for before, after, density in zip(theta_centroids, packed, record["bits_density"]):
        counts = mask_store.unpack(before, width).sum(axis=1)
        assert (mask_store.unpack(after, width).sum(axis=1)
                == A.scaled_counts(counts, density, width)).all()

    assert_user_error(run_cli("mass-bits", "--centroids", str(root / "c"), "--features",
                              str(root / "features"), "--density", "0.5", "--budget", "0.5",
                              "--out", str(tmp_path / "o")), "not both")
    assert_user_error(run_cli("mass-bits", "--centroids", str(root / "c"), "--features",
                              str(root / "features"), "--budget", "0.02",
                              "--out", str(tmp_path / "o")), "below the sparsest")
    assert_user_error(run_cli("mass-bits", "--centroids", str(root / "c"), "--features",
                              str(root / "features"), "--counts", "fitted",
                              "--out", str(tmp_path / "o")), "give --density or --budget")
    assert not (tmp_path / "o" / "centroids.parquet").exists()
