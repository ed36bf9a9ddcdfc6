"""A sweep that trains predictors: each Tune trial fits its centroids, trains a cluster and
a neuron predictor on them with Ray Train inside the trial, and evaluates both; the
results and the report carry the predicted series beside the oracle-assignment ones."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import yaml

from actclust.io import mask_store, storage
from actclust.io.centroid_store import load_centroids
from helpers import assert_user_error, run_cli

pytestmark = pytest.mark.slow  # a second Ray cluster (job submit), or Ray Tune with Ray Train

SEQ = 32


@pytest.mark.timeout(1200)  # two Ray Train runs inside a Tune trial on 2 cores
def test_sweep_trains_and_evaluates_both_predictor_kinds_per_trial(tmp_path, ray_session):
    from actclust.orchestration.sweep import run_sweep

    out = tmp_path / "sweep"
    values = dict(model="tiny:llama", corpus="embedded:pydoc", seq_len=SEQ, max_tokens=SEQ * 32,
                  eval_max_tokens=SEQ * 4, k=[4], theta=[0.5], workers=1, worker_cpus=0.5,
                  static_point=False, predictor="both", predictor_epochs=1, neuron_select="topk",
                  out=str(out))
    report = run_sweep(values)
    rows = {r["k"]: r for r in pq.read_table(out / "sweep.parquet").to_pylist()}
    assert sorted(rows) == [4]
    for k in sorted(rows):
        name = f"k={k}-theta=0.5"
        evals = {"cluster": json.loads((out / "eval" / name / "eval.json").read_text()),
                 "neuron": json.loads((out / "eval" / name / "predicted-neuron" /
                                       "eval.json").read_text())}
        # A cluster predictor makes mass bits the trial's centroids (bits_by's default).
        digest = storage.sha256_file(str(out / "mass-bits" / name / "centroids.parquet"))
        for kind, ev in evals.items():
            assert ev["predictor_kind"] == kind
            lo, hi = ev["predicted_ppl_ci95"]
            assert math.isfinite(ev["predicted_ppl"]) and lo <= ev["predicted_ppl"] <= hi
            assert 0 < ev["predicted_weighted_recall"] <= 1
            assert 0 < ev["predicted_effective_density"] <= 1
            record = json.loads((out / "predictors" / f"{name}-mass" / kind /
                                 "predictor.json").read_text())
            assert record["k"] == k and record["epochs"] == 1
            assert record["placement"] == "trial"  # Ray Train ran inside the Tune trial
            assert record["identity"]["centroids_sha256"] == digest  # this trial's centroids
            assert ev["predictor_params_fraction"] == record["params_fraction"]
        # The neuron predictor at the clustering's per-layer density, exactly (top-k).
        record = json.loads((out / "predictors" / f"{name}-mass" / "neuron" /
                             "predictor.json").read_text())
        width = record["width"]
        assert evals["neuron"]["neuron_select"] == "topk"
        assert evals["cluster"]["neuron_select"] is None
        for row, fit in zip(evals["neuron"]["per_layer"], record["per_layer"]):
            assert row["predicted_density"] == round(fit["cluster_density"] * width) / width
        # Same windows and bootstrap: the two evaluations agree on every shared mode.
        assert evals["neuron"]["cluster_ppl"] == evals["cluster"]["cluster_ppl"]
        assert evals["cluster"]["predicted_accuracy"] is not None
        row = rows[k]
        assert row["predicted_ppl"] == evals["cluster"]["predicted_ppl"]
        assert row["predicted_ppl_ci95"] == evals["cluster"]["predicted_ppl_ci95"]
        assert row["neuron_predicted_ppl"] == evals["neuron"]["predicted_ppl"]
        assert row["neuron_predicted_effective_density"] == \
            evals["neuron"]["predicted_effective_density"]
        # results.json pairs the sweep's points by their per-window losses, as a run's.
        results = {r["k"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
        assert results[k]["per_window"] == evals["cluster"]["per_window"]
        assert results[k]["neuron_per_window"] == evals["neuron"]["per_window"]
        assert len(results[k]["per_window"]["seq"]) == evals["cluster"]["windows"]

    page = (out / "report.html").read_text()
    assert str(report) == str(out / "report.html")
    section = page.split("<h2>Predicted series</h2>", 1)[1].split("</ul>", 1)[0]
    for kind in ("cluster", "neuron"):
        assert f"predicted: hamming-kmeans theta=0.5 mass bits, {kind} predictor" in section
    assert section.count("K=4:") == 2
    assert (out / "plots" / "perplexity_vs_effective_density.png").stat().st_size > 0


@pytest.mark.timeout(900)
def test_run_trains_and_evaluates_a_predictor_per_k(tmp_path, ray_session):
    """`actclust run` shares the trial's stages: outside Tune, Ray Train sizes its own.
    By default (bits_by activation_mass with a cluster predictor) the predicted trial's
    centroids take mass bits first."""
    from actclust import config as C
    from actclust.orchestration.runconfig import RunConfig
    from actclust.orchestration.pipeline import run_pipeline

    out = tmp_path / "run"
    run_pipeline(C.build(RunConfig, dict(
        model="tiny:llama", corpus="embedded:pydoc", seq_len=SEQ, max_tokens=SEQ * 32,
        eval_max_tokens=SEQ * 4, k=[2, 4], theta=[0.5], workers=1, predictor="cluster",
        predictor_epochs=1, predictor_trials=["k=4-theta=0.5"], top_m=2, out=str(out))))
    rows = {r["k"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert sorted(rows) == [2, 4]
    # Only the trial named in predictor_trials trains and evaluates a predictor.
    assert rows[2]["predicted_ppl"] is None and rows[2]["predictor_kind"] is None
    assert not (out / "predictors" / "k=2-theta=0.5").exists()
    assert rows[2]["bits_by"] == "frequency" and not (out / "mass-bits" / "k=2-theta=0.5").exists()
    row = rows[4]
    ev = json.loads((out / "eval" / "k=4-theta=0.5" / "eval.json").read_text())
    # The predictor of mass bits has its own directory (a rerun with frequency bits trains
    # another beside it).
    record = json.loads((out / "predictors" / "k=4-theta=0.5-mass" / "cluster" /
                         "predictor.json").read_text())
    assert record["placement"] == "own" and record["k"] == 4
    assert row["predicted_ppl"] == ev["predicted_ppl"] and row["predictor_kind"] == "cluster"
    # top_m 2: the union of the two predicted centroids, recorded in eval.json and the row.
    assert ev["top_m"] == row["top_m"] == 2
    assert f"| {ev['predicted_ppl']:.4g} " in (out / "trials.md").read_text()
    assert "(top-2)" in (out / "trials.md").read_text()
    assert row["neuron_predicted_ppl"] is None
    lo, hi = ev["predicted_ppl_ci95"]
    assert lo <= ev["predicted_ppl"] <= hi
    assert "predicted: hamming-kmeans theta=0.5 mass bits, cluster predictor" in \
        (out / "report.html").read_text()
    # The mass bits: the fitted counts on other neurons, used by the predictor and the
    # evaluation alike.
    mass, fitted = out / "mass-bits" / "k=4-theta=0.5", out / "clusters" / "k=4-theta=0.5"
    meta, moved = load_centroids(mass)
    _, before = load_centroids(fitted)
    assert meta["bits_by"] == "activation_mass" and meta["bits_from"] == str(fitted)
    assert row["bits_by"] == "activation_mass"
    for a, b in zip(moved, before):
        width = meta["d_ff"]
        assert (mask_store.unpack(a, width).sum(axis=1)
                == mask_store.unpack(b, width).sum(axis=1)).all()
    assert record["identity"]["centroids"] == ev["identity"]["centroids"] == str(mass)
    stages = [s["stage"] for s in json.loads((out / "results.json").read_text())
              ["throughput"]["stages"]]
    assert stages.index("mass-bits k=4-theta=0.5") < stages.index(
        "train-predictor k=4-theta=0.5 cluster")


def test_predictor_kind_is_checked(tmp_path):
    assert_user_error(run_cli("run", "--out", str(tmp_path / "r"), "--predictor", "maybe"),
                      "predictor must be one of none, cluster, neuron, both")
    config = tmp_path / "mass.yaml"
    config.write_text("bits_by: activation_mass\n")
    assert_user_error(run_cli("run", "--config", str(config), "--out", str(tmp_path / "r")),
                      "bits_by: activation_mass applies to the trials that get a predictor")
    config.write_text("bits_by: activation_mass\npredictor: cluster\npool_layers: true\n"
                      "algorithm: [brb-kmeans]\n")
    assert_user_error(run_cli("run", "--config", str(config), "--out", str(tmp_path / "r")),
                      "needs per-layer centroids")
    config.write_text("top_m: 2\npredictor: neuron\n")
    assert_user_error(run_cli("run", "--config", str(config), "--out", str(tmp_path / "r")),
                      "top_m: 2 applies to a cluster predictor")
    config.write_text("top_m: 0\npredictor: cluster\n")
    assert_user_error(run_cli("run", "--config", str(config), "--out", str(tmp_path / "r")),
                      "top_m must be")
    assert not (tmp_path / "r").exists()


GRID_REFUSALS = {
    "predictor_trials names no trial": (
        dict(k=[4, 8], predictor_trials=["k=4-theta=0.5", "k=16-theta=0.5"]),
        "predictor_trials names k=16-theta=0.5, not a trial of this run; its trials: "
        "k=4-theta=0.5, k=8-theta=0.5"),
    "top_m above a predicted trial's K": (
        dict(k=[2, 8], top_m=4),
        "top_m: 4 needs K >= 4 in every trial that gets a predictor, not k=2-theta=0.5"),
}


@pytest.mark.parametrize("case", sorted(GRID_REFUSALS))
@pytest.mark.parametrize("command", ["run", "sweep"])
def test_settings_that_do_not_fit_the_grid_are_refused(tmp_path, command, case):
    settings, message = GRID_REFUSALS[case]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(dict(model="tiny:llama", theta=[0.5], predictor="cluster",
                                          out=str(tmp_path / "r"), **settings)))
    assert_user_error(run_cli(command, "--config", str(config)), message)
    assert not (tmp_path / "r").exists()


def test_a_finished_evaluation_is_reused_only_for_its_predictor_kind_and_rule():
    from actclust.orchestration.pipeline import _is_evaluation_of

    assert not _is_evaluation_of(None, None, "threshold")
    assert _is_evaluation_of({"dense_ppl": 3.0}, None, "threshold")
    assert not _is_evaluation_of({"predictor_kind": "cluster"}, None, "threshold")
    assert _is_evaluation_of({"predictor_kind": "cluster", "neuron_select": None}, "cluster",
                             "threshold")
    # eval.json written before the rule existed: the threshold.
    assert _is_evaluation_of({"predictor_kind": "neuron"}, "neuron", "threshold")
    assert not _is_evaluation_of({"predictor_kind": "neuron"}, "neuron", "topk")
    assert _is_evaluation_of({"predictor_kind": "neuron", "neuron_select": "topk"}, "neuron",
                             "topk")
    # random: true asks for the random pass: an evaluation without it is not reused.
    assert not _is_evaluation_of({"random_ppl": None}, None, "threshold", with_random=True)
    assert _is_evaluation_of({"random_ppl": 40.0}, None, "threshold", with_random=True)
    # Another mask mode is another evaluation.
    assert not _is_evaluation_of({"mask_mode": "replace"}, None, "threshold", mask_mode="and")
    assert _is_evaluation_of({"mask_mode": "and"}, None, "threshold", mask_mode="and")
    assert _is_evaluation_of({"random_ppl": None}, None, "threshold", with_random=False)
    # Other centroids (the fitted ones against their mass bits) are another evaluation.
    done = {"identity": {"centroids": "/r/clusters/k=4-theta=0.5"}}
    assert _is_evaluation_of(done, None, "threshold", centroids="/r/clusters/k=4-theta=0.5")
    assert not _is_evaluation_of(done, None, "threshold", centroids="/r/mass-bits/k=4-theta=0.5")
    # The union of another number of clusters is another evaluation; before the key: top-1.
    union = {"predictor_kind": "cluster", "top_m": 2}
    assert _is_evaluation_of(union, "cluster", "threshold", top_m=2)
    assert not _is_evaluation_of(union, "cluster", "threshold", top_m=1)
    assert _is_evaluation_of({"predictor_kind": "cluster"}, "cluster", "threshold", top_m=1)
    assert not _is_evaluation_of({"predictor_kind": "cluster"}, "cluster", "threshold", top_m=2)
