"""actclust.io.storage on a local directory and on a real S3 API (moto server on loopback)."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pyarrow as pa
import pytest

from actclust.io import storage


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> str:
    """The same tests on a local directory and on an S3 prefix."""
    if request.param == "local":
        return str(tmp_path / "out")
    return storage.join(request.getfixturevalue("s3_bucket"), "run")


def test_join_keeps_the_uri_scheme(tmp_path):
    assert storage.join("s3://b/run", "masks", "layer=0", "x.parquet") == \
        "s3://b/run/masks/layer=0/x.parquet"
    assert storage.join("s3://b/run/", "a") == "s3://b/run/a"
    assert storage.join(str(tmp_path), "a", "b") == str(tmp_path / "a" / "b")
    assert storage.join(f"file://{tmp_path}", "a") == str(tmp_path / "a")
    assert [storage.scheme(x) for x in ("s3://b", "GS://b", "file:///x", "/x", "rel")] == \
        ["s3", "gs", "", "", ""]
    assert storage.normalize("S3://b/run/") == "s3://b/run"
    assert storage.normalize("rel") == str(tmp_path.cwd() / "rel")


def test_bytes_json_and_digests_round_trip(where):
    data = b"\x00actclust\xff" * 1000
    path = storage.join(where, "sub", "blob.bin")
    assert not storage.exists(path) and not storage.is_file(path)
    digest = storage.write_bytes_atomic(data, path)
    assert digest == hashlib.sha256(data).hexdigest() == storage.sha256_file(path)
    assert storage.read_bytes(path) == data
    assert storage.is_file(path) and storage.exists(storage.join(where, "sub"))
    assert not storage.is_file(storage.join(where, "sub"))

    storage.write_json_atomic({"k": [1, 2], "name": "x"}, storage.join(where, "m.json"))
    assert storage.read_json(storage.join(where, "m.json")) == {"k": [1, 2], "name": "x"}
    assert storage.list_names(where) == ["m.json", "sub"]
    assert storage.list_names(where, recursive=True) == ["m.json", "sub", "sub/blob.bin"]


def test_parquet_digest_is_the_digest_of_the_stored_file(where):
    table = pa.table({"seq": np.arange(500, dtype=np.int64),
                      "bits": pa.array([bytes([i % 256]) * 4 for i in range(500)],
                                       pa.binary(4))})
    path = storage.join(where, "masks", "layer=0", "shard-00000.parquet")
    digest = storage.write_table_atomic(table, path)
    assert digest == storage.sha256_file(path)
    assert storage.read_table(path).equals(table)
    assert storage.read_table(path, columns=["bits"]).column_names == ["bits"]
    batches = list(storage.parquet_file(path).iter_batches(batch_size=200, columns=["seq"]))
    assert [len(b) for b in batches] == [200, 200, 100]


def test_overwrite_replaces_a_stray_object(where):
    """A rerun writes over whatever an interrupted run left at the same name."""
    path = storage.join(where, "x.json")
    storage.write_bytes_atomic(b"{truncated", path)
    storage.write_json_atomic({"ok": True}, path)
    assert storage.read_json(path) == {"ok": True}
    storage.delete_file(path)
    assert not storage.is_file(path)
    storage.delete_file(path)  # gone already: no error


def test_missing_and_empty_locations(where):
    assert storage.is_empty(where) and storage.list_names(where) == []
    storage.makedirs(where)
    assert storage.is_empty(where)
    storage.write_bytes_atomic(b"1", storage.join(where, "a"))
    assert not storage.is_empty(where)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(where, "nothing-here"))


def test_local_writes_leave_no_temporaries(tmp_path):
    out = tmp_path / "d"
    storage.write_bytes_atomic(b"x" * 10, str(out / "a.bin"))
    storage.write_json_atomic({"a": 1}, str(out / "b.json"))
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", "b.json"]
    stale = out / ".c.parquet.tmp-0123abcd"
    stale.write_bytes(b"partial")
    (out / ".keep").write_bytes(b"")
    assert storage.remove_temporaries(str(out)) == 1
    assert sorted(p.name for p in out.iterdir()) == [".keep", "a.bin", "b.json"]
    assert storage.remove_temporaries("s3://bucket/prefix") == 0


def test_endpoint_comes_from_the_environment(s3_server, s3_bucket, monkeypatch):
    """AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3, which wins) selects the server."""
    path = storage.join(s3_bucket, "probe.json")
    storage.write_json_atomic({"n": 1}, path)
    assert s3_server.keys(s3_bucket[5:]) == [f"{s3_bucket[5:]}/probe.json"]

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    assert storage.read_json(path) == {"n": 1}


def test_ray_storage_is_picklable_without_credentials(s3_bucket, tmp_path):
    path, filesystem = storage.ray_storage(storage.join(s3_bucket, "tune"))
    assert path == f"{s3_bucket[5:]}/tune"
    blob = pickle.dumps(filesystem)
    assert b"actclust-test-secret" not in blob and b"actclust-test" not in blob
    clone = pickle.loads(blob)
    clone.open_output_stream(f"{path}/x").close()
    assert storage.is_file(storage.join(s3_bucket, "tune", "x"))

    assert storage.ray_storage(str(tmp_path / "t")) == (str(tmp_path / "t"), None)


def test_json_written_is_what_readers_expect(where):
    """Same bytes as the local writer has always produced (indent 1, newline)."""
    storage.write_json_atomic({"a": 1}, storage.join(where, "x.json"))
    raw = storage.read_bytes(storage.join(where, "x.json"))
    assert raw == (json.dumps({"a": 1}, indent=1) + "\n").encode()


def test_unsupported_scheme_and_missing_bucket_are_user_errors(s3_bucket):
    from actclust.errors import UserError

    with pytest.raises(UserError, match="unsupported storage scheme ftp://"):
        storage.exists("ftp://host/dir")
    with pytest.raises(UserError, match="names no bucket"):
        storage.exists("s3://")

    storage.makedirs(storage.join(s3_bucket, "run"))  # the bucket exists: nothing to do
    with pytest.raises(UserError, match="bucket no-such-bucket-here does not exist"):
        storage.makedirs("s3://no-such-bucket-here/run")


def test_a_predictor_directory_round_trips(where):
    """What train-predictor writes and evaluate / generate read: weights, then the record."""
    import torch

    from actclust.predict.model import load_predictor, read_meta, save

    meta = {"kind": "cluster", "k": 4, "rank": 2, "layers": [0, 1], "width": 16,
            "identity": {"model": "tiny:llama"}}
    tensors = {"down": torch.arange(24, dtype=torch.float32).reshape(2, 6, 2),
               "up": torch.ones(2, 2, 4), "bias": torch.zeros(2, 4)}
    directory = storage.join(where, "predictor")
    save(directory, meta, tensors)
    assert read_meta(directory) == meta
    loaded = load_predictor(directory)
    h = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    for layer in (0, 1):
        expect = torch.nn.functional.gelu(h @ tensors["down"][layer]) @ tensors["up"][layer] \
            + tensors["bias"][layer]
        assert torch.equal(loaded.logits(layer, h), expect)
