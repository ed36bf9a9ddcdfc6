"""On-disk mask store (DESIGN.md format version 1): the one place that knows
the Parquet schema and the bit order.

Layout of an extraction directory::

    DIR/manifest.json
    DIR/masks/layer=<l>/<shard>.parquet    seq int64, pos int32, token int32,
                                           bits fixed_size_binary(ceil(d/8))

Bit order: neuron i is bit ``i % 8`` (least significant first) of byte ``i // 8``.
Every file is written under a temporary name and renamed into place; the
manifest is replaced atomically and lists a shard as complete only after all of
its layer files are in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np

from actclust.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
COMPLETE = "complete"
PENDING = "pending"


def row_bytes(width: int) -> int:
    return (width + 7) // 8


def pack(mask: np.ndarray) -> np.ndarray:
    """(N, d) bool -> (N, ceil(d/8)) uint8 in the contract's bit order."""
    return np.packbits(np.asarray(mask, dtype=bool), axis=-1, bitorder="little")


def unpack(bits: np.ndarray, width: int) -> np.ndarray:
    """(N, B) uint8 -> (N, width) bool."""
    return np.unpackbits(bits, axis=-1, count=width, bitorder="little").astype(bool)


def mask_schema(width: int):
    import pyarrow as pa

    return pa.schema([
        ("seq", pa.int64()),
        ("pos", pa.int32()),
        ("token", pa.int32()),
        ("bits", pa.binary(row_bytes(width))),
    ])


def bits_array(packed: np.ndarray):
    """(N, B) uint8 -> pyarrow fixed_size_binary(B) array without copying rows one by one."""
    import pyarrow as pa

    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    n, b = packed.shape
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(b), n, [None, pa.py_buffer(packed)])


def bits_to_numpy(column) -> np.ndarray:
    """pyarrow fixed_size_binary column (Array or ChunkedArray) -> (N, B) uint8."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 0:
            return np.zeros((0, column.type.byte_width), dtype=np.uint8)
        column = pa.concat_arrays(column.chunks) if column.num_chunks > 1 else column.chunk(0)
    width = column.type.byte_width
    data = column.buffers()[1]
    start = column.offset * width
    flat = np.frombuffer(data, dtype=np.uint8)[start:start + len(column) * width]
    return flat.reshape(len(column), width).copy()


def mask_table(seq: np.ndarray, pos: np.ndarray, token: np.ndarray, packed: np.ndarray, width: int):
    import pyarrow as pa

    return pa.Table.from_arrays(
        [pa.array(seq, pa.int64()), pa.array(pos, pa.int32()), pa.array(token, pa.int32()),
         bits_array(packed)],
        schema=mask_schema(width),
    )


def layer_dir(root: str | os.PathLike, layer: int) -> Path:
    return Path(root) / "masks" / f"layer={int(layer)}"


def shard_path(root, layer: int, shard: str) -> Path:
    return layer_dir(root, layer) / f"{shard}.parquet"


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
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
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
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
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


def write_shard(root, shard: str, seq: np.ndarray, token_ids: np.ndarray,
                layer_bits: list[np.ndarray], layers: list[int], width: int) -> dict:
    """Write one shard (all layers) of windows ``token_ids`` (W, T); returns its manifest entry.

    ``layer_bits[i]`` is the (W*T, B) packed masks of ``layers[i]``, rows in (seq, pos) order.
    """
    w, t = token_ids.shape
    seq_col = np.repeat(np.asarray(seq, dtype=np.int64), t)
    pos_col = np.tile(np.arange(t, dtype=np.int32), w)
    tok_col = token_ids.reshape(-1).astype(np.int32)
    digests = []
    for layer, packed in zip(layers, layer_bits):
        table = mask_table(seq_col, pos_col, tok_col, packed, width)
        digests.append(write_table_atomic(table, shard_path(root, layer, shard)))
    return {
        "name": shard,
        "windows": int(w),
        "rows": int(w * t),
        "seq_first": int(seq[0]),
        "seq_last": int(seq[-1]),
        "sha256": hashlib.sha256("".join(digests).encode()).hexdigest(),
        "file_sha256": digests,
        "status": COMPLETE,
    }


def read_manifest(root: str | os.PathLike) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise UserError(f"{root} is not a mask directory: {MANIFEST} is missing "
                        "(create one with actclust extract)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); re-run actclust extract") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is not an actclust mask manifest of format version "
                        f"{FORMAT_VERSION}")
    for key in ("model", "layers", "d_ff", "shards", "thresholds"):
        if key not in manifest:
            raise UserError(f"{path} lacks the field {key!r}; re-run actclust extract")
    return manifest


def write_manifest(root, manifest: dict) -> None:
    write_json_atomic(manifest, Path(root) / MANIFEST)


def complete_shards(manifest: dict) -> list[dict]:
    return [s for s in manifest["shards"] if s.get("status") == COMPLETE]


def require_complete(manifest: dict, root) -> None:
    pending = [s["name"] for s in manifest["shards"] if s.get("status") != COMPLETE]
    if pending:
        raise UserError(f"mask directory {root} is incomplete ({len(pending)} shard(s) not "
                        "finished); re-run the same actclust extract command to finish it")


def layer_files(root, manifest: dict, layer: int) -> list[Path]:
    return [shard_path(root, layer, s["name"]) for s in complete_shards(manifest)]


def read_layer(root, manifest: dict, layer: int, columns=("bits",)) -> dict:
    """All complete rows of one layer, in (seq, pos) order: {column: numpy array}."""
    import pyarrow.parquet as pq

    parts: dict[str, list] = {c: [] for c in columns}
    for path in layer_files(root, manifest, layer):
        table = pq.read_table(path, columns=list(columns))
        for c in columns:
            col = table.column(c)
            parts[c].append(bits_to_numpy(col) if c == "bits" else col.to_numpy())
    out = {}
    for c, chunks in parts.items():
        if chunks:
            out[c] = np.concatenate(chunks)
        else:
            out[c] = np.zeros((0, row_bytes(manifest["d_ff"])), np.uint8) if c == "bits" \
                else np.zeros(0, np.int64)
    return out


def iter_layer_batches(root, manifest: dict, layer: int, batch_rows: int,
                       shards: list[str] | None = None) -> Iterator[np.ndarray]:
    """Stream one layer's packed masks as (<=batch_rows, B) uint8 arrays (bounded memory)."""
    import pyarrow.parquet as pq

    names = shards if shards is not None else [s["name"] for s in complete_shards(manifest)]
    for name in names:
        pf = pq.ParquetFile(shard_path(root, layer, name))
        for batch in pf.iter_batches(batch_size=batch_rows, columns=["bits"]):
            yield bits_to_numpy(batch.column(0))
