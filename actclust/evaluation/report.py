"""Plots and a self-contained report.html for a run or sweep directory.

Reads ``DIR/results.json`` (``{"identity": {...}, "rows": [...]}``, written by
``actclust run`` and ``actclust sweep``) and writes ``DIR/plots/*.png`` and
``DIR/report.html`` with the plots embedded, the table, the definitions and
the run's identity.
"""

from __future__ import annotations

import base64
import html
import io
import json
import platform

from actclust.errors import UserError
from actclust.evaluation import fronts
from actclust.io import storage

DEFINITIONS = [
    ("mask m", "m_i = 1 iff |a_i| > tau_l, a = the input of the FFN output projection"),
    ("centroid c", "theta mode: bit i set iff at least a fraction theta of the cluster's masks "
                   "have it; density mode (density=D): the round(D d_ff) bits most frequent "
                   "among the cluster's masks"),
    ("assignment", "theta mode: argmin_j (theta |c_j| - m.c_j), plain Hamming at theta 0.5; "
                   "density mode: argmax_j m.c_j; ties to the lowest j"),
    ("K = 1", "one static mask per layer: the floor clustering must beat at equal density"),
    ("hit_cap", "layers whose fit stopped at max_iter before converging (0: all converged)"),
    ("precision", "|m AND c| / |c|, micro-averaged over (token, layer) pairs"),
    ("recall", "|m AND c| / |m|; this is what the paper (arXiv 2507.14179) calls "
               "'clustering precision'"),
    ("density", "|c| / d_ff: the fraction of FFN neurons a centroid mask keeps"),
    ("dense_ppl / oracle_ppl / cluster_ppl", "perplexity with no mask / the token's own mask / "
                                             "the centroid nearest to the token's mask"),
    ("random_ppl", "random masks with exactly the bits the centroids used, per layer"),
    ("weighted_recall", "sum |a| m c / sum |a| m: the share of active activation mass kept"),
    ("dense prefix", "positions < dense_prefix of every window are never masked (the first "
                     "token is an attention sink with activations ~100x the rest)"),
    ("effective density", "fraction of FFN neurons kept over all evaluated tokens, "
                          "dense-prefix tokens counted at 1.0"),
    ("[lo, hi]", "95% percentile bootstrap over held-out windows, the same resampled windows "
                 "for every mode (paired)"),
    ("predicted_ppl", "perplexity with each layer masked by what a trained predictor says from "
                      "the FFN input before the FFN runs: the predicted cluster's centroid, or a "
                      "neuron predictor's thresholded output (its figures: neuron_predicted_*)"),
    ("predicted_weighted_recall", "sum |a| m p / sum |a| m, p the predicted mask"),
    ("ffn_bytes_fraction", "FFN weight bytes read per token over the dense FFN's, at masked "
                           "positions; a mask that needs the true mask (oracle, cluster with "
                           "the oracle assignment) reads gate and up whole: an upper bound"),
    ("teal / cats / wina", "training-free FFN sparsity at target s (arXiv 2408.14690, "
                           "2404.08763, 2505.19427), calibrated on fitting windows"),
    ("held-out", "window seq is held out iff seq % heldout_every == heldout_every - 1; "
                 "fitting never sees those windows (evaluate refuses otherwise)"),
]


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("actclust", "torch", "transformers", "ray", "pyarrow", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def objective(row: dict) -> str:
    """"theta=0.3" or "density=0.5": the fit objective of a result row."""
    if row.get("objective"):
        return fronts.fit_objective(row)
    return f"theta={row['theta']:g}"


def _series(rows: list[dict], algorithm: str, obj: str, key: str):
    pts = sorted((r["k"], r[key]) for r in rows
                 if r.get("algorithm") == algorithm and objective(r) == obj
                 and r.get(key) is not None)
    return [p[0] for p in pts], [p[1] for p in pts]


def make_plots(rows: list[dict], plots: str,
               anchors: list[dict] | None = None) -> list[tuple[str, bytes]]:
    """PNG plots written under ``plots`` (a directory or URI); returns (name, png bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["algorithm"], objective(r)) for r in rows})
    paths = []

    def finish(fig, ax, name, ylabel, logy=False):
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("number of clusters K")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        save(fig, name)

    def save(fig, name):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        storage.write_bytes_atomic(buffer.getbuffer(), storage.join(plots, f"{name}.png"))
        paths.append((name, buffer.getvalue()))

    _ppl_vs_effective_density(rows, plt, save)
    by_bytes = fronts.points(rows, anchors or [])
    if by_bytes:
        fronts.plot(by_bytes, rows[0], plt, save)

    fig, ax = plt.subplots(figsize=(6, 4))
    for alg, obj in groups:
        ax.plot(*_series(rows, alg, obj, "cluster_ppl"), "o-", label=f"cluster {alg} {obj}")
    ax.axhline(rows[0]["dense_ppl"], color="k", ls="--", label="dense")
    ax.axhline(rows[0]["oracle_ppl"], color="g", ls=":", label="oracle (own mask)")
    finish(fig, ax, "perplexity_vs_k", "perplexity (held-out)", logy=True)

    fig, ax = plt.subplots(figsize=(6, 4))
    for alg, obj in groups:
        ax.plot(*_series(rows, alg, obj, "precision"), "o-", label=f"precision {alg} {obj}")
        ax.plot(*_series(rows, alg, obj, "recall"), "s--", label=f"recall {alg} {obj}")
    finish(fig, ax, "precision_recall_vs_k", "micro-averaged precision / recall")

    fig, ax = plt.subplots(figsize=(6, 4))
    for alg, obj in groups:
        ax.plot(*_series(rows, alg, obj, "density"), "o-", label=f"centroid {alg} {obj}")
    ax.axhline(rows[0]["true_density"], color="k", ls="--", label="true masks")
    finish(fig, ax, "density_vs_k", "density |c| / d_ff")

    fig, ax = plt.subplots(figsize=(6, 4))
    for alg, obj in groups:
        ax.plot(*_series(rows, alg, obj, "cost"), "o-", label=f"{alg} {obj}")
    finish(fig, ax, "cost_vs_k", "mean cost of the fit in bits (its own objective; elbow)")

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        per_layer = r.get("per_layer_recall")
        if per_layer:
            ax.plot(range(len(per_layer)), per_layer, ".-",
                    label=f"K={r['k']} {objective(r)} {r['algorithm']}")
    ax.set_xlabel("layer")
    ax.set_ylabel("recall |m ∧ c| / |m|")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, "per_layer_recall")
    return paths


def _ppl_vs_effective_density(rows: list[dict], plt, save) -> None:
    """Cluster perplexity with its interval against the compute kept, every algorithm and K."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for alg, obj in sorted({(r["algorithm"], objective(r)) for r in rows}):
        series = sorted((r for r in rows if (r["algorithm"], objective(r)) == (alg, obj)
                         and r.get("effective_density") is not None), key=lambda r: r["k"])
        if not series:
            continue
        x = [r["effective_density"] for r in series]
        y = [r["cluster_ppl"] for r in series]
        err = _yerr(series, "cluster_ppl")
        label = f"{alg} {obj}"
        bars = ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, label=label)
        for r, xi, yi in zip(series, x, y):
            ax.annotate(f"K={r['k']}", (xi, yi), fontsize=6, xytext=(3, 3),
                        textcoords="offset points", color=bars[0].get_color())
    first = rows[0]
    for key, style, name in (("dense_ppl", dict(color="k", ls="--"), "dense"),
                             ("oracle_ppl", dict(color="g", ls=":"), "oracle (own mask)")):
        ax.axhline(first[key], label=name, **style)
        if first.get(f"{key}_ci95"):
            ax.axhspan(*first[f"{key}_ci95"], color=style["color"], alpha=0.08)
    if first.get("oracle_effective_density") is not None:
        ax.plot([first["oracle_effective_density"]], [first["oracle_ppl"]], "g*", ms=10)
    for label, prefix, series in predicted_series(rows):
        key = f"{prefix}predicted_ppl"
        ax.errorbar([r[f"{prefix}predicted_effective_density"] for r in series],
                    [r[key] for r in series], yerr=_yerr(series, key), fmt="s--", capsize=3,
                    mfc="none", label=f"predicted: {label}")
    ax.set_yscale("log")
    ax.set_xlabel("effective density (FFN neurons kept, dense prefix at 1.0)")
    ax.set_ylabel("held-out perplexity, 95% interval")
    ax.set_title(f"dense prefix {first.get('dense_prefix')}, mask mode "
                 f"{first.get('mask_mode')}, {first.get('windows')} windows", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, "perplexity_vs_effective_density")


# Columns of the neuron predictor's figures in a ``predictor: both`` row.
NEURON = "neuron_"


def predicted_series(rows: list[dict]) -> list[tuple[str, str, list[dict]]]:
    """Every predicted curve: (label, column prefix, its rows by K), one per fit group and
    predictor kind; the prefix is "" (the row's predictor_kind) or NEURON."""
    found = []
    for alg, obj in sorted({(r["algorithm"], objective(r)) for r in rows}):
        for prefix in ("", NEURON):
            series = sorted((r for r in rows if (r["algorithm"], objective(r)) == (alg, obj)
                             and r.get(f"{prefix}predicted_ppl") is not None
                             and r.get(f"{prefix}predicted_effective_density") is not None),
                            key=lambda r: r["k"])
            if series:
                kind = "neuron" if prefix else series[0].get("predictor_kind")
                found.append((f"{alg} {obj}, {kind} predictor", prefix, series))
    return found


def _predicted_list(rows: list[dict]) -> str:
    """The predicted series, point by point, beside the oracle-assignment ones."""
    items = []
    for label, prefix, series in predicted_series(rows):
        points = "; ".join(
            f"K={r['k']}: {r[prefix + 'predicted_ppl']:.4g} "
            f"[{r[prefix + 'predicted_ppl_ci95'][0]:.4g}, {r[prefix + 'predicted_ppl_ci95'][1]:.4g}]"
            f" at effective density {r[prefix + 'predicted_effective_density']:.3f} "
            f"(cluster, oracle assignment: {r['cluster_ppl']:.4g})" for r in series)
        items.append(f"<li><b>predicted: {html.escape(label)}</b>: {html.escape(points)}</li>")
    if not items:
        return ""
    return f"<h2>Predicted series</h2><ul>{''.join(items)}</ul>"


def _yerr(series: list[dict], key: str):
    """Asymmetric error bars from ``<key>_ci95``; None when a row has no interval."""
    if not all(r.get(f"{key}_ci95") for r in series):
        return None
    return [[r[key] - r[f"{key}_ci95"][0] for r in series],
            [r[f"{key}_ci95"][1] - r[key] for r in series]]


def _cell(row: dict, col: str) -> str:
    v = row.get(col)
    ci = row.get(f"{col}_ci95")
    if isinstance(v, float) and ci:
        return f"<td>{v:.4g} [{ci[0]:.4g}, {ci[1]:.4g}]</td>"
    return f"<td>{v:.4g}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>"


def _table(rows: list[dict]) -> str:
    cols = ["k", "objective", "algorithm", "dense_ppl", "oracle_ppl", "cluster_ppl", "random_ppl",
            "effective_density", "density", "random_density", "precision", "recall",
            "weighted_recall", "f1", "true_density", "cost", "fit_seconds", "hit_cap"]
    if all(r.get("random_ppl") is None for r in rows):  # the opt-in random pass did not run
        cols = [c for c in cols if not c.startswith("random_")]
    for prefix in ("", NEURON):  # predictor columns only where a predictor ran
        extra = [f"{prefix}{c}" for c in ("predicted_ppl", "predicted_effective_density",
                                          "predicted_accuracy", "predicted_weighted_recall",
                                          "predictor_params_fraction")]
        if any(r.get(extra[0]) is not None for r in rows):
            cols += ([] if prefix else ["predictor_kind"]) + extra
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = []
    for r in sorted(rows, key=lambda r: (r["algorithm"], objective(r), r["k"])):
        cells = []
        for c in cols:
            v = objective(r) if c == "objective" else r.get(c)
            if c == "hit_cap" and v:  # flagged: some layers did not converge
                cells.append(f'<td style="background:#fdd">{int(v)} at max_iter</td>')
                continue
            cells.append(_cell(r, c) if c != "objective" else f"<td>{html.escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _anchor_table(anchors: list[dict]) -> str:
    if not anchors:
        return ""
    cols = ["anchor", "anchor_sparsity", "anchor_ppl", "dense_ppl", "ffn_bytes_fraction",
            "realized_sparsity", "windows"]
    body = "".join("<tr>" + "".join(_cell(a, c) for c in cols) + "</tr>" for a in anchors)
    return (f"<h2>Anchors (training-free)</h2><table><tr>"
            f"{''.join(f'<th>{c}</th>' for c in cols)}</tr>{body}</table>")


def write_report(directory: str) -> str:
    """Write ``directory/report.html`` (and its plots); returns its location."""
    root = storage.normalize(directory)
    results = storage.join(root, "results.json")
    if not storage.is_file(results):
        raise UserError(f"{root} has no results.json; run actclust run or actclust sweep first")
    data = storage.read_json(results)
    rows = data["rows"]
    if not rows:
        raise UserError(f"{results} holds no results yet")
    anchors = data.get("anchors") or []
    plots = make_plots(rows, storage.join(root, "plots"), anchors)
    budgets = fronts.markdown(fronts.budget_table(fronts.points(rows, anchors)))
    storage.write_bytes_atomic(budgets.encode("utf-8"), storage.join(root, "budgets.md"))
    storage.write_bytes_atomic(fronts.trials_markdown(rows).encode("utf-8"),
                               storage.join(root, "trials.md"))
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}"><figcaption>{name}</figcaption></figure>'
        for name, png in plots)
    identity = {**data.get("identity", {}), "versions": _versions()}
    defs = "".join(f"<dt>{html.escape(a)}</dt><dd>{html.escape(b)}</dd>" for a, b in DEFINITIONS)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>actclust report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1300px}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}}
figure{{display:inline-block;margin:8px}}img{{max-width:600px}}pre{{background:#f6f6f6;padding:8px}}</style>
</head><body>
<h1>actclust report</h1>
<h2>Results</h2>{_table(rows)}
{_predicted_list(rows)}
<h2>Best perplexity within each FFN-bytes budget</h2><pre>{html.escape(budgets)}</pre>
{_anchor_table(anchors)}
<h2>Plots</h2>{images}
<h2>Definitions</h2><dl>{defs}</dl>
<h2>Run identity</h2><pre>{html.escape(json.dumps(identity, indent=1))}</pre>
</body></html>
"""
    out = storage.join(root, "report.html")
    storage.write_bytes_atomic(page.encode("utf-8"), out)
    return out
