"""SIGKILL the driver of `actclust cluster` mid-fit: rerunning resumes from the k-means
checkpoint and ends with the centroids of a clean run. (Extraction and sweep drivers
are killed in tests/test_extract.py and tests/test_pipeline.py.)"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from helpers import REPO

from .support import RAY_START_ATTEMPTS, RAY_START_TIMEOUT, run_cli

# Four CLI runs, each starting its own Ray instance: minutes each on a busy machine.
pytestmark = [pytest.mark.timeout(2400), pytest.mark.slow]


def test_killed_cluster_driver_resumes_to_identical_centroids(tmp_path):
    masks = tmp_path / "masks"
    assert run_cli("extract", "--model", "tiny:llama", "--seq-len", "64", "--max-tokens",
                   str(64 * 60), "--out", str(masks)).returncode == 0
    fit = ["cluster", "--masks", str(masks), "--k", "32", "--max-iter", "60", "--workers", "2"]
    clean = run_cli(*fit, "--out", str(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr[-2000:]

    out = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    checkpoint = out / "checkpoints" / "layer=1.npz"
    log = tmp_path / "killed.log"
    for _ in range(RAY_START_ATTEMPTS):
        with log.open("w") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "actclust", *fit, "--out", str(out)],
                                    cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                    start_new_session=True)
        deadline = time.monotonic() + 600  # only bounds a failure
        while time.monotonic() < deadline and not checkpoint.exists() and proc.poll() is None:
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):  # a failed start may be gone already
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if RAY_START_TIMEOUT not in log.read_text():
            break
    assert checkpoint.exists(), "the fit ended before layer 1 was checkpointed"
    assert (out / "layers" / "layer=0.npz").exists()  # layer 0 finished before the kill
    assert not (out / "centroids.parquet").exists()

    resumed = run_cli(*fit, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "layer 1: resuming k-means from its checkpoint" in resumed.stderr
    assert pq.read_table(out / "centroids.parquet").equals(
        pq.read_table(tmp_path / "clean" / "centroids.parquet"))
    assert not checkpoint.exists()  # a finished layer's checkpoint is cleaned up
