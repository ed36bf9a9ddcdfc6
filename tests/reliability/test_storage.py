"""Storage faults: a disk that fills during extraction, and corrupt shards caught before use."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from actclust.io import mask_store as store
from actclust.capture.verify import verify
from helpers import assert_user_error

from .support import run_cli

# Each test runs the CLI (its own Ray instance) two or three times: minutes each on a
# busy machine.
pytestmark = pytest.mark.timeout(2400)

ARGS = ["extract", "--model", "tiny:opt", "--corpus", "embedded:pydoc", "--seq-len", "32",
        "--max-tokens", str(32 * 240), "--shard-windows", "8", "--workers", "1"]


@pytest.fixture
def small_disk(tmp_path):
    """A 160 KiB tmpfs: room for a few shards of tiny:opt masks, not all 30."""
    mount = Path(f"/tmp/actclust-small-disk-{uuid.uuid4().hex[:6]}")
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        mount.rmdir()
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)
    mount.rmdir()


def test_full_disk_stops_cleanly_and_a_rerun_completes(small_disk, tmp_path):
    out = small_disk / "masks"
    proc = run_cli(*ARGS, "--out", str(out))
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("actclust: error:")]
    assert len(errors) == 1 and "no space left on device" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    manifest = store.read_manifest(out)
    done = store.complete_shards(manifest)
    assert 0 < len(done) < len(manifest["shards"])
    # Every shard the manifest calls complete is intact; the rest are reported.
    problems = verify(str(out))
    assert problems and all("not complete" in p for p in problems), problems
    for shard in done:
        for layer, digest in zip(manifest["layers"], shard["file_sha256"]):
            assert store.sha256_file(store.shard_path(out, layer, shard["name"])) == digest
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    proc = run_cli(*ARGS, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert verify(str(out)) == []
    reference = tmp_path / "ref"
    assert run_cli(*ARGS, "--out", str(reference)).returncode == 0
    for layer in manifest["layers"]:
        assert pq.read_table(store.layer_dir(out, layer)).sort_by("seq").equals(
            pq.read_table(store.layer_dir(reference, layer)).sort_by("seq"))


def test_truncated_shard_is_refused_by_cluster_and_verify(tmp_path):
    out = tmp_path / "masks"
    assert run_cli(*ARGS[:8], str(32 * 32), *ARGS[9:], "--out", str(out)).returncode == 0
    manifest = store.read_manifest(out)
    path = store.layer_files(out, manifest, 0)[0]
    path.write_bytes(path.read_bytes()[:-100])
    assert any("sha256" in p or "unreadable" in p for p in verify(str(out)))
    assert_user_error(run_cli("cluster", "--masks", str(out), "--k", "4", "--out",
                              str(tmp_path / "c")), "does not match its sha256")
    assert not (tmp_path / "c" / "centroids.parquet").exists()


def test_foreign_or_incomplete_manifest_is_refused(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"format_version": 99, "model": "x"}')
    assert_user_error(run_cli("cluster", "--masks", str(foreign), "--k", "4", "--out",
                              str(tmp_path / "c1")), "format version 1")
    (foreign / "manifest.json").write_text("{not json")
    assert_user_error(run_cli("verify", str(foreign)), "not valid JSON")
    partial = tmp_path / "partial"
    assert run_cli(*ARGS[:8], str(32 * 32), *ARGS[9:], "--out", str(partial)).returncode == 0
    manifest = store.read_manifest(partial)
    manifest["shards"][-1]["status"] = store.PENDING
    store.write_manifest(partial, manifest)
    assert_user_error(run_cli("cluster", "--masks", str(partial), "--k", "4", "--out",
                              str(tmp_path / "c2")), "is incomplete")
