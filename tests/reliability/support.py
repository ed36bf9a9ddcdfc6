"""What the reliability tests share besides fixtures: a real multi-node Ray cluster on this
machine (ray.cluster_utils.Cluster), the CLI with a busy machine's deadline, and waiting on
conditions."""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import helpers as shared

# A CLI run starts its own Ray instance and actors: minutes, not seconds, when the
# cores are shared with other work. The bound only ends a run that hangs.
CLI_TIMEOUT_S = 900
NODE_START_TIMEOUT_S = 600

# Ray gives a starting node a fixed 30 s to register with its GCS (ray/_private/node.py);
# on an oversubscribed machine a start can miss it. That is Ray failing to start, not
# the behaviour under test: such a start is tried again, a few times.
RAY_START_TIMEOUT = "timed out during startup"
RAY_START_ATTEMPTS = 3


def run_cli(*args: str, timeout: float = CLI_TIMEOUT_S, **kwargs):
    """``python -m actclust ARGS`` in a fresh process, with a deadline for a busy machine."""
    for _ in range(RAY_START_ATTEMPTS):
        proc = shared.run_cli(*args, timeout=timeout, **kwargs)
        if RAY_START_TIMEOUT not in proc.stderr:
            break
    return proc


def start_node(cluster, **args):
    """``cluster.add_node``, tried again when Ray's start-up bound is missed."""
    for attempt in range(RAY_START_ATTEMPTS):
        try:
            return cluster.add_node(wait=False, **args)
        except Exception as exc:  # Ray raises a bare Exception for this
            if RAY_START_TIMEOUT not in str(exc) or attempt == RAY_START_ATTEMPTS - 1:
                raise


class Nodes:
    """A head with no CPUs, which the driver (this process) connects to, and worker
    nodes of one CPU each that run every actor. Only worker nodes are ever killed."""

    def __init__(self, workers: int = 2):
        from ray.cluster_utils import Cluster

        self.cluster = Cluster()
        # The first node is the head; no dashboard: less to start on a busy machine.
        start_node(self.cluster, num_cpus=0, include_dashboard=False)
        self.workers = []
        self.restore(workers)

    def _processes(self, node) -> list:
        """The worker processes (the actors) a worker node's raylet started."""
        import psutil

        raylet = node.all_processes["raylet"][0].process
        return psutil.Process(raylet.pid).children(recursive=True)

    @contextlib.contextmanager
    def paused(self):
        """Stop every actor process on the worker nodes (SIGSTOP) for the duration,
        so a node can be lost at a known point of the job, whatever the load."""
        import psutil

        stopped = [p for node in self.workers for p in self._processes(node)]
        for proc in stopped:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            for proc in stopped:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(signal.SIGCONT)

    def kill_worker(self) -> None:
        """Crash the last worker node: SIGKILL its worker processes (the actors) and its
        raylet at once, as a lost machine would."""
        import ray

        node = self.workers.pop()
        assert node.node_id != ray.get_runtime_context().get_node_id(), \
            "never remove the node the driver is connected to"
        for proc in self._processes(node):
            proc.kill()
        self.cluster.remove_node(node, allow_graceful=False)

    def restore(self, workers: int = 2) -> None:
        while len(self.workers) < workers:
            self.workers.append(start_node(self.cluster, num_cpus=1))
        # Ray's own wait gives a node 30 s to register: far too little on a busy machine.
        self.cluster.wait_for_nodes(timeout=NODE_START_TIMEOUT_S)

    def shutdown(self) -> None:
        """Worker nodes first, the head only once this driver has disconnected. A job
        a failed test left running may reconnect on its next Ray call; removing the
        head then disconnects it again (remove_node refuses once, after ray.shutdown)."""
        import ray

        for node in list(self.workers):
            self.cluster.remove_node(node, allow_graceful=False)
        self.workers = []
        for _ in range(3):
            ray.shutdown()
            try:
                self.cluster.shutdown()
                return
            except ValueError:
                continue
        raise RuntimeError("a leftover job kept reconnecting to the test cluster")


def in_background(fn, *args):
    """Run fn(*args) in a thread; returns a join() that re-raises its exception."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join(timeout: float = 600):
        thread.join(timeout)
        assert not thread.is_alive(), "the job did not finish"
        if "error" in box:
            raise box["error"]
        return box.get("result")
    join.running = thread.is_alive
    return join


def wait_for(predicate, timeout: float = 420, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds. The deadline only bounds a failure: actors
    that start slowly on a shared machine still get there well within it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
