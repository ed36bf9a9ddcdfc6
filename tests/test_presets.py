"""Every job preset builds a valid configuration, and names only trials of its own grid."""

import re
from pathlib import Path

import pytest
import yaml

from actclust import config as C
from actclust.errors import UserError
from actclust.orchestration.pipeline import check_predictor_trials, trial_grid
from actclust.orchestration.sweep import SweepConfig, grid_points

PRESETS = sorted((Path(__file__).resolve().parent.parent / "jobs" / "presets").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_builds_and_names_only_its_own_trials(preset):
    cfg = C.build(SweepConfig, yaml.safe_load(preset.read_text()), source=str(preset))
    points = grid_points(cfg)
    assert points and len({p.name for p in points}) == len(points)
    check_predictor_trials(cfg, points)
    check_predictor_trials(cfg, trial_grid(cfg))  # actclust run: no static K = 1 points


def test_compass_covers_every_algorithm_with_predictors_on_two_trials():
    cfg = C.build(SweepConfig, yaml.safe_load(
        (PRESETS[0].parent / "compass.yaml").read_text()))
    names = [p.name for p in trial_grid(cfg)]
    hamming = [f"k={k}-theta={t}" for t in (0.5, 0.3) for k in (1, 16, 64, 256, 1024)]
    density = [f"k={k}-density={d}" for d in (0.4, 0.5, 0.6, 0.7) for k in (1, 1024)]
    baselines = [f"k={k}-theta=0.5-{a}" for a in ("brb-kmeans", "activation-aware")
                 for k in (16, 256, 1024)]
    assert names == hamming + density + baselines
    assert cfg.predictor == "both" and cfg.predictor_trials == \
        ["k=256-theta=0.5", "k=1024-density=0.5"]
    assert cfg.max_tokens is None and cfg.eval_max_tokens is None and not cfg.random
    assert cfg.anchors == ["teal", "cats", "wina"]
    assert cfg.anchor_sparsity == [0.3, 0.4, 0.5, 0.6, 0.7]


def test_grid_blocks_are_products_of_their_own_lists():
    cfg = C.build(SweepConfig, dict(k=[8], theta=[0.5], grid=[
        {"k": [4, 16]},  # theta from the top level
        {"k": [16], "density": [0.4]},  # density only: no theta trial
        {"k": [4, 16]}]))  # a trial named twice runs once
    assert [p.name for p in trial_grid(cfg)] == [
        "k=4-theta=0.5", "k=16-theta=0.5", "k=16-density=0.4"]
    # The sweep's static points cover every objective of the blocks.
    assert {p.name for p in grid_points(cfg)} >= {"k=1-theta=0.5", "k=1-density=0.4"}


@pytest.mark.parametrize("grid, fragment", [
    ({"k": [4]}, "grid in config must be list"),
    ([{"k": [4], "seed": 1}], "a grid block takes only k, theta, density, algorithm"),
    ([["k", 4]], "a grid block takes only"),
    ([{"k": [0]}], "k must be a list of positive integers"),
    ([{"theta": [1.5]}], "theta must be a list of values in (0, 1]"),
])
def test_a_bad_grid_block_is_refused_in_one_line(grid, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        C.build(SweepConfig, dict(grid=grid))


def test_fit_macs_counts_every_layer_at_its_sites_width():
    from actclust.orchestration.ledger import fit_macs

    one_site = {"d_ff": 10, "iterations": {"0": 2, "1": 3}, "tokens": 4, "k": 5}
    assert fit_macs(one_site) == (2 + 3) * 4 * 5 * 10
    sites = {"d_ff": {"gate": 10, "up": 20}, "iterations": {"gate:0": 2, "up:0": 3},
             "tokens": 4, "k": 5}
    assert fit_macs(sites) == (2 * 10 + 3 * 20) * 4 * 5


@pytest.mark.parametrize("settings, bits_by", [
    ({"predictor": "cluster"}, "activation_mass"), ({"predictor": "both"}, "activation_mass"),
    ({}, "frequency"), ({"predictor": "neuron"}, "frequency"),
    ({"predictor": "cluster", "bits_by": "frequency"}, "frequency"),
    ({"predictor": "cluster", "pool_layers": True, "algorithm": ["brb-kmeans"]}, "frequency")])
def test_the_levers_that_pay_at_every_budget_are_the_defaults(settings, bits_by):
    """Mask mode and, and mass bits wherever a cluster predictor is trained."""
    from actclust.orchestration.runconfig import RunConfig

    cfg = C.build(RunConfig, settings)
    assert cfg.bits_by == bits_by and cfg.mask_mode == "and"
    assert C.EvaluateConfig().mask_mode == "and"
