"""actclust compare: per-window losses in eval.json and paired ratio intervals between
evaluations of the same windows, checked against the eval.json figures and by hand."""

import json
import math

import numpy as np
import pytest

from actclust.clustering.distributed import run_cluster
from actclust.config import ClusterConfig, EvaluateConfig, build
from actclust.evaluation.anchor_eval import run_anchor
from actclust.evaluation.bootstrap import paired_ppl_intervals, paired_ratio_intervals
from actclust.evaluation import fronts
from actclust.evaluation.compare import load_point, point_method, window_losses
from actclust.evaluation.evaluate import run_evaluate
from helpers import assert_user_error, run_cli

SEQ = 32
WINDOWS = 8


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory, extract_masks, ray_session):
    """A clustering and a TEAL anchor of tiny:llama, both evaluated on the same 8 windows."""
    root = tmp_path_factory.mktemp("compare")
    masks = extract_masks(seq_len=SEQ, max_tokens=SEQ * 40, split="train", sparsity=0.5)
    run_cluster(build(ClusterConfig, dict(masks=masks, k=4, out=str(root / "c"))))
    common = dict(max_tokens=SEQ * WINDOWS, dense_prefix=1)
    cluster = run_evaluate(build(EvaluateConfig, dict(centroids=str(root / "c"),
                                                      out=str(root / "e"), **common)))
    teal = run_anchor(build(EvaluateConfig, dict(anchor="teal", anchor_sparsity=0.5,
                                                 masks=masks, out=str(root / "teal"),
                                                 **common)))
    return root, cluster, teal


def test_per_window_losses_give_back_every_perplexity(evaluations):
    _, cluster, teal = evaluations
    for report, modes in ((cluster, ("dense", "oracle", "cluster")), (teal, ("dense", "anchor"))):
        record = report["per_window"]
        assert len(record["seq"]) == len(record["tokens"]) == report["windows"] == WINDOWS
        assert sum(record["tokens"]) == report["predicted_tokens"]
        for mode in modes:
            ppl = math.exp(math.fsum(record["nll"][mode]) / sum(record["tokens"]))
            assert ppl == pytest.approx(report[f"{mode}_ppl"], rel=1e-12)
    assert cluster["per_window"]["seq"] == teal["per_window"]["seq"]
    assert cluster["per_window"]["nll"]["dense"] == pytest.approx(
        teal["per_window"]["nll"]["dense"], rel=1e-9)


def test_compare_cli_pairs_the_points_with_the_reference(evaluations, tmp_path):
    root, cluster, teal = evaluations
    out = tmp_path / "compare.json"
    proc = run_cli("compare", str(root / "teal"), str(root / "e"), f"{root / 'e'}:dense",
                   "--out", str(out), "--resamples", "400")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert proc.stdout.count("\n| ") == 4  # header, and a row per point
    reference, clustered, dense = result["points"]
    assert reference["ppl"] == pytest.approx(teal["anchor_ppl"], rel=1e-12)
    assert reference["ratio"] == 1.0 and reference["ratio_ci95"] == [1.0, 1.0]
    assert clustered["ppl"] == pytest.approx(cluster["cluster_ppl"], rel=1e-12)
    assert clustered["ratio"] == pytest.approx(cluster["cluster_ppl"] / teal["anchor_ppl"],
                                               rel=1e-12)
    assert clustered["ffn_bytes_fraction"] == cluster["ffn_bytes_fraction"]["cluster"]
    assert dense["ratio"] == pytest.approx(teal["dense_ppl"] / teal["anchor_ppl"], rel=1e-9)
    for row in (clustered, dense):
        lo, hi = row["ratio_ci95"]
        assert lo <= row["ratio"] <= hi
        assert row["verdict"] == ("lower" if hi < 1 else "higher" if lo > 1 else "not separated")
    assert result["bootstrap"] == {"unit": "window", "resamples": 400, "seed": 0,
                                   "paired": True}


def test_compare_refuses_what_does_not_pair(evaluations, tmp_path):
    root, _, _ = evaluations
    assert_user_error(run_cli("compare", str(root / "e")), "at least two")
    assert_user_error(run_cli("compare", str(root / "e"), f"{root / 'e'}:predicted"),
                      "no mode 'predicted'")
    assert_user_error(run_cli("compare", str(root / "e"), str(tmp_path)), "holds no eval.json")
    report = json.loads((root / "e" / "eval.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    shifted = dict(report, per_window=dict(report["per_window"],
                                           seq=report["per_window"]["seq"][1:] + [10 ** 6]))
    (other / "eval.json").write_text(json.dumps(shifted))
    assert_user_error(run_cli("compare", str(root / "e"), str(other)), "other windows")
    old = tmp_path / "old"
    old.mkdir()
    (old / "eval.json").write_text(json.dumps({k: v for k, v in report.items()
                                               if k != "per_window"}))
    assert_user_error(run_cli("compare", str(root / "e"), str(old)), "no per-window losses")
    protocol = tmp_path / "protocol"
    protocol.mkdir()
    (protocol / "eval.json").write_text(json.dumps(
        dict(report, identity=dict(report["identity"], dense_prefix=4))))
    assert_user_error(run_cli("compare", str(root / "e"), str(protocol)), "dense_prefix")


def test_a_bare_directory_names_its_operating_point(tmp_path):
    def write(name, modes):
        (tmp_path / name).mkdir()
        record = window_losses([3, 8], [10, 10], {m: [20.0, 25.0] for m in modes})
        (tmp_path / name / "eval.json").write_text(json.dumps({"per_window": record}))
        return str(tmp_path / name)

    assert load_point(write("p", ("dense", "cluster", "predicted"))).mode == "predicted"
    assert load_point(write("a", ("dense", "anchor"))).mode == "anchor"
    assert load_point(write("c", ("dense", "cluster"))).mode == "cluster"
    assert load_point(str(tmp_path / "c" / "eval.json") + ":dense").mode == "dense"


def test_ratio_interval_by_hand_and_separation_despite_overlap():
    rng = np.random.default_rng(5)
    tokens = np.full(60, 100.0)
    hardness = rng.uniform(2.0, 4.0, 60)  # windows differ far more than the methods do
    a = tokens * hardness
    b = tokens * (hardness + 0.02)
    got = paired_ratio_intervals({"b": b}, a, tokens, resamples=500, seed=2)["b"]
    assert got[0] == pytest.approx(math.exp(0.02))
    assert got[1] == pytest.approx(math.exp(0.02)) and got[2] == pytest.approx(math.exp(0.02))
    noisy = b + rng.normal(0, 0.5, 60)
    ratio, lo, hi = paired_ratio_intervals({"n": noisy}, a, tokens, resamples=500, seed=2)["n"]
    assert 1.0 < lo < ratio < hi
    own = paired_ppl_intervals({"a": a, "n": noisy}, tokens, resamples=500, seed=2)
    assert own["n"][0] < own["a"][1]  # the two perplexity intervals overlap


def test_compare_draws_the_points_as_a_front(evaluations, tmp_path):
    root, _, _ = evaluations
    plot = tmp_path / "front.png"
    proc = run_cli("compare", str(root / "teal"), str(root / "e"), "--plot", str(plot),
                   "--resamples", "50")
    assert proc.returncode == 0, proc.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    assert [load_point(str(root / d)).method for d in ("teal", "e")] == \
        ["teal", fronts.UPPER_BOUND]
    # Dense alone has no front to draw: refused in one line, and no file is left.
    refused = tmp_path / "dense.png"
    table = tmp_path / "dense.json"
    assert_user_error(run_cli("compare", f"{root / 'e'}:dense", f"{root / 'teal'}:dense",
                              "--plot", str(refused), "--out", str(table)),
                      "--plot needs at least one point")
    assert not refused.exists() and not table.exists()


def test_each_mode_of_an_evaluation_names_its_series_on_the_front():
    assert point_method({"predictor_kind": "cluster", "top_m": 1}, "predicted") == \
        "predicted cluster"
    assert point_method({"predictor_kind": "cluster", "top_m": 2}, "predicted") == \
        "predicted cluster top-2"
    assert point_method({"predictor_kind": "neuron", "top_m": 1}, "predicted") == \
        "neuron predictor"
    assert point_method({"anchor": "wina"}, "anchor") == "wina"
    assert point_method({"anchor": "teal", "anchor_allocation": {"allocation": "greedy"}},
                        "anchor") == "teal per-layer"
    assert point_method({"k": 1, "mask_mode": "replace"}, "cluster") == "static"
    assert point_method({"k": 1, "mask_mode": "and"}, "cluster") == "static"
    assert point_method({"k": 4, "mask_mode": "and"}, "cluster") == fronts.UPPER_BOUND
    assert point_method({"k": 64}, "oracle") == "oracle"
