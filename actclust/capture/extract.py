"""Distributed mask extraction: a pool of Ray actors streams shards to Parquet.

The driver tokenizes the corpus once, plans fixed shards of ``shard_windows``
windows, and hands them to extraction actors (one per GPU, or CPU workers).
Each actor loads the model once and writes every layer file of a shard itself
(atomically); with several sites (format version 2) every site's masks come from the
same forward passes, and so do their thresholds. The driver records a shard as complete in the manifest only when
the actor reports all its files in place. A rerun skips complete shards.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from actclust.capture.hooks import calibrate_site_thresholds, site_masks
from actclust.config import ExtractConfig, identity
from actclust.devices import place_model
from actclust.errors import UserError
from actclust.io import mask_store, outdir, storage
from actclust.io.corpus import Windows, load_windows
from actclust.io.models import ffn_sites, load_model, load_tokenizer, site_width
from actclust.progress import Progress
from actclust.runtime.actors import ActorGroup, FaultHooks
from actclust.runtime.raycluster import actor_options, actor_threads, init_ray, set_threads

log = logging.getLogger(__name__)

class MaskExtractor:
    """Loads the model once; computes and writes one shard per call.

    A plain class: ``ray.remote`` is applied where the pool is started.
    """

    def __init__(self, model: str, sites: str, num_cpus: float = 1, use_gpu: bool = False,
                 trust_remote_code: bool = False, faults=None):
        set_threads(num_cpus)
        self.faults = faults or FaultHooks()
        self.error = None
        try:
            self.loaded = load_model(model, trust_remote_code=trust_remote_code)
            self.sites = sites.split(",")
            modules = {site: ffn_sites(self.loaded.model, site) for site in self.sites}
        except UserError as exc:  # reported by info(), so the CLI shows one clear line
            self.error = exc
            return
        self.device = place_model(self.loaded.model, use_gpu)
        self.layers = list(range(len(modules[self.sites[0]])))
        self.widths = {site: site_width(modules[site][0], site) for site in self.sites}

    def info(self) -> dict:
        if self.error is not None:
            raise self.error
        return {"layers": self.layers, "widths": self.widths, "is_relu": self.loaded.is_relu,
                "family": self.loaded.family}

    def calibrate(self, ids: np.ndarray, sparsity: float,
                  batch_windows: int) -> dict[str, list[float]]:
        return calibrate_site_thresholds(self.loaded.model, ids, sparsity, self.sites,
                                         batch_windows)

    def extract(self, root: str, shard: str, seq: np.ndarray, ids: np.ndarray,
                thresholds, batch_windows: int) -> dict:
        """``thresholds``: a list per layer (one site, version 1) or {site: list} (version 2)."""
        self.faults.extraction_shard(shard)
        start = time.perf_counter()
        several = isinstance(thresholds, dict)
        by_site = thresholds if several else {self.sites[0]: thresholds}
        masks = site_masks(self.loaded.model, ids, by_site, batch_windows)
        # Version 1 (one site) keeps its layout: masks/layer=<l>/ (site key None).
        packed = {(site if several else None): [mask_store.pack(m) for m in masks[site]]
                  for site in by_site}
        widths = {(site if several else None): self.widths[site] for site in by_site}
        entry = mask_store.write_site_shard(root, shard, seq, ids, packed, self.layers, widths)
        entry["seconds"] = round(time.perf_counter() - start, 3)
        entry["peak_rss_mb"] = _peak_rss_mb()
        return entry


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (diagnostics in the manifest)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def plan_shards(windows: Windows, shard_windows: int) -> list[tuple[str, slice]]:
    n = len(windows)
    return [(f"shard-{i // shard_windows:05d}", slice(i, min(i + shard_windows, n)))
            for i in range(0, n, shard_windows)]


def _open_manifest(out: str, cfg: ExtractConfig) -> dict | None:
    """The existing manifest of ``out`` if it belongs to the same run; refuse a foreign one."""
    if not storage.is_file(storage.join(out, mask_store.MANIFEST)):
        outdir.refuse_foreign(out, mask_store.MANIFEST)
        return None
    manifest = mask_store.read_manifest(out)
    outdir.refuse_changed(out, manifest.get("identity", {}), identity(cfg),
                          "masks of a different configuration", values=True,
                          hint="use a new --out or repeat the original command to resume")
    return manifest


def run_extract(cfg: ExtractConfig, faults=None) -> dict:
    """Extract masks per ``cfg``; returns the final manifest. Resumable.

    ``faults``: fault-injection hooks handed to the actors (tests only)."""
    import ray

    out = storage.normalize(cfg.out)
    manifest = _open_manifest(out, cfg)
    # A model or corpus that cannot be read leaves no directory behind.
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    windows = load_windows(cfg.corpus, tokenizer, cfg.seq_len, split=cfg.split,
                           max_tokens=cfg.max_tokens, heldout_every=cfg.heldout_every,
                           text_column=cfg.text_column)
    storage.makedirs(out)
    shards = plan_shards(windows, cfg.shard_windows)

    init_ray()
    options = actor_options(cfg.workers)
    use_gpu = "num_gpus" in options
    Actor = ray.remote(MaskExtractor).options(max_restarts=0, **options)
    threads = actor_threads(cfg.workers)
    pool = ActorGroup(lambda: Actor.remote(cfg.model, cfg.sites, threads, use_gpu,
                                          cfg.trust_remote_code, faults), cfg.workers)
    try:
        first = pool.first_actor()
        info = ray.get(first.info.remote())
        if manifest is None:
            manifest = _new_manifest(cfg, info, windows, shards)
            manifest["thresholds"], manifest["sparsity_target"] = _thresholds(cfg, info, windows,
                                                                              first)
            mask_store.write_manifest(out, manifest)
        else:
            log.info("resuming %s: %d of %d shards complete", out,
                     len(mask_store.complete_shards(manifest)), len(manifest["shards"]))
        storage.remove_temporaries(storage.join(out, "masks"))
        todo = [(name, sl) for (name, sl), entry in zip(shards, manifest["shards"])
                if entry.get("status") != mask_store.COMPLETE]
        _run_shards(pool, todo, windows, manifest, out, cfg)
    finally:
        pool.shutdown()
    return manifest


def _new_manifest(cfg: ExtractConfig, info: dict, windows: Windows, shards) -> dict:
    """Format version 1 for one site (the layout every reader has always known), version 2
    (``sites`` a list, ``d_ff`` and ``thresholds`` per site) for several."""
    sites = cfg.sites.split(",")
    several = len(sites) > 1
    return {
        "format_version": mask_store.SITES_FORMAT_VERSION if several else mask_store.FORMAT_VERSION,
        "model": cfg.model,
        "corpus": cfg.corpus,
        "seq_len": cfg.seq_len,
        "sites": sites if several else cfg.sites,
        "split": cfg.split,
        "heldout_every": cfg.heldout_every,
        "layers": info["layers"],
        "d_ff": info["widths"] if several else info["widths"][sites[0]],
        "thresholds": None,
        "sparsity_target": None,
        "tokens": windows.tokens,
        "windows": len(windows),
        "identity": identity(cfg),
        "shards": [{"name": name, "windows": sl.stop - sl.start,
                    "rows": (sl.stop - sl.start) * cfg.seq_len, "sha256": None,
                    "status": mask_store.PENDING} for name, sl in shards],
    }


def _thresholds(cfg: ExtractConfig, info: dict, windows: Windows, actor) -> tuple:
    """Per-layer thresholds (one site: a list; several: {site: list}) and the sparsity
    they were calibrated for (None: fixed tau)."""
    import ray

    sites = cfg.sites.split(",")
    sparsity = cfg.sparsity
    if cfg.threshold is not None:
        by_site = {site: [float(cfg.threshold)] * len(info["layers"]) for site in sites}
        sparsity = None
    elif sparsity is None and info["is_relu"] and cfg.sites == "intermediate":
        by_site = {"intermediate": [0.0] * len(info["layers"])}
    else:
        sparsity = 0.5 if sparsity is None else sparsity
        calib = windows.ids[: cfg.calibration_windows]
        log.info("calibrating per-layer thresholds of %s for sparsity %.2f on %d windows",
                 cfg.sites, sparsity, len(calib))
        by_site = ray.get(actor.calibrate.remote(calib, sparsity, cfg.batch_windows))
        sparsity = float(sparsity)
    return (by_site if len(sites) > 1 else by_site[sites[0]]), sparsity


def _run_shards(pool, todo: list, windows: Windows, manifest: dict, out: str,
                cfg: ExtractConfig) -> None:
    """Extract every pending shard on the pool; record each in the manifest as it lands."""
    index = {s["name"]: i for i, s in enumerate(manifest["shards"])}
    progress = Progress(sum(sl.stop - sl.start for _, sl in todo) * cfg.seq_len, "extract",
                        step_unit="shards")

    def submit(actor, task):
        name, sl = task
        part = windows.take(sl)
        return actor.extract.remote(out, name, part.seq, part.ids, manifest["thresholds"],
                                    cfg.batch_windows)

    def done(task, entry):
        manifest["shards"][index[task[0]]] = entry
        mask_store.write_manifest(out, manifest)
        progress.update(entry["rows"], total_steps=len(todo))

    pool.run(todo, submit, done)
    progress.close()
