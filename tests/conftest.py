"""Shared fixtures: one real local Ray instance per test session, extracted masks, small
corpora, the S3 test server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import SHARED_RAY


def pytest_sessionfinish(session, exitstatus):
    SHARED_RAY.stop()


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


# What extract_masks extracts unless told otherwise: a tiny model on the embedded corpus.
MASKS_DEFAULTS = dict(model="tiny:llama", corpus="embedded:pydoc", seq_len=64)


@pytest.fixture(scope="session")
def extract_masks(tmp_path_factory):
    """A factory: ``extract_masks(**settings)`` runs actclust extract with MASKS_DEFAULTS
    and ``settings`` into a fresh directory and returns it. Ray must be up: ask for
    ``ray_session`` (or the module's own cluster) beside it."""
    from actclust.capture.extract import run_extract
    from actclust.config import ExtractConfig, build

    def make(**settings) -> str:
        out = tmp_path_factory.mktemp("masks") / "m"
        run_extract(build(ExtractConfig, {**MASKS_DEFAULTS, **settings, "out": str(out)}))
        return str(out)
    return make


@pytest.fixture
def text_corpus(tmp_path) -> Path:
    """A small local .txt corpus (about 6k characters of real English)."""
    from pydoc_data.topics import topics

    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:6]), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on 127.0.0.1 (moto server mode) for the whole session."""
    from objectstore import LoopbackS3

    server = LoopbackS3()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """``s3://<fresh bucket>``, with this process's environment pointing at the server
    (CLI subprocesses started by run_cli inherit it)."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return f"s3://{s3_server.new_bucket()}"
