"""The whole pipeline: extract -> cluster (for each K and objective: theta or density) -> evaluate -> report.

Layout of ``out``::

    out/masks/                      actclust extract (fitting windows)
    out/clusters/k=<K>-theta=<t>/   actclust cluster (k=<K>-density=<D>/ in density mode)
    out/eval/k=<K>-theta=<t>/       actclust evaluate (held-out windows)
    out/results.csv, results.json   one row per (K, objective)
    out/report.html, plots/         actclust report

``out`` is a local directory or an object-store URI (``s3://bucket/run``). Every
stage is resumable, so rerunning the same command finishes what a killed run
started and reuses what it finished.
"""

from __future__ import annotations

import logging

from actclust import config as C
from actclust.io import centroid_store, eval_store, mask_store, storage
from actclust.io.storage import write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

RESULT_COLUMNS = ("k", "theta", "target_density", "objective", "algorithm", "dense_ppl", "oracle_ppl", "cluster_ppl",
                  "random_ppl", "precision", "recall", "f1", "accuracy", "density",
                  "true_density", "cost", "fit_seconds", "hit_cap", "tokens")


def objectives(cfg: C.RunConfig) -> list[dict]:
    """The fit objectives a run covers: each theta, then each density."""
    thetas = cfg.theta if isinstance(cfg.theta, list) else [cfg.theta]
    return [{"theta": t, "density": None} for t in thetas] + \
        [{"theta": None, "density": d} for d in getattr(cfg, "density", None) or []]


def objective_label(theta: float | None, density: float | None) -> str:
    return f"density={density:g}" if density is not None else f"theta={theta:g}"


def trial_name(k: int, theta: float | None, algorithm: str = "hamming-kmeans",
               density: float | None = None) -> str:
    suffix = "" if algorithm == "hamming-kmeans" else f"-{algorithm}"
    return f"k={k}-{objective_label(theta, density)}{suffix}"


def extract_stage(cfg: C.RunConfig) -> str:
    from actclust.capture.extract import run_extract

    masks = storage.join(cfg.out, "masks")
    if storage.is_file(storage.join(masks, mask_store.MANIFEST)):
        manifest = mask_store.read_manifest(masks)
        if all(s["status"] == mask_store.COMPLETE for s in manifest["shards"]):
            log.info("masks already extracted in %s", masks)
            return masks
    ecfg = C.build(C.ExtractConfig, dict(
        model=cfg.model, corpus=cfg.corpus, seq_len=cfg.seq_len, max_tokens=cfg.max_tokens,
        sparsity=cfg.sparsity, threshold=cfg.threshold, workers=cfg.workers, out=masks))
    run_extract(ecfg)
    return masks


def cluster_stage(cfg: C.RunConfig, masks: str, k: int, theta: float | None, algorithm: str,
                  density: float | None = None) -> str:
    from actclust.clustering.distributed import run_cluster

    out = storage.join(cfg.out, "clusters", trial_name(k, theta, algorithm, density))
    if centroid_store.is_finished(out):
        return out
    ccfg = C.build(C.ClusterConfig, dict(masks=masks, k=k, theta=theta, density=density,
                                         seed=cfg.seed, workers=cfg.workers,
                                         algorithm=algorithm, out=out))
    run_cluster(ccfg)
    return out


def evaluate_stage(cfg: C.RunConfig, centroids: str, name: str) -> dict:
    from actclust.evaluation.evaluate import run_evaluate

    out = storage.join(cfg.out, "eval", name)
    finished = eval_store.read_eval(out)
    if finished is not None:
        return finished
    ecfg = C.build(C.EvaluateConfig, dict(centroids=centroids, out=out,
                                          max_tokens=cfg.eval_max_tokens, workers=cfg.workers,
                                          seed=cfg.seed))
    return run_evaluate(ecfg)


def result_row(report: dict, cluster_meta: dict) -> dict:
    row = {key: report.get(key) for key in RESULT_COLUMNS}
    row.update(k=cluster_meta["k"], theta=cluster_meta["theta"],
               target_density=cluster_meta.get("density"),
               objective=objective_label(cluster_meta["theta"], cluster_meta.get("density")),
               hit_cap=len(cluster_meta.get("hit_cap", [])),
               algorithm=cluster_meta["algorithm"], cost=cluster_meta["mean_cost"],
               fit_seconds=cluster_meta.get("fit_seconds"),
               per_layer_recall=[p["recall"] for p in report["per_layer"]])
    return row


def run_identity(cfg: C.RunConfig, masks: str) -> dict:
    """What a results table was computed from (shown in the report)."""
    manifest = mask_store.read_manifest(masks)
    return {"model": cfg.model, "corpus": cfg.corpus, "seq_len": cfg.seq_len,
            "fit_tokens": manifest["tokens"], "eval_max_tokens": cfg.eval_max_tokens,
            "thresholds": manifest["thresholds"], "sites": manifest.get("sites"),
            "sparsity": cfg.sparsity, "threshold": cfg.threshold, "seed": cfg.seed}


def write_results(rows: list[dict], out: str, identity: dict,
                  csv_name: str = "results.csv") -> None:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(RESULT_COLUMNS))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in RESULT_COLUMNS})
    write_bytes_atomic(buffer.getvalue().encode("utf-8"), storage.join(out, csv_name))
    write_json_atomic({"identity": identity, "rows": rows}, storage.join(out, "results.json"))


def run_pipeline(cfg: C.RunConfig) -> str:
    """Run every stage; returns the location of report.html."""
    from actclust.evaluation.report import write_report

    out = storage.normalize(cfg.out)
    storage.makedirs(out)
    masks = extract_stage(cfg)
    rows = []
    for objective in objectives(cfg):
        for k in cfg.k:
            name = trial_name(k, algorithm=cfg.algorithm, **objective)
            centroids = cluster_stage(cfg, masks, k, algorithm=cfg.algorithm, **objective)
            report = evaluate_stage(cfg, centroids, name)
            meta = centroid_store.read_meta(centroids)
            rows.append(result_row(report, meta))
            log.info("K=%d %s: cluster_ppl %.3f (dense %.3f), precision %.3f, recall %.3f",
                     k, objective_label(**objective), report["cluster_ppl"], report["dense_ppl"],
                     report["precision"], report["recall"])
    write_results(rows, out, run_identity(cfg, masks))
    path = write_report(out)
    log.info("report: %s", path)
    return path
