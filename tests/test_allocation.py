"""Per-layer density budgets: the greedy search by hand and against exhaustive search, and
the layer error against a direct computation."""

import itertools

import numpy as np
import pytest
import torch

from actclust.errors import UserError
from actclust.evaluation import ffn_bytes
from actclust.io import mask_store
from actclust.kernels import assign_scored
from actclust import budget as B
from actclust.evaluation.anchor_allocation import teal_layer_errors
from actclust.io.models import ffn_projections, load_model, residual_energy
from actclust.predict import allocation as A


def test_greedy_spends_the_budget_where_error_is_cheapest():
    # Two layers, three candidates each; layer 0 loses little by going sparse.
    errors = np.array([[0.02, 0.01, 0.0], [0.9, 0.3, 0.0]])
    nbytes = np.array([[0.2, 0.5, 0.8], [0.2, 0.5, 0.8]])
    assert B.greedy(errors, nbytes, 0.8).tolist() == [2, 2]
    assert B.greedy(errors, nbytes, 0.65).tolist() == [1, 2]
    assert B.greedy(errors, nbytes, 0.5).tolist() == [0, 2]
    assert B.greedy(errors, nbytes, 0.35).tolist() == [0, 1]
    with pytest.raises(UserError, match="below the sparsest"):
        B.greedy(errors, nbytes, 0.1)


def test_greedy_passes_over_candidates_that_save_no_bytes():
    # Layer 0's two densest candidates read the same bytes (centroids clipped at full
    # width): its step from the top goes straight to the candidate that saves bytes, which
    # is far cheaper in error than stepping layer 1 down.
    errors = np.array([[0.5, 0.01, 0.0, 0.0], [0.9, 0.6, 0.3, 0.0]])
    nbytes = np.array([[0.2, 0.5, 0.8, 0.8], [0.2, 0.4, 0.6, 0.8]])
    assert B.greedy(errors, nbytes, 0.65).tolist() == [1, 3]
    assert B.greedy(errors, nbytes, 0.2).tolist() == [0, 0]


def test_greedy_meets_the_budget_and_is_within_one_step_of_the_exhaustive_optimum():
    rng = np.random.default_rng(4)
    for _ in range(20):
        layers, grid = 4, 5
        # Bytes even in the candidate's density, errors convex in it (falling, flattening),
        # as dropped activation mass gives.
        nbytes = rng.uniform(0.1, 0.3, (layers, 1)) + rng.uniform(0.1, 0.2, (layers, 1)) \
            * np.arange(grid)
        steps = np.sort(rng.uniform(0, 1, (layers, grid - 1)), axis=1)[:, ::-1]
        errors = np.concatenate([np.cumsum(steps[:, ::-1], axis=1)[:, ::-1],
                                 np.zeros((layers, 1))], axis=1)
        weights = rng.uniform(1, 3, layers)
        share = weights / weights.sum()
        budget = float(share @ nbytes[:, 0] + rng.uniform(0.05, 0.4))
        pick = B.greedy(errors, nbytes, budget, weights)
        rows = np.arange(layers)
        assert share @ nbytes[rows, pick] <= budget + 1e-12
        best = min(errors[rows, list(p)].sum()
                   for p in itertools.product(range(grid), repeat=layers)
                   if share @ nbytes[rows, list(p)] <= budget + 1e-12)
        # A knapsack: greedy by marginal cost can overshoot by its last steps, no more.
        assert best <= errors[rows, pick].sum() <= best + 2 * steps.max()


def test_mass_centroids_take_the_density_and_fill_memberless_clusters():
    mass = np.array([[5.0, 0, 3, 1], [0, 0, 0, 0], [1, 2, 0, 4]])
    got = A.mass_centroids(mass, 0.5)
    assert got.sum(axis=1).tolist() == [2, 2, 2]
    assert np.flatnonzero(got[0]).tolist() == [0, 2]
    assert np.flatnonzero(got[1]).tolist() == [0, 3]  # the layer's whole mass: 6, 2, 3, 5
    assert np.flatnonzero(got[2]).tolist() == [1, 3]


def test_scaled_counts_keep_the_fitted_shape_at_the_layer_density():
    fitted = np.array([10, 20, 30, 60])  # mean 30 of width 100
    assert A.scaled_counts(fitted, 0.15, 100).tolist() == [5, 10, 15, 30]
    # 60 is clipped at 100, so the others scale further: (10 + 20 + 30) s + 100 = 4 * 60.
    assert A.scaled_counts(fitted, 0.6, 100).tolist() == [23, 47, 70, 100]
    assert A.scaled_counts(fitted, 1.0, 100).tolist() == [100] * 4
    assert A.scaled_counts(np.array([0, 3]), 0.01, 100).tolist() == [1, 1]  # never empty
    mass = np.arange(400, dtype=float).reshape(4, 100)
    got = A.mass_centroids(mass, 0.15, fitted)
    assert got.sum(axis=1).tolist() == [5, 10, 15, 30]
    assert got[3, -30:].all()  # the largest mass


@pytest.mark.parametrize("mask_mode,counts", [("and", "equal"), ("replace", "equal"),
                                              ("and", "fitted")])
def test_layer_error_equals_a_direct_computation(mask_mode, counts):
    rng = np.random.default_rng(1)
    n, width, d_model, k = 300, 48, 16, 5
    a = rng.normal(size=(n, width)).astype(np.float32)
    truth = np.abs(a) > 0.6
    mass = rng.uniform(0, 1, (k, width))
    w_down = torch.from_numpy(rng.normal(size=(d_model, width)).astype(np.float32))
    fitted = np.array([5, 10, 15, 20, 25]) if counts == "fitted" else None
    grid = (0.25, 0.5, 1.0)
    errors, in_shares, kept_shares = A.layer_errors(a, mask_store.pack(truth), mass, None,
                                                    w_down, grid, mask_mode, fitted)
    w = w_down.numpy().astype(np.float64)
    for density, err, in_share, kept_share in zip(grid, errors, in_shares, kept_shares):
        cents = np.zeros((k, width), dtype=bool)
        # Fitted mean 15 of 48: scaled by 0.8, 1.6, and at 1.0 every centroid full.
        sizes = np.full(k, round(density * width)) if fitted is None else {
            0.25: fitted * 0.8, 0.5: fitted * 1.6, 1.0: np.full(k, width)}[density]
        for j, size in enumerate(sizes.astype(int)):
            cents[j, np.argsort(-mass[j])[:size]] = True
        labels, _ = assign_scored(mask_store.pack(truth), mask_store.pack(cents))
        keep = cents[labels] & truth if mask_mode == "and" else cents[labels]
        want = np.square((a * ~keep).astype(np.float64) @ w.T).sum() / n
        assert err == pytest.approx(want, rel=1e-4)
        assert in_share == pytest.approx(cents[labels].mean())
        assert kept_share == pytest.approx(keep.mean())
    assert errors[-1] == (pytest.approx(np.square((a * ~truth) @ w.T).sum() / n, rel=1e-4)
                          if mask_mode == "and" else 0.0)
    assert errors[0] > errors[1] > errors[2]


def test_layer_bytes_read_gate_and_up_at_the_centroid_share_and_down_at_the_kept_share():
    weights = {"gate": 100, "up": 100, "down": 100}
    got = B.layer_bytes(weights, (0.4, 0.8), np.array([0.2, 0.5]))
    assert got.tolist() == pytest.approx([(0.4 + 0.4 + 0.2) / 3, (0.8 + 0.8 + 0.5) / 3])
    got = B.layer_bytes(weights, (0.4,), (0.4,))
    assert got.tolist() == pytest.approx([0.4])
    assert got[0] == ffn_bytes.fraction([weights], {0: ffn_bytes.split_reads(0.4, 0.4)})


def test_teal_layer_error_equals_a_direct_computation():
    proj = ffn_projections(load_model("tiny:llama").model)[0]
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(200, 64)).astype(np.float32))
    errors, kept = teal_layer_errors(proj, x, grid=(0.5, 1.0))
    assert errors[1] == 0.0 and kept[1].tolist() == [1.0, 1.0]
    with torch.inference_mode():
        h = proj.act(proj.gate(x)) * proj.up(x)
        y = proj.down(h)
        xs = x * (x.abs() > np.quantile(x.abs().numpy(), 0.5))
        hs = proj.act(proj.gate(xs)) * proj.up(xs)
        hs = hs * (hs.abs() > np.quantile(h.abs().numpy(), 0.5))
        want = float((proj.down(hs) - y).square().sum() / len(x))
    assert errors[0] == pytest.approx(want, rel=1e-5)
    assert kept[0] == pytest.approx([0.5, float((hs != 0).float().mean())], abs=1e-3)


def test_residual_energy_is_the_mean_squared_norm_entering_each_layer():
    model = load_model("tiny:llama").model
    ids = np.random.default_rng(0).integers(0, 200, size=(3, 12))
    seen = {}
    layers = model.model.layers
    handles = [layer.register_forward_pre_hook(
        lambda mod, args, kwargs, i=i: seen.__setitem__(i, args[0] if args
                                                        else kwargs["hidden_states"]),
        with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.inference_mode():
        model(torch.from_numpy(ids))
    for h in handles:
        h.remove()
    got = residual_energy(model, ids, dense_prefix=2, batch_windows=2)
    for i in range(len(layers)):
        want = float(seen[i][:, 2:].double().square().sum(-1).mean())
        assert got[i] == pytest.approx(want, rel=1e-5)
