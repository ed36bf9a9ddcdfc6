"""Evaluation: clustering precision/recall and masked perplexity on held-out windows.

Evaluation actors load the model and the centroids once, then take fixed chunks
of held-out windows. Each chunk runs one forward pass per mode:

- ``dense``: no mask; its true masks are assigned to centroids with the bit
  kernels of :mod:`actclust.hamming` to give the clustering metrics;
- ``oracle``: every layer's `a` times its own true mask ``|a| > tau_l``;
- ``cluster``: `a` times the centroid nearest (Hamming) to its true mask;
- ``random``: `a` times a random mask with the centroids' per-layer density.

Masks in the masked passes are computed on the fly from the activation that
reaches each layer in that same pass (as the paper's artifact does). Chunks are
fixed by ``batch_windows`` and per-window NLL sums are added in window order on
the driver, so any number of workers gives the same numbers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from actclust import store
from actclust.errors import UserError

log = logging.getLogger(__name__)

MODES = ("dense", "oracle", "cluster", "random")
# Per-layer integer sums: tokens, |m|, |c|, Hamming d, |m AND c|.
STAT_FIELDS = ("tokens", "true_bits", "centroid_bits", "hamming", "overlap")


def window_nll(logits, ids) -> np.ndarray:
    """Per-window sum of next-token NLL: logits (W, T, V), ids (W, T) -> (W,) float64."""
    import torch

    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return nll.sum(dim=1).numpy()


def metric_values(stats: np.ndarray, width: int) -> dict:
    """Micro-averaged metrics from summed STAT_FIELDS (one row, or summed over layers)."""
    tokens, true_bits, centroid_bits, hamming, overlap = (float(v) for v in stats)
    precision = overlap / centroid_bits if centroid_bits else 0.0
    recall = overlap / true_bits if true_bits else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    cells = tokens * width
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": 1.0 - hamming / cells if cells else 0.0,
        "density": centroid_bits / cells if cells else 0.0,
        "true_density": true_bits / cells if cells else 0.0,
    }


def assignment_stats(bits: np.ndarray, centroids: np.ndarray, backend: str) -> np.ndarray:
    """STAT_FIELDS sums for packed masks (N, B) against packed centroids (K, B)."""
    from actclust import hamming

    labels, dist = hamming.assign(bits, centroids, backend=backend)
    true_bits = hamming.popcount(bits).astype(np.int64)
    cent_bits = hamming.popcount(centroids).astype(np.int64)[labels]
    overlap = (true_bits + cent_bits - dist.astype(np.int64)) // 2
    return np.array([len(bits), true_bits.sum(), cent_bits.sum(), dist.astype(np.int64).sum(),
                     overlap.sum()], dtype=np.int64)


def _injected_delay() -> None:
    """Latency injection for the reliability tests (ACTCLUST_FAULT_DELAY_S), off by default."""
    delay = float(os.environ.get("ACTCLUST_FAULT_DELAY_S", "0") or 0)
    if delay > 0:
        time.sleep(delay)


def torch_float32():
    import torch

    return torch.float32


class Evaluator:
    """Loads the model and centroids once; evaluates one chunk of windows per call."""

    def __init__(self, model: str, centroids_dir: str, num_cpus: float = 1, seed: int = 0,
                 trust_remote_code: bool = False, use_gpu: bool = False):
        import torch

        from actclust.models import load_model
        from actclust.raycluster import set_threads

        set_threads(num_cpus)
        meta, centroids = load_centroids(centroids_dir)
        self.model = load_model(model, trust_remote_code=trust_remote_code).model
        self.device = "cuda" if use_gpu else "cpu"
        self.model.to(self.device)
        self.site = meta["sites"]
        # Model layer -> its position in the clustered layers (others stay unmasked).
        self.slot = {layer: i for i, layer in enumerate(meta["layers"])}
        self.thresholds = meta["thresholds"]
        self.seed = seed
        # Centroids unpacked once, as 0/1 float32 (K, d): the GEMM form of the
        # Hamming distance, |m| + |c| - 2 m.c, is exact in float32 below 2**24 bits.
        self.centroids = [torch.from_numpy(store.unpack(c, meta["d_ff"]).astype(np.float32))
                          .to(self.device) for c in centroids]
        self.norms = [c.sum(dim=1) for c in self.centroids]
        self.density = [float(n.sum()) / c.numel() for c, n in zip(self.centroids, self.norms)]

    def evaluate(self, chunk: int, ids: np.ndarray, modes=MODES) -> dict:
        import torch

        from actclust.masks import masking

        _injected_delay()

        ids_t = torch.tensor(ids, device=self.device)
        out = {"nll": {}, "tokens": int(ids.shape[0] * (ids.shape[1] - 1))}
        stats = np.zeros((len(self.centroids), len(STAT_FIELDS)), dtype=np.int64)
        for mode in modes:
            fn = self._mask_fn(mode, chunk, stats)
            with torch.inference_mode(), masking(self.model, fn, self.site):
                logits = self.model(ids_t).logits
            out["nll"][mode] = window_nll(logits.cpu(), ids_t.cpu())
        out["stats"] = stats
        return out

    def _true_mask(self, slot: int, a):
        from actclust.masks import mask_of

        return mask_of(a, self.thresholds[slot])

    def nearest(self, slot: int, m):
        """Nearest centroid (Hamming; ties to the lowest index) of bool masks m (N, d).

        Returns (labels (N,) int64, overlap |m AND c| (N,) float32) as tensors.
        """
        mf = m.to(torch_float32())
        dot = mf @ self.centroids[slot].T  # (N, K) = |m AND c_j|
        labels = (self.norms[slot][None, :] - 2 * dot).argmin(dim=1)  # |m| is constant per row
        return labels, dot.gather(1, labels[:, None]).squeeze(1)

    def _centroid_mask(self, slot: int, a, stats: np.ndarray | None):
        """The centroid mask nearest to each token's true mask, shaped like ``a``."""
        m = self._true_mask(slot, a).reshape(-1, a.shape[-1])
        labels, overlap = self.nearest(slot, m)
        if stats is not None:
            true_bits = m.sum(dim=1).double()
            cent_bits = self.norms[slot][labels].double()
            overlap = overlap.double()
            stats[slot] += np.array([len(m), true_bits.sum(), cent_bits.sum(),
                                     (true_bits + cent_bits - 2 * overlap).sum(), overlap.sum()],
                                    dtype=np.float64).round().astype(np.int64)
        return self.centroids[slot][labels].reshape(a.shape)

    def _mask_fn(self, mode: str, chunk: int, stats: np.ndarray):
        import torch

        if mode == "dense":
            def fn(slot, a):
                self._centroid_mask(slot, a, stats)  # metrics only; leave `a` as it is
                return None
        elif mode == "oracle":
            def fn(slot, a):
                return self._true_mask(slot, a)
        elif mode == "cluster":
            def fn(slot, a):
                return self._centroid_mask(slot, a, None)
        elif mode == "random":
            def fn(slot, a):
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + chunk * 1009 + slot)
                return (torch.rand(a.shape, generator=gen) < self.density[slot]).to(a.device)
        else:
            raise ValueError(f"unknown mode {mode!r}")

        def by_layer(layer, a):
            slot = self.slot.get(layer)
            return None if slot is None else fn(slot, a)
        return by_layer


def load_centroids(root: str | Path) -> tuple[dict, list[np.ndarray]]:
    """cluster.json and the per-layer (K, B) centroids of a clustering directory."""
    import pyarrow.parquet as pq

    root = Path(root)
    meta_path = root / "cluster.json"
    if not meta_path.is_file() or not (root / "centroids.parquet").is_file():
        raise UserError(f"{root} is not a clustering directory (cluster.json and "
                        "centroids.parquet expected; create them with actclust cluster)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{meta_path} is not valid JSON ({exc})") from None
    table = pq.read_table(root / "centroids.parquet")
    layer_col = table.column("layer").to_numpy()
    cluster_col = table.column("cluster").to_numpy()
    bits = store.bits_to_numpy(table.column("bits"))
    per_layer = []
    for layer in meta["layers"]:
        key = -1 if meta.get("pooled") else layer
        rows = np.flatnonzero(layer_col == key)
        rows = rows[np.argsort(cluster_col[rows], kind="stable")]
        if len(rows) == 0:
            raise UserError(f"{root}/centroids.parquet has no centroids for layer {layer}")
        per_layer.append(bits[rows])
    return meta, per_layer


def _resolve(cfg, meta: dict):
    """Fill the evaluation config from the centroids' identity; refuse a mismatch."""

    for key in ("model", "corpus", "seq_len", "text_column", "heldout_every"):
        given = getattr(cfg, key)
        if given is None:
            setattr(cfg, key, meta[key])
    if cfg.model != meta["model"]:
        raise UserError(f"centroids in {cfg.centroids} were fitted on masks of model "
                        f"{meta['model']!r}, not {cfg.model!r}; pass --model {meta['model']} "
                        "or cluster masks of this model")
    if cfg.seq_len != meta["seq_len"]:
        log.warning("evaluating with seq_len %d; the centroids were fitted on %d-token windows",
                    cfg.seq_len, meta["seq_len"])
    if cfg.seq_len < 2:
        raise UserError(f"seq_len must be at least 2, got {cfg.seq_len}")
    if cfg.max_tokens is not None and cfg.max_tokens < cfg.seq_len:
        raise UserError(f"max_tokens ({cfg.max_tokens}) is smaller than one window "
                        f"(seq_len {cfg.seq_len}); raise --max-tokens or lower --seq-len")
    return cfg


def run_evaluate(cfg) -> dict:
    """Evaluate centroids on held-out windows; writes and returns eval.json's content."""
    import ray

    from actclust.corpus import load_windows
    from actclust.models import load_tokenizer
    from actclust.pool import ActorPool
    from actclust.progress import Progress
    from actclust.raycluster import actor_options, init_ray

    meta, centroids = load_centroids(cfg.centroids)
    cfg = _resolve(cfg, meta)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    windows = load_windows(cfg.corpus, tokenizer, cfg.seq_len, split=cfg.split,
                           max_tokens=cfg.max_tokens, heldout_every=cfg.heldout_every,
                           text_column=cfg.text_column)
    _check_width(cfg, meta, centroids)

    init_ray()
    options = actor_options(cfg.workers)
    Actor = ray.remote(Evaluator).options(max_restarts=0, **options)
    centroids_dir = str(Path(cfg.centroids).resolve())
    pool = ActorPool(lambda: Actor.remote(cfg.model, centroids_dir, options["num_cpus"], cfg.seed,
                                          cfg.trust_remote_code, "num_gpus" in options),
                     cfg.workers)
    chunks = [(i, slice(s, min(s + cfg.batch_windows, len(windows))))
              for i, s in enumerate(range(0, len(windows), cfg.batch_windows))]
    results: dict = {}
    progress = Progress(len(windows) * cfg.seq_len, "evaluate", step_unit="chunks")

    def done(task, result):
        results[task[0]] = result
        progress.update((task[1].stop - task[1].start) * cfg.seq_len, total_steps=len(chunks))

    try:
        pool.run(chunks, lambda actor, task: actor.evaluate.remote(task[0], windows.ids[task[1]]),
                 done)
    finally:
        pool.shutdown()
    progress.close()
    results = [results[c] for c, _ in chunks]
    report = summarize(results, meta, windows)
    report.update(identity=_identity(cfg, meta, windows))
    store.write_json_atomic(report, Path(cfg.out) / "eval.json")
    return report


def _check_width(cfg, meta: dict, centroids: list[np.ndarray]) -> None:
    expect = store.row_bytes(meta["d_ff"])
    for layer, c in zip(meta["layers"], centroids):
        if c.shape[1] != expect:
            raise UserError(f"centroids of layer {layer} are {c.shape[1] * 8} bits wide, but "
                            f"cluster.json says d_ff {meta['d_ff']}")


def summarize(results: list, meta: dict, windows) -> dict:
    """eval.json content from per-chunk results, in window order."""
    tokens = sum(r["tokens"] for r in results)
    nll = {mode: math.fsum(float(v) for r in results for v in r["nll"][mode]) for mode in MODES}
    stats = sum(r["stats"] for r in results)  # (L, fields) int64
    width = meta["d_ff"]
    report = {
        "dense_ppl": math.exp(nll["dense"] / tokens),
        "oracle_ppl": math.exp(nll["oracle"] / tokens),
        "cluster_ppl": math.exp(nll["cluster"] / tokens),
        "random_ppl": math.exp(nll["random"] / tokens),
        **metric_values(stats.sum(axis=0), width),
        "tokens": int(stats[0, 0]),
        "predicted_tokens": tokens,
        "windows": len(windows),
        "k": meta["k"],
        "theta": meta["theta"],
        "algorithm": meta.get("algorithm", "hamming-kmeans"),
        "per_layer": [{"layer": int(layer), **metric_values(stats[i], width)}
                      for i, layer in enumerate(meta["layers"])],
        "definitions": {
            "precision": "|m AND c| / |c|, micro-averaged over (token, layer)",
            "recall": "|m AND c| / |m| (the paper's 'clustering precision')",
            "cluster_ppl": "a * centroid of the cluster nearest (Hamming) to the token's true mask",
        },
    }
    return report


def _identity(cfg, meta: dict, windows) -> dict:
    return {"model": cfg.model, "corpus": cfg.corpus, "split": cfg.split, "seq_len": cfg.seq_len,
            "max_tokens": cfg.max_tokens, "heldout_every": cfg.heldout_every,
            "sites": meta["sites"], "thresholds": meta["thresholds"], "d_ff": meta["d_ff"],
            "centroids": str(cfg.centroids), "first_seq": int(windows.seq[0]),
            "last_seq": int(windows.seq[-1])}
