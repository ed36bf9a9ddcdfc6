"""A real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster)."""

from __future__ import annotations

import os
import threading
import time

import pytest



class Nodes:
    """A head with no CPUs (drivers only) and worker nodes of one CPU each."""

    def __init__(self, workers: int = 2):
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        self.workers = [self.cluster.add_node(num_cpus=1) for _ in range(workers)]
        self.cluster.wait_for_nodes()

    def kill_worker(self) -> None:
        """Crash the last worker node: SIGKILL its worker processes (the actors) and its
        raylet at once, as a lost machine would."""
        import psutil

        node = self.workers.pop()
        raylet = node.all_processes["raylet"][0].process
        workers = psutil.Process(raylet.pid).children(recursive=True)
        for proc in workers:
            proc.kill()
        self.cluster.remove_node(node, allow_graceful=False)

    def restore(self, workers: int = 2) -> None:
        while len(self.workers) < workers:
            self.workers.append(self.cluster.add_node(num_cpus=1))
        self.cluster.wait_for_nodes()


@pytest.fixture(scope="module")
def nodes():
    import ray

    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    cluster = Nodes()
    ray.init(address=cluster.cluster.address, logging_level="WARNING")
    yield cluster
    ray.shutdown()
    cluster.cluster.shutdown()


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


def wait_for(predicate, timeout: float = 180, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
