"""Ray Tune sweep over K, the fit objective (theta or density) and the algorithm on one extraction.

The grid is one list of points (k, theta or density, algorithm); with ``static_point``
(default on) every objective also gets a K = 1 hamming-kmeans point, one static mask
per layer: the "no clustering" floor the clusterings are read against.

Each trial fits centroids with the distributed clusterer, trains the configured
predictor kind(s) on them with Ray Train (``predictor: cluster|neuron|both``; see
:func:`actclust.predict.train._scaling` for where its workers run), evaluates with
evaluation actors, then reports ``cluster_ppl``, ``precision``, ``recall``,
``density`` and the fit time through ``tune.report``. A trial declares a
placement group (a small bundle for itself and one bundle per worker actor);
Tune captures the trial's actors into it, so concurrent trials never
oversubscribe the cluster. Trial outputs live at fixed paths under ``out``, so a
retried trial resumes its own checkpoints, and an interrupted sweep resumes with
``Tuner.restore`` when rerun with the same config. ``out`` may be an object-store
URI: Tune's experiment state then lives in the same bucket (``out/tune``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from typing import Optional

from actclust import config as C
from actclust.errors import UserError
from actclust.io import centroid_store, eval_store, outdir, storage
from actclust.io.storage import write_table_atomic
from actclust.orchestration.predictor_stages import mass_bits_stage
from actclust.orchestration.runconfig import RunConfig, TrialPoint
from actclust.runtime.actors import run_lived_actors
from actclust.orchestration.pipeline import (RESULT_COLUMNS, anchor_rows, baseline_stage,
                                             check_predictor_trials, cluster_stage,
                                             extract_stage, neuron_eval_dir, objectives,
                                             result_row, run_identity, trial_evaluation,
                                             trial_grid, write_results)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SweepConfig(RunConfig):
    # What a sweep directory holds: rerun with other values is refused.
    IDENTITY: typing.ClassVar[tuple] = (
        "model", "corpus", "seq_len", "max_tokens", "eval_max_tokens", "heldout_every",
        "sparsity", "threshold", "k", "theta", "density", "algorithm", "seed", "workers",
        "static_point", "dense_prefix", "mask_mode", "sites", "pool_layers", "predictor",
        "predictor_epochs", "neuron_select", "random", "predictor_trials", "grid", "bits_by",
        "top_m")

    out: str = "runs/sweep"
    theta: list = dataclasses.field(default_factory=lambda: [0.5])
    workers: int = 1
    worker_cpus: float = 1.0
    max_concurrent_trials: Optional[int] = None
    max_failures: int = 2
    static_point: bool = True

    def validate(self) -> None:
        super().validate()
        if self.worker_cpus <= 0:
            raise UserError(f"worker_cpus must be > 0, got {self.worker_cpus}")
        if self.max_concurrent_trials is not None:
            C._positive(self.max_concurrent_trials, "max_concurrent_trials")


# Settings whose behaviour before the key existed differs from today's default: every
# trial of such a sweep ran the random-mask pass, mask mode replace and frequency bits.
BEFORE_THE_KEY = {"random": True, "mask_mode": "replace", "bits_by": "frequency"}


def trial(config: dict) -> None:
    """One Tune trial: cluster, evaluate, report. Pure stage calls, no Tune logic."""
    from ray import tune

    # A sweep restored from before a setting existed lacks its key in Tune's saved config.
    cfg = SweepConfig(**{**BEFORE_THE_KEY, **config["sweep"]})
    point = TrialPoint(**config["point"])  # Tune holds it as a dict
    with run_lived_actors():  # the trial's evaluations share their actors
        centroids = cluster_stage(cfg, config["masks"], point)
        centroids = mass_bits_stage(cfg, centroids, point.name)
        report, second = trial_evaluation(cfg, centroids, point.name)
    meta = centroid_store.read_meta(centroids)
    row = result_row(report, meta, second)
    tune.report({key: row[key] for key in RESULT_COLUMNS if row.get(key) is not None}
                | {"per_layer_recall": row["per_layer_recall"], "trial": point.name})


def run_sweep(values: dict, source: str = "config", overrides: dict | None = None) -> str:
    """Run (or resume) the sweep described by ``values``; returns report.html."""
    from ray import tune

    from actclust.runtime.raycluster import init_ray
    from actclust.evaluation.report import write_report

    cfg = C.build(SweepConfig, values, overrides, source)
    check_predictor_trials(cfg, grid_points(cfg))
    out = storage.normalize(cfg.out)
    cfg.out = out
    storage.makedirs(out)
    _check_identity(out, cfg)
    masks = extract_stage(cfg)
    init_ray()
    baseline_stage(cfg, masks)  # before any trial, so that every trial reuses it
    param_space = {
        "point": tune.grid_search([dataclasses.asdict(p) for p in grid_points(cfg)]),
        "masks": masks,
        "sweep": dataclasses.asdict(cfg),
    }
    resources = tune.PlacementGroupFactory(
        [{"CPU": 0.1}] + [{"CPU": cfg.worker_cpus}] * cfg.workers, strategy="PACK")
    trainable = tune.with_resources(trial, resources)
    tune_path, tune_fs = storage.ray_storage(storage.join(out, "tune"))
    if tune.Tuner.can_restore(f"{tune_path}/sweep", storage_filesystem=tune_fs):
        log.info("resuming the sweep in %s", storage.join(out, "tune"))
        tuner = tune.Tuner.restore(f"{tune_path}/sweep", trainable, resume_errored=True,
                                   restart_errored=False, storage_filesystem=tune_fs)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent_trials),
            run_config=tune.RunConfig(
                name="sweep", storage_path=tune_path, storage_filesystem=tune_fs, verbose=0,
                callbacks=[_trial_progress()],
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures)))
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} sweep trial(s) failed; first: {errors[0]}")
    rows = [dict(r.metrics) for r in grid]
    rows = [{**{key: row.get(key) for key in (*RESULT_COLUMNS, "per_layer_recall")},
             **(window_losses(cfg, row["trial"]) if row.get("trial") else {})} for row in rows]
    rows.sort(key=lambda r: (r["algorithm"], r["objective"], r["k"]))
    _write_table(rows, out, masks, cfg, anchor_rows(cfg, masks))
    path = write_report(out)
    log.info("sweep of %d trials done; report: %s", len(rows), path)
    return path


def _trial_progress():
    """A Tune callback that counts finished trials on the progress facility.

    Tune saves it with the experiment and brings it back on restore, so the bar
    is made on the first event (counting trials finished before a restart) and
    never pickled.
    """
    from ray import tune

    from actclust.progress import Progress

    class TrialProgress(tune.Callback):
        def __init__(self):
            self.progress = None

        def __getstate__(self):
            return {**self.__dict__, "progress": None}

        def _bar(self, trials):
            if self.progress is None:
                finished = sum(t.status == "TERMINATED" for t in trials)
                self.progress = Progress(len(trials), "sweep", unit="trials", initial=finished)
            return self.progress

        def on_trial_start(self, iteration, trials, trial, **info):
            self._bar(trials)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._bar(trials).update(1)

        def on_experiment_end(self, trials, **info):
            if self.progress is not None:
                self.progress.close()
                self.progress = None

    return TrialProgress()


def grid_points(cfg: SweepConfig) -> list[TrialPoint]:
    """Every (k, theta, density, algorithm) trial point, static K = 1 points included."""
    points = trial_grid(cfg)
    if cfg.static_point:
        static = [TrialPoint(k=1, algorithm="hamming-kmeans", **obj) for obj in objectives(cfg)]
        points += [p for p in static if p not in points]
    return points


SWEEP_RECORD = "sweep_config.json"


def window_losses(cfg: SweepConfig, trial: str) -> dict:
    """A trial's per-window losses, read from its eval.json(s) rather than passed through
    Tune's results, so that budgets.md pairs the sweep's points as a run's."""
    main = eval_store.read_eval(storage.join(cfg.out, "eval", trial)) or {}
    neuron = eval_store.read_eval(neuron_eval_dir(cfg, trial)) or {}
    return {"per_window": main.get("per_window"), "neuron_per_window": neuron.get("per_window")}


def _check_identity(out: str, cfg: SweepConfig) -> None:
    """Refuse a directory that holds another sweep (same contract as extract).

    A record written before a setting existed lacks its key; that sweep ran with the
    setting's default then (``BEFORE_THE_KEY``, else today's default), so a rerun at that
    value resumes it (the key is added)."""
    current = C.identity(cfg)
    path = storage.join(out, SWEEP_RECORD)
    if storage.is_file(path):
        recorded = storage.read_json_record(path)
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING
                    else f.default_factory() for f in dataclasses.fields(cfg)
                    if f.default is not dataclasses.MISSING
                    or f.default_factory is not dataclasses.MISSING}
        defaults.update(BEFORE_THE_KEY)
        added = {key: value for key, value in current.items()
                 if key not in recorded and key in defaults and value == defaults[key]}
        if added:
            storage.write_json_atomic({**recorded, **added}, path)
    outdir.open_output(out, SWEEP_RECORD, current, "a sweep with other settings",
                       fresh_only=False,
                       hint="use a new out directory (a sweep from before 2026-12-06 resumes "
                            "with mask_mode: replace and bits_by: frequency, its defaults then)")


def _write_table(rows: list[dict], out: str, masks: str, cfg: SweepConfig,
                 anchors: list[dict]) -> None:
    import pyarrow as pa

    identity = run_identity(cfg, masks)
    write_results(rows, out, identity, csv_name="sweep.csv", anchors=anchors)
    table = pa.Table.from_pylist([{k: r.get(k) for k in RESULT_COLUMNS} for r in rows])
    table = table.replace_schema_metadata({"actclust.identity": json.dumps(identity)})
    write_table_atomic(table, storage.join(out, "sweep.parquet"))
