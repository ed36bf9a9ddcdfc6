"""What test modules share besides fixtures (those stay in conftest.py): the repository
root, the session's shared Ray cluster, running the CLI, and common assertions."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from sharedray import SharedRay

REPO = Path(__file__).resolve().parents[1]
# One `ray start --head` for the CLI processes of the whole session, started on first use.
SHARED_RAY = SharedRay()
OBJECT_STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS")
FORMATS = REPO / "docs" / "formats.md"


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


def assert_same_layers(a: dict, b: dict) -> None:
    """Two {layer: pyarrow.Table} maps hold the same, non-empty set of layers, each equal."""
    assert a, "no layers to compare"
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for layer in a:
        assert a[layer].equals(b[layer]), f"layer {layer} differs"


def undocumented_fields(record: dict, prefixes: tuple = ()) -> list[str]:
    """Keys of ``record`` that docs/formats.md never names in backticks.

    A key that is one of ``prefixes`` followed by a documented name counts as documented
    (results rows carry the neuron predictor's figures as ``neuron_<field>``).
    """
    named = set(re.findall(r"`([a-z_0-9]+)", FORMATS.read_text(encoding="utf-8")))
    return [key for key in record if key not in named
            and not any(key.startswith(p) and key[len(p):] in named for p in prefixes)]
