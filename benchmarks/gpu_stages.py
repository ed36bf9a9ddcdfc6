"""The stage actors' GPU paths, in one process: extraction, k-means and evaluation on
CUDA against the same code on the CPU (no Ray needed).

Runs :class:`MaskExtractor` and :class:`Evaluator` (the classes Ray starts as
actors) with ``use_gpu`` on and off on the same windows, and checks that the
masks are identical, that the clustering statistics are identical and that the
perplexities agree. Prints one JSON line per model.

    python3 benchmarks/gpu_stages.py --models tiny:llama,tiny:opt
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np


def check(model: str, max_tokens: int, seq_len: int, k: int) -> dict:
    import torch

    from actclust import kmeans
    from actclust.capture.extract import MaskExtractor
    from actclust.clustering.policy import fit_policy
    from actclust.evaluation.evaluate import STAT_FIELDS, Evaluator, EvaluatorSpec
    from actclust.io import centroid_store, mask_store
    from actclust.io.corpus import load_windows
    from actclust.io.models import load_tokenizer

    windows = load_windows("embedded:pydoc", load_tokenizer(model), seq_len,
                           max_tokens=max_tokens)
    ids = windows.ids
    gpu = MaskExtractor(model, "intermediate", use_gpu=True)
    cpu = MaskExtractor(model, "intermediate", use_gpu=False)
    info = gpu.info()
    thresholds = gpu.calibrate(ids, 0.5, 4)
    cpu_thresholds = cpu.calibrate(ids, 0.5, 4)
    out = {"model": model, "device": torch.cuda.get_device_name(0),
           "threshold_max_rel_diff": float(max(abs(a - b) / max(abs(b), 1e-12)
                                               for a, b in zip(thresholds, cpu_thresholds)))}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        entry_gpu = gpu.extract(str(root / "gpu"), "shard-00000", windows.seq, ids, thresholds, 4)
        entry_cpu = cpu.extract(str(root / "cpu"), "shard-00000", windows.seq, ids, thresholds, 4)
        masks = {}
        for name in ("gpu", "cpu"):
            masks[name] = [mask_store.read_shards(root / name, layer, ["shard-00000"], info["d_ff"])
                           for layer in info["layers"]]
        agree = [float((a == b).mean()) for a, b in zip(masks["gpu"], masks["cpu"])]
        out.update(rows=entry_gpu["rows"], mask_bytes_equal_fraction=agree,
                   shard_sha_equal=entry_gpu["sha256"] == entry_cpu["sha256"])
        results = {}
        for layer, x in zip(info["layers"], masks["gpu"]):
            fits = {b: kmeans.fit(x, k, seed=0, max_iter=10, backend=b) for b in ("cupy", "torch",
                                                                                   "numpy")}
            out.setdefault("kmeans_backends_equal", []).append(
                all(np.array_equal(f.centroids, fits["numpy"].centroids) for f in fits.values()))
            res = fits["numpy"]
            results[layer] = {"centroids": res.centroids, "sizes": res.sizes, "cost": res.cost,
                              "iterations": res.iterations, "converged": res.converged}
        cfg = SimpleNamespace(k=k, theta=0.5, seed=0, algorithm="hamming-kmeans", init="k-means++",
                              batch_size=None, max_iter=10, tol=1e-3, workers=1,
                              pool_layers=False, masks=str(root / "gpu"))
        manifest = {"model": model, "corpus": "embedded:pydoc", "seq_len": seq_len,
                    "sites": "intermediate", "layers": info["layers"], "d_ff": info["d_ff"],
                    "thresholds": thresholds, "tokens": int(ids.size)}
        centroid_store.write_centroids(cfg, manifest, info["layers"], results, root / "c",
                                       fit_policy(cfg))
        evals = {dev: Evaluator(EvaluatorSpec(model, str(root / "c"), use_gpu=dev == "cuda"))
                 .evaluate(0, ids)
                 for dev in ("cuda", "cpu")}
    tokens = int(np.sum(evals["cpu"]["tokens"]))
    # Bit counts must agree exactly; the activation-mass sums are float and may round apart.
    counts = [i for i, name in enumerate(STAT_FIELDS) if not name.endswith("_mass")]
    out["stats_equal"] = bool(np.array_equal(evals["cuda"]["stats"][:, counts],
                                             evals["cpu"]["stats"][:, counts]))
    for mode in ("dense", "oracle", "cluster", "random"):
        ppl = {dev: math.exp(float(np.sum(e["nll"][mode])) / tokens) for dev, e in evals.items()}
        out[f"{mode}_ppl_cuda"], out[f"{mode}_ppl_cpu"] = ppl["cuda"], ppl["cpu"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny:llama,tiny:opt")
    parser.add_argument("--max-tokens", type=int, default=64 * 32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--k", type=int, default=16)
    args = parser.parse_args()
    for model in args.models.split(","):
        print(json.dumps(check(model, args.max_tokens, args.seq_len, args.k)), flush=True)


if __name__ == "__main__":
    main()
