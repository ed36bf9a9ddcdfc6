"""Distributed per-layer clustering of a mask directory: the driver and its workers.

For the default ``hamming-kmeans`` algorithm, W :class:`ClusterWorker` actors
form one ``ray.util.collective`` group (gloo on CPU, NCCL on GPU). For each
layer every worker reads only its contiguous block of that layer's shard files
and runs the same :func:`actclust.clustering.kmeans.fit` loop; per-cluster bit
sums, counts and costs are all-reduced after every (mini-)batch, so all workers
hold identical centroids.

Rank 0 checkpoints the k-means state every iteration and each finished layer's
centroids (:mod:`actclust.io.kmeans_state`); a rerun (or a rebuilt group after
a worker died) resumes from them. A version 2 mask directory (several sites) is
clustered site by site, each site's layers as above (states under ``OUT/site=<s>/``).
Baseline algorithms (``brb-kmeans``,
``activation-aware``) run in one worker on the same masks and write the same
outputs (:mod:`actclust.io.centroid_store`).
"""

from __future__ import annotations

import logging
import time
import uuid

import numpy as np

from actclust.clustering import activation_aware, baselines, kmeans
from actclust.clustering.datasets import open_layer_dataset
from actclust.clustering.policy import fit_policy
from actclust.config import ClusterConfig, FitSpec, identity
from actclust.errors import UserError
from actclust.io import centroid_store, kmeans_state, mask_store, outdir, storage
from actclust.progress import Progress
from actclust.runtime.actors import (ActorGroup, FaultHooks, acquire_group, release_group,
                                     stage_group)
from actclust.runtime.raycluster import (actor_options, actor_threads, cluster_gpus, init_ray,
                                         set_threads)

log = logging.getLogger(__name__)

RUN_MARKER = "cluster_run.json"


class ClusterWorker:
    """One rank of the clustering group; also fits the baselines (as a group of one).

    A plain class: ``ray.remote`` is applied where it starts. ``faults`` are the
    test's fault-injection hooks (none by default).
    """

    def __init__(self, num_cpus: float = 1, faults: FaultHooks | None = None):
        set_threads(num_cpus)
        self.faults = faults or FaultHooks()
        self.configure(0, 1, "local")

    def configure(self, rank: int, world_size: int, group: str) -> None:
        """Give this worker its place once the group's size is known."""
        self.rank, self.world_size, self.group = rank, world_size, group

    def join(self, backend: str = "gloo") -> int:
        import ray.util.collective as col

        if self.world_size > 1:
            col.init_collective_group(self.world_size, self.rank, backend=backend,
                                      group_name=self.group)
        return self.rank

    def _allreduce(self, array: np.ndarray) -> np.ndarray:
        if self.world_size == 1:
            return array
        import torch
        import ray.util.collective as col

        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64).copy())
        col.allreduce(tensor, group_name=self.group)
        return tensor.numpy()

    def fit_layer(self, root: str, layer: int, shards: list[str], width: int, spec: FitSpec,
                  checkpoint: str | None, rows: list[int], global_offset: int = 0,
                  site: str | None = None) -> dict:
        dataset = open_layer_dataset(root, layer, shards, rows, width, global_offset,
                                     spec.memory_budget_mb, site)
        resume = kmeans_state.load_state(checkpoint) if checkpoint else None
        save = None
        if checkpoint and self.rank == 0:
            save = lambda state: kmeans_state.save_state(state, checkpoint)  # noqa: E731

        def progress(iteration, cost, changed):
            self.faults.kmeans_iteration(self.rank, layer, iteration)

        start = time.perf_counter()
        result = kmeans.fit(None, spec.k, theta=spec.theta, density=spec.density, width=width,
                            seed=spec.seed, init=spec.init,
                            batch_size=spec.batch_size, max_iter=spec.max_iter, tol=spec.tol,
                            backend=spec.backend, dataset=dataset, allreduce=self._allreduce,
                            checkpoint=save, resume=resume, progress=progress, rank=self.rank,
                            world_size=self.world_size, layer=layer)
        return {"rank": self.rank, "centroids": result.centroids, "sizes": result.sizes,
                "cost": result.cost, "iterations": result.iterations,
                "converged": result.converged, "rows": int(dataset.count()),
                "history": [h["cost"] for h in result.history],
                "seconds": time.perf_counter() - start}

    def fit_baseline(self, root: str, layers: list[int], shards: list[str], width: int,
                     spec: FitSpec, site: str | None = None) -> dict:
        per_layer = [mask_store.read_shards(root, layer, shards, width, site) for layer in layers]
        x = baselines.pool_layers(per_layer, spec.pool_rows, spec.seed) \
            if len(per_layer) > 1 else per_layer[0]
        start = time.perf_counter()
        if spec.algorithm == "brb-kmeans":
            res = baselines.brb_kmeans(x, spec.k, width, seed=spec.seed,
                                       max_iter=spec.max_iter, batch_size=spec.batch_size,
                                       density=spec.density)
        else:
            res = activation_aware.activation_aware(x, spec.k, width, seed=spec.seed,
                                                    max_iter=spec.max_iter, density=spec.density)
        return {"centroids": res.centroids, "sizes": np.asarray(res.sizes), "cost": res.cost,
                "iterations": res.iterations, "converged": bool(res.converged),
                "rows": int(len(x)), "history": [],
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


def run_cluster(cfg: ClusterConfig, faults: FaultHooks | None = None) -> dict:
    """Cluster every requested layer; writes centroids.parquet and cluster.json.

    ``faults``: fault-injection hooks handed to the workers (tests only).
    """
    manifest = mask_store.read_manifest(cfg.masks)
    mask_store.require_complete(manifest, cfg.masks)
    layers = _layers(cfg, manifest)
    total_rows = sum(s["rows"] for s in manifest["shards"])
    if cfg.k > total_rows:
        raise UserError(f"k ({cfg.k}) is larger than the number of masks per layer "
                        f"({total_rows}); lower --k or extract more tokens")
    sites = mask_store.sites_of(manifest)
    views = {site: mask_store.site_view(manifest, site) for site in sites}
    if cfg.verify:
        for view in views.values():
            mask_store.verify_layers(cfg.masks, view, layers)
    out = storage.normalize(cfg.out)
    outdir.open_output(out, RUN_MARKER,
                       {**identity(cfg), "masks_sha": mask_store.masks_digest(manifest)},
                       "clustering results of another configuration")
    init_ray()
    several = manifest["format_version"] == mask_store.SITES_FORMAT_VERSION
    by_site = {}
    for site, view in views.items():
        # Version 2: each site keeps its k-means states apart (OUT/site=<s>/...).
        state_out = storage.join(out, f"site={site}") if several else out
        if cfg.algorithm == "hamming-kmeans" and not cfg.pool_layers:
            by_site[site] = _fit_kmeans(cfg, view, layers, state_out, faults)
        else:
            by_site[site] = _fit_baseline(cfg, view, layers, faults)
    if several:
        return centroid_store.write_site_centroids(cfg, manifest, layers, by_site, out,
                                                   fit_policy(cfg))
    return centroid_store.write_centroids(cfg, manifest, layers, by_site[sites[0]], out,
                                          fit_policy(cfg))


def _layers(cfg: ClusterConfig, manifest: dict) -> list[int]:
    layers = cfg.layers if cfg.layers is not None else manifest["layers"]
    missing = sorted(set(layers) - set(manifest["layers"]))
    if missing:
        raise UserError(f"layers {missing} are not in {cfg.masks} (it has layers "
                        f"{manifest['layers'][0]}..{manifest['layers'][-1]})")
    return list(layers)


def _start_group(cfg: ClusterConfig, world_size: int, faults, grace_s: float = 10.0):
    """Start up to ``world_size`` workers and join those that could be placed.

    After the first worker is up, the others get as long again as it took (at
    least ``grace_s`` seconds); a worker that cannot be placed (a lost node) is
    dropped and the group is smaller.
    Full-batch and mini-batch results do not depend on the group's size.
    """
    import ray

    options = actor_options(world_size)
    Worker = ray.remote(ClusterWorker).options(max_restarts=0, **options)
    threads = actor_threads(world_size)
    group = ActorGroup(lambda: Worker.remote(threads, faults), world_size,
                       max_replacements=3 * world_size)
    workers = group.started(grace_s, what="k-means worker")
    if len(workers) < world_size:
        log.warning("continuing with %d of %d k-means workers", len(workers), world_size)
    name = f"actclust-{uuid.uuid4().hex[:8]}"
    ray.get([w.configure.remote(rank, len(workers), name) for rank, w in enumerate(workers)])
    backend = "nccl" if cluster_gpus() > 0 and cfg.backend in ("auto", "cupy") else "gloo"
    ray.get([w.join.remote(backend) for w in workers])
    return group


def _fit_kmeans(cfg: ClusterConfig, manifest: dict, layers: list[int], out: str,
                faults) -> dict:
    """Fit each layer with the worker group; rebuild the group if a worker dies."""
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    shards = mask_store.complete_shards(manifest)
    world_size = max(1, min(cfg.workers, len(shards)))
    width = mask_store.mask_width(manifest)
    spec = cfg.fit_spec()
    rows = {s["name"]: s["rows"] for s in shards}
    results: dict = {}
    progress = Progress(len(layers), "cluster", unit="layers")
    group = None
    attempts = 0
    # Inside a run the workers (and their collective group) serve every trial.
    key = None if faults is not None else ("kmeans", world_size, cfg.backend)
    for layer in layers:
        done_path = kmeans_state.finished_path(out, layer)
        finished = kmeans_state.load_state(done_path)
        if finished is not None:
            results[layer] = finished
            progress.update(1)
            continue
        ckpt = kmeans_state.checkpoint_path(out, layer)
        while True:
            if group is None:
                group = acquire_group(key, lambda: _start_group(cfg, world_size, faults))
            workers = group.actors()
            blocks = split_shards(shards, len(workers))
            state = kmeans_state.load_state(ckpt)
            if state is not None:
                log.info("layer %d: resuming k-means from its checkpoint at iteration %d",
                         layer, state["iteration"])
            offsets = np.cumsum([0] + [sum(rows[n] for n in b) for b in blocks])
            refs = [w.fit_layer.remote(cfg.masks, layer, blocks[r], width, spec, ckpt,
                                       [rows[n] for n in blocks[r]], int(offsets[r]),
                                       manifest.get("mask_site"))
                    for r, w in enumerate(workers)]
            try:
                outs = _gather(refs)
                break
            except (RayActorError, RayTaskError, GetTimeoutError) as exc:
                attempts += 1
                release_group(key, group, failed=True)
                group = None
                if isinstance(exc, RayTaskError) and isinstance(exc.cause, (UserError, ValueError)):
                    raise
                if attempts > 3:
                    raise
                log.warning("a k-means worker failed on layer %d (%s); rebuilding the group and "
                            "resuming from the checkpoint", layer, type(exc).__name__)
        res = next(o for o in outs if o["rank"] == 0)
        res["seconds"] = max(o["seconds"] for o in outs)
        kmeans_state.save_state({k: v for k, v in res.items() if k != "rank"}, done_path)
        kmeans_state.delete_state(ckpt)
        results[layer] = res
        progress.update(1)
    progress.close()
    if group is not None:
        release_group(key, group)
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


def _fit_baseline(cfg: ClusterConfig, manifest: dict, layers: list[int], faults) -> dict:
    import ray

    if cfg.algorithm == "hamming-kmeans":
        raise UserError("--pool-layers needs --algorithm brb-kmeans or activation-aware")
    options = actor_options(1)
    Worker = ray.remote(ClusterWorker).options(max_restarts=1, max_task_retries=1, **options)
    key = None if faults is not None else ("baseline worker",)
    names = [s["name"] for s in mask_store.complete_shards(manifest)]
    width = mask_store.mask_width(manifest)
    spec = cfg.fit_spec()
    site = manifest.get("mask_site")
    with stage_group(key, lambda: Worker.remote(actor_threads(1), faults), 1) as group:
        worker = group.first_actor()
        if cfg.pool_layers:
            return {-1: ray.get(worker.fit_baseline.remote(cfg.masks, layers, names, width, spec,
                                                           site))}
        return {layer: ray.get(worker.fit_baseline.remote(cfg.masks, [layer], names, width, spec,
                                                          site))
                for layer in layers}
