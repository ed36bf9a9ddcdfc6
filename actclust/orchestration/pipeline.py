"""The whole pipeline: extract -> dense and oracle -> anchors -> cluster (for each K and objective:
theta or density) -> evaluate -> report.

Layout of ``out``::

    out/masks/                      actclust extract (fitting windows)
    out/clusters/k=<K>-theta=<t>/   actclust cluster (k=<K>-density=<D>/ in density mode)
    out/eval/baseline/              dense and oracle passes, computed once per run
    out/eval/k=<K>-theta=<t>/       actclust evaluate (held-out windows)
    out/predictors/k=<K>-theta=<t>/<kind>/   actclust train-predictor (with ``predictor:``)
    out/eval/k=<K>-theta=<t>/predicted-neuron/   the neuron predictor's eval.json (``both``)
    out/eval/anchor=<method>-s=<s>/ actclust evaluate --anchor (with ``anchors:``)
    out/results.csv, results.json   one row per (K, objective)
    out/report.html, plots/         actclust report

``out`` is a local directory or an object-store URI (``s3://bucket/run``). Every
stage is resumable, so rerunning the same command finishes what a killed run
started and reuses what it finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

from actclust import config as C
from actclust.errors import UserError
from actclust.evaluation.ffn_bytes import BYTES_DEFINITION
from actclust.io import centroid_store, eval_store, mask_store, storage
from actclust.io.storage import write_bytes_atomic, write_json_atomic
from actclust.orchestration.ledger import Ledger, fit_macs, measure_gemm_rate
from actclust.orchestration.predictor_stages import (gets_predictor, mass_bits_stage,
                                                     predictor_stage)
from actclust.orchestration.runconfig import RunConfig, TrialPoint, objective_label
from actclust.runtime.actors import run_lived_actors

log = logging.getLogger(__name__)

RESULT_COLUMNS = ("k", "theta", "target_density", "objective", "algorithm", "dense_ppl",
                  "oracle_ppl", "cluster_ppl", "random_ppl", "dense_ppl_ci95", "oracle_ppl_ci95",
                  "cluster_ppl_ci95", "random_ppl_ci95", "effective_density",
                  "oracle_effective_density", "density", "random_density", "precision", "recall",
                  "weighted_recall", "f1", "accuracy", "true_density", "dense_prefix",
                  "mask_mode", "windows", "cost", "fit_seconds", "hit_cap", "tokens",
                  "predictor_kind", "predictor_params_fraction", "predicted_ppl",
                  "predicted_ppl_ci95", "predicted_effective_density", "predicted_density",
                  "predicted_accuracy", "predicted_precision", "predicted_recall",
                  "predicted_weighted_recall", "oracle_ffn_bytes_fraction",
                  "cluster_ffn_bytes_fraction", "random_ffn_bytes_fraction",
                  "predicted_ffn_bytes_fraction", "bits_by", "top_m")
# With ``predictor: both`` the neuron predictor's figures sit beside the cluster predictor's.
NEURON = "neuron_"
NEURON_COLUMNS = tuple(NEURON + c for c in RESULT_COLUMNS
                       if c.startswith("predict") and c != "predictor_kind")
RESULT_COLUMNS += NEURON_COLUMNS
# Algorithms without a theta: one trial per K for all the thetas listed (densities still vary).
THETA_FREE = ("brb-kmeans", "activation-aware")


def objectives(cfg: RunConfig) -> list[dict]:
    """The fit objectives a run covers: each theta, then each density (over its grid
    blocks, in order)."""
    if cfg.grid:
        return _unique(o for block in cfg.grid for o in objectives(cfg.block(block)))
    thetas = cfg.theta if isinstance(cfg.theta, list) else [cfg.theta]
    return [{"theta": t, "density": None} for t in thetas] + \
        [{"theta": None, "density": d} for d in getattr(cfg, "density", None) or []]


def _unique(items) -> list:
    out = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def trial_grid(cfg: RunConfig) -> list[TrialPoint]:
    """Every trial point (k, theta, density, algorithm): the product of k, objectives and
    algorithms, or of each grid block in turn; theta-free algorithms fit once per K for
    all the thetas listed."""
    if cfg.grid:
        return _unique(p for block in cfg.grid for p in trial_grid(cfg.block(block)))
    points = []
    for algorithm in cfg.algorithm:
        objs = objectives(cfg)
        if algorithm in THETA_FREE:
            thetas = [o for o in objs if o["density"] is None]
            objs = thetas[:1] + [o for o in objs if o["density"] is not None]
        points += [TrialPoint(k=k, algorithm=algorithm, **obj) for obj in objs for k in cfg.k]
    return points


def check_predictor_trials(cfg: RunConfig, points: list[TrialPoint]) -> None:
    """Refuse ``predictor_trials`` that name no trial of the grid (a typo would silently
    train nothing)."""
    names = [p.name for p in points]
    unknown = [n for n in cfg.predictor_trials if n not in names]
    if unknown:
        raise UserError(f"predictor_trials names {', '.join(unknown)}, not a trial of this "
                        f"run; its trials: {', '.join(names)}")
    if cfg.predictor_trials and cfg.predictor == "none":
        raise UserError("predictor_trials needs predictor: cluster, neuron or both")
    small = [p.name for p in points if gets_predictor(cfg, p.name) and p.k < cfg.top_m]
    if small:
        raise UserError(f"top_m: {cfg.top_m} needs K >= {cfg.top_m} in every trial that gets "
                        f"a predictor, not {', '.join(small)}; name the others in "
                        "predictor_trials (a sweep: or set static_point: false)")


def extract_stage(cfg: RunConfig, ledger: Ledger | None = None) -> str:
    from actclust.capture.extract import run_extract

    start = time.monotonic()
    masks = storage.join(cfg.out, "masks")
    if storage.is_file(storage.join(masks, mask_store.MANIFEST)):
        manifest = mask_store.read_manifest(masks)
        if all(s["status"] == mask_store.COMPLETE for s in manifest["shards"]):
            log.info("masks already extracted in %s", masks)
            return masks
    ecfg = C.build(C.ExtractConfig, dict(
        model=cfg.model, corpus=cfg.corpus, seq_len=cfg.seq_len, max_tokens=cfg.max_tokens,
        heldout_every=cfg.heldout_every, sparsity=cfg.sparsity, threshold=cfg.threshold,
        sites=getattr(cfg, "sites", "intermediate"), workers=cfg.workers, out=masks))
    run_extract(ecfg)
    if ledger is not None:
        ledger.stage("extract", time.monotonic() - start,
                     mask_store.read_manifest(masks)["tokens"])
    return masks


def cluster_stage(cfg: RunConfig, masks: str, point: TrialPoint,
                  ledger: Ledger | None = None) -> str:
    from actclust.clustering.distributed import run_cluster

    out = storage.join(cfg.out, "clusters", point.name)
    if centroid_store.is_finished(out):
        return out
    start = time.monotonic()
    # Pooling applies to the baselines; hamming-kmeans points (the sweep's static K = 1)
    # stay per layer.
    pool = bool(getattr(cfg, "pool_layers", False)) and point.algorithm != "hamming-kmeans"
    ccfg = C.build(C.ClusterConfig, dict(masks=masks, k=point.k, theta=point.theta,
                                         density=point.density, seed=cfg.seed,
                                         workers=cfg.workers, algorithm=point.algorithm,
                                         pool_layers=pool, out=out))
    meta = run_cluster(ccfg)
    if ledger is not None:
        ledger.stage(f"cluster {point.name}", time.monotonic() - start, macs=fit_macs(meta))
    return out


def neuron_eval_dir(cfg: RunConfig, name: str) -> str:
    """Where the neuron predictor's eval.json of a ``predictor: both`` trial lives."""
    return storage.join(cfg.out, "eval", name, "predicted-neuron")


def evaluate_stage(cfg: RunConfig, centroids: str, name: str,
                   predictors: dict | None = None, ledger: Ledger | None = None) -> dict:
    """eval.json of a trial, with the mode ``predicted`` of its first predictor kind.

    With two kinds the neuron predictor is evaluated first, into its own eval.json (same
    windows and bootstrap seed, so its intervals pair with the others); the trial's
    eval.json, written last, stays its commit record.
    """
    predictors = predictors or {}
    kinds = list(predictors)
    if len(kinds) > 1:
        second = neuron_eval_dir(cfg, name)
        if not _is_evaluation_of(eval_store.read_eval(second), "neuron", cfg.neuron_select,
                                 cfg.random, cfg.mask_mode, centroids):
            _evaluate(_evaluate_config(cfg, centroids, second, predictors["neuron"],
                                       cfg.neuron_select), f"evaluate {name} neuron", ledger)
    out = storage.join(cfg.out, "eval", name)
    kind = kinds[0] if kinds else None
    select = cfg.neuron_select if kind == "neuron" else "threshold"
    top_m = cfg.top_m if kind == "cluster" else 1
    finished = eval_store.read_eval(out)
    if _is_evaluation_of(finished, kind, select, cfg.random, cfg.mask_mode, centroids, top_m):
        return finished
    return _evaluate(_evaluate_config(cfg, centroids, out, predictors.get(kind), select, top_m),
                     f"evaluate {name}", ledger)


def _evaluate(ecfg, label: str, ledger: Ledger | None) -> dict:
    """run_evaluate, recorded in the ledger: one pass per mode over the held-out tokens."""
    from actclust.evaluation.evaluate import run_evaluate

    start = time.monotonic()
    report = run_evaluate(ecfg)
    if ledger is not None:
        passes = 1 + bool(ecfg.random) + (ecfg.predictor is not None)
        ledger.stage(label, time.monotonic() - start, passes * report["tokens"])
    return report


def _is_evaluation_of(report: dict | None, kind: str | None, neuron_select: str,
                      with_random: bool = False, mask_mode: str = "replace",
                      centroids: str | None = None, top_m: int = 1) -> bool:
    """Whether a finished eval.json used this predictor kind (and neuron selection rule or
    number of unioned clusters), mask mode and centroids (the fitted ones, or their mass
    bits), and has the random pass if it is asked for; eval.json from before the rule
    existed used the threshold."""
    if report is None or report.get("predictor_kind") != kind:
        return False
    if kind == "cluster" and (report.get("top_m") or 1) != top_m:
        return False
    used = report.get("identity", {}).get("centroids")
    if centroids is not None and used is not None \
            and storage.normalize(used) != storage.normalize(centroids):
        return False
    if report.get("mask_mode", "replace") != mask_mode:
        return False
    if report.get("k") == 1 and mask_mode == "and" and \
            report.get("definitions", {}).get("ffn_bytes_fraction") != BYTES_DEFINITION:
        return False  # counted before the static centroid read gate and up at its density
    if with_random and report.get("random_ppl") is None:
        return False
    return kind != "neuron" or (report.get("neuron_select") or "threshold") == neuron_select


def _evaluate_config(cfg: RunConfig, centroids: str | None, out: str | None,
                     predictor: str | None = None, neuron_select: str = "threshold",
                     top_m: int = 1):
    return C.build(C.EvaluateConfig, dict(
        centroids=centroids or "-", out=out or "-", max_tokens=cfg.eval_max_tokens,
        workers=cfg.workers, seed=cfg.seed, dense_prefix=cfg.dense_prefix,
        mask_mode=cfg.mask_mode, baseline=storage.join(cfg.out, "eval", "baseline"),
        predictor=predictor, neuron_select=neuron_select, top_m=top_m, random=cfg.random))


def trial_evaluation(cfg: RunConfig, centroids: str, name: str,
                     ledger: Ledger | None = None) -> tuple[dict, dict | None]:
    """Train the trial's predictors (if any) and evaluate: (eval.json, the neuron
    predictor's eval.json with ``predictor: both``, else None)."""
    predictors = predictor_stage(cfg, centroids, name, ledger)
    report = evaluate_stage(cfg, centroids, name, predictors, ledger)
    second = eval_store.read_eval(neuron_eval_dir(cfg, name)) if len(predictors) > 1 else None
    return report, second


def baseline_stage(cfg: RunConfig, masks: str, ledger: Ledger | None = None) -> dict:
    """The dense and oracle passes of the run, computed once for every trial."""
    from actclust.evaluation.evaluate import run_baseline

    meta = mask_store.evaluation_meta(mask_store.read_manifest(masks))
    ecfg = _evaluate_config(cfg, masks, None)
    start = time.monotonic()
    reused = storage.is_file(storage.join(ecfg.baseline, eval_store.BASELINE_FILE))
    baseline = run_baseline(ecfg, meta)
    if ledger is not None and not reused:
        ledger.stage("dense and oracle", time.monotonic() - start,
                     2 * len(baseline["seq"]) * cfg.seq_len)
    return baseline


def measure_floor_rates(cfg: RunConfig, masks: str, ledger: Ledger) -> None:
    """The bare-forward rate (the run's evaluation actors) and the assignment GEMM rate
    (here) that the run's floor is counted at."""
    from actclust.evaluation.evaluate import bare_forward_rate

    manifest = mask_store.read_manifest(masks)
    ledger.bare_rate = bare_forward_rate(_evaluate_config(cfg, masks, None),
                                         mask_store.evaluation_meta(manifest))
    width = manifest["d_ff"] if isinstance(manifest["d_ff"], int) else max(
        manifest["d_ff"].values())
    ledger.gemm_rate = measure_gemm_rate(width)
    log.info("floor rates: bare forward %.0f tokens/s, assignment GEMM %.3g multiply-adds/s",
             ledger.bare_rate, ledger.gemm_rate)


# What an anchor's eval.json depends on beyond the masks directory (which fixes the rest).
ANCHOR_IDENTITY = ("masks", "anchor", "anchor_sparsity", "dense_prefix", "max_tokens",
                   "calibration_windows", "batch_windows")
ANCHOR_COLUMNS = ("anchor", "anchor_sparsity", "anchor_ppl", "anchor_ppl_ci95", "dense_ppl",
                  "dense_ppl_ci95", "ffn_bytes_fraction", "realized_sparsity", "windows")


def anchor_stage(cfg: RunConfig, masks: str, method: str, sparsity: float,
                 ledger: Ledger | None = None) -> dict:
    """eval.json of one anchor point, reused when it was made from the same settings."""
    from actclust.evaluation.anchor_eval import run_anchor

    out = storage.join(cfg.out, "eval", f"anchor={method}-s={sparsity:g}")
    ecfg = dataclasses.replace(_evaluate_config(cfg, None, out), centroids=None, anchor=method,
                               anchor_sparsity=sparsity, masks=storage.normalize(masks))
    ecfg.validate()
    finished = (eval_store.read_eval(out) or {}).get("identity", {})
    if all(finished.get(key) == getattr(ecfg, key) for key in ANCHOR_IDENTITY):
        return eval_store.read_eval(out)
    start = time.monotonic()
    report = run_anchor(ecfg)
    if ledger is not None:
        # One pass over the held-out windows (dense is the run's baseline) and the
        # dense calibration pass.
        ledger.stage(f"anchor {method} s={sparsity:g}", time.monotonic() - start,
                     report["tokens"] + report["calibration"]["tokens"])
    return report


def anchor_row(report: dict) -> dict:
    row = {key: report.get(key) for key in ANCHOR_COLUMNS}
    row["ffn_bytes_fraction"] = report["ffn_bytes_fraction"]["anchor"]
    row["realized_sparsity"] = report["anchor_realized_sparsity"]
    row["per_window"] = report.get("per_window")  # pairs it with the trials in budgets.md
    return row


def anchor_rows(cfg: RunConfig, masks: str, ledger: Ledger | None = None) -> list[dict]:
    """One row per (anchor, sparsity) of the run, each logged as it lands."""
    rows = []
    for method in cfg.anchors:
        for sparsity in cfg.anchor_sparsity:
            report = anchor_stage(cfg, masks, method, sparsity, ledger)
            rows.append(anchor_row(report))
            log.info("%s s=%.2f: ppl %.3f [%.3f, %.3f] (dense %.3f) at FFN bytes %.3f", method,
                     sparsity, report["anchor_ppl"], *report["anchor_ppl_ci95"],
                     report["dense_ppl"], rows[-1]["ffn_bytes_fraction"])
    return rows


def result_row(report: dict, cluster_meta: dict, neuron_report: dict | None = None) -> dict:
    row = {key: report.get(key) for key in RESULT_COLUMNS}
    for mode, fraction in (report.get("ffn_bytes_fraction") or {}).items():
        if mode != "dense":
            row[f"{mode}_ffn_bytes_fraction"] = fraction
    for key in NEURON_COLUMNS:
        row[key] = (neuron_report or {}).get(key[len(NEURON):])
    if neuron_report is not None:
        row[NEURON + "predicted_ffn_bytes_fraction"] = \
            (neuron_report.get("ffn_bytes_fraction") or {}).get("predicted")
    # Per-window losses pair the trials with each other and the anchors in budgets.md.
    row["per_window"] = report.get("per_window")
    row[NEURON + "per_window"] = (neuron_report or {}).get("per_window")
    row.update(k=cluster_meta["k"], theta=cluster_meta["theta"],
               target_density=cluster_meta.get("density"),
               objective=objective_label(cluster_meta["theta"], cluster_meta.get("density")),
               hit_cap=len(cluster_meta.get("hit_cap", [])),
               algorithm=cluster_meta["algorithm"], cost=cluster_meta["mean_cost"],
               fit_seconds=cluster_meta.get("fit_seconds"),
               bits_by=cluster_meta.get("bits_by") or "frequency",
               per_layer_recall=[p["recall"] for p in report["per_layer"]])
    return row


def run_identity(cfg: RunConfig, masks: str) -> dict:
    """What a results table was computed from (shown in the report)."""
    manifest = mask_store.read_manifest(masks)
    return {"model": cfg.model, "corpus": cfg.corpus, "seq_len": cfg.seq_len,
            "fit_tokens": manifest["tokens"], "eval_max_tokens": cfg.eval_max_tokens,
            "heldout_every": cfg.heldout_every, "dense_prefix": cfg.dense_prefix,
            "mask_mode": cfg.mask_mode, "thresholds": manifest["thresholds"],
            "sites": manifest.get("sites"), "pool_layers": getattr(cfg, "pool_layers", False),
            "sparsity_target": manifest.get("sparsity_target"),
            "threshold": cfg.threshold, "seed": cfg.seed}


def write_results(rows: list[dict], out: str, identity: dict,
                  csv_name: str = "results.csv", anchors: list[dict] | None = None,
                  throughput: dict | None = None) -> None:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(RESULT_COLUMNS))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in RESULT_COLUMNS})
    write_bytes_atomic(buffer.getvalue().encode("utf-8"), storage.join(out, csv_name))
    record = {"identity": identity, "rows": rows, "anchors": anchors or []}
    if throughput is not None:
        record["throughput"] = throughput
    write_json_atomic(record, storage.join(out, "results.json"))


def run_pipeline(cfg: RunConfig) -> str:
    """Run every stage; returns the location of report.html.

    The stages share one set of actors (:func:`run_lived_actors`): the evaluation actors
    load the model once and take each trial's centroids, predictor or anchor per call.
    """
    from actclust.evaluation.report import write_report

    check_predictor_trials(cfg, trial_grid(cfg))
    out = storage.normalize(cfg.out)
    storage.makedirs(out)
    ledger = Ledger()
    with run_lived_actors() if cfg.warm_actors else contextlib.nullcontext():
        masks = extract_stage(cfg, ledger)
        baseline_stage(cfg, masks, ledger)
        measure_floor_rates(cfg, masks, ledger)
        # The anchors need only the masks: first, so that the front has its floors early.
        anchors = anchor_rows(cfg, masks, ledger)
        rows = []
        for point in trial_grid(cfg):
            centroids = cluster_stage(cfg, masks, point, ledger)
            centroids = mass_bits_stage(cfg, centroids, point.name, ledger)
            report, second = trial_evaluation(cfg, centroids, point.name, ledger)
            meta = centroid_store.read_meta(centroids)
            rows.append(result_row(report, meta, second))
            log.info("K=%d %s %s: cluster_ppl %.3f [%.3f, %.3f] (dense %.3f) at effective "
                     "density %.3f, recall %.3f, weighted recall %.3f", point.k,
                     point.objective, point.algorithm,
                     report["cluster_ppl"], *report["cluster_ppl_ci95"], report["dense_ppl"],
                     report["effective_density"], report["recall"], report["weighted_recall"])
    throughput = ledger.close()
    write_results(rows, out, run_identity(cfg, masks), anchors=anchors, throughput=throughput)
    path = write_report(out)
    log.info("report: %s", path)
    return path
