"""The evaluation protocol: dense prefix, effective density, intervals, a fair random
baseline, weighted recall, mask mode ``and``, the shared baseline and held-out refusals."""

import json
import math
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from actclust import kernels
from actclust.capture.extract import run_extract
from actclust.capture.hooks import captured, masking
from actclust.clustering.distributed import run_cluster
from actclust.config import ClusterConfig, EvaluateConfig, ExtractConfig, build
from actclust.evaluation.evaluate import run_evaluate
from actclust.io import mask_store as store
from actclust.io.corpus import load_windows
from actclust.io.models import ByteTokenizer, load_model
from helpers import assert_user_error, run_cli

SEQ = 32
MODEL = "tiny:llama"
EVAL_TOKENS = SEQ * 8


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("protocol")
    run_extract(build(ExtractConfig, dict(model=MODEL, corpus="embedded:pydoc", seq_len=SEQ,
                                           max_tokens=SEQ * 40, out=str(root / "masks"))))
    run_cluster(build(ClusterConfig, dict(masks=str(root / "masks"), k=4, theta=0.3,
                                           out=str(root / "c"))))
    return root


def evaluate(root, name, **kw):
    # replace (a * c), the mode whose densities these tests check; and is asked for by name
    values = dict(centroids=str(root / "c"), out=str(root / name), max_tokens=EVAL_TOKENS,
                  mask_mode="replace")
    values.update(kw)
    return run_evaluate(build(EvaluateConfig, values))


def filled_centroids(root, name, fill):
    dst = root / name
    if not dst.exists():
        shutil.copytree(root / "c", dst)
        table = pq.read_table(dst / "centroids.parquet")
        d = json.loads((dst / "cluster.json").read_text())["d_ff"]
        full = store.pack(np.full((table.num_rows, d), fill, dtype=bool))
        table = table.set_column(table.schema.get_field_index("bits"), "bits",
                                 store.bits_array(full))
        pq.write_table(table, dst / "centroids.parquet")
    return str(dst)


def heldout_ids():
    return load_windows("embedded:pydoc", ByteTokenizer(), SEQ, split="heldout",
                        max_tokens=EVAL_TOKENS).ids


def test_prefix_positions_stay_dense_and_count_in_effective_density(fitted):
    """All-zero centroids with prefix P equal zeroing `a` at positions >= P, computed here."""
    prefix = 3
    report = evaluate(fitted, "zeros", centroids=filled_centroids(fitted, "zeros", False),
                      dense_prefix=prefix)
    model = load_model(MODEL).model
    ids = heldout_ids()
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(ids), 4):
            batch = torch.tensor(ids[start:start + 4])

            def zero_after_prefix(layer, a):
                mask = torch.ones_like(a)
                mask[:, prefix:] = 0
                return mask
            with masking(model, zero_after_prefix):
                loss = model(batch, labels=batch).loss.item()
            total += loss * batch.shape[0] * (SEQ - 1)
    assert report["cluster_ppl"] == pytest.approx(math.exp(total / (len(ids) * (SEQ - 1))),
                                                  rel=1e-6)
    assert report["density"] == 0.0
    assert report["effective_density"] == pytest.approx(prefix / SEQ, rel=1e-12)
    assert report["tokens"] == len(ids) * SEQ
    assert report["masked_tokens"] == len(ids) * (SEQ - prefix)
    assert report["dense_prefix"] == prefix


def test_metrics_intervals_and_random_baseline(fitted):
    report = evaluate(fitted, "e", dense_prefix=1)
    strict = evaluate(fitted, "strict", dense_prefix=0)
    on_disk = json.loads((fitted / "e" / "eval.json").read_text())
    for mode in ("dense", "oracle", "cluster", "random"):
        lo, hi = on_disk[f"{mode}_ppl_ci95"]
        assert lo <= on_disk[f"{mode}_ppl"] <= hi and lo < hi
    # The random masks keep exactly as many bits as the centroids used.
    assert abs(report["random_density"] - report["density"]) < 0.005
    assert abs(strict["random_density"] - strict["density"]) < 0.005
    # Strict: nothing is kept for free; with a prefix the first token counts at 1.0.
    assert strict["effective_density"] == pytest.approx(strict["density"], rel=1e-12)
    prefix_share = 1 / SEQ
    assert report["effective_density"] == pytest.approx(
        prefix_share + (1 - prefix_share) * report["density"], rel=1e-12)
    assert report["dense_ppl"] == strict["dense_ppl"]

    # Layer 0 sees the dense activation in every pass: recompute its metrics here.
    model = load_model(MODEL).model
    meta = json.loads((fitted / "c" / "cluster.json").read_text())
    cent = pq.read_table(fitted / "c" / "centroids.parquet").to_pydict()
    rows = [i for i, layer in enumerate(cent["layer"]) if layer == 0]
    packed = np.stack([np.frombuffer(cent["bits"][i], np.uint8) for i in rows])
    with torch.inference_mode(), captured(model) as acts:
        model(torch.tensor(heldout_ids()))
        a = acts[0][:, 1:].reshape(-1, meta["d_ff"]).double().numpy()
    m = np.abs(a) > meta["thresholds"][0]
    # Assigned by the rule the centroids were fitted with (theta-weighted at theta 0.3).
    labels, _ = kernels.assign_scored(store.pack(m), packed, meta.get("rule"), backend="numpy")
    c = store.unpack(packed, meta["d_ff"])[labels]
    layer0 = report["per_layer"][0]
    assert layer0["weighted_recall"] == pytest.approx((np.abs(a) * m * c).sum()
                                                      / (np.abs(a) * m).sum(), rel=1e-5)
    assert layer0["recall"] == pytest.approx((m & c).sum() / m.sum(), rel=1e-12)
    assert layer0["precision"] == pytest.approx((m & c).sum() / c.sum(), rel=1e-12)
    assert 0 < report["weighted_recall"] < 1


def test_mask_mode_and_with_full_centroids_is_the_oracle(fitted):
    ones = filled_centroids(fitted, "ones", True)
    report = evaluate(fitted, "and", centroids=ones, mask_mode="and")
    assert report["cluster_ppl"] == pytest.approx(report["oracle_ppl"], rel=1e-12)
    assert report["effective_density"] == pytest.approx(report["oracle_effective_density"])
    assert report["weighted_recall"] == 1.0 and report["mask_mode"] == "and"
    replace = evaluate(fitted, "replace", centroids=ones)
    assert replace["cluster_ppl"] == pytest.approx(replace["dense_ppl"], rel=1e-12)
    assert replace["effective_density"] == 1.0


def test_a_shared_baseline_is_computed_once_and_gives_the_same_numbers(fitted):
    fresh = evaluate(fitted, "nobase")
    first = evaluate(fitted, "b1", baseline=str(fitted / "base"))
    cached = json.loads((fitted / "base" / "baseline.json").read_text())
    cached["nll"]["dense"] = [v + 1.0 for v in cached["nll"]["dense"]]  # prove it is read
    (fitted / "base" / "baseline.json").write_text(json.dumps(cached))
    second = evaluate(fitted, "b2", baseline=str(fitted / "base"))
    for key in ("oracle_ppl", "cluster_ppl", "random_ppl", "recall", "oracle_effective_density",
                "oracle_ppl_ci95", "cluster_ppl_ci95"):
        assert fresh[key] == first[key] == second[key], key
    assert fresh["dense_ppl"] == first["dense_ppl"] < second["dense_ppl"]
    other = evaluate(fitted, "b3", baseline=str(fitted / "base"), dense_prefix=2)
    assert other["dense_ppl"] == fresh["dense_ppl"]  # another prefix: recomputed, not reused


def edited(fitted, tmp_path, **changes):
    dst = tmp_path / "c"
    shutil.copytree(fitted / "c", dst)
    meta = json.loads((dst / "cluster.json").read_text())
    meta.update(changes)
    (dst / "cluster.json").write_text(json.dumps(meta))
    return str(dst)


@pytest.mark.parametrize("change, args, fragment", [
    ({"split": "all"}, (), "fitted on the 'all' split"),
    ({}, ("--split", "train"), "shares windows with the 'train' split"),
    ({}, ("--heldout-every", "7"), "heldout_every 10, not 7"),
    ({}, ("--seq-len", str(SEQ * 2)), f"seq_len {SEQ}"),
    ({"split": None, "masks": "/nonexistent"}, (), "do not record the split"),
])
def test_evaluation_on_fitting_windows_is_refused(fitted, tmp_path, change, args, fragment):
    centroids = edited(fitted, tmp_path, **change)
    proc = run_cli("evaluate", "--centroids", centroids, "--out", str(tmp_path / "e"), *args)
    assert_user_error(proc, fragment)
    assert not (tmp_path / "e").exists()


def test_records_say_what_happened(fitted):
    """The default sparsity is recorded; baselines' `converged` is what their fit did."""
    manifest = store.read_manifest(fitted / "masks")
    assert manifest["sparsity_target"] == 0.5 and manifest["split"] == "train"
    meta = json.loads((fitted / "c" / "cluster.json").read_text())
    assert (meta["split"], meta["seq_len"], meta["heldout_every"]) == ("train", SEQ, 10)
    masks = str(fitted / "masks")
    capped = run_cluster(build(ClusterConfig, dict(masks=masks, k=4, max_iter=1,
                                                   algorithm="activation-aware",
                                                   out=str(fitted / "aa1"))))
    assert not any(capped["converged"].values())  # one round cannot see a stable assignment
    # BRB-KMeans runs to its own tolerance within the cap every algorithm shares.
    brb = run_cluster(build(ClusterConfig, dict(masks=masks, k=4, max_iter=1,
                                                algorithm="brb-kmeans", out=str(fitted / "brb"))))
    assert brb["max_iter"] == 1 and set(brb["iterations"].values()) == {1}
    free = run_cluster(build(ClusterConfig, dict(masks=masks, k=4, max_iter=300,
                                                 algorithm="brb-kmeans",
                                                 out=str(fitted / "brb300"))))
    assert free["max_iter"] == 300 and all(free["converged"].values())
    assert all(n < 300 for n in free["iterations"].values())
