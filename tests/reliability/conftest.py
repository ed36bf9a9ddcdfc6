"""Fixtures of the reliability tests: a real multi-node Ray cluster on this machine."""

from __future__ import annotations

import os

import pytest

from .support import Nodes


@pytest.fixture(scope="module")
def nodes():
    import ray

    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    cluster = Nodes()
    ray.init(address=cluster.cluster.address, logging_level="WARNING")
    assert ray.get_runtime_context().get_node_id() == cluster.cluster.head_node.node_id, \
        "the driver must be connected to the head, which is never removed"
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture
def cluster(nodes):
    """The module's cluster with both worker nodes back after each test, pass or fail."""
    yield nodes
    nodes.restore()
