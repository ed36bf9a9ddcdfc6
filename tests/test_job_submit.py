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


def test_ray_job_submit_runs_the_pipeline_smoke_test(head_node, tmp_path):
    address, env = head_node
    out = tmp_path / "job-out"
    runtime_env = tmp_path / "runtime_env.json"
    runtime_env.write_text(json.dumps({"working_dir": str(REPO),
                                       "excludes": [".venv", ".git", "runs", "*.egg-info"]}))
    command = [str(VENV_BIN / "ray"), "job", "submit", "--address", address,
               "--runtime-env", str(runtime_env), "--",
               sys.executable, "jobs/pipeline.py", "--smoke-test", "--out", str(out)]
    deadline = time.time() + 90
    while True:
        res = subprocess.run(command, env=env, capture_output=True, text=True, timeout=480)
        # The dashboard answers before its job agent has registered; that is the only retry.
        if "No available agent" not in res.stdout + res.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert "succeeded" in (res.stdout + res.stderr).lower()
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert sorted(r["k"] for r in rows) == [4, 8]
    assert (out / "report.html").is_file()
