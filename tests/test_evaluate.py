"""Masked perplexity and clustering metrics, checked against independent computations."""

import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from actclust.io import mask_store as store
from actclust.clustering.distributed import run_cluster
from actclust.config import ClusterConfig, EvaluateConfig, ExtractConfig, build
from actclust.io.corpus import load_windows
from actclust.evaluation.evaluate import run_evaluate
from actclust.evaluation.metrics import metric_values
from actclust.kernels import assignment_stats
from actclust.capture.extract import run_extract
from actclust.io.models import ByteTokenizer, load_model
from helpers import assert_user_error, run_cli

SEQ = 64


@pytest.fixture(scope="module", params=["tiny:opt", "tiny:llama"])
def fitted(request, tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp(request.param.replace(":", "-"))
    run_extract(build(ExtractConfig, dict(model=request.param, corpus="embedded:pydoc",
                                           seq_len=SEQ, max_tokens=SEQ * 30,
                                           out=str(root / "masks"))))
    run_cluster(build(ClusterConfig, dict(masks=str(root / "masks"), k=8, out=str(root / "c"))))
    return request.param, root


def evaluate(root, name="e", **kw):
    # replace (a * c), the mode these tests check against a masked forward
    values = dict(centroids=str(root / "c"), out=str(root / name), max_tokens=SEQ * 6,
                  mask_mode="replace")
    values.update(kw)
    return run_evaluate(build(EvaluateConfig, values))


def transformers_ppl(model_name, max_tokens):
    model = load_model(model_name).model
    w = load_windows("embedded:pydoc", ByteTokenizer(), SEQ, split="heldout", max_tokens=max_tokens)
    total, count = 0.0, 0
    with torch.inference_mode():
        for chunk in range(0, len(w), 4):  # same batching as the evaluator
            ids = torch.tensor(w.ids[chunk:chunk + 4])
            loss = model(ids, labels=ids).loss.item()
            n = ids.shape[0] * (ids.shape[1] - 1)
            total, count = total + loss * n, count + n
    return math.exp(total / count)


def test_dense_ppl_equals_transformers_loss(fitted):
    name, root = fitted
    report = evaluate(root)
    assert report["dense_ppl"] == pytest.approx(transformers_ppl(name, SEQ * 6), rel=1e-5)
    assert report["tokens"] == SEQ * 6
    on_disk = json.loads((root / "e" / "eval.json").read_text())
    for key in ("dense_ppl", "oracle_ppl", "cluster_ppl", "precision", "recall", "f1", "accuracy",
                "density", "true_density", "tokens", "per_layer"):
        assert key in on_disk
    assert [p["layer"] for p in on_disk["per_layer"]] == [0, 1]


def test_relu_oracle_equals_dense_exactly(fitted):
    name, root = fitted
    report = evaluate(root, "e_oracle")
    if name == "tiny:opt":
        assert report["oracle_ppl"] == report["dense_ppl"]
    else:
        assert report["oracle_ppl"] != report["dense_ppl"]  # 50% sparsity changes a gated model


def _replace_centroids(root, name, fill):
    """A copy of the clustering directory whose centroids are all ones or all zeros."""
    dst = root / name
    shutil.copytree(root / "c", dst)
    import pyarrow.parquet as pq

    table = pq.read_table(dst / "centroids.parquet")
    bits = store.bits_to_numpy(table.column("bits"))
    meta = json.loads((dst / "cluster.json").read_text())
    full = store.pack(np.full((len(bits), meta["d_ff"]), fill, dtype=bool))
    table = table.set_column(table.schema.get_field_index("bits"), "bits", store.bits_array(full))
    pq.write_table(table, dst / "centroids.parquet")
    return dst


def test_all_ones_centroids_give_dense_and_all_zeros_hurt(fitted):
    name, root = fitted
    ones = evaluate(root, "e1", centroids=str(_replace_centroids(root, "ones", True)))
    zeros = evaluate(root, "e0", centroids=str(_replace_centroids(root, "zeros", False)))
    assert ones["cluster_ppl"] == pytest.approx(ones["dense_ppl"], rel=1e-12)
    assert ones["recall"] == 1.0 and ones["density"] == 1.0
    assert zeros["recall"] == 0.0
    # Random tiny weights predict near-uniformly, so only "it changed" is meaningful here;
    # the direction is checked on the real model below.
    assert abs(zeros["cluster_ppl"] - zeros["dense_ppl"]) > 1e-6 * zeros["dense_ppl"]


@pytest.mark.slow
def test_zero_recall_raises_perplexity_on_the_embedded_model(tmp_path, ray_session):
    import pyarrow.parquet as pq

    layers = list(range(30))
    c = tmp_path / "zeros"
    c.mkdir()
    zero = np.zeros((2, store.row_bytes(1536)), np.uint8)
    table = pa.table({"layer": pa.array(np.repeat(np.int32(layers), 2)),
                      "cluster": pa.array(np.tile(np.int32([0, 1]), 30)),
                      "bits": store.bits_array(np.concatenate([zero] * 30)),
                      "size": pa.array(np.ones(60, np.int64))})
    pq.write_table(table, c / "centroids.parquet")
    meta = dict(k=2, theta=0.5, algorithm="hamming-kmeans", model="embedded:smollm2-135m",
                corpus="embedded:pydoc", seq_len=128, sites="intermediate", text_column="text",
                heldout_every=10, split="train", layers=layers, d_ff=1536,
                thresholds=[0.0] * 30)
    (c / "cluster.json").write_text(json.dumps(meta))
    report = run_evaluate(build(EvaluateConfig, dict(centroids=str(c), out=str(tmp_path / "e"),
                                                     max_tokens=256)))
    assert report["recall"] == 0.0 and report["density"] == 0.0
    assert report["cluster_ppl"] > 2 * report["dense_ppl"]
    assert 3 < report["dense_ppl"] < 100


def test_two_workers_give_the_same_numbers(fitted):
    name, root = fitted
    one = evaluate(root, "w1", workers=1)
    two = evaluate(root, "w2", workers=2)
    for key in ("dense_ppl", "oracle_ppl", "cluster_ppl", "random_ppl", "precision", "recall"):
        assert one[key] == two[key]


def test_metrics_equal_brute_force_on_random_masks():
    rng = np.random.default_rng(0)
    d = 300
    m = rng.random((500, d)) < 0.3
    c = rng.random((12, d)) < 0.4
    stats = assignment_stats(store.pack(m), store.pack(c), "numpy")
    dist = (m[:, None, :] != c[None, :, :]).sum(-1)
    nearest = dist.argmin(1)
    cm = c[nearest]
    inter = (m & cm).sum()
    got = metric_values(stats, d)
    assert got["precision"] == pytest.approx(inter / cm.sum())
    assert got["recall"] == pytest.approx(inter / m.sum())
    assert got["accuracy"] == pytest.approx((m == cm).mean())
    assert got["density"] == pytest.approx(cm.mean())
    assert got["true_density"] == pytest.approx(m.mean())
    p, r = inter / cm.sum(), inter / m.sum()
    assert got["f1"] == pytest.approx(2 * p * r / (p + r))


def test_centroids_of_another_model_are_refused(fitted, tmp_path):
    name, root = fitted
    other = "tiny:gpt2"
    proc = run_cli("evaluate", "--model", other, "--centroids", str(root / "c"),
                   "--out", str(tmp_path / "e"))
    assert_user_error(proc, "were fitted on masks of model")
    assert not (tmp_path / "e" / "eval.json").exists()


def test_centroids_of_another_width_are_refused(fitted, tmp_path):
    name, root = fitted
    dst = tmp_path / "c"
    shutil.copytree(root / "c", dst)
    meta = json.loads((dst / "cluster.json").read_text())
    meta["d_ff"] = meta["d_ff"] * 2
    (dst / "cluster.json").write_text(json.dumps(meta))
    proc = run_cli("evaluate", "--centroids", str(dst), "--out", str(tmp_path / "e"))
    assert_user_error(proc, "bits wide")


def test_in_pass_assignment_matches_the_hamming_kernels(fitted):
    """The evaluator's GEMM-form assignment equals hamming.assign, ties included."""
    from actclust import hamming
    from actclust.evaluation.evaluate import Evaluator, EvaluatorSpec

    name, root = fitted
    ev = Evaluator(EvaluatorSpec(name, str(root / "c")))
    rows = ev.centroids[0].rows.numpy()
    d = rows.shape[1]
    rng = np.random.default_rng(1)
    centroids_packed = store.pack(rows.astype(bool))
    m = rng.random((400, d)) < 0.5
    m[:50] = rows[rng.integers(0, len(centroids_packed), 50)] > 0  # exact hits
    labels, overlap = ev.centroids[0].nearest(torch.from_numpy(m))
    ref_labels, ref_dist = hamming.assign(store.pack(m), centroids_packed, backend="numpy")
    np.testing.assert_array_equal(labels.numpy(), ref_labels)
    cent = rows[ref_labels] > 0
    np.testing.assert_array_equal(overlap.numpy(), (m & cent).sum(1))
