"""Every directory on a real S3 API (moto's server on loopback): extract -> verify ->
cluster -> evaluate on tiny:llama, a sweep with Tune's storage in the bucket, and a
SIGKILLed extraction that resumes to the same masks.

No credentials travel with the work: this module points its own environment at the
server before it starts its Ray instance, so every Ray worker finds the endpoint
and keys in the environment it was started with, as a node of a real cluster
finds its instance profile. The same stages on a local directory are the reference.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from actclust import config as C
from actclust.capture.verify import verify
from actclust.errors import UserError
from actclust.io import mask_store
from actclust.io import storage
from helpers import REPO, assert_same_layers, assert_user_error, run_cli

# Whole runs, Ray Train and Ray Tune against an S3 server: about 4 minutes of the suite.
pytestmark = pytest.mark.slow

SEQ_LEN = 32
EXTRACT = dict(model="tiny:llama", corpus="embedded:pydoc", seq_len=SEQ_LEN,
               max_tokens=SEQ_LEN * 64, shard_windows=2, workers=1)


@pytest.fixture(scope="module")
def bucket(s3_server):
    """``s3://<bucket>``, with this process and a fresh Ray instance pointed at the server."""
    import ray

    env = s3_server.env()
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL_S3", "RAY_ADDRESS"]}
    os.environ.update(env)
    for key in ("AWS_ENDPOINT_URL_S3", "RAY_ADDRESS"):
        os.environ.pop(key, None)
    ray.shutdown()  # workers inherit the environment of the instance they belong to
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield f"s3://{s3_server.new_bucket()}"
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def extract(out: str) -> dict:
    from actclust.capture.extract import run_extract

    return run_extract(C.build(C.ExtractConfig, dict(EXTRACT, out=out)))


def cluster(masks: str, out: str) -> dict:
    from actclust.clustering.distributed import run_cluster

    return run_cluster(C.build(C.ClusterConfig, dict(masks=masks, k=4, out=out, workers=2)))


def evaluate(centroids: str, out: str) -> dict:
    from actclust.evaluation.evaluate import run_evaluate

    return run_evaluate(C.build(C.EvaluateConfig, dict(centroids=centroids, out=out,
                                                       max_tokens=SEQ_LEN * 8, workers=1)))


def layer_tables(root: str, manifest: dict) -> dict:
    import pyarrow as pa

    return {layer: pa.concat_tables([storage.read_table(p)
                                     for p in mask_store.layer_files(root, manifest, layer)])
            for layer in manifest["layers"]}


@pytest.fixture(scope="module")
def stages(bucket, tmp_path_factory):
    """The three stages on S3 and, as the reference, on a local directory."""
    local = tmp_path_factory.mktemp("local")
    runs = {}
    for name, root in (("s3", bucket), ("local", str(local))):
        masks = storage.join(root, "masks")
        manifest = extract(masks)
        meta = cluster(masks, storage.join(root, "clusters"))
        report = evaluate(storage.join(root, "clusters"), storage.join(root, "eval"))
        runs[name] = dict(root=root, masks=masks, manifest=manifest, meta=meta, report=report)
    return runs


def test_shards_land_in_the_bucket_under_their_manifest_digests(stages, s3_server):
    run = stages["s3"]
    manifest = run["manifest"]
    shards = mask_store.complete_shards(manifest)
    assert len(shards) == len(manifest["shards"]) > 20
    prefix = run["masks"][len("s3://"):]
    expected = {f"{prefix}/{mask_store.MANIFEST}"} | {
        f"{prefix}/masks/layer={layer}/{s['name']}.parquet"
        for layer in manifest["layers"] for s in shards}
    assert set(s3_server.keys(prefix)) == expected  # no temporaries, nothing else
    for shard in shards:
        for layer, digest in zip(manifest["layers"], shard["file_sha256"]):
            assert storage.sha256_file(mask_store.shard_path(run["masks"], layer, shard["name"])) \
                == digest


def test_masks_on_s3_equal_masks_on_disk(stages):
    s3, local = stages["s3"], stages["local"]
    for key in ("tokens", "windows", "layers", "d_ff", "thresholds"):
        assert s3["manifest"][key] == local["manifest"][key], key
    a = layer_tables(s3["masks"], s3["manifest"])
    b = layer_tables(local["masks"], local["manifest"])
    assert_same_layers(a, b)


def test_verify_reads_every_object_against_its_hash(stages, s3_server):
    masks = stages["s3"]["masks"]
    assert verify(masks) == []
    done = run_cli("verify", masks)
    assert done.returncode == 0 and f"{masks}: OK" in done.stdout, done.stderr[-2000:]

    # A copy with one flipped byte in one object fails, naming that object.
    copy = storage.join(stages["s3"]["root"], "corrupt")
    fs, src = storage.resolve(masks)
    _, dst = storage.resolve(copy)
    for key in s3_server.keys(src):
        fs.copy_file(key, dst + key[len(src):])
    manifest = stages["s3"]["manifest"]
    victim = mask_store.shard_path(copy, manifest["layers"][1], manifest["shards"][3]["name"])
    data = bytearray(storage.read_bytes(victim))
    data[len(data) // 3] ^= 0x40
    storage.write_bytes_atomic(bytes(data), victim)
    problems = verify(copy)
    assert len(problems) >= 1
    assert f"masks/layer={manifest['layers'][1]}/{manifest['shards'][3]['name']}.parquet" \
        in problems[0] and "sha256" in problems[0]
    assert_user_error(run_cli("verify", copy), "failed verification")


def test_cluster_on_s3_equals_cluster_on_disk(stages, s3_server):
    s3, local = stages["s3"], stages["local"]
    from actclust.io.centroid_store import load_centroids

    meta_a, cents_a = load_centroids(storage.join(s3["root"], "clusters"))
    meta_b, cents_b = load_centroids(storage.join(local["root"], "clusters"))
    assert meta_a["cost"] == meta_b["cost"] and meta_a["iterations"] == meta_b["iterations"]
    assert all(np.array_equal(a, b) for a, b in zip(cents_a, cents_b))
    keys = s3_server.keys(s3["root"][len("s3://"):] + "/clusters")
    names = sorted(k.split("/clusters/", 1)[1] for k in keys)
    layers = [f"layers/layer={layer}.npz" for layer in s3["manifest"]["layers"]]
    # The per-iteration checkpoints are gone once each layer is finished.
    assert names == sorted(["centroids.parquet", "cluster.json", "cluster_run.json", *layers])


def test_evaluate_on_s3_equals_evaluate_on_disk(stages):
    a, b = stages["s3"]["report"], stages["local"]["report"]
    on_s3 = storage.read_json(storage.join(stages["s3"]["root"], "eval", "eval.json"))
    assert on_s3["cluster_ppl"] == a["cluster_ppl"]
    for key in ("dense_ppl", "oracle_ppl", "cluster_ppl", "random_ppl", "precision", "recall",
                "density", "tokens"):
        assert a[key] == b[key], key
    assert 0 < a["precision"] <= 1 and 0 < a["recall"] <= 1 and np.isfinite(a["cluster_ppl"])


def test_rerun_on_s3_reuses_finished_work_and_a_foreign_directory_is_refused(stages):
    from actclust.errors import UserError

    s3 = stages["s3"]
    again = extract(s3["masks"])  # every shard complete: nothing is extracted again
    assert again["shards"] == s3["manifest"]["shards"]
    assert cluster(s3["masks"], storage.join(s3["root"], "clusters"))["cost"] == s3["meta"]["cost"]
    with pytest.raises(UserError, match="different configuration"):
        from actclust.capture.extract import run_extract

        run_extract(C.build(C.ExtractConfig, dict(EXTRACT, seq_len=16, out=s3["masks"])))
    with pytest.raises(UserError, match="not empty"):
        cluster(s3["masks"], storage.join(s3["root"], "eval"))


def test_sweep_keeps_tune_state_and_results_in_the_bucket(bucket, s3_server):
    from actclust.orchestration.sweep import run_sweep

    out = storage.join(bucket, "sweep")
    values = dict(model="tiny:llama", corpus="embedded:pydoc", seq_len=SEQ_LEN,
                  max_tokens=SEQ_LEN * 32, eval_max_tokens=SEQ_LEN * 4, k=[4], theta=[0.5],
                  workers=1, worker_cpus=0.5, static_point=False, out=out)
    report = run_sweep(values)
    assert report == storage.join(out, "report.html")
    assert b"actclust report" in storage.read_bytes(report)
    table = storage.read_table(storage.join(out, "sweep.parquet")).to_pylist()
    assert [r["k"] for r in table] == [4]  # one trial is enough for Tune's state
    keys = s3_server.keys(out[len("s3://"):])
    tune = [k for k in keys if "/tune/sweep/" in k]
    assert any(k.rsplit("/", 1)[1].startswith("experiment_state") for k in tune), tune
    assert any("/plots/" in k for k in keys) and any(k.endswith("sweep.csv") for k in keys)

    # Rerun: Tune restores the finished experiment from the bucket; nothing is refit.
    before = {k: storage.sha256_file(f"s3://{k}") for k in keys if "/clusters/" in k}
    assert run_sweep(values) == report
    assert {k: storage.sha256_file(f"s3://{k}") for k in before} == before


def _recorded_shards(out: str) -> list:
    """Complete shards of the manifest in the bucket; none while the loopback server is
    still taking in the manifest's new version (it can answer a read mid-upload)."""
    try:
        return mask_store.complete_shards(mask_store.read_manifest(out))
    except UserError:
        return []


def test_killed_extraction_on_s3_resumes_to_the_same_masks(stages, bucket, s3_server):
    """SIGKILL the CLI once the manifest in the bucket records a complete shard; plant a
    stray object where a pending shard goes; rerun: the same masks as uninterrupted."""
    out = storage.join(bucket, "killed")
    args = ["extract", "--model", EXTRACT["model"], "--corpus", EXTRACT["corpus"],
            "--seq-len", str(SEQ_LEN), "--max-tokens", str(EXTRACT["max_tokens"]),
            "--shard-windows", str(EXTRACT["shard_windows"]), "--workers", "1", "--out", out]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "actclust", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    manifest_key = storage.join(out, mask_store.MANIFEST)
    try:
        while True:
            assert proc.poll() is None, "extraction ended before a shard was recorded"
            if storage.is_file(manifest_key) and _recorded_shards(out):
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = mask_store.read_manifest(out)
    pending = [s for s in partial["shards"] if s["status"] != mask_store.COMPLETE]
    assert 1 <= len(mask_store.complete_shards(partial)) and pending
    assert verify(out) != []  # incomplete is reported, not passed

    stray = mask_store.shard_path(out, partial["layers"][0], pending[-1]["name"])
    storage.write_bytes_atomic(b"half an upload", stray)
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert verify(out) == []
    manifest = mask_store.read_manifest(out)
    reference = stages["s3"]
    assert [s["sha256"] for s in manifest["shards"]] == \
        [s["sha256"] for s in reference["manifest"]["shards"]]
    a, b = layer_tables(out, manifest), layer_tables(reference["masks"], reference["manifest"])
    assert_same_layers(a, b)


def test_the_readme_run_command_works_on_s3(bucket, s3_server):
    """`actclust run --config jobs/presets/tiny.yaml --out s3://bucket/run`, as
    docs/storage.md documents it, in a fresh process that takes the endpoint from its
    environment."""
    command = "actclust run --config jobs/presets/tiny.yaml --out s3://bucket/run"
    assert command in (REPO / "docs" / "storage.md").read_text()
    out = storage.join(bucket, "run")
    done = run_cli(*command.split()[1:-1], out, timeout=900)  # every stage, twice K
    assert done.returncode == 0, done.stderr[-2000:]
    assert verify(storage.join(out, "masks")) == []
    keys = {k.split("/run/", 1)[1] for k in s3_server.keys(out[len("s3://"):])}
    for name in ("report.html", "results.csv", "results.json", "masks/manifest.json",
                 "clusters/k=4-theta=0.5/cluster.json", "clusters/k=8-theta=0.5/centroids.parquet",
                 "eval/k=4-theta=0.5/eval.json", "eval/k=8-theta=0.5/eval.json",
                 "plots/perplexity_vs_k.png"):
        assert name in keys, name
    rows = storage.read_json(storage.join(out, "results.json"))["rows"]
    assert [r["k"] for r in rows] == [4, 8]
    assert all(0 < r["recall"] <= 1 and np.isfinite(r["cluster_ppl"]) for r in rows)


# --- predictors on S3 -------------------------------------------------------------------

PREDICTOR = dict(epochs=2, workers=1)


@pytest.fixture(scope="module")
def predictor_runs(stages, bucket, tmp_path_factory):
    """A cluster predictor trained and evaluated with every directory on S3, and the same
    from a local directory as the reference (centroids from the same masks: the ones the
    stages fixture extracted into the bucket)."""
    from actclust.evaluation.evaluate import run_evaluate
    from actclust.predict.train import run_train_predictor

    masks = stages["s3"]["masks"]
    runs = {}
    for name, root in (("s3", storage.join(bucket, "p")),
                       ("local", str(tmp_path_factory.mktemp("plocal")))):
        centroids = storage.join(root, "clusters")
        cluster(masks, centroids)
        out = storage.join(root, "predictor")
        record = run_train_predictor(C.build(C.PredictorConfig, dict(
            PREDICTOR, centroids=centroids, out=out)))
        report = run_evaluate(C.build(C.EvaluateConfig, dict(
            centroids=centroids, out=storage.join(root, "eval"), predictor=out,
            max_tokens=SEQ_LEN * 8, workers=1)))
        runs[name] = dict(root=root, centroids=centroids, out=out, record=record, report=report)
    return runs


def test_predictor_on_s3_evaluates_like_the_local_one(predictor_runs, s3_server):
    s3, local = predictor_runs["s3"], predictor_runs["local"]
    for key in ("training_tokens", "validation_tokens", "train_accuracy",
                "validation_accuracy", "params", "rank"):
        assert s3["record"][key] == local["record"][key], key
    on_s3 = storage.read_json(storage.join(s3["root"], "eval", "eval.json"))
    assert on_s3["predicted_ppl"] == s3["report"]["predicted_ppl"]
    for key in ("cluster_ppl", "predicted_ppl", "predicted_ppl_ci95", "predicted_accuracy",
                "predicted_precision", "predicted_recall", "predicted_density"):
        assert s3["report"][key] == local["report"][key], key
    assert np.isfinite(s3["report"]["predicted_ppl"]) and 0 < s3["report"]["predicted_recall"] <= 1
    keys = {k.split("/predictor/", 1)[1] for k in s3_server.keys(s3["out"][len("s3://"):])}
    assert {"predictor.json", "predictor.safetensors", "run.json", "features/features.json",
            "features/shard-00000.parquet", "features/shard-00000.json"} <= keys
    assert any(k.startswith("ray/train/checkpoint_") and k.endswith("/state.pt") for k in keys)
    # The predictor on S3 also drives sparse generation.
    done = run_cli("generate", "--centroids", s3["centroids"], "--predictor", s3["out"],
                   "--prompt", "The for statement", "--max-new-tokens", "4")
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-2000:]


def test_predictor_on_s3_refuses_a_foreign_prefix(predictor_runs, bucket):
    foreign = storage.join(bucket, "foreign")
    storage.write_bytes_atomic(b"someone else's", storage.join(foreign, "data.bin"))
    assert_user_error(run_cli("train-predictor", "--centroids", predictor_runs["s3"]["centroids"],
                              "--out", foreign), "not empty")
    assert storage.list_names(foreign) == ["data.bin"]


@pytest.mark.timeout(1200)  # two Ray Train start-ups; slow on a loaded 2-core machine
def test_killed_predictor_training_on_s3_resumes_from_its_checkpoint(predictor_runs, bucket):
    """SIGKILL the CLI once Ray Train has recorded a checkpoint in the bucket; leave a stray
    weights object and a feature shard without its record; rerun: it resumes after a
    recorded epoch, rewrites the stray shard to the same bytes and commits the predictor."""
    from actclust.io import predictor_store

    out = storage.join(bucket, "killed-predictor")
    args = ["train-predictor", "--centroids", predictor_runs["s3"]["centroids"], "--out", out,
            "--epochs", "5", "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "actclust", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    snapshot = storage.join(out, "ray", "train", "checkpoint_manager_snapshot.json")
    try:
        while not storage.is_file(snapshot):
            assert proc.poll() is None, "training ended before a checkpoint was recorded"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not predictor_store.is_finished(out)

    features = storage.join(out, "features")
    shard = "shard-00001.parquet"
    record = storage.read_json(storage.join(features, "shard-00001.json"))
    storage.delete_file(storage.join(features, "shard-00001.json"))
    storage.write_bytes_atomic(b"half an upload", storage.join(features, shard))
    storage.write_bytes_atomic(b"half an upload", storage.join(out, predictor_store.WEIGHTS))

    done = run_cli(*args, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = predictor_store.read_meta(out)
    assert result["resumed_after_epoch"] >= 1 and result["epochs"] == 5
    assert storage.read_json(storage.join(features, "shard-00001.json")) == record
    assert storage.sha256_file(storage.join(features, shard)) == record["sha256"]
    from actclust.predict import load_predictor

    assert load_predictor(out).k == 4
