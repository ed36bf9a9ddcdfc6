"""Re-check a mask directory (local or object store) against its manifest."""

from __future__ import annotations

import numpy as np

from actclust.io import mask_store, storage


def verify(root: str) -> list[str]:
    """Every problem found, as one line each; an empty list means the directory is sound."""
    manifest = mask_store.read_manifest(root)
    problems: list[str] = []
    for site in mask_store.sites_of(manifest):
        problems += _verify_files(root, mask_store.site_view(manifest, site))
    return _verify_manifest(manifest) + problems


def _verify_manifest(manifest: dict) -> list[str]:
    problems = []
    pending = [s["name"] for s in manifest["shards"] if s.get("status") != mask_store.COMPLETE]
    if pending:
        problems.append(f"{len(pending)} shard(s) not complete: {', '.join(pending[:5])}"
                        f"{' ...' if len(pending) > 5 else ''}")
    seen = {}
    for shard in mask_store.complete_shards(manifest):
        key = (shard.get("seq_first"), shard.get("seq_last"))
        if key in seen:
            problems.append(f"shards {seen[key]} and {shard['name']} cover the same windows")
        seen[key] = shard["name"]
    rows = sum(s["rows"] for s in mask_store.complete_shards(manifest))
    if not pending and rows != manifest["tokens"]:
        problems.append(f"complete shards hold {rows} rows per layer, manifest says {manifest['tokens']}")
    return problems


def _verify_files(root: str, manifest: dict) -> list[str]:
    """The files of one site (a version 1 manifest or a site view)."""
    import pyarrow as pa

    problems = []
    site = manifest.get("mask_site")
    expected_schema = mask_store.mask_schema(manifest["d_ff"])
    seq_len = manifest["seq_len"]
    for shard in mask_store.complete_shards(manifest):
        digests = shard.get("file_sha256") or []
        for i, layer in enumerate(manifest["layers"]):
            path = mask_store.shard_path(root, layer, shard["name"], site)
            where = mask_store.relative_shard_path(layer, shard["name"], site)
            if not storage.is_file(path):
                problems.append(f"{where}: missing")
                continue
            if i < len(digests) and mask_store.sha256_file(path) != digests[i]:
                problems.append(f"{where}: sha256 differs from the manifest (file changed or corrupt)")
            try:
                table = storage.read_table(path)
            except (pa.ArrowException, OSError) as exc:
                problems.append(f"{where}: unreadable Parquet ({str(exc).splitlines()[0]})")
                continue
            if not table.schema.equals(expected_schema):
                problems.append(f"{where}: schema {table.schema} != expected {expected_schema}")
                continue
            if table.num_rows != shard["rows"]:
                problems.append(f"{where}: {table.num_rows} rows, manifest says {shard['rows']}")
                continue
            seq = table.column("seq").to_numpy()
            pos = table.column("pos").to_numpy()
            expect_pos = np.tile(np.arange(seq_len), shard["windows"])
            if not np.array_equal(pos, expect_pos) or np.any(np.diff(seq) < 0) \
                    or len(np.unique(seq)) != shard["windows"] \
                    or np.any(np.bincount(np.unique(seq, return_inverse=True)[1]) != seq_len):
                problems.append(f"{where}: (seq, pos) rows do not cover {shard['windows']} "
                                f"windows x {seq_len} positions in order")
    return problems
