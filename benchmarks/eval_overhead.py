"""Evaluation overhead: each masked pass vs a dense pass on the same windows.

    python benchmarks/eval_overhead.py --centroids runs/demo/clusters/k=64-theta=0.5
    python benchmarks/eval_overhead.py --smoke-test     # fits tiny centroids first

Loads the model and centroids once (as an evaluation actor does) and times, on
the same held-out windows and thread count: a bare forward (no hooks), the dense
pass (hooks that assign masks for the metrics), and the oracle, cluster and
random masked passes. Goal: each masked pass <= 1.2x the bare dense pass.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def smoke_centroids(root: str) -> str:
    from actclust.clustering.distributed import run_cluster
    from actclust.config import ClusterConfig, ExtractConfig, build
    from actclust.capture.extract import run_extract

    run_extract(build(ExtractConfig, dict(model="tiny:llama", seq_len=64, max_tokens=64 * 32,
                                          out=f"{root}/masks")))
    run_cluster(build(ClusterConfig, dict(masks=f"{root}/masks", k=16, out=f"{root}/c")))
    return f"{root}/c"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--centroids")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()

    import torch

    from actclust.io.corpus import load_windows
    from actclust.evaluation.evaluate import MODES, Evaluator, EvaluatorSpec, load_centroids
    from actclust.io.models import load_tokenizer

    tmp = tempfile.mkdtemp(prefix="actclust-bench-")
    if args.smoke_test or not args.centroids:
        args.centroids = smoke_centroids(tmp)
        args.tokens = min(args.tokens, 1024)
    meta, _ = load_centroids(args.centroids)
    threads = os.cpu_count() or 1
    evaluator = Evaluator(EvaluatorSpec(meta["model"], args.centroids, num_cpus=threads))
    windows = load_windows(meta["corpus"], load_tokenizer(meta["model"]), meta["seq_len"],
                           split="heldout", max_tokens=args.tokens)
    chunks = [windows.ids[i:i + 4] for i in range(0, len(windows), 4)]

    def bare():
        with torch.inference_mode():
            for c in chunks:
                evaluator.model(torch.tensor(c))

    bare()  # warm-up
    times = {"bare": best_of(bare, args.repeats)}
    for mode in MODES:
        # The random pass draws as many bits as the cluster pass used: time the two together
        # and take the cluster pass off.
        modes = ("cluster", "random") if mode == "random" else (mode,)
        times[mode] = best_of(lambda: [evaluator.evaluate(i, c, modes=modes)
                                       for i, c in enumerate(chunks)], args.repeats)
    times["random"] -= times["cluster"]
    result = {"model": meta["model"], "k": meta["k"], "tokens": windows.tokens,
              "threads": threads, "seconds": times,
              "ratio": {m: times[m] / times["bare"] for m in MODES}}
    for mode in ("bare", *MODES):
        print(f"{mode:8s} {times[mode]:7.3f} s  {times[mode] / times['bare']:.3f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
