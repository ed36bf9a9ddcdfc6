"""Several FFN sites at once (format version 2): extraction from the same forward passes,
per-site centroids, all sites masked in one evaluation pass, and version 1 unchanged."""

import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from actclust.capture.extract import run_extract
from actclust.capture.verify import verify
from actclust.clustering.distributed import run_cluster
from actclust.config import ClusterConfig, EvaluateConfig, ExtractConfig, build, load_yaml
from actclust.orchestration.runconfig import RunConfig
from actclust.errors import UserError
from actclust.evaluation.evaluate import run_evaluate
from actclust.io import centroid_store
from actclust.io import mask_store as store
from actclust.io.corpus import load_windows
from actclust.io.models import ByteTokenizer, load_model
from helpers import REPO, assert_user_error, run_cli

SEQ = 32
MODEL = "tiny:llama"
FIT_TOKENS = SEQ * 24
EVAL_TOKENS = SEQ * 6
SITES = ["gate", "up", "down_out"]


def extract(out, sites, model=MODEL):
    return run_extract(build(ExtractConfig, dict(
        model=model, corpus="embedded:pydoc", seq_len=SEQ, max_tokens=FIT_TOKENS, out=str(out),
        sites=sites, sparsity=0.5, shard_windows=8, calibration_windows=8)))


def cluster(masks, out, **kw):
    values = dict(masks=str(masks), k=4, theta=0.3, out=str(out))
    values.update(kw)
    return run_cluster(build(ClusterConfig, values))


def evaluate(centroids, out, **kw):
    values = dict(centroids=str(centroids), out=str(out), max_tokens=EVAL_TOKENS,
                  bootstrap_resamples=200)
    values.update(kw)
    return run_evaluate(build(EvaluateConfig, values))


@pytest.fixture(scope="module")
def multi(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("sites")
    manifest = extract(root / "masks", ",".join(SITES))
    cluster(root / "masks", root / "c")
    return root, manifest


def site_bits(root, manifest, site):
    """Every layer's packed masks of ``site`` (version 1 directory: its one site)."""
    view = store.site_view(manifest, site)
    return [store.read_layer(root, view, layer)["bits"] for layer in manifest["layers"]]


def test_multi_site_manifest_and_layout(multi):
    root, manifest = multi
    assert manifest["format_version"] == 2 and manifest["sites"] == SITES
    assert manifest["d_ff"] == {"gate": 192, "up": 192, "down_out": 64}
    assert set(manifest["thresholds"]) == set(SITES)
    assert all(len(t) == len(manifest["layers"]) for t in manifest["thresholds"].values())
    for site in SITES:
        for layer in manifest["layers"]:
            files = sorted(p.name for p in (root / "masks" / "masks" / f"site={site}"
                                            / f"layer={layer}").iterdir())
            assert files == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert not (root / "masks" / "masks" / "layer=0").exists()
    assert verify(str(root / "masks")) == []
    # The written row widths follow each site's width.
    assert site_bits(root / "masks", manifest, "down_out")[0].shape == (FIT_TOKENS, 8)
    assert site_bits(root / "masks", manifest, "gate")[0].shape == (FIT_TOKENS, 24)


@pytest.mark.parametrize("site", ["gate", "down_out"])
def test_multi_site_masks_equal_single_site_masks_bit_for_bit(multi, tmp_path, site):
    root, manifest = multi
    single = extract(tmp_path / "one", site)
    assert single["format_version"] == 1 and single["sites"] == site
    assert single["thresholds"] == manifest["thresholds"][site]
    assert single["d_ff"] == manifest["d_ff"][site]
    for got, want in zip(site_bits(root / "masks", manifest, site),
                         site_bits(tmp_path / "one", single, site)):
        np.testing.assert_array_equal(got, want)


def test_corrupt_site_file_is_named_by_verify(multi, tmp_path):
    root, _ = multi
    copy = tmp_path / "m"
    shutil.copytree(root / "masks", copy)
    path = copy / "masks" / "site=up" / "layer=1" / "shard-00001.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = verify(str(copy))
    assert any(p.startswith("masks/site=up/layer=1/shard-00001.parquet: sha256") for p in problems)
    with pytest.raises(UserError, match="does not match its sha256"):
        cluster(copy, tmp_path / "c")


def test_centroids_per_site_and_layer(multi):
    root, manifest = multi
    meta, centroids = centroid_store.load_centroids(str(root / "c"))
    assert meta["format_version"] == 2 and meta["sites"] == SITES
    assert meta["d_ff"] == manifest["d_ff"]
    table = pq.read_table(root / "c" / "centroids.parquet")
    assert table.column("site").to_pylist().count("down_out") == 4 * len(manifest["layers"])
    assert [c.shape for c in centroids] == [(4, 24)] * 4 + [(4, 8)] * 2
    assert set(meta["cost"]) == {f"{s}:{layer}" for s in SITES for layer in manifest["layers"]}


def test_pooled_layers_give_one_centroid_set_per_site(multi, tmp_path):
    root, manifest = multi
    meta = cluster(root / "masks", tmp_path / "pooled", algorithm="activation-aware",
                   pool_layers=True, theta=None)
    assert meta["pooled"] and set(meta["sizes"]) == {f"{s}:-1" for s in SITES}
    table = pq.read_table(tmp_path / "pooled" / "centroids.parquet")
    assert sorted(set(zip(table.column("site").to_pylist(), table.column("layer").to_pylist()))) \
        == sorted((s, -1) for s in SITES)
    _, centroids = centroid_store.load_centroids(str(tmp_path / "pooled"))
    np.testing.assert_array_equal(centroids[0], centroids[1])  # gate, layers 0 and 1: pooled
    report = evaluate(tmp_path / "pooled", tmp_path / "e", mask_mode="and")
    assert math.isfinite(report["cluster_ppl"]) and report["oracle_ppl"] <= report["cluster_ppl"]


def independent_oracle_ppl(manifest, dense_prefix):
    """Perplexity with gate, up and down_out outputs all masked by |x| > tau in one pass,
    with hooks written here."""
    model = load_model(MODEL).model
    ids = torch.tensor(load_windows("embedded:pydoc", ByteTokenizer(), SEQ, split="heldout",
                                    max_tokens=EVAL_TOKENS).ids)
    handles = []
    for layer, block in enumerate(model.model.layers):
        for site, module in (("gate", block.mlp.gate_proj), ("up", block.mlp.up_proj),
                             ("down_out", block.mlp.down_proj)):
            tau = manifest["thresholds"][site][layer]

            def hook(mod, args, out, tau=tau):
                keep = (out.abs() > tau).to(out.dtype)
                keep[:, :dense_prefix] = 1
                return out * keep
            handles.append(module.register_forward_hook(hook))
    with torch.inference_mode():
        logits = model(ids).logits.double()
    for h in handles:
        h.remove()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])
    return math.exp(-logp.mean().item())


def test_every_site_is_masked_in_the_same_pass(multi):
    root, manifest = multi
    report = evaluate(root / "c", root / "e")
    assert report["oracle_ppl"] == pytest.approx(independent_oracle_ppl(manifest, 1), rel=1e-9)
    assert report["oracle_ppl"] != report["dense_ppl"]
    assert report["sites"] == SITES
    assert [(p["site"], p["layer"]) for p in report["per_layer"]] == \
        [(s, layer) for s in SITES for layer in manifest["layers"]]
    per_site = {p["site"]: p for p in report["per_site"]}
    assert per_site["down_out"]["d_ff"] == 64 and per_site["gate"]["d_ff"] == 192
    # Overall figures weigh each site by its width: every site sees the same tokens.
    widths = {s: manifest["d_ff"][s] for s in SITES}
    total = sum(widths.values())
    for key in ("effective_density", "density", "true_density", "random_density"):
        want = sum(per_site[s][key] * widths[s] for s in SITES) / total
        assert report[key] == pytest.approx(want, rel=1e-12), key
    true_bits = {s: per_site[s]["true_density"] * widths[s] for s in SITES}
    assert report["recall"] == pytest.approx(
        sum(per_site[s]["recall"] * true_bits[s] for s in SITES) / sum(true_bits.values()))
    assert report["random_density"] == pytest.approx(report["density"], abs=0.005)
    lo, hi = report["cluster_ppl_ci95"]
    assert lo <= report["cluster_ppl"] <= hi


def ones_centroids(src, dst):
    """A copy of version 2 centroids with every bit set (each row its site's width)."""
    shutil.copytree(src, dst)
    table = pq.read_table(dst / "centroids.parquet")
    widths = json.loads((dst / "cluster.json").read_text())["d_ff"]
    bits = [b"\xff" * store.row_bytes(widths[s]) for s in table.column("site").to_pylist()]
    table = table.set_column(table.schema.get_field_index("bits"), "bits",
                             pa.array(bits, pa.binary()))
    pq.write_table(table, dst / "centroids.parquet")
    return dst


def test_mask_mode_and_with_full_centroids_is_the_oracle_over_all_sites(multi, tmp_path):
    root, _ = multi
    ones = ones_centroids(root / "c", tmp_path / "ones")
    report = evaluate(ones, tmp_path / "and", mask_mode="and", dense_prefix=0)
    assert report["cluster_ppl"] == pytest.approx(report["oracle_ppl"], rel=1e-12)
    assert report["effective_density"] == pytest.approx(report["oracle_effective_density"])
    assert report["weighted_recall"] == 1.0
    replace = evaluate(ones, tmp_path / "replace", dense_prefix=0, mask_mode="replace")
    assert replace["cluster_ppl"] == pytest.approx(replace["dense_ppl"], rel=1e-12)
    assert replace["effective_density"] == 1.0


def as_version2(src, dst):
    """A version 1 directory of one site rewritten in the version 2 layout."""
    manifest = json.loads((src / "manifest.json").read_text())
    site = manifest["sites"]
    shutil.copytree(src, dst)
    (dst / "masks").rename(dst / "tmp")
    (dst / "masks").mkdir()
    (dst / "tmp").rename(dst / "masks" / f"site={site}")
    manifest.update(format_version=2, sites=[site], d_ff={site: manifest["d_ff"]},
                    thresholds={site: manifest["thresholds"]})
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_one_site_through_version_2_equals_version_1(tmp_path, ray_session):
    extract(tmp_path / "v1", "up")
    v2 = as_version2(tmp_path / "v1", tmp_path / "v2")
    assert verify(str(v2)) == []
    for name, masks in (("c1", tmp_path / "v1"), ("c2", v2)):
        cluster(masks, tmp_path / name)
    meta1, c1 = centroid_store.load_centroids(str(tmp_path / "c1"))
    meta2, c2 = centroid_store.load_centroids(str(tmp_path / "c2"))
    assert meta1.get("format_version") is None and meta2["format_version"] == 2
    for a, b in zip(c1, c2):
        np.testing.assert_array_equal(a, b)
    r1 = evaluate(tmp_path / "c1", tmp_path / "e1")
    r2 = evaluate(tmp_path / "c2", tmp_path / "e2")
    for key in ("dense_ppl", "oracle_ppl", "cluster_ppl", "random_ppl", "cluster_ppl_ci95",
                "precision", "recall", "weighted_recall", "density", "random_density",
                "effective_density", "oracle_effective_density", "true_density", "tokens"):
        assert r1[key] == r2[key], key
    assert [{k: v for k, v in p.items() if k != "site"} for p in r2["per_layer"]] == \
        r1["per_layer"]
    assert r1["per_site"][0]["effective_density"] == r1["effective_density"]


def test_version_1_relu_directory_reads_everywhere(tmp_path, ray_session):
    manifest = extract(tmp_path / "m", "down_out", model="tiny:opt")
    assert manifest["format_version"] == 1 and manifest["sites"] == "down_out"
    assert (tmp_path / "m" / "masks" / "layer=0" / "shard-00000.parquet").is_file()
    assert verify(str(tmp_path / "m")) == []
    meta = cluster(tmp_path / "m", tmp_path / "c")
    assert meta["sites"] == "down_out" and meta["d_ff"] == 64
    assert "site" not in pq.read_table(tmp_path / "c" / "centroids.parquet").column_names
    report = evaluate(tmp_path / "c", tmp_path / "e")
    assert report["sites"] == "down_out" and "site" not in report["per_layer"][0]
    assert math.isfinite(report["cluster_ppl"])


@pytest.mark.parametrize("sites, fragment", [
    ("intermediate,gate", "intermediate cannot be combined"),
    ("gate,up,gate", "gate more than once"),
    ("gate,attn", "sites must be one of"),
    (",", "sites must name at least one"),
])
def test_bad_sites_are_refused(tmp_path, sites, fragment):
    proc = run_cli("extract", "--model", MODEL, "--sites", sites, "--out", str(tmp_path / "m"))
    assert_user_error(proc, fragment)
    assert not (tmp_path / "m").exists()


def test_single_site_tools_refuse_multi_site_centroids(multi, tmp_path):
    root, _ = multi
    for argv in (["train-predictor", "--centroids", str(root / "c"), "--out", str(tmp_path / "p")],
                 ["generate", "--centroids", str(root / "c"), "--predictor", str(tmp_path),
                  "--prompt", "x"],
                 ["evaluate", "--centroids", str(root / "c"), "--out", str(tmp_path / "e"),
                  "--predictor", str(tmp_path)]):
        assert_user_error(run_cli(*argv), "hold several sites (gate, up, down_out)")
    assert not (tmp_path / "p").exists() and not (tmp_path / "e").exists()


def test_sites_in_run_configs_and_the_paper_presets():
    assert build(RunConfig, {"sites": ["gate", "up", "down_out"]}).sites == "gate,up,down_out"
    assert build(RunConfig, {"sites": "gate, up"}).sites == "gate,up"
    with pytest.raises(UserError, match="pool_layers needs"):
        build(RunConfig, {"pool_layers": True})
    from actclust.orchestration.sweep import SweepConfig

    for name in ("paper_embedded", "paper_mistral7b"):
        path = REPO / "jobs" / "presets" / f"{name}.yaml"
        values = load_yaml(path)
        for cls in (RunConfig, SweepConfig):
            cfg = build(cls, values, source=str(path))
            assert cfg.sites == "gate,up,down_out" and cfg.pool_layers
            assert cfg.mask_mode == "and" and cfg.algorithm == ["activation-aware"]
            assert cfg.sparsity == 0.5
    embedded = build(RunConfig, load_yaml(REPO / "jobs" / "presets" / "paper_embedded.yaml"))
    assert embedded.model == "embedded:smollm2-135m" and embedded.corpus == "embedded:pydoc"


def test_a_multi_site_run_shares_its_baseline(tmp_path, ray_session):
    from actclust.orchestration.pipeline import evaluate_stage, run_pipeline

    cfg = build(RunConfig, dict(out=str(tmp_path / "run"), model=MODEL, seq_len=SEQ,
                                max_tokens=FIT_TOKENS, eval_max_tokens=EVAL_TOKENS, k=[2],
                                sites=["gate", "down_out"], pool_layers=True,
                                algorithm=["activation-aware"], mask_mode="and",
                                dense_prefix=0, workers=1))
    run_pipeline(cfg)
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["rows"]
    assert len(rows) == 1 and len(rows[0]["per_layer_recall"]) == 4  # 2 sites x 2 layers
    manifest = store.read_manifest(str(tmp_path / "run" / "masks"))
    assert manifest["format_version"] == 2 and manifest["sites"] == ["gate", "down_out"]
    # The trial read the run's baseline (dense and oracle passes from the manifest's
    # thresholds): a changed baseline shows in a new evaluation of the same centroids.
    path = tmp_path / "run" / "eval" / "baseline" / "baseline.json"
    baseline = json.loads(path.read_text())
    baseline["nll"]["dense"] = [v + 1.0 for v in baseline["nll"]["dense"]]
    path.write_text(json.dumps(baseline))
    centroids = str(tmp_path / "run" / "clusters" / "k=2-theta=0.5-activation-aware")
    again = evaluate_stage(cfg, centroids, "again")
    assert again["dense_ppl"] > rows[0]["dense_ppl"] * math.exp(0.9 / SEQ)
    assert again["cluster_ppl"] == rows[0]["cluster_ppl"]
