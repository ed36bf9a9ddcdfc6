"""The compute-fair front: perplexity against FFN weight bytes read per token, and the best
perplexity of each method within fixed byte budgets.

A point is an *operating point* when its mask is known before the FFN runs (predicted
cluster, neuron predictor, static K = 1 in mask mode replace, the anchors); cluster points
with the oracle assignment need the true mask and are drawn as upper bounds only.

Within a budget the winner is separated from the runner-up by the paired bootstrap interval
of their perplexity ratio when both points keep per-window losses of the same windows
(eval.json's ``per_window``, carried into the results rows), and by their own intervals
otherwise (rows written by an older actclust).
"""

from __future__ import annotations

import numpy as np

from actclust.evaluation.bootstrap import paired_ratio_intervals

BUDGETS = (0.4, 0.5, 0.6, 0.7)
MASS_BITS = " mass bits"  # after the objective of a trial whose bits are by activation mass
OPERATING = ("predicted cluster", "neuron predictor", "teal", "cats", "wina", "static")
UPPER_BOUND = "cluster (oracle assignment)"


def fit_objective(row: dict) -> str:
    """"theta=0.5", "density=0.4 mass bits": a row's fit objective and its centroid bits."""
    mass = MASS_BITS if row.get("bits_by") == "activation_mass" else ""
    return f"{row.get('objective') or ''}{mass}"


def _point(method: str, label: str, fraction, ppl, ci95, per_window: dict | None = None,
           mode: str | None = None) -> dict | None:
    if fraction is None or ppl is None:
        return None
    losses = None
    if per_window and mode in per_window.get("nll", {}):
        losses = {"seq": list(per_window["seq"]), "tokens": list(per_window["tokens"]),
                  "nll": list(per_window["nll"][mode])}
    return {"method": method, "label": label, "ffn_bytes_fraction": float(fraction),
            "ppl": float(ppl), "ppl_ci95": list(ci95) if ci95 else None, "losses": losses}


def points(rows: list[dict], anchors: list[dict]) -> list[dict]:
    """Every point of a results table by FFN bytes: trials, their predictors, anchors."""
    found = []
    for r in rows:
        name = f"K={r['k']} {fit_objective(r)} {r.get('algorithm')}".strip()
        static = r["k"] == 1  # one centroid, known before the FFN runs
        found.append(_point("static" if static else UPPER_BOUND, name,
                            r.get("cluster_ffn_bytes_fraction"), r.get("cluster_ppl"),
                            r.get("cluster_ppl_ci95"), r.get("per_window"), "cluster"))
        kind = r.get("predictor_kind")
        if kind:
            method = "predicted cluster" if kind == "cluster" else "neuron predictor"
            union = f" top-{r['top_m']}" if kind == "cluster" and (r.get("top_m") or 1) > 1 \
                else ""
            found.append(_point(method, name + union, r.get("predicted_ffn_bytes_fraction"),
                                r.get("predicted_ppl"), r.get("predicted_ppl_ci95"),
                                r.get("per_window"), "predicted"))
        found.append(_point("neuron predictor", name,
                            r.get("neuron_predicted_ffn_bytes_fraction"),
                            r.get("neuron_predicted_ppl"), r.get("neuron_predicted_ppl_ci95"),
                            r.get("neuron_per_window"), "predicted"))
    for a in anchors:
        greedy = " greedy" if a.get("anchor_allocation") else ""
        found.append(_point(a["anchor"], f"s={a['anchor_sparsity']:g}{greedy}",
                            a["ffn_bytes_fraction"], a["anchor_ppl"], a.get("anchor_ppl_ci95"),
                            a.get("per_window"), "anchor"))
    return [p for p in found if p is not None]


def paired_ratio(first: dict, second: dict) -> tuple[float, float, float] | None:
    """(ratio, lo, hi): the perplexity of ``first`` over ``second``'s with its paired
    bootstrap interval over windows (1000 resamples, seed 0: ``actclust compare``'s
    defaults); None unless both keep the losses of the same windows."""
    a, b = first.get("losses"), second.get("losses")
    if not a or not b or a["seq"] != b["seq"] or a["tokens"] != b["tokens"]:
        return None
    ratio = paired_ratio_intervals({"first": np.asarray(a["nll"])}, np.asarray(b["nll"]),
                                   np.asarray(a["tokens"]))
    return ratio["first"]


def budget_table(found: list[dict], budgets=BUDGETS) -> list[dict]:
    """Per budget: each operating method's best point within it, and the winner (lowest
    perplexity). ``ratio`` is the winner's perplexity over the runner-up's with its paired
    interval (None without per-window losses); ``overlaps`` when that interval reaches 1,
    or without it when the two perplexity intervals overlap."""
    table = []
    for budget in budgets:
        best = {}
        for method in OPERATING:
            within = [p for p in found if p["method"] == method
                      and p["ffn_bytes_fraction"] <= budget + 1e-12]
            best[method] = min(within, key=lambda p: p["ppl"]) if within else None
        ranked = sorted((p for p in best.values() if p is not None), key=lambda p: p["ppl"])
        first, second = (ranked + [None, None])[:2]
        ratio = paired_ratio(first, second) if second else None
        if ratio is not None:
            overlaps = ratio[2] >= 1.0
        else:
            overlaps = bool(second and first["ppl_ci95"] and second["ppl_ci95"]
                            and second["ppl_ci95"][0] <= first["ppl_ci95"][1])
        table.append({"budget": budget, "best": best,
                      "winner": first["method"] if first else None,
                      "runner_up": second["method"] if second else None, "overlaps": overlaps,
                      "ratio": list(ratio) if ratio else None})
    return table


def _cell(p: dict | None) -> str:
    if p is None:
        return "–"
    ci = f" [{p['ppl_ci95'][0]:.4g}, {p['ppl_ci95'][1]:.4g}]" if p["ppl_ci95"] else ""
    return f"{p['ppl']:.4g}{ci} @ {p['ffn_bytes_fraction']:.3f} ({p['label']})"


def markdown(table: list[dict]) -> str:
    """The budget table as Markdown: one row per budget, a column per method."""
    lines = ["| FFN bytes ≤ | " + " | ".join(OPERATING) + " | winner |",
             "|---" * (len(OPERATING) + 2) + "|"]
    for row in table:
        winner = row["winner"] or "–"
        if row["ratio"]:
            ratio, lo, hi = row["ratio"]
            verdict = "not separated from" if row["overlaps"] else "lower than"
            winner += (f" ({verdict} {row['runner_up']}: paired ratio {ratio:.3f} "
                       f"[{lo:.3f}, {hi:.3f}])")
        elif row["overlaps"]:
            winner += f" (interval overlaps {row['runner_up']})"
        lines.append(f"| {row['budget']:g} | "
                     + " | ".join(_cell(row["best"][m]) for m in OPERATING) + f" | {winner} |")
    return "\n".join(lines) + "\n"


def _ppl(row: dict, key: str) -> str:
    if row.get(key) is None:
        return "–"
    ci = row.get(f"{key}_ci95")
    return f"{row[key]:.4g} [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else f"{row[key]:.4g}"


def _fraction(row: dict, key: str) -> str:
    return "–" if row.get(key) is None else f"{row[key]:.3f}"


def _union(row: dict) -> str:
    """" (top-2)": a cluster predictor's mask is the union of its top-M centroids."""
    return f" (top-{row['top_m']})" if (row.get("top_m") or 1) > 1 else ""


def trials_markdown(rows: list[dict]) -> str:
    """Every trial as one Markdown row: its cluster pass (the oracle assignment, an upper
    bound), its predictors, recall and FFN bytes, in the table's order."""
    lines = ["| algorithm | objective | K | cluster ppl (oracle assignment) | bytes | "
             "weighted recall | predicted cluster ppl | bytes | neuron predictor ppl | bytes |",
             "|---" * 10 + "|"]
    for r in rows:
        lines.append(" | ".join([
            f"| {r['algorithm']}", fit_objective(r), str(r["k"]),
            _ppl(r, "cluster_ppl"), _fraction(r, "cluster_ffn_bytes_fraction"),
            "–" if r.get("weighted_recall") is None else f"{r['weighted_recall']:.3f}",
            _ppl(r, "predicted_ppl") + _union(r) if r.get("predictor_kind") == "cluster" else "–",
            _fraction(r, "predicted_ffn_bytes_fraction")
            if r.get("predictor_kind") == "cluster" else "–",
            _ppl(r, "neuron_predicted_ppl"),
            _fraction(r, "neuron_predicted_ffn_bytes_fraction")]) + " |")
    return "\n".join(lines) + "\n"


def plot(found: list[dict], baseline: dict, plt, save) -> None:
    """Perplexity with intervals against FFN bytes read, one series per method."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    known = (*OPERATING, UPPER_BOUND)
    for method in (*known, *sorted({p["method"] for p in found} - set(known))):
        series = sorted((p for p in found if p["method"] == method),
                        key=lambda p: p["ffn_bytes_fraction"])
        if not series:
            continue
        yerr = None
        if all(p["ppl_ci95"] for p in series):
            yerr = [[p["ppl"] - p["ppl_ci95"][0] for p in series],
                    [p["ppl_ci95"][1] - p["ppl"] for p in series]]
        ax.errorbar([p["ffn_bytes_fraction"] for p in series], [p["ppl"] for p in series],
                    yerr=yerr, fmt="x:" if method == UPPER_BOUND else "o-", capsize=3,
                    label=method + (" (upper bound)" if method == UPPER_BOUND else ""))
    if baseline.get("dense_ppl") is not None:
        ax.axhline(baseline["dense_ppl"], color="k", ls="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("FFN weight bytes read per token / dense")
    ax.set_ylabel("held-out perplexity, 95% interval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, "perplexity_vs_ffn_bytes")
