"""The mask store (docs/formats.md, format versions 1 and 2): the one place that knows the mask
Parquet schema and the bit order, both ways (write and read), and the manifest.

Layout of an extraction directory::

    DIR/manifest.json
    DIR/masks/layer=<l>/<shard>.parquet          version 1 (one site)
    DIR/masks/site=<s>/layer=<l>/<shard>.parquet version 2 (several sites)
        seq int64, pos int32, token int32, bits fixed_size_binary(ceil(d/8))

A version 2 manifest lists ``sites`` and holds ``d_ff`` and ``thresholds`` per site;
:func:`site_view` turns it into a version-1-shaped manifest of one site (with
``mask_site`` naming the partition), which every per-site reader here accepts.

Bit order: neuron i is bit ``i % 8`` (least significant first) of byte ``i // 8``.
``DIR`` is a local path or an object-store URI (:mod:`actclust.io.storage`). Every
file is written whole (local: temporary name and rename; object store: one upload
to its final key); the manifest is the commit record: it lists a shard as complete
only after all of its layer files are in place, and files of shards it does not
list as complete are ignored and overwritten.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np

from actclust.errors import UserError
from actclust.io import storage
from actclust.io.storage import sha256_file, write_json_atomic, write_table_atomic  # noqa: F401

FORMAT_VERSION = 1  # one site
SITES_FORMAT_VERSION = 2  # several sites from the same forward passes
READABLE_VERSIONS = (FORMAT_VERSION, SITES_FORMAT_VERSION)
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


def _located(location: str):
    """A ``Path`` for a local location (what callers have always received), else the URI."""
    return Path(location) if storage.is_local(location) else location


def _masks_parts(layer: int, site: str | None) -> list[str]:
    """Path parts under DIR: version 1 ``masks/layer=l``, version 2 ``masks/site=s/layer=l``."""
    return ["masks"] + ([f"site={site}"] if site is not None else []) + [f"layer={int(layer)}"]


def layer_dir(root, layer: int, site: str | None = None):
    return _located(storage.join(root, *_masks_parts(layer, site)))


def shard_path(root, layer: int, shard: str, site: str | None = None):
    return _located(storage.join(root, *_masks_parts(layer, site), f"{shard}.parquet"))


def relative_shard_path(layer: int, shard: str, site: str | None = None) -> str:
    return "/".join(_masks_parts(layer, site) + [f"{shard}.parquet"])


def write_shard(root, shard: str, seq: np.ndarray, token_ids: np.ndarray,
                layer_bits: list[np.ndarray], layers: list[int], width: int) -> dict:
    """Write one shard (all layers) of windows ``token_ids`` (W, T); returns its manifest entry.

    ``layer_bits[i]`` is the (W*T, B) packed masks of ``layers[i]``, rows in (seq, pos) order.
    """
    return write_site_shard(root, shard, seq, token_ids, {None: layer_bits}, layers,
                            {None: width})


def write_site_shard(root, shard: str, seq: np.ndarray, token_ids: np.ndarray,
                     site_bits: dict, layers: list[int], widths: dict) -> dict:
    """Write one shard of every site and layer; ``site_bits[site][i]`` the packed masks of
    ``layers[i]`` (site None: the version 1 layout). ``file_sha256`` lists the files site by
    site, layer by layer (the manifest's ``sites`` order)."""
    w, t = token_ids.shape
    seq_col = np.repeat(np.asarray(seq, dtype=np.int64), t)
    pos_col = np.tile(np.arange(t, dtype=np.int32), w)
    tok_col = token_ids.reshape(-1).astype(np.int32)
    digests = []
    for site, layer_bits in site_bits.items():
        for layer, packed in zip(layers, layer_bits):
            table = mask_table(seq_col, pos_col, tok_col, packed, widths[site])
            digests.append(write_table_atomic(table, shard_path(root, layer, shard, site)))
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


def read_manifest(root) -> dict:
    path = storage.join(root, MANIFEST)
    if not storage.is_file(path):
        raise UserError(f"{root} is not a mask directory: {MANIFEST} is missing "
                        "(create one with actclust extract)")
    manifest = storage.read_json_record(path, "; re-run actclust extract")
    if not isinstance(manifest, dict) or manifest.get("format_version") not in READABLE_VERSIONS:
        raise UserError(f"{path} is not an actclust mask manifest of format version "
                        f"{' or '.join(map(str, READABLE_VERSIONS))}")
    for key in ("model", "layers", "d_ff", "shards", "thresholds"):
        if key not in manifest:
            raise UserError(f"{path} lacks the field {key!r}; re-run actclust extract")
    if manifest["format_version"] == SITES_FORMAT_VERSION:
        sites = manifest.get("sites")
        if not isinstance(sites, list) or not sites or any(
                not isinstance(manifest[key], dict) or set(manifest[key]) != set(sites)
                for key in ("d_ff", "thresholds")):
            raise UserError(f"{path} is a version 2 manifest without a list of sites and their "
                            "d_ff and thresholds; re-run actclust extract")
    return manifest


def evaluation_meta(manifest: dict) -> dict:
    """What evaluating against these masks' windows needs: model, corpus, window rule,
    split, sites, layers, thresholds and widths."""
    meta = {key: manifest[key] for key in ("format_version", "model", "corpus", "seq_len",
                                           "heldout_every", "split", "sites", "layers",
                                           "thresholds", "d_ff")}
    meta["text_column"] = manifest.get("identity", {}).get("text_column", "text")
    return meta


def sites_of(manifest: dict) -> list[str]:
    """The sites a manifest (or cluster.json) holds, in order."""
    if manifest.get("format_version") == SITES_FORMAT_VERSION:
        return list(manifest["sites"])
    return [manifest.get("sites") or "intermediate"]


def site_view(manifest: dict, site: str) -> dict:
    """A version-1-shaped manifest of one site: ``sites`` the site, ``d_ff`` its width,
    ``thresholds`` its list, ``file_sha256`` its files, ``mask_site`` its partition
    (None for a version 1 directory, which is returned as it is)."""
    sites = sites_of(manifest)
    if site not in sites:
        raise UserError(f"site {site!r} is not in these masks (they hold {', '.join(sites)})")
    if manifest.get("format_version") != SITES_FORMAT_VERSION:
        return manifest
    n = len(manifest["layers"])
    start = sites.index(site) * n
    shards = [{**s, "file_sha256": (s.get("file_sha256") or [])[start:start + n]}
              for s in manifest["shards"]]
    return {**manifest, "format_version": FORMAT_VERSION, "sites": site,
            "d_ff": manifest["d_ff"][site], "thresholds": manifest["thresholds"][site],
            "shards": shards, "mask_site": site}


def write_manifest(root, manifest: dict) -> None:
    write_json_atomic(manifest, storage.join(root, MANIFEST))


def complete_shards(manifest: dict) -> list[dict]:
    return [s for s in manifest["shards"] if s.get("status") == COMPLETE]


def require_complete(manifest: dict, root) -> None:
    pending = [s["name"] for s in manifest["shards"] if s.get("status") != COMPLETE]
    if pending:
        raise UserError(f"mask directory {root} is incomplete ({len(pending)} shard(s) not "
                        "finished); re-run the same actclust extract command to finish it")


def layer_files(root, manifest: dict, layer: int) -> list:
    """Files of one layer of a version 1 manifest or a :func:`site_view`."""
    return [shard_path(root, layer, s["name"], manifest.get("mask_site"))
            for s in complete_shards(manifest)]


def read_layer(root, manifest: dict, layer: int, columns=("bits",)) -> dict:
    """All complete rows of one layer, in (seq, pos) order: {column: numpy array}."""
    parts: dict[str, list] = {c: [] for c in columns}
    for path in layer_files(root, manifest, layer):
        table = storage.read_table(path, columns=columns)
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
    names = shards if shards is not None else [s["name"] for s in complete_shards(manifest)]
    for name in names:
        pf = storage.parquet_file(shard_path(root, layer, name, manifest.get("mask_site")))
        for batch in pf.iter_batches(batch_size=batch_rows, columns=["bits"]):
            yield bits_to_numpy(batch.column(0))


def read_shards(root, layer: int, names: list[str], width: int,
                site: str | None = None) -> np.ndarray:
    """Packed masks (N, B) of one layer (of ``site``, version 2) from the named shard files."""
    parts = [bits_to_numpy(storage.read_table(shard_path(root, layer, n, site), columns=["bits"])
                           .column("bits")) for n in names]
    return np.concatenate(parts) if parts else np.zeros((0, row_bytes(width)), np.uint8)


def mask_width(manifest: dict) -> int:
    """Bits per mask: d_ff at the FFN sites, d_model at ``down_out`` (stored as ``d_ff``)."""
    return int(manifest["d_ff"])


def masks_digest(manifest: dict) -> str:
    """A short digest of the complete shards' contents (the masks' identity)."""
    return hashlib.sha256("".join(s.get("sha256") or "" for s in manifest["shards"])
                          .encode()).hexdigest()[:16]


def verify_layers(root: str, manifest: dict, layers: list[int]) -> None:
    """Refuse corrupt inputs before using them: each file must match its sha256."""
    index = {layer: i for i, layer in enumerate(manifest["layers"])}
    for shard in complete_shards(manifest):
        digests = shard.get("file_sha256") or []
        for layer in layers:
            path = shard_path(root, layer, shard["name"], manifest.get("mask_site"))
            if not storage.is_file(path):
                raise UserError(f"{path} is missing; run actclust verify {root}")
            if digests and sha256_file(path) != digests[index[layer]]:
                raise UserError(f"{path} does not match its sha256 in the manifest (corrupt or "
                                f"changed); run actclust verify {root} and re-extract")
