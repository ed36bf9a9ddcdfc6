"""Predictors: the inference API, the feature shards, Ray Train fitting and resume, and
the evaluation mode `predicted`, each checked against an independent computation."""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from actclust import kernels as hamming
from actclust.capture.extract import run_extract
from actclust.capture.hooks import layer_masks, masking
from actclust.clustering.distributed import run_cluster
from actclust.config import ClusterConfig, EvaluateConfig, ExtractConfig, PredictorConfig, build
from actclust.errors import UserError
from actclust.evaluation.evaluate import run_evaluate
from actclust.io import mask_store as store
from actclust.io.centroid_store import load_centroids
from actclust.io.corpus import load_windows
from actclust.io.models import ByteTokenizer, decoder_layers, load_model
from actclust.predict import features as F
from actclust.predict import load_predictor
from actclust.predict import model as M
from actclust.predict.train import run_train_predictor
from helpers import REPO, SHARED_RAY, assert_user_error, run_cli, undocumented_fields

SEQ = 64


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("predict")
    run_extract(build(ExtractConfig, dict(model="tiny:llama", seq_len=SEQ, max_tokens=SEQ * 40,
                                          sparsity=0.5, out=str(root / "masks"))))
    run_cluster(build(ClusterConfig, dict(masks=str(root / "masks"), k=8, out=str(root / "c"))))
    return root


@pytest.fixture(scope="module")
def trained(fitted):
    cfg = build(PredictorConfig, dict(centroids=str(fitted / "c"), out=str(fitted / "p"),
                                      epochs=3, workers=2, shard_windows=4,
                                      features=str(fitted / "features")))
    return run_train_predictor(cfg)


def _gelu_logits(h, down, up, bias):
    z = h @ down
    z = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    return z @ up + bias


def test_predictor_set_matches_an_independent_forward(tmp_path):
    gen = torch.Generator().manual_seed(3)
    L, d, r, k = 2, 16, 4, 6
    tensors = {"down": torch.randn(L, d, r, generator=gen), "up": torch.randn(L, r, k, generator=gen),
               "bias": torch.randn(L, k, generator=gen)}
    meta = {"kind": "cluster", "k": k, "rank": r, "width": 32, "layers": [3, 5], "identity": {}}
    M.save(tmp_path, meta, tensors)
    p = load_predictor(tmp_path)
    h = torch.randn(2, 7, d, generator=gen)
    want = _gelu_logits(h, tensors["down"][1], tensors["up"][1], tensors["bias"][1])
    assert p.kind == "cluster" and p.k == k and p.layers == [3, 5]
    assert torch.equal(p.cluster_ids(5, h), want.argmax(-1))
    top = p.top_clusters(5, h, 3)
    assert top.shape == (2, 7, 3) and top.dtype == torch.int64
    assert torch.equal(top[..., 0], want.argmax(-1))
    assert torch.equal(top, want.topk(3, dim=-1).indices)
    with pytest.raises(ValueError, match="neuron"):
        p.neuron_mask(5, h)

    tensors = {"down": tensors["down"], "up": torch.randn(L, r, 32, generator=gen),
               "bias": torch.randn(L, 32, generator=gen), "threshold": torch.tensor([0.5, -0.2])}
    M.save(tmp_path / "n", {**meta, "kind": "neuron"}, tensors)
    n = load_predictor(tmp_path / "n")
    mask = n.neuron_mask(3, h)
    want = _gelu_logits(h, tensors["down"][0], tensors["up"][0], tensors["bias"][0]) > 0.5
    assert mask.dtype == torch.bool and mask.shape == (2, 7, 32)
    assert torch.equal(mask, want)


def test_default_rank_fits_two_percent():
    rank = M.default_rank(576, 256, 3 * 576 * 1536)
    assert M.params_per_layer(576, rank, 256) <= 0.02 * 3 * 576 * 1536
    assert M.params_per_layer(576, rank + 1, 256) > 0.02 * 3 * 576 * 1536


@pytest.mark.parametrize("name, norm", [("tiny:llama", "post_attention_layernorm"),
                                        ("tiny:opt", "final_layer_norm")])
def test_feature_shard_holds_the_ffn_input_and_the_true_mask(name, norm, tmp_path):
    model = load_model(name).model
    w = load_windows("embedded:pydoc", ByteTokenizer(), SEQ, max_tokens=SEQ * 3)
    thresholds = [0.05, 0.1]
    spec = F.FeatureSpec(root=str(tmp_path), model=name, site="intermediate", layers=(0, 1),
                         thresholds=tuple(thresholds), d_model=64,
                         width=model.config.intermediate_size if name == "tiny:llama" else 256,
                         shard_windows=3)
    assert F.write_missing(spec, w.seq, w.ids) == 1
    assert F.write_missing(spec, w.seq, w.ids) == 0  # complete shards are skipped
    h, bits = F.read_shard(spec, 0)

    normed = []  # independent: the output of the norm that precedes the FFN
    hooks = [getattr(layer, norm).register_forward_hook(
        lambda m, a, out: normed.append(out.detach().reshape(-1, 64)))
        for layer in decoder_layers(model)]
    with torch.inference_mode():
        for s in range(0, len(w), 4):
            model(torch.tensor(w.ids[s:s + 4]))
    for hk in hooks:
        hk.remove()
    for i in range(2):
        np.testing.assert_allclose(h[:, i], normed[i].numpy(), rtol=1e-3, atol=1e-3)
    masks = layer_masks(model, w.ids, thresholds)
    for i in range(2):
        assert np.array_equal(bits[:, i], store.pack(masks[i]))


@pytest.mark.parametrize("kind", ["cluster", "neuron"])
def test_shard_cache_gives_what_the_shards_hold_within_its_budget(kind, tmp_path):
    model = load_model("tiny:llama").model
    w = load_windows("embedded:pydoc", ByteTokenizer(), SEQ, max_tokens=SEQ * 6)
    spec = F.FeatureSpec(root=str(tmp_path), model="tiny:llama", site="intermediate",
                         layers=(0, 1), thresholds=(0.05, 0.1), d_model=64,
                         width=model.config.intermediate_size, shard_windows=2)
    assert F.write_missing(spec, w.seq, w.ids) == 3
    rng = np.random.default_rng(0)
    centroids = [np.packbits(rng.random((5, spec.width)) < 0.4, axis=1, bitorder="little")
                 for _ in spec.layers]
    targets = F.Targets(kind, centroids, spec.width)
    one_shard = 2 * SEQ * 2 * (64 * 2 + (8 if kind == "cluster" else spec.width // 8))
    cache = F.ShardCache(spec, targets, budget=2 * one_shard)  # room for two shards
    for index in (0, 1, 2, 0, 2):
        h, prepared = cache.get(index)
        want_h, bits = F.read_shard(spec, index)
        assert torch.equal(h.to(torch.float32), torch.from_numpy(want_h))
        rows = torch.tensor([3, 0, 7])
        assert torch.equal(targets.select(prepared, rows), targets(bits)[rows])
    assert sorted(cache.held) == [0, 1] and cache.bytes == 2 * one_shard


@pytest.mark.slow  # Ray Train (the trained fixture)
def test_trained_cluster_predictor_record(trained, fitted):
    meta, centroids = load_centroids(fitted / "c")
    assert trained["kind"] == "cluster" and trained["k"] == 8 and trained["layers"] == [0, 1]
    assert trained["params"] == 2 * M.params_per_layer(64, trained["rank"], 8)
    assert trained["params_fraction"] <= 0.02
    assert trained["params_fraction"] == pytest.approx(trained["params"] / (2 * 3 * 64 * 192))
    windows = trained["identity"]["windows"]
    assert windows == 40 and trained["training_tokens"] + trained["validation_tokens"] == 40 * SEQ
    assert trained["validation_tokens"] == 4 * SEQ  # shard 9 of 10 validates
    assert trained["validation_accuracy"] > 2 / 8  # well above chance
    assert json.loads((fitted / "p" / "predictor.json").read_text()) == trained
    p = load_predictor(fitted / "p")
    assert p.kind == "cluster" and p.rank == trained["rank"]
    # The recorded train accuracy is the top-1 agreement with the kernels' assignment.
    spec_args = json.loads((fitted / "features" / "features.json").read_text())
    spec = F.FeatureSpec(root=str(fitted / "features"), model="tiny:llama", site="intermediate",
                         layers=(0, 1), thresholds=tuple(spec_args["thresholds"]), d_model=64,
                         width=192, shard_windows=4)
    h, bits = F.read_shard(spec, 0)
    hits = sum(int((p.cluster_ids(l, torch.from_numpy(h[:, l])).numpy()
                    == hamming.assign(np.ascontiguousarray(bits[:, l]), centroids[l])[0]).sum())
               for l in (0, 1))
    assert 0 < hits <= 2 * len(h)
    # The same command again is a no-op that returns the same record.
    again = run_train_predictor(build(PredictorConfig, dict(
        centroids=str(fitted / "c"), out=str(fitted / "p"), epochs=3, workers=2, shard_windows=4,
        features=str(fitted / "features"))))
    assert again == trained


@pytest.mark.slow  # Ray Train (the trained fixture)
def test_docs_formats_names_every_field_of_a_predictor_directory(trained, fitted):
    run_record = json.loads((fitted / "p" / "run.json").read_text())
    assert not undocumented_fields(trained) and not undocumented_fields(run_record)


@pytest.mark.slow  # Ray Train (the trained fixture)
def test_neuron_predictor_matches_the_cluster_density(fitted, trained):
    record = run_train_predictor(build(PredictorConfig, dict(
        centroids=str(fitted / "c"), out=str(fitted / "pn"), kind="neuron", epochs=2, workers=1,
        shard_windows=4, features=str(fitted / "features"))))
    assert record["kind"] == "neuron" and record["params_fraction"] <= 0.02
    for row in record["per_layer"]:
        assert row["train_density"] == pytest.approx(row["cluster_density"], abs=0.02)
        assert 0 < row["train_recall"] <= 1 and 0 < row["validation_precision"] <= 1
    assert record["cluster_density"] == pytest.approx(trained["cluster_density"])


def _fixed_predictor(fitted, out, kind, first, second=None):
    """A predictor that ignores its input: bias picks cluster ``first`` (then ``second``),
    or switches on the neurons in ``first``."""
    meta, _ = load_centroids(fitted / "c")
    record = json.loads((fitted / "p" / "predictor.json").read_text())
    width = meta["d_ff"]
    out_dim = meta["k"] if kind == "cluster" else width
    bias = torch.zeros(2, out_dim)
    bias[:, first] = 2.0
    if second is not None:
        bias[:, second] = 1.0
    tensors = {"down": torch.zeros(2, 64, 1), "up": torch.zeros(2, 1, out_dim), "bias": bias}
    if kind == "neuron":
        tensors["threshold"] = torch.zeros(2)
    M.save(out, {**record, "kind": kind, "rank": 1}, tensors)
    return out


def _masked_ppl(fitted, masks_by_layer, max_tokens):
    model = load_model("tiny:llama").model
    w = load_windows("embedded:pydoc", ByteTokenizer(), SEQ, split="heldout", max_tokens=max_tokens)
    total, count = 0.0, 0
    mask_fn = masks_by_layer if callable(masks_by_layer) else \
        (lambda layer, a: masks_by_layer[layer])
    with torch.inference_mode(), masking(model, mask_fn):
        for s in range(0, len(w), 4):
            ids = torch.tensor(w.ids[s:s + 4])
            n = ids.shape[0] * (ids.shape[1] - 1)
            total += model(ids, labels=ids).loss.item() * n
            count += n
    return math.exp(total / count), w


@pytest.mark.slow  # Ray Train (the trained fixture)
def test_predicted_mode_and_keeps_the_true_mask_inside_the_prediction(fitted, trained, tmp_path):
    meta, centroids = load_centroids(fitted / "c")
    width = meta["d_ff"]
    pred_dir = _fixed_predictor(fitted, tmp_path / "fixed", "cluster", 5)
    fixed = [torch.from_numpy(store.unpack(c[5:6], width)[0]) for c in centroids]
    reports = {mode: run_evaluate(build(EvaluateConfig, dict(
        centroids=str(fitted / "c"), out=str(tmp_path / mode), max_tokens=SEQ * 8,
        predictor=str(pred_dir), dense_prefix=0, mask_mode=mode))) for mode in ("replace", "and")}
    taus = meta["thresholds"]
    want, _ = _masked_ppl(fitted, lambda layer, a: fixed[layer] & (a.abs() > taus[layer]),
                          SEQ * 8)
    assert reports["and"]["predicted_ppl"] == pytest.approx(want, rel=1e-5)
    assert reports["and"]["predicted_ppl"] != pytest.approx(reports["replace"]["predicted_ppl"],
                                                            rel=1e-4)
    fractions = [r["ffn_bytes_fraction"]["predicted"] for r in reports.values()]
    assert fractions[1] < fractions[0]  # down is read only at the kept neurons


@pytest.mark.slow  # Ray Train (the trained fixture)
@pytest.mark.parametrize("kind", ["cluster", "neuron"])
def test_predicted_mode_equals_an_independent_masked_pass(fitted, trained, tmp_path, kind):
    meta, centroids = load_centroids(fitted / "c")
    width = meta["d_ff"]
    neurons = np.arange(0, width, 3)
    pred_dir = _fixed_predictor(fitted, tmp_path / "fixed", kind, 5 if kind == "cluster" else neurons)
    report = run_evaluate(build(EvaluateConfig, dict(
        centroids=str(fitted / "c"), out=str(tmp_path / "e"), max_tokens=SEQ * 8,
        predictor=str(pred_dir), dense_prefix=0,  # the reference masks every position
        mask_mode="replace")))  # the reference applies the predicted mask itself
    if kind == "cluster":
        fixed = [torch.from_numpy(store.unpack(c[5:6], width)[0]) for c in centroids]
    else:
        fixed = [torch.from_numpy(np.isin(np.arange(width), neurons))] * 2
    want, w = _masked_ppl(fitted, fixed, SEQ * 8)
    assert report["predicted_ppl"] == pytest.approx(want, rel=1e-5)
    density = np.mean([float(f.float().mean()) for f in fixed])
    assert report["predicted_density"] == pytest.approx(density, rel=1e-6)
    # Layer 0 sees the dense input, so its figures follow from the dense true masks.
    true0 = layer_masks(load_model("tiny:llama").model, w.ids, meta["thresholds"])[0]
    overlap = (true0 & fixed[0].numpy()).sum()
    row = report["per_layer"][0]
    assert row["predicted_recall"] == pytest.approx(overlap / true0.sum(), rel=1e-6)
    assert row["predicted_precision"] == pytest.approx(overlap / (len(true0) * fixed[0].sum().item()))
    if kind == "cluster":
        labels = hamming.assign(store.pack(true0), centroids[0])[0]
        assert row["predicted_accuracy"] == pytest.approx(float((labels == 5).mean()))
    else:
        assert report["predicted_accuracy"] is None
    assert report["predictor_params_fraction"] == trained["params_fraction"]


@pytest.mark.slow  # Ray Train (the trained fixture)
def test_neuron_topk_keeps_each_layers_cluster_density_exactly(fitted, trained, tmp_path):
    """--neuron-select topk: per token the round(d * width) highest logits, d the
    clustering's per-layer density on the training tokens; a threshold need not transfer
    to the masked pass's inputs, a budget does by construction."""
    meta, _ = load_centroids(fitted / "c")
    record = json.loads((fitted / "p" / "predictor.json").read_text())
    width = meta["d_ff"]
    order = torch.randperm(width, generator=torch.Generator().manual_seed(1))
    bias = torch.stack([order.float(), -order.float()])  # distinct logits, other order per layer
    M.save(tmp_path / "fixed", {**record, "kind": "neuron", "rank": 1},
           {"down": torch.zeros(2, 64, 1), "up": torch.zeros(2, 1, width), "bias": bias,
            "threshold": torch.full((2,), 1e9)})  # the threshold rule would keep nothing
    budgets = [int(round(r["cluster_density"] * width)) for r in record["per_layer"]]
    assert load_predictor(tmp_path / "fixed").neuron_budget(1) == budgets[1]
    fixed = [torch.zeros(width, dtype=torch.bool).index_fill_(0, bias[i].topk(n).indices, True)
             for i, n in enumerate(budgets)]
    report = run_evaluate(build(EvaluateConfig, dict(
        centroids=str(fitted / "c"), out=str(tmp_path / "e"), max_tokens=SEQ * 8,
        predictor=str(tmp_path / "fixed"), neuron_select="topk", dense_prefix=0,
        mask_mode="replace")))
    want, _ = _masked_ppl(fitted, fixed, SEQ * 8)
    assert report["predicted_ppl"] == pytest.approx(want, rel=1e-5)
    assert report["neuron_select"] == "topk"
    for row, n in zip(report["per_layer"], budgets):
        assert row["predicted_density"] == pytest.approx(n / width, abs=1e-12)
    old = {**record, "kind": "neuron", "rank": 1,
           "per_layer": [{k: v for k, v in r.items() if k != "cluster_density"}
                         for r in record["per_layer"]]}
    M.save(tmp_path / "old", old, {"down": torch.zeros(2, 64, 1), "up": torch.zeros(2, 1, width),
                                   "bias": bias, "threshold": torch.zeros(2)})
    with pytest.raises(UserError, match="no per-layer cluster_density"):
        run_evaluate(build(EvaluateConfig, dict(
            centroids=str(fitted / "c"), out=str(tmp_path / "o"), max_tokens=SEQ * 8,
            predictor=str(tmp_path / "old"), neuron_select="topk")))
    assert not (tmp_path / "o" / "eval.json").exists()
    cluster = run_cli("evaluate", "--centroids", str(fitted / "c"), "--predictor",
                      str(fitted / "p"), "--neuron-select", "topk", "--out", str(tmp_path / "x"))
    assert_user_error(cluster, "--neuron-select applies to a neuron predictor")
    assert_user_error(run_cli("evaluate", "--centroids", str(fitted / "c"), "--out",
                              str(tmp_path / "y"), "--neuron-select", "top"),
                      "neuron_select must be one of threshold, topk")


@pytest.mark.slow  # Ray Train (the trained fixture)
def test_top_m_masks_with_the_union_of_centroids(fitted, trained, tmp_path):
    meta, centroids = load_centroids(fitted / "c")
    pred_dir = _fixed_predictor(fitted, tmp_path / "fixed", "cluster", 2, 6)
    report = run_evaluate(build(EvaluateConfig, dict(
        centroids=str(fitted / "c"), out=str(tmp_path / "e"), max_tokens=SEQ * 4,
        predictor=str(pred_dir), top_m=2)))
    union = [store.unpack(c[[2, 6]], meta["d_ff"]).any(axis=0) for c in centroids]
    assert report["predicted_density"] == pytest.approx(np.mean([u.mean() for u in union]))


@pytest.mark.slow  # Ray Train (the trained fixture)
def test_predicted_weighted_recall_equals_the_cluster_pass_when_prediction_is_assignment(
        fitted, trained, tmp_path):
    """K = 1: every token's oracle assignment is cluster 0, and so is every prediction, so
    the predicted pass is the cluster pass and its figures must be the cluster pass's."""
    run_cluster(build(ClusterConfig, dict(masks=str(fitted / "masks"), k=1, out=str(tmp_path / "c1"))))
    record = json.loads((fitted / "p" / "predictor.json").read_text())
    identity = {**record["identity"],
                "centroids_sha256": store.sha256_file(tmp_path / "c1" / "centroids.parquet")}
    M.save(tmp_path / "p1", {**record, "k": 1, "rank": 1, "identity": identity},
           {"down": torch.zeros(2, 64, 1), "up": torch.zeros(2, 1, 1), "bias": torch.zeros(2, 1)})
    report = run_evaluate(build(EvaluateConfig, dict(
        centroids=str(tmp_path / "c1"), out=str(tmp_path / "e"), max_tokens=SEQ * 8,
        predictor=str(tmp_path / "p1"), mask_mode="replace")))
    assert report["predicted_accuracy"] == 1.0
    assert 0 < report["weighted_recall"] < 1
    assert report["predicted_weighted_recall"] == pytest.approx(report["weighted_recall"], rel=1e-6)
    assert report["predicted_ppl"] == pytest.approx(report["cluster_ppl"], rel=1e-9)
    assert report["predicted_effective_density"] == pytest.approx(report["effective_density"])
    for row in report["per_layer"]:
        assert row["predicted_weighted_recall"] == pytest.approx(row["weighted_recall"], rel=1e-6)
        assert row["predicted_recall"] == pytest.approx(row["recall"], rel=1e-9)


@pytest.mark.slow  # Ray Train (the trained fixture)
def test_predicted_weighted_recall_of_the_union_of_all_centroids(fitted, trained, tmp_path):
    """A fixed predictor with top-m 2 masks with the union of centroids 2 and 6; layer 0 sees
    the dense input in every pass, so its weighted recall follows from a dense forward with
    the dense prefix excluded."""
    from actclust.capture.hooks import per_layer_on_host

    meta, centroids = load_centroids(fitted / "c")
    width = meta["d_ff"]
    pred_dir = _fixed_predictor(fitted, tmp_path / "fixed", "cluster", 2, 6)
    report = run_evaluate(build(EvaluateConfig, dict(
        centroids=str(fitted / "c"), out=str(tmp_path / "e"), max_tokens=SEQ * 8,
        predictor=str(pred_dir), top_m=2)))  # default dense_prefix 1
    union = store.unpack(centroids[0][[2, 6]], width).any(axis=0)
    w = load_windows("embedded:pydoc", ByteTokenizer(), SEQ, split="heldout", max_tokens=SEQ * 8)
    a = np.concatenate(per_layer_on_host(load_model("tiny:llama").model, w.ids, "intermediate", 4,
                                         lambda layer, x: x.double())[0])  # (W, T, width)
    body = np.abs(a[:, 1:].reshape(-1, width))
    mass = body * (body > meta["thresholds"][0])
    want = (mass * union).sum() / mass.sum()
    assert 0 < want < 1
    row = report["per_layer"][0]
    assert row["predicted_weighted_recall"] == pytest.approx(want, rel=1e-5)
    masked, prefix = len(body), len(w)
    assert row["predicted_effective_density"] == pytest.approx(
        (masked * union.sum() + prefix * width) / ((masked + prefix) * width))
    assert 0 < report["predicted_weighted_recall"] <= 1


@pytest.mark.slow  # Ray Train (the trained fixture)
def test_evaluation_refuses_foreign_or_overlapping_predictors(fitted, trained, tmp_path):
    base = ["evaluate", "--centroids", str(fitted / "c"), "--out", str(tmp_path / "e"),
            "--max-tokens", str(SEQ * 4)]
    # Evaluating the fitting split is refused for the centroids first; the predictor's own
    # check is reached directly, with the windows it was trained on.
    from types import SimpleNamespace

    from actclust.predict.evaluation import check_predictor

    meta, _ = load_centroids(fitted / "c")
    cfg = build(EvaluateConfig, dict(centroids=str(fitted / "c"), split="train",
                                     out=str(tmp_path / "e"), max_tokens=SEQ * 4,
                                     predictor=str(fitted / "p"), model=meta["model"],
                                     corpus=meta["corpus"], seq_len=meta["seq_len"]))
    trained_on = json.loads((fitted / "p" / "predictor.json").read_text())["identity"]["first_seq"]
    with pytest.raises(UserError, match="windows this evaluation would use"):
        check_predictor(str(fitted / "p"), cfg, meta, SimpleNamespace(seq=np.array([trained_on])))
    with pytest.raises(UserError, match="shares windows"):
        run_evaluate(cfg)
    other = tmp_path / "c2"
    run_cluster(build(ClusterConfig, dict(masks=str(fitted / "masks"), k=8, seed=1,
                                          out=str(other))))
    proc = run_cli("evaluate", "--centroids", str(other), "--out", str(tmp_path / "e"),
                   "--predictor", str(fitted / "p"), "--max-tokens", str(SEQ * 4))
    assert_user_error(proc, "other centroids")
    assert_user_error(run_cli(*base, "--predictor", str(fitted / "p"), "--top-m", "9"),
                      "--top-m must be in [1, 8]")
    assert_user_error(run_cli(*base, "--predictor", str(tmp_path)), "not a predictor directory")
    assert not (tmp_path / "e" / "eval.json").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--kind", "bogus"], "kind must be one of cluster, neuron"),
    (["--rank", "0"], "rank must be at least 1"),
    (["--epochs", "0"], "epochs must be at least 1"),
])
def test_train_predictor_bad_flags(fitted, tmp_path, argv, fragment):
    proc = run_cli("train-predictor", "--centroids", str(fitted / "c"), "--out",
                   str(tmp_path / "p"), *argv)
    assert_user_error(proc, fragment)


def test_train_predictor_bad_inputs(fitted, tmp_path):
    assert_user_error(run_cli("train-predictor", "--out", str(tmp_path / "p")), "missing centroids")
    assert_user_error(run_cli("train-predictor", "--centroids", str(tmp_path), "--out",
                              str(tmp_path / "p")), "is not a clustering directory")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert_user_error(run_cli("train-predictor", "--centroids", str(fitted / "c"), "--out",
                              str(tmp_path / "busy")), "not empty")


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two Ray Train start-ups; slow on a loaded 2-core machine
def test_killed_driver_resumes_from_its_last_checkpoint(fitted, tmp_path):
    out = tmp_path / "p"
    argv = ["train-predictor", "--centroids", str(fitted / "c"), "--out", str(out), "--epochs",
            "5", "--workers", "1"]
    # The killed driver joins the shared cluster, as the resumed one does; one worker: the
    # two-worker fit is the `trained` fixture's.
    env = SHARED_RAY.client_env()
    with open(tmp_path / "first.err", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "actclust", *argv], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    pattern = str(out / "ray" / "train" / "checkpoint_*" / "state.pt")
    # A checkpoint counts once Ray Train has recorded it in its snapshot, not when its
    # files land: a kill in between leaves nothing to resume from.
    snapshot = out / "ray" / "train" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 600
    while time.time() < deadline and not snapshot.is_file() and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, (tmp_path / "first.err").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert glob.glob(pattern), "training ended before its first checkpoint"
    assert not (out / "predictor.json").exists()

    resumed = run_cli(*argv, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Ray Train's routine lines stay off the terminal by default (they come back with -v).
    for routine in ("Reporting training result", "Started training worker group", "epoch 1:"):
        assert routine not in resumed.stderr, resumed.stderr[-3000:]
    record = json.loads((out / "predictor.json").read_text())
    assert record["resumed_after_epoch"] >= 1
    assert record["epochs"] == 5 and record["validation_accuracy"] > 2 / 8
