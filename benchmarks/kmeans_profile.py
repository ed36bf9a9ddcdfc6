"""Where a k-means fit's time goes, against its assignment GEMMs alone.

One layer of a real mask directory (every row of the layer, read as the clustering
workers read it), one process, the library's own fit (``actclust.clustering.kmeans.fit``)
with its checkpoint written every iteration as rank 0 writes it. The kernels the fit
calls are wrapped with timers, so each phase is measured inside the real fit:

- read: the layer's Parquet shards into memory (``open_layer_dataset``);
- seeding: the shared sample and greedy k-means++ on it;
- assignment: ``assign_scored`` over every row, every iteration (the GEMM and its argmin);
- bit sums: the per-cluster set-bit counts of every iteration;
- update: the rule's new centroids from the counts (and empty-cluster re-seeding);
- checkpoint: the state written after every iteration;
- final pass: the last assignment, sizes and cost.

The anchor is the same iterations' assignment GEMMs alone: ``assign_scored`` of every row
against the fit's final centroids, timed best of --repeats, times the iterations run.

    python benchmarks/kmeans_profile.py --masks runs/compass/masks --layer 12 --k 256 1024
"""
from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections import defaultdict

from _anchors import machine, print_json, print_table

from actclust import kernels
from actclust.clustering import datasets, kmeans
from actclust.io import kmeans_state, mask_store
from actclust.kernels.rules import AssignRule


def timed(phases: dict, name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] += time.perf_counter() - start
    return wrapper


def profile(masks: str, layer: int, k: int, theta: float, max_iter: int, repeats: int) -> dict:
    manifest = mask_store.read_manifest(masks)
    shards = mask_store.complete_shards(manifest)
    width = mask_store.mask_width(manifest)
    phases: dict = defaultdict(float)
    start = time.perf_counter()
    dataset = datasets.open_layer_dataset(masks, layer, [s["name"] for s in shards],
                                          [s["rows"] for s in shards], width, 0, None)
    phases["read"] = time.perf_counter() - start
    originals = {"assign_scored": kernels.assign_scored, "bit_sums": kernels.bit_sums,
                 "shared_sample": kmeans.shared_sample, "init_kmeanspp": kmeans.init_kmeanspp,
                 "reseed_empty": kmeans.reseed_empty, "final": kmeans._final_pass}
    kernels.assign_scored = timed(phases, "assignment", originals["assign_scored"])
    kernels.bit_sums = timed(phases, "bit sums", originals["bit_sums"])
    kmeans.shared_sample = timed(phases, "seeding", originals["shared_sample"])
    kmeans.init_kmeanspp = timed(phases, "seeding", originals["init_kmeanspp"])
    kmeans.reseed_empty = timed(phases, "update", originals["reseed_empty"])
    rule = AssignRule.from_args(theta=theta)
    centroids_of = AssignRule.centroids  # the plain function, restored below
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/state.npz"
        save = timed(phases, "checkpoint", lambda state: kmeans_state.save_state(state, path))
        try:
            AssignRule.centroids = timed(phases, "update", centroids_of)
            final = timed(phases, "final pass", originals["final"])
            kmeans._final_pass = lambda *a, **kw: final(*a, **kw)
            fit_start = time.perf_counter()
            result = kmeans.fit(None, k, theta=theta, width=width, dataset=dataset,
                                max_iter=max_iter, checkpoint=save, layer=layer)
            fit_seconds = time.perf_counter() - fit_start
        finally:
            AssignRule.centroids = centroids_of
            kernels.assign_scored, kernels.bit_sums = (originals["assign_scored"],
                                                       originals["bit_sums"])
            kmeans.shared_sample, kmeans.init_kmeanspp = (originals["shared_sample"],
                                                          originals["init_kmeanspp"])
            kmeans.reseed_empty, kmeans._final_pass = (originals["reseed_empty"],
                                                       originals["final"])
    # The final pass's own assignment was counted under assignment too: move it.
    x = dataset.x
    gemm = min(_time(lambda: kernels.assign_scored(x, result.centroids, rule))
               for _ in range(repeats))
    phases["assignment"] -= gemm  # the final pass's assignment, inside "final pass" already
    fit_total = phases["read"] + fit_seconds
    gemm_alone = gemm * result.iterations
    other = fit_seconds - sum(v for n, v in phases.items() if n != "read")
    return {"k": k, "rows": int(x.shape[0]), "width": width, "iterations": result.iterations,
            "fit_seconds": round(fit_total, 2), "gemm_alone_seconds": round(gemm_alone, 2),
            "fit_over_gemm": round(fit_total / gemm_alone, 2),
            **{f"{name}_seconds": round(v, 2) for name, v in phases.items()},
            "other_seconds": round(other, 2)}


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", required=True)
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--k", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--theta", type=float, default=0.5)
    parser.add_argument("--max-iter", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = [profile(args.masks, args.layer, k, args.theta, args.max_iter, args.repeats)
            for k in args.k]
    print_table(rows, list(rows[0]))
    print_json("kmeans_profile", machine=machine(), masks=args.masks, layer=args.layer,
               theta=args.theta, rows=rows)


if __name__ == "__main__":
    main()
