"""End to end: actclust run, the HTML report in a real browser, and a Tune sweep that resumes."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from helpers import REPO, SHARED_RAY, assert_user_error, run_cli, undocumented_fields

# Two trials: the same K at two thetas is all the run's assertions compare.
TINY_RUN = dict(model="tiny:llama", corpus="embedded:pydoc", seq_len=64, max_tokens=64 * 48,
                eval_max_tokens=64 * 8, k=[16], theta=[0.5, 0.3], workers=1,
                anchors=["teal", "wina"], anchor_sparsity=[0.5])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    config = out.parent / "run.yaml"
    config.write_text(yaml.safe_dump(TINY_RUN))
    proc = run_cli("run", "--config", str(config), "--out", str(out), timeout=1400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# The run fixture starts Ray and several actor pools; allow for a loaded machine.
@pytest.mark.timeout(1500)
def test_run_writes_every_stage_and_a_table(run_dir):
    rows = json.loads((run_dir / "results.json").read_text())["rows"]
    assert sorted((r["k"], r["theta"]) for r in rows) == [(16, 0.3), (16, 0.5)]
    for row in rows:
        assert row["oracle_ppl"] > 0 and 0 < row["precision"] <= 1 and 0 < row["recall"] <= 1
        assert len(row["per_layer_recall"]) == 2
    # Lower theta keeps more bits: denser centroids, higher recall.
    by = {(r["k"], r["theta"]): r for r in rows}
    assert by[(16, 0.3)]["density"] > by[(16, 0.5)]["density"]
    assert by[(16, 0.3)]["recall"] > by[(16, 0.5)]["recall"]
    header = (run_dir / "results.csv").read_text().splitlines()[0]
    assert header.startswith("k,theta,target_density,objective,algorithm,dense_ppl,oracle_ppl,"
                             "cluster_ppl")
    assert (run_dir / "masks" / "manifest.json").is_file()
    assert len(list((run_dir / "plots").glob("*.png"))) == 7


def test_run_ends_with_its_wall_time_and_floor(run_dir):
    """results.json's throughput counts every pass the run made: extraction, dense and
    oracle, one cluster pass per trial, each anchor's pass and its calibration."""
    throughput = json.loads((run_dir / "results.json").read_text())["throughput"]
    fitted = json.loads((run_dir / "masks" / "manifest.json").read_text())["tokens"]
    heldout = TINY_RUN["eval_max_tokens"]
    anchors = [json.loads(p.read_text()) for p in run_dir.glob("eval/anchor=*/eval.json")]
    assert len(anchors) == 2 and all(a["tokens"] == heldout for a in anchors)
    assert throughput["forwarded_tokens"] == fitted + 2 * heldout + 2 * heldout + sum(
        a["tokens"] + a["calibration"]["tokens"] for a in anchors)
    assert [s["stage"] for s in throughput["stages"]] == [
        "extract", "dense and oracle", "anchor teal s=0.5", "anchor wina s=0.5",
        "cluster k=16-theta=0.5", "evaluate k=16-theta=0.5", "cluster k=16-theta=0.3",
        "evaluate k=16-theta=0.3"]
    assert throughput["bare_forward_tokens_per_s"] > 0
    assert throughput["assignment_macs"] > 0 and throughput["assignment_macs_per_s"] > 0
    floor = (throughput["forwarded_tokens"] / throughput["bare_forward_tokens_per_s"]
             + throughput["assignment_macs"] / throughput["assignment_macs_per_s"])
    assert throughput["floor_seconds"] == pytest.approx(floor)
    assert 0 < throughput["floor_seconds"] < throughput["wall_seconds"]
    assert throughput["wall_over_floor"] == pytest.approx(
        throughput["wall_seconds"] / throughput["floor_seconds"])


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_warm_and_fresh_actors_give_identical_centroids_and_evaluations(run_dir, tmp_path):
    """The run's actors live for the run (the trials are evaluated by the actors that
    calibrated and evaluated the anchors); starting fresh ones per stage changes nothing."""
    out = tmp_path / "fresh"
    config = tmp_path / "fresh.yaml"
    config.write_text(yaml.safe_dump({**TINY_RUN, "warm_actors": False}))
    proc = run_cli("run", "--config", str(config), "--out", str(out), timeout=1400)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def evaluation(path):  # identity names the run's own directories
        return {k: v for k, v in json.loads(path.read_text()).items() if k != "identity"}

    trials = sorted(p.name for p in (run_dir / "clusters").iterdir())
    assert len(trials) == 2 and trials == sorted(p.name for p in (out / "clusters").iterdir())
    for name in trials:
        warm, fresh = (pq.read_table(d / "clusters" / name / "centroids.parquet")
                       for d in (run_dir, out))
        assert warm.num_rows > 0 and warm.equals(fresh), name
        assert evaluation(run_dir / "eval" / name / "eval.json") == \
            evaluation(out / "eval" / name / "eval.json"), name
    anchors = sorted(p.relative_to(run_dir) for p in run_dir.glob("eval/anchor=*/eval.json"))
    assert len(anchors) == 2
    for path in anchors:
        assert evaluation(run_dir / path) == evaluation(out / path), path


@pytest.mark.timeout(1500)
def test_run_puts_anchors_on_the_front_by_ffn_bytes(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    rows, anchors = results["rows"], results["anchors"]
    assert [(a["anchor"], a["anchor_sparsity"]) for a in anchors] == [("teal", 0.5),
                                                                      ("wina", 0.5)]
    for a in anchors:
        report = json.loads((run_dir / "eval" / f"anchor={a['anchor']}-s=0.5" /
                             "eval.json").read_text())
        # The run's shared baseline: the anchors pair with every trial's intervals.
        assert report["dense_ppl_ci95"] == rows[0]["dense_ppl_ci95"]
        assert report["windows"] == rows[0]["windows"] == 8
        assert a["ffn_bytes_fraction"] == report["ffn_bytes_fraction"]["anchor"]
    wina = next(a for a in anchors if a["anchor"] == "wina")
    assert wina["ffn_bytes_fraction"] == pytest.approx(0.5)  # 64 and 192 inputs: exact halves
    for row in rows:  # the oracle assignment reads gate and up whole: over 2/3 of the bytes
        assert 2 / 3 < row["cluster_ffn_bytes_fraction"] < 1
        assert 2 / 3 < row["oracle_ffn_bytes_fraction"] < 1
    budgets = (run_dir / "budgets.md").read_text()
    assert budgets.splitlines()[0].startswith("| FFN bytes ≤ | predicted cluster")
    assert "| 0.5 |" in budgets and "wina" in budgets.split("| 0.5 |")[1].splitlines()[0]
    assert "perplexity_vs_ffn_bytes" in (run_dir / "report.html").read_text()
    # Every point keeps its per-window losses, so the winner at 0.7 (teal or wina, both at
    # s = 0.5; the trials' oracle assignment is no operating point) is set against the
    # runner-up by their paired ratio.
    for point in (*rows, *anchors):
        assert len(point["per_window"]["seq"]) == 8
    teal, wina = (next(a for a in anchors if a["anchor"] == m) for m in ("teal", "wina"))
    ratio = math.exp((sum(teal["per_window"]["nll"]["anchor"])
                      - sum(wina["per_window"]["nll"]["anchor"]))
                     / sum(teal["per_window"]["tokens"]))
    if ratio > 1:
        ratio = 1 / ratio
    assert f"paired ratio {ratio:.3f} [" in budgets.split("| 0.7 |")[1].splitlines()[0]


@pytest.mark.timeout(1500)
def test_run_shares_one_baseline_and_reports_intervals(run_dir):
    rows = json.loads((run_dir / "results.json").read_text())["rows"]
    baseline = json.loads((run_dir / "eval" / "baseline" / "baseline.json").read_text())
    assert len(baseline["nll"]["dense"]) == 8 and baseline["identity"]["dense_prefix"] == 1
    for row in rows:
        assert row["dense_ppl"] == rows[0]["dense_ppl"]
        assert row["dense_ppl_ci95"] == rows[0]["dense_ppl_ci95"]
        lo, hi = row["cluster_ppl_ci95"]
        assert lo <= row["cluster_ppl"] <= hi
        # The random pass is opt-in in a run: its figures are null, not made up.
        assert row["random_ppl"] is None and row["random_density"] is None
        assert row["random_ffn_bytes_fraction"] is None
        # Mask mode and (the default) keeps m AND c of the centroid's bits; the dense
        # prefix (1 of 64 positions) counts at 1.0.
        prefix = 1 / TINY_RUN["seq_len"]
        assert row["mask_mode"] == "and"
        assert prefix < row["effective_density"] <= prefix + (1 - prefix) * row["density"] + 1e-12
    html = (run_dir / "report.html").read_text()
    assert html.index("perplexity_vs_effective_density") < html.index("perplexity_vs_k")


def test_theta_free_algorithms_run_once_per_k():
    from actclust import config as C
    from actclust.orchestration.runconfig import RunConfig
    from actclust.orchestration.pipeline import trial_grid

    cfg = C.build(RunConfig, dict(k=[16, 64], theta=[0.5, 0.3],
                                    algorithm=["hamming-kmeans", "brb-kmeans"]))
    grid = [(p.k, p.theta, p.algorithm) for p in trial_grid(cfg)]
    assert grid == [(16, 0.5, "hamming-kmeans"), (64, 0.5, "hamming-kmeans"),
                    (16, 0.3, "hamming-kmeans"), (64, 0.3, "hamming-kmeans"),
                    (16, 0.5, "brb-kmeans"), (64, 0.5, "brb-kmeans")]
    assert C.build(RunConfig, dict(algorithm="brb-kmeans")).algorithm == ["brb-kmeans"]


def test_docs_formats_names_every_field_a_run_writes(run_dir):
    def load(pattern):
        found = sorted(run_dir.glob(pattern))
        assert found, pattern
        return json.loads(found[0].read_text())

    results = load("results.json")
    evaluation = load("eval/k=16-theta=0.5/eval.json")
    records = {"manifest.json": load("masks/manifest.json"),
               "cluster.json": load("clusters/*/cluster.json"),
               "eval.json": evaluation, "eval.json per_layer": evaluation["per_layer"][0],
               "anchor eval.json": load("eval/anchor=*/eval.json"),
               "results.json": results, "results.json anchors": results["anchors"][0],
               "results.json throughput": results["throughput"],
               "results.json stages": results["throughput"]["stages"][0]}
    for name, record in records.items():
        assert not undocumented_fields(record), (name, undocumented_fields(record))
    for row in results["rows"]:
        assert not undocumented_fields(row, prefixes=("neuron_",))


def test_rerun_reuses_finished_stages(run_dir):
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("eval.json")}
    proc = run_cli("run", "--out", str(run_dir), "--config", str(run_dir.parent / "run.yaml"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("eval.json")} == before


def test_random_true_adds_the_random_pass_and_reuses_the_rest(run_dir, tmp_path):
    out = tmp_path / "r"  # a copy: the module's other tests read run_dir as the run left it
    shutil.copytree(run_dir, out)
    config = tmp_path / "random.yaml"
    # Anchors are keyed by their masks directory, which the copy moved: leave them out.
    config.write_text(yaml.safe_dump({**TINY_RUN, "random": True, "anchors": []}))
    kept = [out / "eval" / "baseline" / "baseline.json", *out.glob("clusters/*/cluster.json")]
    assert len(kept) == 3  # the baseline and both trials' clusterings
    before = {p: p.stat().st_mtime_ns for p in kept}
    proc = run_cli("run", "--config", str(config), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in kept} == before
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 2
    for row in rows:
        lo, hi = row["random_ppl_ci95"]
        assert lo <= row["random_ppl"] <= hi
        assert abs(row["random_density"] - row["density"]) < 0.005
        assert 0 < row["random_ffn_bytes_fraction"] < 1


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="needs chromium (.ci/run installs it)")
def test_report_renders_its_plots_in_headless_chromium(run_dir, tmp_path):
    html = (run_dir / "report.html").read_text()
    plots = sorted(p.stem for p in (run_dir / "plots").glob("*.png"))
    assert "perplexity_vs_ffn_bytes" in plots and len(plots) == 7, plots
    assert html.count("data:image/png;base64,") == len(plots)
    assert all(f'alt="{name}"' in html for name in plots)
    assert "tiny:llama" in html and "clustering precision" in html
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2000",
                    f"--screenshot={shot}", (run_dir / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    import matplotlib.image

    pixels = (matplotlib.image.imread(shot)[..., :3] * 255).astype(int)
    # matplotlib's first two line colours (#1f77b4 blue, #ff7f0e orange) only occur in plots.
    blue = (np.abs(pixels - [31, 119, 180]).sum(-1) < 40).sum()
    orange = (np.abs(pixels - [255, 127, 14]).sum(-1) < 40).sum()
    assert blue > 500 and orange > 500, (blue, orange)


@pytest.mark.slow  # Ray Tune
def test_sweep_resumes_after_the_driver_is_killed(tmp_path):
    config = tmp_path / "sweep.yaml"
    # Two trials (K=4 and the K=1 static-mask floor), one at a time: one finishes before
    # the kill, the other after the resume.
    config.write_text(yaml.safe_dump({**TINY_RUN, "k": [4], "theta": [0.5],
                                      "workers": 1, "out": str(tmp_path / "s"),
                                      "max_concurrent_trials": 1, "anchors": ["wina"]}))
    # Both drivers join the shared cluster; the killed one's trials die with it.
    env = SHARED_RAY.client_env()
    args = [sys.executable, "-m", "actclust", "sweep", "--config", str(config)]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((tmp_path / "s").glob("eval/*/eval.json")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = list((tmp_path / "s").glob("eval/*/eval.json"))
    assert first, "no trial finished before the kill"
    assert not (tmp_path / "s" / "sweep.parquet").exists()
    stamp = first[0].stat().st_mtime_ns
    res = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming the sweep" in res.stderr
    table = pq.read_table(tmp_path / "s" / "sweep.parquet").to_pylist()
    assert sorted(r["k"] for r in table) == [1, 4]  # K=1: the static-mask floor
    assert first[0].stat().st_mtime_ns == stamp  # the finished trial was not redone
    assert (tmp_path / "s" / "sweep.csv").is_file() and (tmp_path / "s" / "report.html").is_file()
    anchors = json.loads((tmp_path / "s" / "results.json").read_text())["anchors"]
    assert [(a["anchor"], a["anchor_sparsity"]) for a in anchors] == [("wina", 0.5)]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"k": [4], "colour": "red"}))
    assert_user_error(run_cli("sweep", "--config", str(bad)), "unknown key colour")


# jobs/pipeline.py --smoke-test runs under `ray job submit` in tests/test_job_submit.py.
@pytest.mark.parametrize("job", ["extract", "cluster", "evaluate"])
def test_job_entry_points_smoke(job, tmp_path):
    # A job joins a running cluster through RAY_ADDRESS, as under `ray job submit`.
    env = SHARED_RAY.client_env()
    args = [sys.executable, f"jobs/{job}.py", "--smoke-test"]
    if job == "extract":
        args += ["--out", str(tmp_path / "o")]
    res = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("job", ["extract", "cluster", "evaluate", "train_predictor"])
def test_a_job_refuses_a_key_no_stage_takes_and_leaves_other_stages_keys_aside(job, tmp_path):
    preset = tmp_path / "preset.yaml"
    # k and theta belong to the clustering, anchors to the run: a stage's job ignores them.
    preset.write_text(yaml.safe_dump(dict(model="tiny:opt", k=[4], theta=[0.5],
                                          anchors=["teal"], max_token=64)))
    res = subprocess.run([sys.executable, f"jobs/{job}.py", "--config", str(preset)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert_user_error(res, f"unknown key max_token in {preset}; no stage of actclust takes it")


@pytest.mark.parametrize("job,preset,message", [
    ("cluster", dict(masks="m", out="c", k=0), "k must be at least 1, got 0"),
    ("pipeline", dict(model="tiny:opt", k=[4], theta=[1.5]), "theta must be a list of values"),
    ("pipeline", dict(model="tiny:opt", k=[4], max_concurrent_trials=2),
     "unknown key max_concurrent_trials"),
])
def test_a_job_refuses_what_the_command_line_refuses(job, preset, message, tmp_path):
    # A job is `actclust <command>` on its preset: the same checks, the same one line.
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(preset))
    res = subprocess.run([sys.executable, f"jobs/{job}.py", "--config", str(path)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert_user_error(res, message)
    assert not (REPO / "c").exists()


def test_a_sweep_recorded_before_a_setting_existed_resumes_at_its_default(tmp_path):
    from actclust import config as C
    from actclust.errors import UserError
    from actclust.orchestration import sweep as S

    newer = ("sites", "pool_layers", "predictor", "predictor_epochs")
    record = tmp_path / S.SWEEP_RECORD

    def write_old_record(cfg):
        record.write_text(json.dumps({k: v for k, v in C.identity(cfg).items()
                                      if k not in newer}))

    at_defaults = C.build(S.SweepConfig, dict(out=str(tmp_path), k=[4]))
    write_old_record(at_defaults)
    S._check_identity(str(tmp_path), at_defaults)  # resumes: no error
    assert json.loads(record.read_text()) == json.loads(json.dumps(C.identity(at_defaults)))

    write_old_record(at_defaults)
    other = C.build(S.SweepConfig, dict(out=str(tmp_path), k=[4], predictor="cluster"))
    with pytest.raises(UserError, match="predictor"):
        S._check_identity(str(tmp_path), other)

    # Before `random` existed every trial ran the random pass: that sweep resumes with
    # random: true, and is refused at today's default rather than mixing rows.
    record.write_text(json.dumps({k: v for k, v in C.identity(at_defaults).items()
                                  if k != "random"}))
    with pytest.raises(UserError, match="random"):
        S._check_identity(str(tmp_path), at_defaults)
    S._check_identity(str(tmp_path), C.build(S.SweepConfig, dict(out=str(tmp_path), k=[4],
                                                                random=True)))
    assert json.loads(record.read_text())["random"] is True
    # Before mask_mode and bits_by existed a sweep masked a * c with frequency bits.
    record.write_text(json.dumps({k: v for k, v in C.identity(at_defaults).items()
                                  if k not in ("mask_mode", "bits_by")}))
    with pytest.raises(UserError, match="mask_mode: replace and bits_by: frequency"):
        S._check_identity(str(tmp_path), at_defaults)
    S._check_identity(str(tmp_path), C.build(S.SweepConfig, dict(
        out=str(tmp_path), k=[4], mask_mode="replace", bits_by="frequency")))
    assert json.loads(record.read_text())["mask_mode"] == "replace"
