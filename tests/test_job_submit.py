"""A real `ray job submit` to a cluster started with `ray start --head` on this machine."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO
from sharedray import free_port, own_ports

pytestmark = pytest.mark.slow  # a second Ray cluster (job submit), or Ray Tune with Ray Train

VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def head_node(tmp_path):
    """A one-node cluster with token authentication and the dashboard on localhost only."""
    port, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    ports = own_ports()
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={port}",
         "--num-cpus=2", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--include-dashboard=true", "--disable-usage-stats", *ports],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", dash), timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
                time.sleep(0.5)
        yield address, env
    finally:
        proc.send_signal(signal.SIGTERM)  # --block: ray stops what it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        # `ray start` records the cluster for later ray.init() calls; forget it.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def ray_job(env, address, *args):
    """One `ray job` CLI call against the head node; its return code and whole output."""
    res = subprocess.run([str(VENV_BIN / "ray"), "job", args[0], "--address", address, *args[1:]],
                         env=env, capture_output=True, text=True, timeout=120)
    return res.returncode, res.stdout + res.stderr


# The job server answers its port before its agent has registered, and drops a connection
# now and then while the machine is loaded; both end a CLI call without deciding anything.
TRANSIENT = ("No available agent", "ConnectionError", "RemoteDisconnected")


@pytest.mark.timeout(900)  # up to 120 s to submit and 480 s to run, on a loaded machine
def test_ray_job_submit_runs_the_pipeline_smoke_test(head_node, tmp_path):
    address, env = head_node
    out = tmp_path / "job-out"
    runtime_env = tmp_path / "runtime_env.json"
    runtime_env.write_text(json.dumps({"working_dir": str(REPO),
                                       "excludes": [".venv", ".git", "runs", "*.egg-info"]}))
    job = "actclust-smoke"
    deadline = time.time() + 120
    while True:
        rc, text = ray_job(env, address, "submit", "--submission-id", job, "--no-wait",
                           "--runtime-env", str(runtime_env), "--",
                           sys.executable, "jobs/pipeline.py", "--smoke-test", "--out", str(out))
        # A retry after a dropped connection finds the first attempt's job: it was accepted.
        if rc == 0 or "already exists" in text:
            break
        assert any(t in text for t in TRANSIENT) and time.time() < deadline, text[-3000:]
        time.sleep(2)
    deadline = time.time() + 480
    while True:
        rc, text = ray_job(env, address, "status", job)
        # The CLI's words for the terminal states (ray.dashboard.modules.job.cli).
        state = next((s for s in ("succeeded", "failed", "was stopped")
                      if f"Job '{job}' {s}" in text), None)
        if state:
            break
        assert (rc == 0 or any(t in text for t in TRANSIENT)) and time.time() < deadline, \
            text[-3000:]
        time.sleep(2)
    assert state == "succeeded", ray_job(env, address, "logs", job)[1][-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert sorted(r["k"] for r in rows) == [4, 8]
    assert (out / "report.html").is_file()
