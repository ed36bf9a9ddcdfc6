"""Distributed per-layer clustering of a mask directory.

For the default ``hamming-kmeans`` algorithm, W worker actors form one
``ray.util.collective`` group (gloo on CPU, NCCL on GPU). For each layer every
worker reads only its contiguous block of that layer's shard files and runs the
same :func:`actclust.kmeans.fit` loop; per-cluster bit sums, counts and costs are
all-reduced after every (mini-)batch, so all workers hold identical centroids.

Rank 0 checkpoints the k-means state every iteration and each finished layer's
centroids; a rerun (or a rebuilt group after a worker died) resumes from them.
Baseline algorithms (``brb-kmeans``, ``activation-aware``) run in one actor on
the same masks and write the same outputs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np

from actclust import store
from actclust.config import ClusterConfig
from actclust.errors import UserError

log = logging.getLogger(__name__)

IDENTITY_KEYS = ("k", "theta", "seed", "algorithm", "init", "batch_size", "max_iter", "tol",
                 "pool_layers")


def save_state(state: dict, path: Path) -> None:
    """A k-means state dict as one .npz (no pickle), replaced atomically."""
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    meta = {k: v for k, v in state.items() if k not in arrays}
    buffer = io.BytesIO()
    np.savez(buffer, _meta=np.array(json.dumps(meta)), **arrays)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def load_state(path: Path) -> dict | None:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        state = json.loads(str(data["_meta"]))
        for key in data.files:
            if key != "_meta":
                state[key] = data[key]
    for key in ("sums", "counts"):
        state.setdefault(key, None)
    return state


def read_shards(root: str, layer: int, names: list[str], width: int) -> np.ndarray:
    """Packed masks (N, B) of one layer from the named shard files, in order."""
    import pyarrow.parquet as pq

    parts = [store.bits_to_numpy(pq.read_table(store.shard_path(root, layer, n),
                                                columns=["bits"]).column("bits")) for n in names]
    return np.concatenate(parts) if parts else np.zeros((0, store.row_bytes(width)), np.uint8)


def _fault_injector(rank: int, layer: int):
    """Fault injection for the reliability tests, off unless its variables are set.

    ``ACTCLUST_FAULT_KMEANS=RANK:LAYER:ITERATION:MARKER`` makes that rank's process
    exit abruptly after that iteration, once (the marker file records it);
    ``ACTCLUST_FAULT_DELAY_S=S`` makes every iteration S seconds slower.
    """
    delay = float(os.environ.get("ACTCLUST_FAULT_DELAY_S", "0") or 0)
    spec = os.environ.get("ACTCLUST_FAULT_KMEANS")
    crash = None
    if spec:
        f_rank, f_layer, f_iter, marker = spec.split(":", 3)
        if int(f_rank) == rank and int(f_layer) == layer:
            crash = (int(f_iter), Path(marker))
    if crash is None and delay <= 0:
        return None

    def progress(iteration, cost, changed):
        if delay > 0:
            time.sleep(delay)  # latency injection: a slow iteration
        if crash is not None and iteration == crash[0] and not crash[1].exists():
            crash[1].touch()
            os._exit(1)
    return progress


class KMeansWorker:
    """One rank of the clustering group. ``ray.remote`` is applied where it starts."""

    def __init__(self, num_cpus: float = 1, rank: int = 0, world_size: int = 1,
                 group: str = "local"):
        from actclust.raycluster import set_threads

        set_threads(num_cpus)
        self.configure(rank, world_size, group)

    def configure(self, rank: int, world_size: int, group: str) -> None:
        """Give this worker its place once the group's size is known."""
        self.rank, self.world_size, self.group = rank, world_size, group

    def join(self, backend: str = "gloo") -> int:
        import ray.util.collective as col

        if self.world_size > 1:
            col.init_collective_group(self.world_size, self.rank, backend=backend,
                                      group_name=self.group)
        self.joined = True
        return self.rank

    def _allreduce(self, array: np.ndarray) -> np.ndarray:
        if self.world_size == 1:
            return array
        import torch
        import ray.util.collective as col

        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64).copy())
        col.allreduce(tensor, group_name=self.group)
        return tensor.numpy()

    def fit_layer(self, root: str, layer: int, shards: list[str], width: int, params: dict,
                  checkpoint_path: str | None, rows: list[int] | None = None,
                  global_offset: int = 0) -> dict:
        from actclust import kmeans
        from actclust.maskdata import ParquetDataset

        rows = rows or []
        budget = params.get("memory_budget_mb")
        if budget is not None and sum(rows) * store.row_bytes(width) > budget * 2**20:
            # Larger than this worker's memory budget: stream from Parquet.
            dataset = ParquetDataset([store.shard_path(root, layer, n) for n in shards], rows,
                                     store.row_bytes(width), global_offset)
        else:
            dataset = kmeans.ArrayDataset(read_shards(root, layer, shards, width), global_offset)
        resume = load_state(Path(checkpoint_path)) if checkpoint_path else None
        save = None
        if checkpoint_path and self.rank == 0:
            save = lambda state: save_state(state, Path(checkpoint_path))  # noqa: E731
        progress = _fault_injector(self.rank, layer)
        start = time.perf_counter()
        result = kmeans.fit(None, params["k"], theta=params["theta"], seed=params["seed"],
                            init=params["init"], batch_size=params["batch_size"],
                            max_iter=params["max_iter"], tol=params["tol"],
                            backend=params["backend"], dataset=dataset,
                            allreduce=self._allreduce,
                            checkpoint=save, resume=resume, progress=progress, rank=self.rank,
                            world_size=self.world_size, layer=layer)
        return {"rank": self.rank, "centroids": result.centroids, "sizes": result.sizes,
                "cost": result.cost, "iterations": result.iterations,
                "converged": result.converged, "rows": int(dataset.count()),
                "seconds": time.perf_counter() - start}

    def fit_baseline(self, root: str, layers: list[int], shards: list[str], width: int,
                     params: dict) -> dict:
        from actclust import baselines

        per_layer = [read_shards(root, layer, shards, width) for layer in layers]
        x = baselines.pool_layers(per_layer, params["pool_rows"], params["seed"]) \
            if len(per_layer) > 1 else per_layer[0]
        start = time.perf_counter()
        if params["algorithm"] == "brb-kmeans":
            # BRB-KMeans stops on scikit-learn's own tolerance, not the Hamming k-means cap.
            res = baselines.brb_kmeans(x, params["k"], width, seed=params["seed"],
                                       max_iter=baselines.BRB_MAX_ITER,
                                       batch_size=params["batch_size"])
        else:
            res = baselines.activation_aware(x, params["k"], width, seed=params["seed"],
                                             max_iter=params["max_iter"])
        return {"centroids": res.centroids, "sizes": np.asarray(res.sizes), "cost": res.cost,
                "iterations": res.iterations, "converged": res.converged, "rows": int(len(x)),
                "seconds": time.perf_counter() - start}


def split_shards(shards: list[dict], world_size: int) -> list[list[str]]:
    """Contiguous, row-balanced blocks of shard names, one per rank."""
    rows = np.cumsum([s["rows"] for s in shards])
    total = rows[-1] if len(rows) else 0
    blocks: list[list[str]] = [[] for _ in range(world_size)]
    for shard, end in zip(shards, rows):
        rank = min(int((end - shard["rows"]) * world_size // max(total, 1)), world_size - 1)
        blocks[rank].append(shard["name"])
    return blocks


def _open_out(out: Path, cfg: ClusterConfig, manifest: dict) -> None:
    """Refuse an output directory that holds the results of another configuration."""
    marker = out / "cluster_run.json"
    ident = {**{k: getattr(cfg, k) for k in IDENTITY_KEYS}, "masks_sha": _masks_digest(manifest)}
    if marker.is_file():
        previous = json.loads(marker.read_text())
        if previous != ident:
            changed = [k for k in ident if previous.get(k) != ident[k]]
            raise UserError(f"{out} holds clustering results of another configuration "
                            f"({', '.join(changed)} differ); use a new --out")
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {out} exists and is not empty; choose a new --out")
    else:
        store.write_json_atomic(ident, marker)


def _masks_digest(manifest: dict) -> str:
    import hashlib

    return hashlib.sha256("".join(s.get("sha256") or "" for s in manifest["shards"])
                          .encode()).hexdigest()[:16]


def run_cluster(cfg: ClusterConfig) -> dict:
    """Cluster every requested layer; writes centroids.parquet and cluster.json."""
    from actclust.raycluster import init_ray

    manifest = store.read_manifest(cfg.masks)
    store.require_complete(manifest, cfg.masks)
    layers = _layers(cfg, manifest)
    total_rows = sum(s["rows"] for s in manifest["shards"])
    if cfg.k > total_rows:
        raise UserError(f"k ({cfg.k}) is larger than the number of masks per layer "
                        f"({total_rows}); lower --k or extract more tokens")
    if cfg.verify:
        _verify_layers(cfg.masks, manifest, layers)
    out = Path(cfg.out)
    _open_out(out, cfg, manifest)
    init_ray()
    if cfg.algorithm == "hamming-kmeans" and not cfg.pool_layers:
        results = _fit_kmeans(cfg, manifest, layers, out)
    else:
        results = _fit_baseline(cfg, manifest, layers)
    return _write_outputs(cfg, manifest, layers, results, out)


def _layers(cfg: ClusterConfig, manifest: dict) -> list[int]:
    layers = cfg.layers if cfg.layers is not None else manifest["layers"]
    missing = sorted(set(layers) - set(manifest["layers"]))
    if missing:
        raise UserError(f"layers {missing} are not in {cfg.masks} (it has layers "
                        f"{manifest['layers'][0]}..{manifest['layers'][-1]})")
    return list(layers)


def _verify_layers(root: str, manifest: dict, layers: list[int]) -> None:
    """Refuse corrupt inputs before using them: each file must match its sha256."""
    index = {layer: i for i, layer in enumerate(manifest["layers"])}
    for shard in store.complete_shards(manifest):
        digests = shard.get("file_sha256") or []
        for layer in layers:
            path = store.shard_path(root, layer, shard["name"])
            if not path.is_file():
                raise UserError(f"{path} is missing; run actclust verify {root}")
            if digests and store.sha256_file(path) != digests[index[layer]]:
                raise UserError(f"{path} does not match its sha256 in the manifest (corrupt or "
                                f"changed); run actclust verify {root} and re-extract")


def _params(cfg: ClusterConfig) -> dict:
    return {"k": cfg.k, "theta": cfg.theta, "seed": cfg.seed, "init": cfg.init,
            "batch_size": cfg.batch_size, "max_iter": cfg.max_iter, "tol": cfg.tol,
            "backend": cfg.backend, "algorithm": cfg.algorithm, "pool_rows": 200_000,
            "memory_budget_mb": cfg.memory_budget_mb}


def _place_workers(make, wanted: int, grace_s: float, attempts: int = 3,
                   timeout_s: float = 300.0) -> list:
    """Up to ``wanted`` started actors. A candidate whose start fails (placed on a
    node that was dying) is replaced, ``attempts`` times each; once one is up the
    rest get ``grace_s`` seconds, and those still unplaced are given up."""
    import ray

    pending = {}
    for _ in range(wanted):
        actor = make()
        pending[actor.__ray_ready__.remote()] = actor
    retries = attempts * wanted
    workers: list = []
    deadline = time.monotonic() + timeout_s
    while pending:
        now = time.monotonic()
        if workers:
            deadline = min(deadline, now + grace_s)
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - now))
        if not ready:
            break
        actor = pending.pop(ready[0])
        try:
            ray.get(ready[0])
            workers.append(actor)
        except ray.exceptions.RayActorError:
            ray.kill(actor)
            if retries > 0:
                retries -= 1
                fresh = make()
                pending[fresh.__ray_ready__.remote()] = fresh
    for actor in pending.values():
        ray.kill(actor)
    if not workers:
        raise RuntimeError("no k-means worker could be started; see the Ray logs")
    return workers


def _start_group(cfg: ClusterConfig, world_size: int, grace_s: float = 10.0):
    """Start up to ``world_size`` workers and join those that could be placed.

    After the first worker is up, the others get ``grace_s`` seconds; a worker
    that cannot be placed (a lost node) is dropped and the group is smaller.
    Full-batch and mini-batch results do not depend on the group's size.
    """
    import ray

    from actclust.raycluster import actor_options, cluster_gpus

    options = actor_options(world_size)
    Worker = ray.remote(KMeansWorker).options(max_restarts=0, **options)
    workers = _place_workers(lambda: Worker.remote(options["num_cpus"]), world_size, grace_s)
    if len(workers) < world_size:
        log.warning("continuing with %d of %d k-means workers", len(workers), world_size)
    group = f"actclust-{uuid.uuid4().hex[:8]}"
    ray.get([w.configure.remote(rank, len(workers), group) for rank, w in enumerate(workers)])
    backend = "nccl" if cluster_gpus() > 0 and cfg.backend in ("auto", "cupy") else "gloo"
    ray.get([w.join.remote(backend) for w in workers])
    return workers


def _fit_kmeans(cfg: ClusterConfig, manifest: dict, layers: list[int], out: Path) -> dict:
    """Fit each layer with the worker group; rebuild the group if a worker dies."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    from actclust.progress import Progress

    shards = store.complete_shards(manifest)
    world_size = max(1, min(cfg.workers, len(shards)))
    results: dict = {}
    progress = Progress(len(layers), "cluster", unit="layers")
    workers = None
    attempts = 0
    for layer in layers:
        done_path = out / "layers" / f"layer={layer}.npz"
        finished = load_state(done_path)
        if finished is not None:
            results[layer] = finished
            progress.update(1)
            continue
        while True:
            if workers is None:
                workers = _start_group(cfg, world_size)
            blocks = split_shards(shards, len(workers))
            ckpt = str(out / "checkpoints" / f"layer={layer}.npz")
            state = load_state(Path(ckpt))
            if state is not None:
                log.info("layer %d: resuming k-means from its checkpoint at iteration %d",
                         layer, state["iteration"])
            rows = {s["name"]: s["rows"] for s in shards}
            offsets = np.cumsum([0] + [sum(rows[n] for n in b) for b in blocks])
            refs = [w.fit_layer.remote(cfg.masks, layer, blocks[r], manifest["d_ff"],
                                       _params(cfg), ckpt, [rows[n] for n in blocks[r]],
                                       int(offsets[r])) for r, w in enumerate(workers)]
            try:
                outs = _gather(refs)
                break
            except (RayActorError, RayTaskError, GetTimeoutError) as exc:
                attempts += 1
                if isinstance(exc, RayTaskError) and isinstance(exc.cause, (UserError, ValueError)):
                    raise
                if attempts > 3:
                    raise
                log.warning("a k-means worker failed on layer %d (%s); rebuilding the group and "
                            "resuming from the checkpoint", layer, type(exc).__name__)
                for w in workers:
                    ray.kill(w)
                workers = None
        res = next(o for o in outs if o["rank"] == 0)
        res["seconds"] = max(o["seconds"] for o in outs)
        save_state({k: v for k, v in res.items() if k != "rank"}, done_path)
        Path(ckpt).unlink(missing_ok=True)
        results[layer] = res
        progress.update(1)
    progress.close()
    for w in workers or []:
        ray.kill(w)
    return results


def _gather(refs: list) -> list:
    """Results of all ranks; raises as soon as any rank fails (the others may be
    blocked in an all-reduce waiting for it)."""
    import ray

    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done[0])
    return ray.get(refs)


def _fit_baseline(cfg: ClusterConfig, manifest: dict, layers: list[int]) -> dict:
    import ray

    from actclust.raycluster import actor_options

    options = actor_options(1)
    Worker = ray.remote(KMeansWorker).options(max_restarts=1, max_task_retries=1, **options)
    worker = Worker.remote(options["num_cpus"])
    names = [s["name"] for s in store.complete_shards(manifest)]
    params = _params(cfg)
    if cfg.pool_layers:
        pooled = ray.get(worker.fit_baseline.remote(cfg.masks, layers, names, manifest["d_ff"],
                                                    params)) if cfg.algorithm != "hamming-kmeans" \
            else None
        if pooled is None:
            raise UserError("--pool-layers needs --algorithm brb-kmeans or activation-aware")
        results = {-1: pooled}
    else:
        results = {layer: ray.get(worker.fit_baseline.remote(cfg.masks, [layer], names,
                                                             manifest["d_ff"], params))
                   for layer in layers}
    ray.kill(worker)
    return results


def _max_iter(cfg: ClusterConfig) -> int:
    """The iteration cap the fit actually ran under."""
    from actclust.baselines import BRB_MAX_ITER

    return BRB_MAX_ITER if cfg.algorithm == "brb-kmeans" else cfg.max_iter


def _write_outputs(cfg: ClusterConfig, manifest: dict, layers: list[int], results: dict,
                   out: Path) -> dict:
    import pyarrow as pa

    keys = sorted(results)
    tables = []
    for key in keys:
        c = np.asarray(results[key]["centroids"], dtype=np.uint8)
        tables.append(pa.table({
            "layer": pa.array(np.full(len(c), key, np.int32)),
            "cluster": pa.array(np.arange(len(c), dtype=np.int32)),
            "bits": store.bits_array(c),
            "size": pa.array(np.asarray(results[key]["sizes"], np.int64)),
        }))
    table = pa.concat_tables(tables)
    store.write_table_atomic(table, out / "centroids.parquet")
    costs = {str(k): float(results[k]["cost"]) for k in keys}
    meta = {
        "k": cfg.k, "theta": cfg.theta, "seed": cfg.seed, "algorithm": cfg.algorithm,
        "init": cfg.init, "batch_size": cfg.batch_size, "max_iter": _max_iter(cfg), "tol": cfg.tol,
        "workers": cfg.workers, "pooled": bool(cfg.pool_layers),
        "iterations": {str(k): int(results[k]["iterations"]) for k in keys},
        "converged": {str(k): bool(results[k]["converged"]) for k in keys},
        "cost": costs,
        "mean_cost": float(np.mean(list(costs.values()))),
        "sizes": {str(k): np.asarray(results[k]["sizes"]).tolist() for k in keys},
        "fit_seconds": float(sum(float(results[k].get("seconds", 0.0)) for k in keys)),
        # Identity of the masks the centroids were fitted on (checked by evaluate).
        "masks": str(cfg.masks),
        "model": manifest["model"], "corpus": manifest["corpus"],
        "seq_len": manifest["seq_len"], "sites": manifest.get("sites", "intermediate"),
        "text_column": manifest.get("identity", {}).get("text_column", "text"),
        "heldout_every": manifest.get("heldout_every", 10),
        "split": manifest.get("split"),
        "layers": layers, "d_ff": manifest["d_ff"],
        "thresholds": [manifest["thresholds"][manifest["layers"].index(l)] for l in layers],
        "tokens": manifest["tokens"],
    }
    store.write_json_atomic(meta, out / "cluster.json")
    return meta
