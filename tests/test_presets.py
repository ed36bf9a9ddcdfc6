"""Every job preset builds a valid configuration, and names only trials of its own grid."""

from pathlib import Path

import pytest
import yaml

from actclust import config as C
from actclust.orchestration.pipeline import check_predictor_trials, trial_grid, trial_name
from actclust.orchestration.sweep import SweepConfig, grid_points

PRESETS = sorted((Path(__file__).resolve().parent.parent / "jobs" / "presets").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_builds_and_names_only_its_own_trials(preset):
    cfg = C.build(SweepConfig, yaml.safe_load(preset.read_text()), source=str(preset))
    points = grid_points(cfg)
    assert points and len({trial_name(**p) for p in points}) == len(points)
    check_predictor_trials(cfg, points)
    check_predictor_trials(cfg, trial_grid(cfg))  # actclust run: no static K = 1 points


def test_compass_covers_every_algorithm_with_predictors_on_two_trials():
    cfg = C.build(SweepConfig, yaml.safe_load(
        (PRESETS[0].parent / "compass.yaml").read_text()))
    names = {trial_name(**p) for p in trial_grid(cfg)}
    assert {"k=1024-theta=0.5", "k=256-theta=0.5-brb-kmeans",
            "k=1024-theta=0.5-activation-aware"} <= names
    assert cfg.predictor == "both" and sorted(cfg.predictor_trials) == \
        ["k=1024-theta=0.5", "k=256-theta=0.5"]
    assert cfg.max_tokens is None and cfg.eval_max_tokens is None and not cfg.random
