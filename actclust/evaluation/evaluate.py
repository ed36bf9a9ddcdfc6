"""Evaluation: clustering precision/recall and masked perplexity on held-out windows.

Evaluation actors load the model and the centroids once, then take fixed chunks
of held-out windows. Each chunk runs one forward pass per mode:

- ``dense``: no mask;
- ``oracle``: every layer's `a` times its own true mask ``|a| > tau_l``;
- ``cluster``: `a` times the centroid nearest (Hamming) to its true mask (mask mode
  ``replace``), or times both (``and``, the paper artifact's metric); the clustering
  metrics are measured here, on the activation each mask is applied to;
- ``random``: `a` times a random mask with exactly as many bits, per layer and chunk,
  as the centroids used in the cluster pass (so ``random_density == density``).

With several sites (format version 2) every (site, layer) is masked in the same forward
pass, each by its own threshold and centroids; a *slot* is one masked (site, layer),
site-major (:func:`actclust.io.centroid_store.slots`), and the per-slot sums make the
per-layer, per-site and overall figures.

Positions ``< dense_prefix`` of every window are never masked: the first token is an
attention sink whose activations are two orders of magnitude above the rest.
Masks in the masked passes are computed on the fly from the activation that
reaches each layer in that same pass (as the paper's artifact does). Chunks are
fixed by ``batch_windows`` and per-window NLL sums are kept in window order, so any
number of workers gives the same numbers; the dense and oracle passes do not depend
on the centroids and are computed once per run when a baseline directory is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import numpy as np

from actclust.errors import UserError
from actclust.evaluation.anchors import AnchorSpec, Sparsifier, calibrate
from actclust.evaluation.ffn_bytes import BYTES_DEFINITION, matrix_weights, mode_fractions
from actclust.evaluation.metrics import (BASELINE_MODES, F, MODES, STAT_FIELDS, baseline_from,
                                        empty_stats, summarize, window_nll)
from actclust.io import centroid_store, eval_store, mask_store, storage
from actclust.io.centroid_store import load_centroids, slots
from actclust.runtime.actors import FaultHooks, stage_group

log = logging.getLogger(__name__)

__all__ = ["MODES", "STAT_FIELDS", "Evaluator", "EvaluatorSpec", "load_centroids", "run_baseline",
           "run_evaluate"]


@dataclasses.dataclass(frozen=True)
class EvaluatorSpec:
    """What an evaluation actor is built from; travels from the driver to the actors.

    ``meta`` (cluster.json's model, sites, layers, thresholds, d_ff) stands in for the
    centroids when only centroid-free modes (dense, oracle, anchor) are evaluated.
    """

    model: str
    centroids_dir: str | None = None
    num_cpus: float = 1
    seed: int = 0
    trust_remote_code: bool = False
    use_gpu: bool = False
    predictor_dir: str | None = None
    top_m: int = 1
    dense_prefix: int = 1
    mask_mode: str = "replace"
    meta: dict | None = None
    neuron_select: str = "threshold"
    anchor: AnchorSpec | None = None


# What an evaluation actor loads once; the rest of its spec changes from trial to trial.
MODEL_FIELDS = ("model", "num_cpus", "trust_remote_code", "use_gpu")


class Evaluator:
    """Loads the model once; evaluates one chunk of windows per call.

    The centroids, predictor and anchor of ``spec`` are loaded with the model. A call
    that brings another spec (a run's next trial, on an actor that lives for the run)
    loads that spec's instead; the model stays.
    """

    def __init__(self, spec: EvaluatorSpec, faults: FaultHooks | None = None):
        from actclust.devices import place_model
        from actclust.io.models import ffn_projections, load_model
        from actclust.runtime.raycluster import set_threads

        set_threads(spec.num_cpus)
        self.model = load_model(spec.model, trust_remote_code=spec.trust_remote_code).model
        self.device = place_model(self.model, spec.use_gpu)
        self.faults = faults or FaultHooks()
        self.ffn_weights = matrix_weights(ffn_projections(self.model))
        self.shape = (0, 0)  # (windows, seq_len) of the chunk in flight
        self.spec = None
        self._load_trial(spec)

    def _load_trial(self, spec: EvaluatorSpec) -> None:
        """Everything of ``spec`` beyond the model: slots, centroids, predictor, anchor."""
        from actclust import kernels

        if self.spec is not None and any(getattr(spec, f) != getattr(self.spec, f)
                                         for f in MODEL_FIELDS):
            raise ValueError("an evaluation actor keeps its model; start another for "
                             f"{spec.model!r}")
        meta, centroids = spec.meta, None
        if spec.centroids_dir is not None:
            meta, centroids = load_centroids(spec.centroids_dir)
        masked = slots(meta)
        self.sites = centroid_store.sites_of(meta)
        # (site, model layer) -> its slot among the clustered ones (others stay unmasked).
        self.slot = {(site, layer): i for i, (site, layer, _, _) in enumerate(masked)}
        self.thresholds = [tau for _, _, _, tau in masked]
        self.seed = spec.seed
        self.dense_prefix = spec.dense_prefix
        self.mask_mode = spec.mask_mode
        # Unpacked once onto the model's device, where the masks are made; masks are
        # assigned by the rule the centroids were fitted with (absent: Hamming).
        self.centroids = [kernels.device_centroids(c, width, self.device, meta.get("rule"))
                          for c, (_, _, width, _) in zip(centroids or [], masked)]
        self.sparsifier = None if spec.anchor is None else Sparsifier(
            self.model, spec.anchor, spec.dense_prefix, spec.model)
        self.predicted = None
        if spec.predictor_dir is not None:
            from actclust.predict.evaluation import PredictedMasks

            self.predicted = PredictedMasks(spec.predictor_dir, self, spec.top_m,
                                            spec.neuron_select)
        self.spec = spec

    def calibrate(self, ids: np.ndarray, method: str, sparsity: float, dense_prefix: int,
                  batch_windows: int) -> dict:
        """An anchor's thresholds from dense passes over ``ids`` (fitting windows)."""
        return calibrate(self.model, ids, method, sparsity, dense_prefix, batch_windows,
                         self.spec.model)

    def bare_forward(self, ids: np.ndarray) -> float:
        """Seconds of one plain forward of ``ids``: no hooks, no loss (a run's floor rate)."""
        import time

        import torch

        from actclust.devices import model_input

        ids_t = model_input(self.model, ids)
        start = time.perf_counter()
        with torch.inference_mode():
            float(self.model(ids_t).logits[0, -1, 0])  # waits for the device
        return time.perf_counter() - start

    def evaluate(self, chunk: int, ids: np.ndarray, modes=MODES,
                 spec: EvaluatorSpec | None = None) -> dict:
        """Per-window NLL sums (W,) per mode, tokens per window (W,), STAT_FIELDS (L, F);
        with ``spec``, evaluated with that spec's centroids, predictor and anchor."""
        import contextlib

        import torch

        from actclust.capture.hooks import masking
        from actclust.devices import model_input

        if spec is not None and spec != self.spec:
            self._load_trial(spec)
        self.faults.evaluation_chunk(chunk)
        if "random" in modes and ("cluster" not in modes
                                  or modes.index("random") < modes.index("cluster")):
            raise ValueError("the random pass takes its bit counts from a cluster pass before it")
        self.shape = ids.shape
        ids_t = model_input(self.model, ids)
        out = {"nll": {}, "tokens": np.full(len(ids), ids.shape[1] - 1, dtype=np.int64),
               "ffn_weights": self.ffn_weights}
        stats = empty_stats(len(self.slot))
        if "anchor" in modes:
            out["anchor_stats"] = self.sparsifier.empty_stats()
        if self.predicted is not None:
            modes = tuple(modes) + ("predicted",)
        for mode in modes:
            fn = self._mask_fn(mode, chunk, stats)
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.inference_mode())
                if mode == "predicted":
                    stack.enter_context(self.predicted.capturing(self.model))
                if mode == "anchor":
                    stack.enter_context(self.sparsifier.applied(self.shape, out["anchor_stats"]))
                else:
                    for site in self.sites:  # every site masked in this same pass
                        stack.enter_context(masking(self.model, self._by_layer(site, fn), site))
                logits = self.model(ids_t).logits
            out["nll"][mode] = window_nll(logits, ids_t)
        out["stats"] = stats
        if self.predicted is not None:
            out["predicted_stats"] = self.predicted.take_stats()
        return out

    def _body(self, a):
        """The activations of the masked positions (>= dense_prefix) as rows (N, d)."""
        windows, length = self.shape
        a3 = a.reshape(windows, length, a.shape[-1])  # OPT hands its FFN (W*T, d)
        return a3[:, self.dense_prefix:].reshape(-1, a.shape[-1])

    def _full(self, a, body_mask):
        """A mask shaped like ``a``: ``body_mask`` on masked positions, ones on the prefix."""
        import torch

        if self.dense_prefix == 0:
            return body_mask.reshape(a.shape)
        windows, length = self.shape
        full = torch.ones((windows, length, a.shape[-1]), dtype=a.dtype, device=a.device)
        full[:, self.dense_prefix:] = body_mask.reshape(windows, length - self.dense_prefix,
                                                        a.shape[-1]).to(a.dtype)
        return full.reshape(a.shape)

    def _with_dense_prefix(self, a, mask):
        """``mask`` (shaped like ``a``) with the dense-prefix positions set to 1."""
        if self.dense_prefix == 0:
            return mask
        windows, length = self.shape
        full = mask.to(a.dtype).reshape(windows, length, a.shape[-1]).clone()
        full[:, :self.dense_prefix] = 1
        return full.reshape(a.shape)

    def _true_mask(self, slot: int, a):
        from actclust.capture.hooks import mask_of

        return mask_of(a, self.thresholds[slot])

    def _cluster_mask(self, slot: int, body, stats: np.ndarray):
        """Centroid (or m AND centroid) rows for masked positions; records the metrics."""
        import torch

        m = self._true_mask(slot, body)
        centroids = self.centroids[slot]
        labels, overlap = centroids.nearest(m)
        c = centroids.rows[labels]  # (N, d) 0/1
        kept = c * m if self.mask_mode == "and" else c
        mf = m.to(c.dtype)
        mass = body.abs().to(c.dtype) * mf
        f64 = torch.float64
        true_bits = mf.sum(dtype=f64)
        cent_bits = centroids.norms[labels].sum(dtype=f64)
        inter = overlap.sum(dtype=f64)
        row = stats[slot]
        row[F["tokens"]] += len(m)
        row[F["true_bits"]] += float(true_bits)
        row[F["centroid_bits"]] += float(cent_bits)
        row[F["hamming"]] += float(true_bits + cent_bits - 2 * inter)
        row[F["overlap"]] += float(inter)
        row[F["kept_bits"]] += float(kept.sum(dtype=f64))
        row[F["true_mass"]] += float(mass.sum(dtype=f64))
        row[F["kept_mass"]] += float((mass * c).sum(dtype=f64))
        return kept

    def _random_mask(self, slot: int, body, chunk: int, stats: np.ndarray):
        """Exactly as many random bits as the cluster pass used at this layer and chunk."""
        import torch

        bits = int(round(stats[slot, F["centroid_bits"]]))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + chunk * 1009 + slot)
        flat = torch.zeros(body.numel(), dtype=torch.bool)
        flat[torch.randperm(body.numel(), generator=gen)[:bits]] = True
        r = flat.reshape(body.shape).to(body.device)  # drawn on the host: same on every device
        if self.mask_mode == "and":
            r = r & self._true_mask(slot, body)
        stats[slot, F["random_bits"]] += bits
        stats[slot, F["random_kept_bits"]] += float(r.sum())
        return r

    def _mask_fn(self, mode: str, chunk: int, stats: np.ndarray):
        if mode in ("dense", "anchor"):  # an anchor sparsifies through its own hooks
            def fn(slot, a):
                return None
        elif mode == "oracle":
            def fn(slot, a):
                m = self._true_mask(slot, self._body(a))
                stats[slot, F["oracle_bits"]] += float(m.sum())
                return self._full(a, m)
        elif mode == "cluster":
            def fn(slot, a):
                return self._full(a, self._cluster_mask(slot, self._body(a), stats))
        elif mode == "predicted":
            def fn(slot, a):
                return self._with_dense_prefix(a, self.predicted.mask(slot, a))
        elif mode == "random":
            def fn(slot, a):
                return self._full(a, self._random_mask(slot, self._body(a), chunk, stats))
        else:
            raise ValueError(f"unknown mode {mode!r}")
        return fn

    def _by_layer(self, site: str, fn):
        """The hook's mask function of ``site``: the slot of (site, layer), or unmasked."""
        def by_layer(layer, a):
            slot = self.slot.get((site, layer))
            return None if slot is None else fn(slot, a)
        return by_layer


def fitted_split(meta: dict) -> str | None:
    """The split of the masks the centroids were fitted on (older cluster.json: the manifest)."""
    if meta.get("split"):
        return meta["split"]
    masks = meta.get("masks")
    if masks and storage.is_file(storage.join(masks, mask_store.MANIFEST)):
        return mask_store.read_manifest(masks).get("split")
    return None


def resolve(cfg, meta: dict, where: str | None = None):
    """Fill the evaluation config from the identity of what it evaluates (the centroids',
    or a masks directory's for an anchor); refuse a mismatch."""
    where = where or f"centroids in {cfg.centroids}"
    cfg = dataclasses.replace(cfg, **{key: meta[key] for key in
                                      ("model", "corpus", "seq_len", "text_column",
                                       "heldout_every") if getattr(cfg, key) is None})
    if cfg.model != meta["model"]:
        raise UserError(f"{where} were fitted on masks of model "
                        f"{meta['model']!r}, not {cfg.model!r}; pass --model {meta['model']} "
                        "or cluster masks of this model")
    # Windows are numbered per seq_len and held out per heldout_every: another value of
    # either puts held-out tokens inside the windows the centroids were fitted on.
    for key, flag in (("seq_len", "--seq-len"), ("heldout_every", "heldout_every")):
        if getattr(cfg, key) != meta[key]:
            raise UserError(f"{where} were fitted with {key} {meta[key]}, not "
                            f"{getattr(cfg, key)}; evaluate with {flag} {meta[key]} (another "
                            "value renumbers the windows and mixes fitting and held-out tokens)")
    fit = fitted_split(meta)
    if fit is None:
        raise UserError(f"{where} do not record the split of the masks they were fitted on; "
                        "re-run actclust cluster on masks from actclust extract --split train")
    if {fit, cfg.split} != {"train", "heldout"}:
        raise UserError(f"{where} were fitted on the {fit!r} split, which shares windows with "
                        f"the {cfg.split!r} split evaluated here; fit on masks from actclust "
                        "extract --split train and evaluate --split heldout")
    if cfg.seq_len < 2:
        raise UserError(f"seq_len must be at least 2, got {cfg.seq_len}")
    if cfg.dense_prefix >= cfg.seq_len - 1:
        raise UserError(f"dense_prefix ({cfg.dense_prefix}) leaves no masked position in "
                        f"{cfg.seq_len}-token windows; lower --dense-prefix")
    if cfg.max_tokens is not None and cfg.max_tokens < cfg.seq_len:
        raise UserError(f"max_tokens ({cfg.max_tokens}) is smaller than one window "
                        f"(seq_len {cfg.seq_len}); raise --max-tokens or lower --seq-len")
    return cfg


def load_eval_windows(cfg, split: str | None = None, max_tokens: int | None = None):
    """The windows of ``cfg``'s corpus (its split and max_tokens unless given)."""
    from actclust.io.corpus import load_windows
    from actclust.io.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    return load_windows(cfg.corpus, tokenizer, cfg.seq_len, split=split or cfg.split,
                        max_tokens=cfg.max_tokens if split is None else max_tokens,
                        heldout_every=cfg.heldout_every,
                        text_column=cfg.text_column)


def baseline_identity(cfg, meta: dict) -> dict:
    """Everything the dense and oracle passes depend on."""
    return {"model": cfg.model, "corpus": cfg.corpus, "text_column": cfg.text_column,
            "seq_len": cfg.seq_len, "split": cfg.split, "max_tokens": cfg.max_tokens,
            "heldout_every": cfg.heldout_every, "sites": meta["sites"],
            "layers": list(meta["layers"]),
            "thresholds": {s: list(t) for s, t in meta["thresholds"].items()}  # version 2
            if isinstance(meta["thresholds"], dict) else list(meta["thresholds"]),
            "dense_prefix": cfg.dense_prefix, "batch_windows": cfg.batch_windows}


def evaluator_spec(cfg, meta: dict, centroids_dir: str | None = None,
                   predictor_dir: str | None = None, anchor: AnchorSpec | None = None):
    """(EvaluatorSpec, the actors' Ray options) of an evaluation of ``cfg``."""
    from actclust.runtime.raycluster import actor_options, actor_threads, init_ray

    init_ray()
    options = actor_options(cfg.workers)
    meta_fields = {k: meta.get(k) for k in ("format_version", "sites", "layers", "thresholds",
                                            "d_ff", "rule")}
    spec = EvaluatorSpec(cfg.model, centroids_dir, actor_threads(cfg.workers), cfg.seed,
                         cfg.trust_remote_code, "num_gpus" in options, predictor_dir, cfg.top_m,
                         cfg.dense_prefix, cfg.mask_mode, meta_fields, cfg.neuron_select, anchor)
    return spec, options


@contextlib.contextmanager
def evaluators(spec: EvaluatorSpec, options: dict, workers: int,
               faults: FaultHooks | None = None):
    """The evaluation actors of ``spec``'s model: the run's own inside
    :func:`actclust.runtime.actors.run_lived_actors` (fault-injected ones never are)."""
    import ray

    Actor = ray.remote(Evaluator).options(max_restarts=0, **options)
    key = None if faults is not None else ("evaluator", workers, *(getattr(spec, f)
                                                                  for f in MODEL_FIELDS))
    with stage_group(key, lambda: Actor.remote(spec, faults), workers) as group:
        yield group


def run_chunks(cfg, meta: dict, centroids_dir: str | None, windows, modes,
               faults: FaultHooks | None = None, predictor_dir: str | None = None,
               anchor: AnchorSpec | None = None) -> list:
    """Evaluate ``modes`` on every chunk of ``windows`` with a group of actors, in order."""
    from actclust.progress import Progress

    spec, options = evaluator_spec(cfg, meta, centroids_dir, predictor_dir, anchor)
    chunks = [(i, slice(s, min(s + cfg.batch_windows, len(windows))))
              for i, s in enumerate(range(0, len(windows), cfg.batch_windows))]
    results: dict = {}
    # A run evaluates twice (the shared dense and oracle pass, then each trial): name the modes.
    label = "evaluate" if tuple(modes) == tuple(MODES) else "evaluate " + ",".join(modes)
    progress = Progress(len(windows) * cfg.seq_len, label, step_unit="chunks")

    def done(task, result):
        results[task[0]] = result
        progress.update((task[1].stop - task[1].start) * cfg.seq_len, total_steps=len(chunks))

    with evaluators(spec, options, cfg.workers, faults) as group:
        group.run(chunks, lambda actor, task: actor.evaluate.remote(
            task[0], windows.ids[task[1]], modes, spec), done)
    progress.close()
    return [results[c] for c, _ in chunks]


def run_baseline(cfg, meta: dict) -> dict:
    """Compute (or reuse) the dense and oracle passes into ``cfg.baseline``.

    ``meta`` needs cluster.json's model, corpus, seq_len, text_column, heldout_every,
    split, sites, layers, thresholds and d_ff (a mask manifest has them all).
    """
    cfg = resolve(cfg, meta)
    windows = load_eval_windows(cfg)
    ident = baseline_identity(cfg, meta)
    cached = eval_store.read_baseline(cfg.baseline, ident, [int(s) for s in windows.seq])
    if cached is not None:
        return cached
    results = run_chunks(cfg, meta, None, windows, BASELINE_MODES)
    baseline = baseline_from(results, windows, ident)
    eval_store.write_baseline(cfg.baseline, baseline)
    return baseline


def bare_forward_rate(cfg, meta: dict, chunks_per_worker: int = 2) -> float:
    """Tokens/s of a bare forward over the first held-out chunks, on the evaluation actors
    (the run's own inside a run), every actor busy at once."""
    cfg = resolve(cfg, meta)
    windows = load_eval_windows(cfg)
    spec, options = evaluator_spec(cfg, meta)
    size = cfg.batch_windows
    chunks = [slice(s, s + size) for s in range(0, len(windows), size)
              if s + size <= len(windows)][:chunks_per_worker * cfg.workers] or [slice(0, None)]
    seconds: list = []
    with evaluators(spec, options, cfg.workers) as group:
        group.run(chunks, lambda actor, chunk: actor.bare_forward.remote(windows.ids[chunk]),
                  lambda chunk, s: seconds.append(s))
    tokens = sum(len(windows.ids[c]) for c in chunks) * cfg.seq_len
    return tokens / (sum(seconds) / min(cfg.workers, len(chunks)))


def run_evaluate(cfg, faults: FaultHooks | None = None) -> dict:
    """Evaluate centroids on held-out windows; writes and returns eval.json's content.

    ``faults``: fault-injection hooks handed to the actors (tests only).
    """
    meta, centroids = load_centroids(cfg.centroids)
    cfg = resolve(cfg, meta)
    windows = load_eval_windows(cfg)
    centroid_store.check_width(meta, centroids)
    predictor = None
    if cfg.predictor is not None:
        from actclust.predict.evaluation import check_predictor

        centroid_store.require_single_site(meta, cfg.centroids, "--predictor")
        predictor = check_predictor(cfg.predictor, cfg, meta, windows)
    ident = baseline_identity(cfg, meta)
    baseline = eval_store.read_baseline(cfg.baseline, ident, [int(s) for s in windows.seq])
    modes = tuple(m for m in MODES if (m != "random" or cfg.random)
                  and (baseline is None or m not in BASELINE_MODES))
    centroids_dir = storage.normalize(cfg.centroids)
    predictor_dir = None if predictor is None else storage.normalize(cfg.predictor)
    results = run_chunks(cfg, meta, centroids_dir, windows, modes, faults, predictor_dir)
    if baseline is None:
        baseline = baseline_from(results, windows, ident)
        if cfg.baseline is not None:
            eval_store.write_baseline(cfg.baseline, baseline)
    else:
        log.info("dense and oracle passes reused from %s", cfg.baseline)
    report = summarize(results, baseline, meta, windows, dense_prefix=cfg.dense_prefix,
                       mask_mode=cfg.mask_mode, resamples=cfg.bootstrap_resamples,
                       seed=cfg.seed)
    if predictor is not None:
        from actclust.evaluation.bootstrap import paired_ppl_intervals
        from actclust.predict.evaluation import add_predicted

        add_predicted(report, results, predictor, meta, cfg.top_m, cfg.neuron_select)
        # The same seed draws the same resampled windows: paired with the other modes.
        nll = np.concatenate([r["nll"]["predicted"] for r in results])
        tokens = np.concatenate([r["tokens"] for r in results])
        report["predicted_ppl_ci95"] = list(paired_ppl_intervals(
            {"predicted": nll}, tokens, resamples=cfg.bootstrap_resamples,
            seed=cfg.seed)["predicted"])
    report["ffn_bytes_fraction"] = mode_fractions(results, baseline, meta, cfg.mask_mode,
                                                  predictor)
    report["definitions"] = {**report["definitions"], "ffn_bytes_fraction": BYTES_DEFINITION}
    report.update(identity=_identity(cfg, meta, windows))
    eval_store.write_eval(report, cfg.out)
    return report


def _identity(cfg, meta: dict, windows) -> dict:
    """What eval.json was computed from."""
    return {"model": cfg.model, "corpus": cfg.corpus, "split": cfg.split, "seq_len": cfg.seq_len,
            "max_tokens": cfg.max_tokens, "heldout_every": cfg.heldout_every,
            "fitted_split": fitted_split(meta), "sites": meta["sites"],
            "thresholds": meta["thresholds"], "d_ff": meta["d_ff"],
            "dense_prefix": cfg.dense_prefix, "mask_mode": cfg.mask_mode,
            "centroids": str(cfg.centroids), "first_seq": int(windows.seq[0]),
            "last_seq": int(windows.seq[-1])}
