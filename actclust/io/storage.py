"""Where outputs live: a local directory or an object-store URI, behind one set of operations.

Every directory option (``--out``, ``--masks``, ``--centroids``, a sweep's
``out``) is a *location*: a local path, a ``file://`` URI, or a URI that
``pyarrow.fs`` understands (``s3://bucket/prefix``, ``gs://bucket/prefix``).
Locations are plain strings; :func:`join` builds children, :func:`resolve` turns
one into a ``(pyarrow FileSystem, path)`` pair in the process that uses it, so a
Ray worker connects with the credentials of its own environment.

Atomic writes differ by kind, the guarantee does not:

- local: written under a hidden temporary name, fsynced and renamed into place;
- object store: there is no rename, so the object is written at its final key in
  one upload (an interrupted upload leaves no object, or an earlier complete
  one). A result counts only once its commit record names it (the manifest of a
  mask directory, ``cluster.json``, ``eval.json``, Tune's experiment state);
  objects an interrupted run left behind are ignored and overwritten.

Credentials and endpoint come from the environment only: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` (or an instance role / IRSA / workload identity), and
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` for an S3-compatible server.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Union

from actclust.errors import UserError

Location = Union[str, os.PathLike]

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
SCHEMES = ("s3", "gs", "gcs")
TEMPORARY = re.compile(r"^\..+\.tmp-[0-9a-f]{8}$")


def scheme(location: Location) -> str:
    """``"s3"``, ``"gs"``, ... for a URI; ``""`` for a local path or a ``file://`` URI."""
    found = _SCHEME.match(str(location))
    if not found or found.group(1).lower() == "file":
        return ""
    return found.group(1).lower()


def is_local(location: Location) -> bool:
    return scheme(location) == ""


def _local_path(location: Location) -> str:
    text = str(location)
    if text.lower().startswith("file://"):
        text = text[len("file://"):]
    return text


def normalize(location: Location) -> str:
    """A canonical string for ``location``: an absolute local path or ``scheme://bucket/key``."""
    if is_local(location):
        return os.path.abspath(_local_path(location))
    text = str(location)
    head, rest = text.split("://", 1)
    return f"{head.lower()}://{rest.strip('/')}"


def join(location: Location, *parts: str) -> str:
    """``location/part/...`` for a local path or a URI (``pathlib`` would fold ``s3://``)."""
    if is_local(location):
        return os.path.join(_local_path(location), *[str(p) for p in parts])
    base = str(location).rstrip("/")
    return "/".join([base, *[str(p).strip("/") for p in parts]])


def _endpoint() -> str | None:
    """The S3 endpoint of an S3-compatible server, from the environment (AWS's names)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _filesystem(kind: str, bucket: str):
    from pyarrow import fs

    if kind == "s3":
        endpoint = _endpoint()
        if endpoint:
            return fs.S3FileSystem(endpoint_override=endpoint)
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") \
            or fs.resolve_s3_region(bucket)
        return fs.S3FileSystem(region=region)
    filesystem, _ = fs.FileSystem.from_uri(f"{kind}://{bucket}")
    return filesystem


_CACHE: dict = {}


def resolve(location: Location):
    """``(pyarrow.fs.FileSystem, path)`` of ``location``, built from this process's environment.

    The file system is cached per (scheme, bucket, endpoint) in this process. It holds
    no credentials: the cloud SDK under it takes them from this process's environment
    on use, and every other process resolves the same string for itself.
    """
    from pyarrow import fs

    kind = scheme(location)
    if not kind:
        return fs.LocalFileSystem(), os.path.abspath(_local_path(location))
    if kind not in SCHEMES:
        raise UserError(f"{location}: unsupported storage scheme {kind}://; use a local path, "
                        "file://, s3:// or gs://")
    path = str(location).split("://", 1)[1].strip("/")
    if not path:
        raise UserError(f"{location} names no bucket; use {kind}://BUCKET/PREFIX")
    bucket = path.split("/", 1)[0]
    key = (kind, bucket, _endpoint(), os.environ.get("AWS_REGION"),
           os.environ.get("AWS_DEFAULT_REGION"))
    if key not in _CACHE:
        _CACHE[key] = _filesystem(kind, bucket)
    return _CACHE[key], path


def ray_storage(location: Location) -> tuple[str, object]:
    """``(storage_path, storage_filesystem)`` for Ray Tune / Train ``RunConfig`` at ``location``.

    Local: an absolute path and None (Ray's own local handling). Object store: the
    bucket path and the same file system every other write here uses (its pickle
    carries the endpoint, never credentials: each Ray process takes those from its
    own environment). Tune's experiment state and Ray Train's checkpoints (the
    predictor's) both take this pair::

        path, filesystem = ray_storage(join(out, "train"))
        RunConfig(name=..., storage_path=path, storage_filesystem=filesystem)
    """
    if is_local(location):
        return normalize(location), None
    filesystem, path = resolve(location)
    return path, filesystem


# --- queries -------------------------------------------------------------------


def _info(location: Location):
    filesystem, path = resolve(location)
    return filesystem.get_file_info(path)


def exists(location: Location) -> bool:
    from pyarrow import fs

    return _info(location).type != fs.FileType.NotFound


def is_file(location: Location) -> bool:
    from pyarrow import fs

    return _info(location).type == fs.FileType.File


def list_names(location: Location, recursive: bool = False) -> list[str]:
    """Names below ``location`` (relative to it, sorted); ``[]`` when it does not exist."""
    from pyarrow import fs

    filesystem, path = resolve(location)
    if filesystem.get_file_info(path).type != fs.FileType.Directory:
        return []
    infos = filesystem.get_file_info(fs.FileSelector(path, recursive=recursive,
                                                     allow_not_found=True))
    prefix = path.rstrip("/") + "/"
    return sorted(i.path[len(prefix):] if i.path.startswith(prefix) else i.base_name
                  for i in infos)


def is_empty(location: Location) -> bool:
    """True when ``location`` does not exist or holds nothing."""
    return not list_names(location)


# --- reads -----------------------------------------------------------------------


def open_input_file(location: Location):
    """A random-access pyarrow file (what ``pyarrow.parquet`` reads from)."""
    filesystem, path = resolve(location)
    return filesystem.open_input_file(path)


def read_bytes(location: Location) -> bytes:
    with open_input_file(location) as f:
        return f.read()


def read_json(location: Location) -> dict:
    return json.loads(read_bytes(location).decode("utf-8"))


def read_json_record(location: Location, hint: str = "") -> dict:
    """A record we wrote (manifest, cluster.json, predictor.json); a damaged one is the
    user's input error, said in one line (``hint``: what to do about it)."""
    try:
        return read_json(location)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{location} is not valid JSON ({exc}){hint}") from None


def read_table(location: Location, columns=None):
    """A whole Parquet file as a pyarrow Table."""
    import pyarrow.parquet as pq

    with open_input_file(location) as f:
        return pq.read_table(f, columns=list(columns) if columns is not None else None)


def parquet_file(location: Location):
    """A ``pyarrow.parquet.ParquetFile`` for streaming batches."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(open_input_file(location))


def sha256_file(location: Location) -> str:
    h = hashlib.sha256()
    filesystem, path = resolve(location)
    with filesystem.open_input_stream(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- writes ----------------------------------------------------------------------


def makedirs(location: Location) -> None:
    """Create a local directory (and parents). Object stores have no directories; their
    bucket must exist (created by its owner, not by a run), else a UserError says so."""
    from pyarrow import fs

    if is_local(location):
        Path(_local_path(location)).mkdir(parents=True, exist_ok=True)
        return
    filesystem, path = resolve(location)
    bucket = path.split("/", 1)[0]
    if filesystem.get_file_info(bucket).type == fs.FileType.NotFound:
        raise UserError(f"{location}: bucket {bucket} does not exist or these credentials "
                        "cannot see it; create it first")


def temporary_name(path: Path) -> Path:
    """A hidden sibling of a local ``path`` to write before renaming into place."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def write_bytes_atomic(data, location: Location) -> str:
    """Put ``data`` (bytes or a pyarrow Buffer) at ``location`` whole; returns its sha256.

    Local: temporary name, fsync, rename. Object store: one upload to the final key.
    """
    digest = hashlib.sha256(memoryview(data)).hexdigest()
    if is_local(location):
        path = Path(_local_path(location))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(path)
        try:
            with open(tmp, "wb") as f:
                f.write(memoryview(data))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return digest
    filesystem, path = resolve(location)
    with filesystem.open_output_stream(path) as f:
        f.write(data)
    return digest


def write_json_atomic(data: dict, location: Location) -> None:
    text = json.dumps(data, indent=1, sort_keys=False) + "\n"
    write_bytes_atomic(text.encode("utf-8"), location)


def write_table_atomic(table, location: Location, **options) -> str:
    """Write ``table`` as Parquet at ``location``; returns the file's sha256.

    Options default to zstd with dictionaries on the mask store's integer columns
    (absent columns are ignored by pyarrow).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    options.setdefault("compression", "zstd")
    options.setdefault("use_dictionary", [c for c in ("seq", "pos", "token")
                                          if c in table.column_names] or False)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    return write_bytes_atomic(sink.getvalue(), location)


def delete_file(location: Location) -> None:
    """Remove one file or object; nothing if it is not there."""
    from pyarrow import fs

    filesystem, path = resolve(location)
    if filesystem.get_file_info(path).type == fs.FileType.File:
        filesystem.delete_file(path)


def remove_temporaries(location: Location) -> int:
    """Delete local temporaries that a killed writer left under ``location``; count them.

    Object stores have none: an interrupted upload never becomes an object.
    """
    if not is_local(location):
        return 0
    root = Path(_local_path(location))
    stale = [p for p in root.rglob(".*.tmp-*") if TEMPORARY.match(p.name)] if root.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)
