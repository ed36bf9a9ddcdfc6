"""The per-trial stages before a trial's evaluation that concern its predictors: the run's
shared features, the centroid bits by activation mass (``bits_by``) and Ray Train."""

from __future__ import annotations

import time

from actclust import config as C
from actclust.io import centroid_store, predictor_store, storage
from actclust.orchestration.ledger import Ledger
from actclust.orchestration.runconfig import RunConfig
from actclust.runtime.actors import release_all

PREDICTOR_KINDS = {"none": (), "cluster": ("cluster",), "neuron": ("neuron",),
                   "both": ("cluster", "neuron")}


def gets_predictor(cfg: RunConfig, name: str) -> bool:
    return cfg.predictor != "none" and (not cfg.predictor_trials or name in cfg.predictor_trials)


def uses_mass_bits(cfg: RunConfig, name: str) -> bool:
    return cfg.bits_by == "activation_mass" and gets_predictor(cfg, name)


def mass_bits_stage(cfg: RunConfig, centroids: str, name: str,
                    ledger: Ledger | None = None) -> str:
    """The centroids a trial's predictors and evaluation use: with ``bits_by:
    activation_mass``, a trial that gets a predictor takes ``actclust mass-bits`` of its
    fitted centroids (in OUT/mass-bits/<trial>), after the run's features are written;
    otherwise the fitted centroids."""
    from actclust.predict.mass import run_mass_bits
    from actclust.predict.train import write_features

    if not uses_mass_bits(cfg, name):
        return centroids
    out = storage.join(cfg.out, "mass-bits", name)
    if centroid_store.is_finished(out):
        return out
    start = time.monotonic()
    written = write_features(centroids, features_dir(cfg))
    run_mass_bits(C.build(C.MassBitsConfig, dict(centroids=centroids, features=features_dir(cfg),
                                                 out=out)))
    if ledger is not None:
        # The features pass forwards the fitting windows (once per run); mass-bits runs
        # each layer's FFN alone on its stored inputs, which the floor does not count.
        tokens = centroid_store.read_meta(centroids)["tokens"] if written else 0
        ledger.stage(f"mass-bits {name}", time.monotonic() - start, tokens)
    return out


def features_dir(cfg: RunConfig) -> str:
    """The run's predictor features: FFN inputs and true masks of the fitting windows, which
    depend only on the model and the windows, so every trial's predictors share them."""
    return storage.join(cfg.out, "predictors", "features")


def predictor_stage(cfg: RunConfig, centroids: str, name: str,
                    ledger: Ledger | None = None) -> dict:
    """Train the run's predictor kind(s) on one trial's centroids (Ray Train); {kind: dir}."""
    from actclust.predict.train import run_train_predictor

    trained = {}
    if not gets_predictor(cfg, name):
        return trained
    # Predictors of mass bits live apart: a rerun with the other bits_by trains its own.
    folder = f"{name}-mass" if uses_mass_bits(cfg, name) else name
    for kind in PREDICTOR_KINDS[cfg.predictor]:
        out = storage.join(cfg.out, "predictors", folder, kind)
        if not predictor_store.is_finished(out):
            release_all()  # Ray Train places its own workers on the whole cluster
        start = time.monotonic()
        features_claimed = storage.is_file(storage.join(features_dir(cfg),
                                                        predictor_store.FEATURES_RECORD))
        reused = predictor_store.is_finished(out)
        run_train_predictor(C.build(C.PredictorConfig, dict(
            centroids=centroids, out=out, kind=kind, epochs=cfg.predictor_epochs,
            workers=cfg.workers, seed=cfg.seed, features=features_dir(cfg))))
        if ledger is not None and not reused:
            # The first predictor of a run forwards the fitting windows once for the features.
            tokens = 0 if features_claimed else centroid_store.read_meta(centroids)["tokens"]
            ledger.stage(f"train-predictor {name} {kind}", time.monotonic() - start, tokens)
        trained[kind] = out
    return trained
