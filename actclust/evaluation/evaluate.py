"""Evaluation: clustering precision/recall and masked perplexity on held-out windows.

Evaluation actors load the model and the centroids once, then take fixed chunks
of held-out windows. Each chunk runs one forward pass per mode:

- ``dense``: no mask; its true masks are assigned to centroids with the bit
  kernels of :mod:`actclust.kernels` to give the clustering metrics;
- ``oracle``: every layer's `a` times its own true mask ``|a| > tau_l``;
- ``cluster``: `a` times the centroid nearest (Hamming) to its true mask;
- ``random``: `a` times a random mask with the centroids' per-layer density.

Masks in the masked passes are computed on the fly from the activation that
reaches each layer in that same pass (as the paper's artifact does). Chunks are
fixed by ``batch_windows`` and per-window NLL sums are added in window order on
the driver, so any number of workers gives the same numbers.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from actclust.errors import UserError
from actclust.evaluation.metrics import MODES, STAT_FIELDS, summarize, window_nll
from actclust.io import centroid_store, eval_store, storage
from actclust.orchestration.actors import FaultHooks

log = logging.getLogger(__name__)


class Evaluator:
    """Loads the model and centroids once; evaluates one chunk of windows per call.

    A plain class: ``ray.remote`` is applied where the actors are started.
    ``faults`` are the test's fault-injection hooks (none by default).
    """

    def __init__(self, model: str, centroids_dir: str, num_cpus: float = 1, seed: int = 0,
                 trust_remote_code: bool = False, use_gpu: bool = False,
                 faults: FaultHooks | None = None, predictor_dir: str | None = None,
                 top_m: int = 1):
        from actclust import kernels
        from actclust.devices import place_model
        from actclust.io.models import load_model
        from actclust.orchestration.raycluster import set_threads

        set_threads(num_cpus)
        meta, centroids = centroid_store.load_centroids(centroids_dir)
        self.model = load_model(model, trust_remote_code=trust_remote_code).model
        self.device = place_model(self.model, use_gpu)
        self.faults = faults or FaultHooks()
        self.site = meta["sites"]
        # Model layer -> its position in the clustered layers (others stay unmasked).
        self.slot = {layer: i for i, layer in enumerate(meta["layers"])}
        self.thresholds = meta["thresholds"]
        self.seed = seed
        # Unpacked once onto the model's device, where the masks are made; masks are
        # assigned by the rule the centroids were fitted with (absent: Hamming).
        self.centroids = [kernels.device_centroids(c, meta["d_ff"], self.device, meta.get("rule"))
                          for c in centroids]
        self.predicted = None
        if predictor_dir is not None:
            from actclust.predict.evaluation import PredictedMasks

            self.predicted = PredictedMasks(predictor_dir, self, top_m)

    def evaluate(self, chunk: int, ids: np.ndarray, modes=MODES) -> dict:
        import contextlib

        import torch

        from actclust.capture.hooks import masking
        from actclust.devices import model_input

        self.faults.evaluation_chunk(chunk)
        ids_t = model_input(self.model, ids)
        out = {"nll": {}, "tokens": int(ids.shape[0] * (ids.shape[1] - 1))}
        stats = np.zeros((len(self.centroids), len(STAT_FIELDS)), dtype=np.int64)
        if self.predicted is not None:
            modes = tuple(modes) + ("predicted",)
        for mode in modes:
            fn = self._mask_fn(mode, chunk, stats)
            inputs = self.predicted.capturing(self.model) if mode == "predicted" \
                else contextlib.nullcontext()
            with torch.inference_mode(), inputs, masking(self.model, fn, self.site):
                logits = self.model(ids_t).logits
            out["nll"][mode] = window_nll(logits, ids_t)
        out["stats"] = stats
        if self.predicted is not None:
            out["predicted_stats"] = self.predicted.take_stats()
        return out

    def _true_mask(self, slot: int, a):
        from actclust.capture.hooks import mask_of

        return mask_of(a, self.thresholds[slot])

    def _centroid_mask(self, slot: int, a, stats: np.ndarray | None):
        """The centroid mask nearest to each token's true mask, shaped like ``a``."""
        m = self._true_mask(slot, a).reshape(-1, a.shape[-1])
        centroids = self.centroids[slot]
        labels, overlap = centroids.nearest(m)
        if stats is not None:
            stats[slot] += centroids.stats(m, labels, overlap)
        return centroids.rows[labels].reshape(a.shape)

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
        elif mode == "predicted":
            fn = self.predicted.mask
        elif mode == "random":
            def fn(slot, a):
                # Drawn on the host so every device gives the same masks.
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + chunk * 1009 + slot)
                density = self.centroids[slot].density
                return (torch.rand(a.shape, generator=gen) < density).to(a.device)
        else:
            raise ValueError(f"unknown mode {mode!r}")

        def by_layer(layer, a):
            slot = self.slot.get(layer)
            return None if slot is None else fn(slot, a)
        return by_layer


def _resolve(cfg, meta: dict):
    """The evaluation config filled from the centroids' identity; refuse a mismatch."""
    cfg = dataclasses.replace(cfg, **{key: meta[key] for key in
                                      ("model", "corpus", "seq_len", "text_column",
                                       "heldout_every") if getattr(cfg, key) is None})
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


def run_evaluate(cfg, faults: FaultHooks | None = None) -> dict:
    """Evaluate centroids on held-out windows; writes and returns eval.json's content.

    ``faults``: fault-injection hooks handed to the actors (tests only).
    """
    import ray

    from actclust.io.corpus import load_windows
    from actclust.io.models import load_tokenizer
    from actclust.orchestration.actors import ActorGroup
    from actclust.orchestration.raycluster import actor_options, init_ray
    from actclust.progress import Progress

    meta, centroids = centroid_store.load_centroids(cfg.centroids)
    cfg = _resolve(cfg, meta)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    windows = load_windows(cfg.corpus, tokenizer, cfg.seq_len, split=cfg.split,
                           max_tokens=cfg.max_tokens, heldout_every=cfg.heldout_every,
                           text_column=cfg.text_column)
    centroid_store.check_width(meta, centroids)
    predictor = None
    if cfg.predictor is not None:
        from actclust.predict.evaluation import check_predictor

        predictor = check_predictor(cfg.predictor, cfg, meta, windows)

    init_ray()
    options = actor_options(cfg.workers)
    Actor = ray.remote(Evaluator).options(max_restarts=0, **options)
    centroids_dir = storage.normalize(cfg.centroids)
    predictor_dir = None if predictor is None else storage.normalize(cfg.predictor)
    group = ActorGroup(lambda: Actor.remote(cfg.model, centroids_dir, options["num_cpus"],
                                            cfg.seed, cfg.trust_remote_code,
                                            "num_gpus" in options, faults, predictor_dir,
                                            cfg.top_m), cfg.workers)
    chunks = [(i, slice(s, min(s + cfg.batch_windows, len(windows))))
              for i, s in enumerate(range(0, len(windows), cfg.batch_windows))]
    results: dict = {}
    progress = Progress(len(windows) * cfg.seq_len, "evaluate", step_unit="chunks")

    def done(task, result):
        results[task[0]] = result
        progress.update((task[1].stop - task[1].start) * cfg.seq_len, total_steps=len(chunks))

    try:
        group.run(chunks, lambda actor, task: actor.evaluate.remote(task[0], windows.ids[task[1]]),
                  done)
    finally:
        group.shutdown()
    progress.close()
    results = [results[c] for c, _ in chunks]
    report = summarize(results, meta, windows)
    if predictor is not None:
        from actclust.predict.evaluation import add_predicted

        add_predicted(report, results, predictor, meta, cfg.top_m)
    report.update(identity=_identity(cfg, meta, windows))
    eval_store.write_eval(report, cfg.out)
    return report


def _identity(cfg, meta: dict, windows) -> dict:
    """What eval.json was computed from."""
    return {"model": cfg.model, "corpus": cfg.corpus, "split": cfg.split, "seq_len": cfg.seq_len,
            "max_tokens": cfg.max_tokens, "heldout_every": cfg.heldout_every,
            "sites": meta["sites"], "thresholds": meta["thresholds"], "d_ff": meta["d_ff"],
            "centroids": str(cfg.centroids), "first_seq": int(windows.seq[0]),
            "last_seq": int(windows.seq[-1])}
