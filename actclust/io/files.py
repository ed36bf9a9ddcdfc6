"""Atomic file writes and content digests, shared by every store.

Every file is written under a temporary name, fsynced and renamed into place,
so a reader never sees a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path


def temporary_name(path: Path) -> Path:
    """A hidden sibling of ``path`` to write before renaming into place."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_table_atomic(table, path: Path) -> str:
    """Write Parquet under a temporary name, fsync, rename; returns the file's sha256."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        pq.write_table(table, tmp, compression="zstd", use_dictionary=["seq", "pos", "token"])
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest


def write_json_atomic(data: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
