"""Shared fixtures: one real local Ray instance per test session, small corpora."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sharedray import SharedRay

REPO = Path(__file__).resolve().parents[1]
# One `ray start --head` for the CLI processes of the whole session, started on first use.
SHARED_RAY = SharedRay()
OBJECT_STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS")


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


@pytest.fixture
def text_corpus(tmp_path) -> Path:
    """A small local .txt corpus (about 6k characters of real English)."""
    from pydoc_data.topics import topics

    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:6]), encoding="utf-8")
    return path


def run_cli(*args: str, env: dict | None = None, timeout: float = 300,
            own_ray: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m actclust ARGS`` in a fresh process. It joins the session's shared
    Ray cluster (as a job on a cluster would: starting a private Ray instance per command
    costs seconds of CPU); ``own_ray=True`` lets it start its own, as on a laptop."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    # Object-store settings reach the actors through the environment of the Ray instance
    # they run in (never a runtime env): the shared cluster started before a test set
    # them, so such a command starts its own Ray, as it would on a laptop.
    own_ray = own_ray or any(key in full_env for key in OBJECT_STORE_ENV)
    if env and "RAY_ADDRESS" in env:
        full_env["RAY_ADDRESS"] = env["RAY_ADDRESS"]
    elif not own_ray:
        full_env = SHARED_RAY.client_env(full_env)
    return subprocess.run([sys.executable, "-m", "actclust", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=str(REPO))


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, exactly one ``actclust: error:`` line, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    errors = [l for l in proc.stderr.splitlines() if l.startswith("actclust: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


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
