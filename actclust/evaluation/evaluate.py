"""Evaluation: clustering precision/recall and masked perplexity on held-out windows.

The driver side: resolve what is evaluated, hand fixed chunks of held-out windows to
evaluation actors (:mod:`actclust.evaluation.evaluator`, one forward pass per mode), and
summarize them into eval.json. Chunks are fixed by ``batch_windows`` and per-window NLL
sums are kept in window order, so any number of workers gives the same numbers; the
dense and oracle passes do not depend on the centroids and are computed once per run
when a baseline directory is given. Inside a run the actors live for the run
(:func:`actclust.runtime.actors.run_lived_actors`): each trial's centroids, predictor or
anchor travel with its chunks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import numpy as np

from actclust.errors import UserError
from actclust.evaluation.anchors import AnchorSpec
from actclust.evaluation.evaluator import MODEL_FIELDS, Evaluator, EvaluatorSpec
from actclust.evaluation.ffn_bytes import BYTES_DEFINITION, mode_fractions
from actclust.evaluation.metrics import (BASELINE_MODES, MODES, STAT_FIELDS, baseline_from,
                                        summarize)
from actclust.io import centroid_store, eval_store, mask_store, storage
from actclust.io.centroid_store import load_centroids
from actclust.runtime.actors import FaultHooks, stage_group

log = logging.getLogger(__name__)

__all__ = ["MODES", "STAT_FIELDS", "Evaluator", "EvaluatorSpec", "load_centroids", "run_baseline",
           "run_evaluate"]


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
        report["per_window"]["nll"]["predicted"] = [float(v) for v in nll]
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
