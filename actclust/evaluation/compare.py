"""Paired comparison of operating points evaluated on the same windows: ``actclust compare``.

    actclust compare runs/c/eval:predicted runs/teal/eval runs/wina/eval

Every eval.json keeps its per-window NLL sums (``per_window``). Two evaluations of the
same held-out windows can then be compared window by window: the interval given is the
bootstrap interval of the perplexity *ratio* of each point to the first (the reference),
on the same resampled windows. A ratio interval that excludes 1 separates two methods even
where their own perplexity intervals overlap, since a window hard for one is hard for both.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np

from actclust.errors import UserError
from actclust.evaluation import fronts
from actclust.evaluation.bootstrap import paired_ppl_intervals, paired_ratio_intervals
from actclust.io import eval_store, storage

# The mode a bare DIR names: the operating point its evaluation was run for.
DEFAULT_MODES = ("predicted", "anchor", "cluster")
PER_WINDOW_DEFINITION = ("per held-out window (seq, in order): predicted tokens and each "
                         "mode's NLL sum; actclust compare pairs evaluations of the same "
                         "windows with it")
DEFINITION = ("ratio: perplexity of the point over the reference's on the same held-out "
              "windows; ratio_ci95: percentile bootstrap over windows, both perplexities on "
              "the same resampled windows")


def window_losses(seq, tokens, nll: dict) -> dict:
    """eval.json's ``per_window`` record: window ids, predicted tokens and, per mode, the
    NLL sums, all in window order."""
    return {"seq": [int(s) for s in seq], "tokens": [int(t) for t in tokens],
            "nll": {mode: [float(v) for v in values] for mode, values in nll.items()}}


@dataclasses.dataclass(frozen=True)
class Point:
    """One mode of one evaluation: its per-window losses and FFN bytes."""

    label: str
    mode: str
    seq: tuple
    tokens: np.ndarray  # (W,) predicted tokens per window
    nll: np.ndarray  # (W,) float64 NLL sums
    ffn_bytes_fraction: float | None
    protocol: dict
    method: str = ""  # the series it belongs to on a front: fronts' names ("teal", ...)
    dense_ppl: float | None = None

    @property
    def ppl(self) -> float:
        return math.exp(self.nll.sum() / self.tokens.sum())


def load_point(spec: str) -> Point:
    """``DIR[:MODE]``: the evaluation in DIR (the directory of an eval.json, or the file),
    its MODE or else its predicted, anchor or cluster mode."""
    where, _, mode = spec.rpartition(":") if _names_mode(spec) else (spec, "", "")
    directory = where[:-len(eval_store.EVAL_FILE)] if where.endswith(eval_store.EVAL_FILE) \
        else where
    report = eval_store.read_eval(directory)
    if report is None:
        raise UserError(f"{where} holds no eval.json (run actclust evaluate with --out there)")
    record = report.get("per_window")
    if not record:
        raise UserError(f"{where}/eval.json keeps no per-window losses (written by an older "
                        "actclust); evaluate it again to compare it")
    modes = record["nll"]
    if not mode:
        mode = next((m for m in DEFAULT_MODES if m in modes), None)
        if mode is None:
            raise UserError(f"{where}/eval.json has none of the modes "
                            f"{', '.join(DEFAULT_MODES)}; name one: {where}:MODE")
    if mode not in modes:
        raise UserError(f"{where}/eval.json has no mode {mode!r}; it has "
                        f"{', '.join(sorted(modes))}")
    fraction = (report.get("ffn_bytes_fraction") or {}).get(mode)
    return Point(label=f"{where}:{mode}", mode=mode, seq=tuple(record["seq"]),
                 tokens=np.asarray(record["tokens"], dtype=np.float64),
                 nll=np.asarray(modes[mode], dtype=np.float64),
                 ffn_bytes_fraction=None if fraction is None else float(fraction),
                 protocol=_protocol(report), method=point_method(report, mode),
                 dense_ppl=report.get("dense_ppl"))


def point_method(report: dict, mode: str) -> str:
    """The front's series of one mode of an evaluation: "predicted cluster" (" top-M" for
    a union), "neuron predictor", the anchor ("teal", " per-layer" with a per-layer
    budget), the cluster pass's upper bound (static for K = 1), or the mode itself."""
    if mode == "predicted":
        if report.get("predictor_kind") == "neuron":
            return "neuron predictor"
        top = report.get("top_m") or 1
        return "predicted cluster" + (f" top-{top}" if top > 1 else "")
    if mode == "anchor":
        return report.get("anchor", "anchor") + (" per-layer" if report.get("anchor_allocation")
                                                 else "")
    if mode == "cluster":
        static = report.get("k") == 1  # one centroid, known before the FFN runs
        return "static" if static else fronts.UPPER_BOUND
    return mode


def _names_mode(spec: str) -> bool:
    head, sep, tail = spec.rpartition(":")
    return bool(sep and head and tail and "/" not in tail and not tail.endswith(".json"))


def _protocol(report: dict) -> dict:
    """What must match for two evaluations' windows to pair."""
    ident = report.get("identity", {})
    return {key: ident.get(key) for key in ("model", "corpus", "seq_len", "heldout_every",
                                            "dense_prefix", "split")}


def compare(points: list[Point], resamples: int = 1000, seed: int = 0) -> dict:
    """Each point's perplexity and interval, and its ratio to ``points[0]`` with the paired
    interval; refuses points not evaluated on the same windows."""
    if len(points) < 2:
        raise UserError("compare needs at least two evaluations: a reference and another")
    reference = points[0]
    for p in points[1:]:
        if p.seq != reference.seq or not np.array_equal(p.tokens, reference.tokens):
            raise UserError(f"{p.label} was evaluated on other windows than {reference.label} "
                            f"({len(p.seq)} vs {len(reference.seq)} windows); compare "
                            "evaluations of the same held-out windows")
        diff = [k for k in reference.protocol if p.protocol[k] != reference.protocol[k]]
        if diff:
            raise UserError(f"{p.label} differs from {reference.label} in "
                            f"{', '.join(diff)}; compare evaluations under one protocol")
    nll = {p.label: p.nll for p in points}
    own = paired_ppl_intervals(nll, reference.tokens, resamples=resamples, seed=seed)
    ratios = paired_ratio_intervals(nll, reference.nll, reference.tokens, resamples=resamples,
                                    seed=seed)
    rows = [{"point": p.label, "ppl": p.ppl, "ppl_ci95": list(own[p.label]),
             "ffn_bytes_fraction": p.ffn_bytes_fraction,
             "ratio": ratios[p.label][0], "ratio_ci95": list(ratios[p.label][1:]),
             "verdict": _verdict(*ratios[p.label][1:]) if p is not reference else "reference"}
            for p in points]
    return {"reference": reference.label, "windows": len(reference.seq),
            "bootstrap": {"unit": "window", "resamples": resamples, "seed": seed,
                          "paired": True},
            "points": rows, "definition": DEFINITION}


def _verdict(lo: float, hi: float) -> str:
    if hi < 1.0:
        return "lower"
    if lo > 1.0:
        return "higher"
    return "not separated"


def format_table(result: dict) -> str:
    """The comparison as a Markdown table, the reference first."""
    lines = [f"paired over {result['windows']} windows, {result['bootstrap']['resamples']} "
             "resamples; ratio = ppl / reference ppl",
             "| point | ppl [95%] | FFN bytes | ratio [95%] | vs reference |",
             "|---|---|---|---|---|"]
    for r in result["points"]:
        lo, hi = r["ppl_ci95"]
        rlo, rhi = r["ratio_ci95"]
        nbytes = "–" if r["ffn_bytes_fraction"] is None else f"{r['ffn_bytes_fraction']:.3f}"
        lines.append(f"| {r['point']} | {r['ppl']:.2f} [{lo:.2f}, {hi:.2f}] | {nbytes} | "
                     f"{r['ratio']:.3f} [{rlo:.3f}, {rhi:.3f}] | {r['verdict']} |")
    return "\n".join(lines)


def render_front(points: list[Point], result: dict) -> bytes:
    """The compared points as a front: perplexity with its interval against FFN bytes, one
    series per method, dense as a line; the PNG's bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = [{"method": p.method, "label": p.label, "ffn_bytes_fraction": p.ffn_bytes_fraction,
              "ppl": row["ppl"], "ppl_ci95": row["ppl_ci95"]}
             for p, row in zip(points, result["points"])
             if p.ffn_bytes_fraction is not None and p.mode != "dense"]
    if not found:
        raise UserError("--plot needs at least one point with FFN bytes besides dense")
    dense = next((p.dense_ppl for p in points if p.dense_ppl is not None), None)
    png = io.BytesIO()

    def save(fig, _name):
        fig.savefig(png, format="png", dpi=110)
        plt.close(fig)

    fronts.plot(found, {"dense_ppl": dense}, plt, save)
    return png.getvalue()


def run_compare(specs: list[str], out: str | None = None, resamples: int = 1000,
                seed: int = 0, plot: str | None = None) -> dict:
    """Load, compare, optionally write ``out`` (JSON) and ``plot`` (PNG), each atomically
    and only once both are ready; returns the result."""
    if resamples < 1:
        raise UserError(f"resamples must be at least 1, got {resamples}")
    points = [load_point(s) for s in specs]
    result = compare(points, resamples=resamples, seed=seed)
    png = render_front(points, result) if plot is not None else None
    if out is not None:
        storage.write_json_atomic(result, out)
    if png is not None:
        storage.write_bytes_atomic(png, plot)
    return result
