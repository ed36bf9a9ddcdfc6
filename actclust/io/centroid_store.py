"""The centroid store: ``centroids.parquet`` (layer, cluster, bits, size) and
``cluster.json`` (fit settings, costs and the identity of the masks), both ways.

Layout of a clustering directory::

    OUT/centroids.parquet    layer int32 (-1: pooled), cluster int32,
                             bits fixed_size_binary(B), size int64
    OUT/cluster.json         settings, per-layer iterations, cost and sizes,
                             and the masks' model, corpus, site, thresholds

Format version 2 (masks of several sites): centroids.parquet gains a ``site`` string
column and ``bits`` becomes variable-length binary (each row ceil(width/8) bytes of its
site: gate/up d_ff, down_out d_model); cluster.json gets ``format_version`` 2, ``sites``
a list, ``d_ff`` and ``thresholds`` per site, and per-fit figures keyed ``<site>:<layer>``.
:func:`load_centroids` returns one centroid array per (site, layer), site-major.
"""

from __future__ import annotations

import numpy as np

from actclust.errors import UserError
from actclust.io import mask_store, storage
from actclust.io.storage import read_json, write_json_atomic, write_table_atomic

CENTROIDS_FILE = "centroids.parquet"
META_FILE = "cluster.json"


SITES_FORMAT_VERSION = 2


def write_site_centroids(cfg, manifest: dict, layers: list[int], by_site: dict, out,
                         policy: dict) -> dict:
    """Version 2: centroids of several sites, ``by_site[site]`` as :func:`write_centroids`'s
    results (key -1: the site's layers pooled)."""
    import pyarrow as pa

    tables = []
    for site, results in by_site.items():
        for key in sorted(results):
            c = np.asarray(results[key]["centroids"], dtype=np.uint8)
            tables.append(pa.table({
                "site": pa.array([site] * len(c), pa.string()),
                "layer": pa.array(np.full(len(c), key, np.int32)),
                "cluster": pa.array(np.arange(len(c), dtype=np.int32)),
                "bits": pa.array([row.tobytes() for row in c], pa.binary()),
                "size": pa.array(np.asarray(results[key]["sizes"], np.int64)),
            }))
    write_table_atomic(pa.concat_tables(tables), storage.join(out, CENTROIDS_FILE))
    flat = {f"{site}:{key}": res for site, results in by_site.items()
            for key, res in sorted(results.items())}
    meta = _meta(cfg, manifest, flat, policy)
    meta.update({
        "format_version": SITES_FORMAT_VERSION, "sites": list(by_site),
        "layers": layers, "d_ff": {site: manifest["d_ff"][site] for site in by_site},
        "thresholds": {site: [manifest["thresholds"][site][manifest["layers"].index(l)]
                              for l in layers] for site in by_site},
    })
    write_json_atomic(meta, storage.join(out, META_FILE))
    return meta


def write_centroids(cfg, manifest: dict, layers: list[int], results: dict, out,
                    policy: dict) -> dict:
    """centroids.parquet and cluster.json of per-layer fit results (key -1: pooled layers)."""
    import pyarrow as pa

    keys = sorted(results)
    tables = []
    for key in keys:
        c = np.asarray(results[key]["centroids"], dtype=np.uint8)
        tables.append(pa.table({
            "layer": pa.array(np.full(len(c), key, np.int32)),
            "cluster": pa.array(np.arange(len(c), dtype=np.int32)),
            "bits": mask_store.bits_array(c),
            "size": pa.array(np.asarray(results[key]["sizes"], np.int64)),
        }))
    table = pa.concat_tables(tables)
    write_table_atomic(table, storage.join(out, CENTROIDS_FILE))
    meta = _meta(cfg, manifest, results, policy)
    meta.update({
        "sites": manifest.get("sites", "intermediate"), "layers": layers,
        "d_ff": manifest["d_ff"],
        "thresholds": [manifest["thresholds"][manifest["layers"].index(l)] for l in layers],
    })
    write_json_atomic(meta, storage.join(out, META_FILE))
    return meta


def write_from_meta(out, meta: dict, centroids: list[np.ndarray]) -> None:
    """A per-layer clustering directory from a cluster.json record and new centroid bits
    of the same layers and K (sizes as the record has them); cluster.json last."""
    import pyarrow as pa

    tables = [pa.table({
        "layer": pa.array(np.full(len(c), layer, np.int32)),
        "cluster": pa.array(np.arange(len(c), dtype=np.int32)),
        "bits": mask_store.bits_array(np.asarray(c, dtype=np.uint8)),
        "size": pa.array(np.asarray(meta["sizes"][str(layer)], np.int64)),
    }) for layer, c in zip(meta["layers"], centroids)]
    write_table_atomic(pa.concat_tables(tables), storage.join(out, CENTROIDS_FILE))
    write_json_atomic(meta, storage.join(out, META_FILE))


def _meta(cfg, manifest: dict, results: dict, policy: dict) -> dict:
    """cluster.json's fields common to both versions; figures keyed by ``str(key)``;
    ``policy``: the fit's rule and max_iter (:func:`actclust.clustering.policy.fit_policy`)."""
    keys = list(results) if any(isinstance(k, str) for k in results) else sorted(results)
    costs = {str(k): float(results[k]["cost"]) for k in keys}
    converged = {str(k): bool(results[k]["converged"]) for k in keys}
    meta = {
        "k": cfg.k, "theta": cfg.theta, "density": cfg.density, "seed": cfg.seed,
        "algorithm": cfg.algorithm, "rule": policy["rule"],
        "init": cfg.init, "batch_size": cfg.batch_size, "max_iter": policy["max_iter"],
        "tol": cfg.tol,
        "workers": cfg.workers, "pooled": bool(cfg.pool_layers),
        "iterations": {str(k): int(results[k]["iterations"]) for k in keys},
        "converged": converged,
        # Layers that stopped at max_iter before their centroids settled.
        "hit_cap": [k for k in keys if not converged[str(k)]],
        "history": {str(k): [float(c) for c in np.asarray(results[k].get("history", []))]
                    for k in keys},
        "cost": costs,
        "mean_cost": float(np.mean(list(costs.values()))),
        "sizes": {str(k): np.asarray(results[k]["sizes"]).tolist() for k in keys},
        "fit_seconds": float(sum(float(results[k].get("seconds", 0.0)) for k in keys)),
        # Identity of the masks the centroids were fitted on (checked by evaluate).
        "masks": str(cfg.masks),
        "model": manifest["model"], "corpus": manifest["corpus"],
        "seq_len": manifest["seq_len"],
        "text_column": manifest.get("identity", {}).get("text_column", "text"),
        "heldout_every": manifest.get("heldout_every", 10),
        "split": manifest.get("split"),
        "tokens": manifest["tokens"],
    }
    return meta


def read_meta(root) -> dict:
    """cluster.json of a finished clustering directory."""
    return read_json(storage.join(root, META_FILE))


def is_finished(root) -> bool:
    return storage.is_file(storage.join(root, META_FILE))


def sites_of(meta: dict) -> list[str]:
    """The sites of cluster.json (version 1: its one site)."""
    if meta.get("format_version") == SITES_FORMAT_VERSION:
        return list(meta["sites"])
    return [meta.get("sites") or "intermediate"]


def site_meta(meta: dict, site: str) -> dict:
    """cluster.json as version 1 of one site: ``sites`` the site, ``d_ff`` its width,
    ``thresholds`` its list (a version 1 cluster.json is returned as it is)."""
    if meta.get("format_version") != SITES_FORMAT_VERSION:
        return meta
    return {**meta, "format_version": 1, "sites": site, "d_ff": meta["d_ff"][site],
            "thresholds": meta["thresholds"][site]}


def slots(meta: dict) -> list[tuple[str, int, int, float | None]]:
    """(site, layer, width, threshold) of every masked (site, layer), site-major: the order
    of :func:`load_centroids`' list."""
    out = []
    for site in sites_of(meta):
        one = site_meta(meta, site)
        taus = one.get("thresholds") or [None] * len(one["layers"])  # optional when reading
        out += [(site, layer, int(one["d_ff"]), None if tau is None else float(tau))
                for layer, tau in zip(one["layers"], taus)]
    return out


def require_single_site(meta: dict, root, what: str) -> None:
    """Refuse centroids of several sites where only one site makes sense."""
    sites = sites_of(meta)
    if len(sites) > 1:
        raise UserError(f"centroids in {root} hold several sites ({', '.join(sites)}); {what} "
                        "works on centroids of one site: cluster masks from actclust extract "
                        "--sites intermediate")


def load_centroids(root) -> tuple[dict, list[np.ndarray]]:
    """cluster.json and the per-layer (K, B) centroids of a clustering directory
    (version 2: one per (site, layer), site-major, see :func:`slots`)."""
    meta_path = storage.join(root, META_FILE)
    if not storage.is_file(meta_path) or not storage.is_file(storage.join(root, CENTROIDS_FILE)):
        raise UserError(f"{root} is not a clustering directory (cluster.json and "
                        "centroids.parquet expected; create them with actclust cluster)")
    meta = storage.read_json_record(meta_path)
    table = storage.read_table(storage.join(root, CENTROIDS_FILE))
    layer_col = table.column("layer").to_numpy()
    cluster_col = table.column("cluster").to_numpy()
    several = meta.get("format_version") == SITES_FORMAT_VERSION
    if several:
        site_col = np.asarray(table.column("site").to_pylist(), dtype=object)
        raw = table.column("bits").to_pylist()
    else:
        bits = mask_store.bits_to_numpy(table.column("bits"))
    per_layer = []
    for site, layer, width, _ in slots(meta):
        key = -1 if meta.get("pooled") else layer
        hit = layer_col == key
        if several:
            hit &= site_col == site
        rows = np.flatnonzero(hit)
        rows = rows[np.argsort(cluster_col[rows], kind="stable")]
        if len(rows) == 0:
            raise UserError(f"{root}/centroids.parquet has no centroids for "
                            f"{'site ' + site + ', ' if several else ''}layer {layer}")
        if several:
            flat = np.frombuffer(b"".join(raw[i] for i in rows), dtype=np.uint8)
            per_layer.append(flat.reshape(len(rows), -1).copy())
        else:
            per_layer.append(bits[rows])
    return meta, per_layer


def check_width(meta: dict, centroids: list[np.ndarray]) -> None:
    """Refuse centroids whose width disagrees with cluster.json."""
    for (site, layer, width, _), c in zip(slots(meta), centroids):
        if c.shape[1] != mask_store.row_bytes(width):
            raise UserError(f"centroids of layer {layer} are {c.shape[1] * 8} bits wide, but "
                            f"cluster.json says d_ff {width} (site {site})")
