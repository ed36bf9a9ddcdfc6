"""A one-node Ray cluster started with `ray start --head` for the test session's CLI runs.

Every CLI test used to start (and tear down) a private Ray instance: a GCS, a raylet and
their agents, several seconds of CPU on a 2-core machine. Joining one running cluster
through ``RAY_ADDRESS`` is what a job on a real cluster does, and it costs a connection.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_ports() -> list[str]:
    """`ray start` flags giving a head node free ports of its own: other clusters of the
    session (the in-process one, the shared one, the multi-node tests) hold the defaults."""
    return [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port",
        "object-manager-port")]


class SharedRay:
    """Started on the first :meth:`address` call, stopped by :meth:`stop`."""

    def __init__(self, num_cpus: int | None = None):
        self.num_cpus = num_cpus or os.cpu_count() or 1
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def address(self) -> str:
        if self.proc is not None and self.proc.poll() is not None:
            # `ray start --block` exits, taking the whole head down, when any process it
            # started dies; later tests get a new head rather than a dead address.
            print(f"sharedray: the head on port {self.port} exited "
                  f"({self.proc.returncode}); starting another", file=sys.stderr)
            self.proc = None
        if self.proc is None:
            self._start()
        return f"127.0.0.1:{self.port}"

    def client_env(self, base: dict | None = None) -> dict:
        """``base`` (default: this process's environment) with what a Ray client needs
        to join this cluster."""
        return {**(os.environ if base is None else base), "RAY_ADDRESS": self.address(),
                "RAY_AUTH_MODE": "token"}

    def _start(self) -> None:
        self.port = free_port()
        env = {**os.environ, "RAY_AUTH_MODE": "token"}
        env.pop("RAY_ADDRESS", None)
        ports = own_ports()
        ray = str(Path(sys.executable).parent / "ray")
        self.proc = subprocess.Popen(
            [ray, "start", "--head", "--block", f"--port={self.port}",
             f"--num-cpus={self.num_cpus}", "--include-dashboard=false",
             "--disable-usage-stats", *ports],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        # `ray start --block` says so once the node is up; read until then (the output
        # only ends if the start failed).
        seen = []
        for line in self.proc.stdout:
            seen.append(line)
            if "Ray runtime started" in line:
                break
        else:
            raise RuntimeError("ray start --head failed:\n" + "".join(seen[-40:]))
        # A process that started a head stops it when it exits, whoever else forgot to.
        atexit.register(self.stop)
        # Keep draining its output so the pipe never fills.
        import threading

        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)  # --block: ray stops what it started
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        # `ray start` records the cluster for later ray.init() calls; forget it.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{self.port}"):
            current.unlink()
        self.proc = None
