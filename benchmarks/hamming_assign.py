"""Nearest-centroid search: faiss IndexBinaryFlat vs every actclust.hamming backend.

With --profile, the theta = 0.3 and density = 0.5 rules on the torch path are timed too
(checked against the numpy backend under the same rule, not against faiss).

Random masks (N=50,000, K=1,024, d=1,536 by default) in one process; each
method is timed best of --repeats and must return faiss's labels (ties to the
lowest index) and distances exactly. Repeats are interleaved across methods
so that load from other processes affects them alike.

    python benchmarks/hamming_assign.py                # full size
    python benchmarks/hamming_assign.py --smoke-test   # a few seconds
    python benchmarks/hamming_assign.py --n 200000 --k 4096 --d 14336

``--profile`` adds where the torch path's time goes (unpacking, the int8 GEMM,
the argmin, each over all N rows on one thread of blocks) and the torch path
with one worker thread against its default (one per torch thread); the load
average of the machine is printed beside the figures.

Real masks from ``actclust extract``: ``--masks DIR --layer L`` reads that
layer's first --n rows through actclust.io.mask_store and uses K of them, drawn with
--seed, as centroids:

    python benchmarks/hamming_assign.py --masks runs/demo/masks --layer 3
"""
from __future__ import annotations

import argparse
import functools
import sys

import numpy as np

# The script's own folder is on sys.path when run as a script.
from _anchors import best_of, machine, print_json, print_table, random_masks


def faiss_searcher(x: np.ndarray, c: np.ndarray):
    """A callable running faiss IndexBinaryFlat search(k=1) on x.

    Bytes are zero-padded to a multiple of 8 and the index is built here, so
    the timed call is the search alone (the strictest comparison for us).
    """
    import faiss

    pad = -(-x.shape[1] // 8) * 8
    xp, cp = (np.ascontiguousarray(np.pad(a, ((0, 0), (0, pad - a.shape[1])))) for a in (x, c))
    index = faiss.IndexBinaryFlat(8 * pad)
    index.add(cp)

    def search():
        dist, labels = index.search(xp, 1)
        return labels[:, 0].astype(np.int64), dist[:, 0].astype(np.int32)

    search()  # warm-up: the first search starts faiss's OpenMP threads
    return search


def real_masks(root: str, layer: int, n: int, k: int, seed: int):
    """First n packed masks of a layer, k of them (seeded) as centroids, and d_ff."""
    from actclust.io import mask_store as store

    manifest = store.read_manifest(root)
    x = store.read_layer(root, manifest, layer)["bits"][:n]
    if len(x) < k:
        raise SystemExit(f"{root} layer {layer} has {len(x)} rows, fewer than --k {k}")
    c = x[np.random.default_rng(seed).choice(len(x), size=k, replace=False)]
    return np.ascontiguousarray(x), np.ascontiguousarray(c), int(manifest["d_ff"])


def torch_stages(x: np.ndarray, c: np.ndarray, repeats: int) -> dict:
    """Seconds of each stage of the torch CPU path over all rows, best of repeats."""
    import time

    import torch

    from actclust.kernels import torch_backend

    gemm = torch_backend._TorchGemm(c, torch.device("cpu"))
    rows = gemm.default_rows()
    starts = range(0, len(x), rows)
    bits_buf, out = gemm.bits_buffer(rows), gemm.scratch(rows)
    _, mat, norm = gemm.chunks[0]
    blocks = [gemm.unpack(x[lo:lo + rows]).clone() for lo in starts]

    def unpack():
        for lo in starts:
            gemm.unpack(x[lo:lo + rows], bits_buf)

    def gemm_only():
        for b in blocks:
            gemm._scores(b, mat, norm, out)

    def argmin():
        for b in blocks:
            gemm._row_min(out[: len(b)])

    stages = {"unpack (byte lookup)": unpack, "GEMM (int8, or exact float)": gemm_only, "argmin + gather": argmin}
    best = {}
    for name, fn in stages.items():
        t = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - start)
        best[name] = t
    best["rows per block"] = rows
    best["chunks"] = len(gemm.chunks)
    return best


def run(x: np.ndarray, c: np.ndarray, backends: list[str], repeats: int,
        one_worker: bool = False) -> list[dict]:
    """Time faiss and each backend on (x, c); one row per method.

    Repeats are interleaved (faiss, backend 1, backend 2, faiss, ...) so that
    load from other processes hits every method alike; best time kept.
    """
    from actclust import hamming

    methods = {"faiss IndexBinaryFlat": faiss_searcher(x, c)}
    for backend in backends:
        hamming.assign(x, c, backend=backend)  # warm-up: imports, probes, threads
        methods[f"actclust {backend}"] = functools.partial(hamming.assign, x, c, backend=backend)
    other_rules = {}
    if "torch" in backends:  # the torch path with each GEMM forced, whichever it picks
        from actclust.kernels import torch_backend

        gemms = [("float32 GEMM", False)] + [("int8 GEMM", True)] * torch_backend.int_mm_works()
        for label, int_mm in gemms:
            methods[f"actclust torch, {label}"] = functools.partial(_torch_gemm, x, c, int_mm)
    if one_worker and "torch" in backends:
        methods["actclust torch, 1 worker"] = functools.partial(_torch_one_worker, x, c)
        for rule in (dict(theta=0.3), dict(density=0.5)):
            name = "actclust torch, " + ", ".join(f"{k}={v}" for k, v in rule.items())
            methods[name] = functools.partial(hamming.assign_scored, x, c, backend="torch", **rule)
            other_rules[name] = functools.partial(hamming.assign_scored, x, c, backend="numpy", **rule)
    best = {name: float("inf") for name in methods}
    outputs = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            seconds, outputs[name] = best_of(fn, 1)
            best[name] = min(best[name], seconds)
    want = {name: outputs["faiss IndexBinaryFlat"] for name in outputs}
    want.update({name: fn() for name, fn in other_rules.items()})  # their own rule, on numpy
    t_faiss = best["faiss IndexBinaryFlat"]
    return [{"method": name, "seconds": best[name], "ratio_vs_faiss": best[name] / t_faiss,
             "identical": bool(np.array_equal(out[0], want[name][0])
                               and np.array_equal(out[1], want[name][1]))}
            for name, out in outputs.items()]


def _torch_gemm(x, c, int_mm: bool):
    """The torch path with the int8 GEMM (torch._int_mm) or the exact float32 one."""
    import torch

    from actclust import hamming
    from actclust.kernels import torch_backend

    best, labels = torch_backend._TorchGemm(c, torch.device("cpu"), int_mm=int_mm).nearest_all(x)
    return labels, (best + hamming.popcount(x)).astype(np.int32)


def _torch_one_worker(x, c):
    """The torch path with every block on the calling thread (the GEMM still threaded)."""
    import torch

    from actclust import hamming
    from actclust.kernels import torch_backend

    best, labels = torch_backend._TorchGemm(c, torch.device("cpu")).nearest_all(x, workers=1)
    return labels, (best + hamming.popcount(x)).astype(np.int32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="masks to assign")
    parser.add_argument("--k", type=int, default=1024, help="centroids")
    parser.add_argument("--d", type=int, default=1536, help="bits per mask (d_ff)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", default=None, help="comma list; default: every available one")
    parser.add_argument("--masks", default=None, help="mask directory from actclust extract")
    parser.add_argument("--layer", type=int, default=0, help="layer of --masks to read")
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--profile", action="store_true",
                        help="also time the torch path's stages and its one-worker form")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.n, args.k, args.d, args.repeats = 2000, 64, 300, 1

    from actclust import hamming

    backends = args.backends.split(",") if args.backends else hamming.available_backends()
    if args.masks:
        x, c, args.d = real_masks(args.masks, args.layer, args.n, args.k, args.seed)
        args.n = len(x)
    else:
        x = random_masks(args.n, args.d, seed=args.seed)
        c = random_masks(args.k, args.d, seed=args.seed + 1)
    import os

    load_before = os.getloadavg()
    rows = run(x, c, backends, args.repeats, one_worker=args.profile)
    stages = torch_stages(x, c, args.repeats) if args.profile and "torch" in backends else None
    load = [round(v, 1) for v in (*load_before, *os.getloadavg())]
    print(f"assign N={args.n} K={args.k} d={args.d}, best of {args.repeats}, "
          f"load average before {load[:3]}, after {load[3:]}")
    print_table(rows, ["method", "seconds", "ratio_vs_faiss", "identical"])
    if stages:
        print("torch path stages over all rows (one thread of blocks):",
              ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in stages.items()))
    print_json("hamming_assign", n=args.n, k=args.k, d=args.d, repeats=args.repeats, machine=machine(),
               load_average=load, torch_stages=stages,
               results={r["method"]: {k: r[k] for k in ("seconds", "ratio_vs_faiss", "identical")} for r in rows})
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
