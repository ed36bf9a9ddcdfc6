"""The argument parser of ``actclust``: every command, flag, default and example.

The convention, checked for every command by tests/test_cliparser.py (new ones too):

- every flag and positional argument has a one-line ``help`` that says what it
  is, its unit where it has one, and its default as ``(default: ...)``, or
  ``(required...)``; defaults come from the config dataclasses through
  :func:`actclust.cliformat.default`, so the text follows the behaviour;
- every command has a ``description`` in plain prose and an ``epilog`` made by
  :func:`actclust.cliformat.examples`: ``examples:`` then one or two runnable command lines, the
  README's;
- a new command or flag also goes into the README's Commands section: its
  synopsis line lists every long flag and its examples appear there verbatim;
- a new command registers ``_add_<command>`` in :func:`build_parser` and its
  handler in ``actclust.cli.COMMANDS``; commands outside the pipeline's stages (verify,
  report, compare, fetch-model) live in :mod:`actclust.cliparser_tools`.
"""

from __future__ import annotations

import argparse

from actclust import config as C
from actclust import cliparser_tools as tools
from actclust.cliformat import Parser, default, examples, version
from actclust.orchestration.runconfig import RunConfig

DESCRIPTION = (
    "actclust records which FFN neurons of a causal language model are active for every "
    "token and layer, clusters those activation masks per layer into K centroids with a "
    "distributed Hamming k-means, and measures what is lost when each token's FFN is masked "
    "by its centroid: clustering precision and recall, and masked perplexity. Ray actors "
    "share every stage across GPUs or CPU workers; masks and centroids are Parquet files."
)
OVERVIEW = """The stages, in order: extract -> verify -> cluster -> evaluate -> report; `run`
does them all, `sweep` runs one Ray Tune trial per (K, theta, algorithm).
Every command takes --config FILE (YAML, keys = the long flag names with _);
flags override the file. Rerunning a killed command resumes it. Exit status:
0 done, 2 bad input (one `actclust: error:` line), 1 failure.

examples:
  actclust run --out runs/demo
  actclust extract --model tiny:opt --out /tmp/m --max-tokens 8192 --seq-len 64 --workers 2
"""


def _config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="YAML file of settings, keys = the long flag names with _; flags given "
                        "here override it (default: none)")


def _workers_flag(p: argparse.ArgumentParser, cls: type, what: str) -> None:
    p.add_argument("--workers", type=int, metavar="N",
                   help=f"{what} (default: {default(cls, 'workers')})")


def _corpus_flags(p: argparse.ArgumentParser) -> None:
    """Model and corpus flags of extract, with the defaults of a fresh extraction."""
    cls = C.CorpusConfig
    p.add_argument("--model", metavar="M",
                   help="embedded:smollm2-135m, a Hugging Face id or local directory, or "
                        f"tiny:opt|llama|gpt2|gpt-neox (default: {default(cls, 'model')})")
    p.add_argument("--corpus", metavar="C",
                   help="embedded:pydoc, hf:NAME[:CONFIG[:SPLIT]], or a path, directory or glob "
                        f"of .txt/.jsonl/.parquet files (default: {default(cls, 'corpus')})")
    p.add_argument("--text-column", dest="text_column", metavar="NAME",
                   help="column that holds the text in .jsonl, .parquet and hf: corpora "
                        f"(default: {default(cls, 'text_column')})")
    p.add_argument("--seq-len", dest="seq_len", type=int, metavar="N",
                   help=f"window length, in tokens (default: {default(cls, 'seq_len')})")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, metavar="N",
                   help="record at most N tokens of the split, N // seq-len windows "
                        "(default: the whole split)")
    _trust_flag(p)


def _threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch threads (default: torch's own choice)")


def _trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true",
                   default=None, help="allow a hub model's own Python code to run (default: off)")


def _add_extract(sub) -> None:
    cls = C.ExtractConfig
    p = sub.add_parser(
        "extract", help="record packed FFN activation masks to Parquet",
        description="Run the model over the corpus in windows and record, for every token and "
                    "layer, which FFN neurons are active (|a| > tau_l) as packed bit masks in "
                    "Parquet shards, with a manifest.json that names the model, corpus and "
                    "thresholds. Complete shards are skipped on a rerun.",
        epilog=examples(
            "actclust extract --model tiny:opt --out /tmp/m --max-tokens 8192 --seq-len 64 "
            "--workers 2",
            "actclust extract --out runs/masks3 --sites gate,up,down_out --sparsity 0.5 "
            "--max-tokens 16384"))
    _config_flag(p)
    _corpus_flags(p)
    p.add_argument("--out", metavar="DIR",
                   help="output directory for manifest.json and the mask shards (required)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--sparsity", type=float, metavar="S",
                       help="fraction of neurons inactive per layer, in (0, 1); calibrates tau_l "
                            "on the first windows (default: 0.5, or --threshold 0 for ReLU "
                            "models)")
    group.add_argument("--threshold", type=float, metavar="T",
                       help="fixed |a| threshold tau for every layer, in activation units; "
                            "0 means 'fired' (default: calibrated from --sparsity)")
    p.add_argument("--sites", metavar="SITES",
                   help=f"where the mask is read: {', '.join(C.SITES)}, or several of "
                        "gate,up,down_out as a comma list (recorded from the same forward "
                        f"passes, format version 2) (default: {default(cls, 'sites')})")
    p.add_argument("--split", metavar="SPLIT",
                   help="windows to record: train (all but every Nth), heldout (every Nth) or "
                        f"all (default: {default(cls, 'split')})")
    p.add_argument("--heldout-every", dest="heldout_every", type=int, metavar="N",
                   help="every Nth window is held out for evaluation "
                        f"(default: {default(cls, 'heldout_every')})")
    _workers_flag(p, cls, "extraction actors, each with its own copy of the model")
    p.add_argument("--shard-windows", dest="shard_windows", type=int, metavar="N",
                   help=f"windows per Parquet shard (default: {default(cls, 'shard_windows')})")


def _add_cluster(sub) -> None:
    cls = C.ClusterConfig
    p = sub.add_parser(
        "cluster", help="distributed Hamming k-means of the masks, per layer",
        description="Cluster each layer's masks into K centroids. With hamming-kmeans the "
                    "workers form one collective group, each reads its share of the shards, "
                    "and per-cluster bit sums are all-reduced every iteration; the k-means "
                    "state is checkpointed every iteration, so a rerun resumes it. Writes "
                    "centroids.parquet and cluster.json.",
        epilog=examples(
            "actclust cluster --masks /tmp/m --k 16 --out /tmp/c --workers 2",
            "actclust cluster --masks /tmp/m --k 64 --theta 0.3 --algorithm brb-kmeans "
            "--out /tmp/c64"))
    _config_flag(p)
    p.add_argument("--masks", metavar="DIR",
                   help="mask directory written by actclust extract (required)")
    p.add_argument("--k", type=int, metavar="K", help="clusters per layer (required)")
    p.add_argument("--out", metavar="DIR",
                   help="output directory for centroids.parquet and cluster.json (required)")
    objective = p.add_mutually_exclusive_group()
    objective.add_argument("--theta", type=float, metavar="X",
                           help="a centroid bit is set iff at least this fraction of its "
                                "cluster's masks has it, in (0, 1] "
                                f"(default: {default(cls, 'theta')}, majority vote)")
    objective.add_argument("--density", type=float, metavar="D",
                           help="instead of theta: every centroid keeps exactly round(D * d_ff) "
                                "bits, the most frequent among its members (default: off)")
    p.add_argument("--seed", type=int, metavar="N",
                   help=f"seed of the initialisation (default: {default(cls, 'seed')})")
    _workers_flag(p, cls, "k-means actors, each holding a share of the masks")
    p.add_argument("--backend", metavar="NAME",
                   help=f"bit kernels: {', '.join(C.BACKENDS)}; auto takes cupy on a GPU, "
                        f"else torch or numpy (default: {default(cls, 'backend')})")
    p.add_argument("--algorithm", metavar="NAME",
                   help=f"{', '.join(C.ALGORITHMS)} (default: {default(cls, 'algorithm')})")
    p.add_argument("--init", metavar="NAME",
                   help=f"k-means initialisation: k-means++ or random "
                        f"(default: {default(cls, 'init')})")
    p.add_argument("--batch-size", dest="batch_size", type=int, metavar="B",
                   help="mini-batch rows per worker per iteration (default: full batch)")
    p.add_argument("--max-iter", dest="max_iter", type=int, metavar="N",
                   help=f"k-means iterations at most (default: {default(cls, 'max_iter')})")
    p.add_argument("--layers", type=int, nargs="+", metavar="L",
                   help="cluster only these layer indices (default: every recorded layer)")
    p.add_argument("--pool-layers", dest="pool_layers", action="store_true", default=None,
                   help="one centroid set for all layers, fitted on their pooled masks "
                        "(default: off, one set per layer)")
    p.add_argument("--memory-budget-mb", dest="memory_budget_mb", type=float, metavar="MB",
                   help="memory for masks per worker, in MiB; a larger share is streamed from "
                        f"Parquet (default: {default(cls, 'memory_budget_mb'):g})")


def _add_evaluate(sub) -> None:
    cls = C.EvaluateConfig
    p = sub.add_parser(
        "evaluate", help="precision/recall and masked perplexity on held-out windows",
        description="Run the model on held-out windows (seq % 10 == 9) with no mask, each "
                    "token's own mask, its nearest centroid, and a random mask of the same "
                    "density; report clustering precision and recall and the four perplexities "
                    "in eval.json (printed as one JSON line). Model, corpus and window length "
                    "default to those the centroids were fitted on.",
        epilog=examples(
            "actclust evaluate --centroids /tmp/c --out /tmp/e --max-tokens 2048",
            "actclust evaluate --anchor teal --anchor-sparsity 0.5 --masks runs/demo/masks "
            "--out /tmp/teal50"))
    _config_flag(p)
    p.add_argument("--centroids", metavar="DIR",
                   help="clustering directory written by actclust cluster (required)")
    p.add_argument("--out", metavar="DIR", help="output directory for eval.json (required)")
    p.add_argument("--model", metavar="M",
                   help="model to evaluate; must be the one the masks came from (default: the "
                        "centroids' model)")
    p.add_argument("--corpus", metavar="C",
                   help="corpus id or path, as for extract (default: the centroids' corpus)")
    p.add_argument("--text-column", dest="text_column", metavar="NAME",
                   help="column that holds the text (default: the centroids' column)")
    p.add_argument("--seq-len", dest="seq_len", type=int, metavar="N",
                   help="window length, in tokens (default: the centroids' window length)")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, metavar="N",
                   help="evaluate at most N held-out tokens, N // seq-len windows "
                        "(default: every held-out window)")
    p.add_argument("--predictor", metavar="DIR",
                   help="predictor directory from actclust train-predictor: adds the mode "
                        "`predicted` (default: none)")
    p.add_argument("--top-m", dest="top_m", type=int, metavar="M",
                   help="mask with the union of the top-M predicted centroids "
                        f"(default: {default(cls, 'top_m')})")
    p.add_argument("--neuron-select", dest="neuron_select", metavar="RULE",
                   help="a neuron predictor's mask: threshold (its per-layer logit threshold) "
                        "or topk (per token the top round(d * width) neurons, d the "
                        "clustering's per-layer density on the training tokens: equal density "
                        f"by construction) (default: {default(cls, 'neuron_select')})")
    p.add_argument("--split", metavar="SPLIT",
                   help="windows to evaluate, heldout or train; never the split the centroids "
                        f"were fitted on (default: {default(cls, 'split')})")
    p.add_argument("--heldout-every", dest="heldout_every", type=int, metavar="N",
                   help="held-out rule, every Nth window; must equal the masks' value "
                        "(default: the centroids' value)")
    p.add_argument("--dense-prefix", dest="dense_prefix", type=int, metavar="P",
                   help="positions < P of every window are never masked, 0 = strict, in tokens "
                        f"(default: {default(cls, 'dense_prefix')})")
    p.add_argument("--mask-mode", dest="mask_mode", metavar="MODE",
                   help="replace (a*c) or and (a*m*c, the paper artifact's metric) "
                        f"(default: {default(cls, 'mask_mode')})")
    p.add_argument("--anchor", metavar="METHOD",
                   help="evaluate a training-free method instead of centroids: "
                        f"{', '.join(C.ANCHORS)}, FFN only; needs --masks and "
                        "--anchor-sparsity (default: none)")
    p.add_argument("--anchor-sparsity", dest="anchor_sparsity", type=float, metavar="S",
                   help="the anchor's target sparsity, in (0, 1) (default: none)")
    p.add_argument("--anchor-allocation", dest="anchor_allocation",
                   choices=C.ANCHOR_ALLOCATIONS,
                   help="uniform: every layer at S; greedy (teal): a sparsity per layer with "
                        "the FFN bytes of uniform S, chosen on each layer's output error "
                        f"(default: {default(cls, 'anchor_allocation')})")
    p.add_argument("--masks", metavar="DIR",
                   help="with --anchor: masks directory from actclust extract --split train; "
                        "gives model, corpus and windows, and its fitting windows calibrate "
                        "the thresholds (default: none)")
    p.add_argument("--calibration-windows", dest="calibration_windows", type=int, metavar="N",
                   help="with --anchor: fitting windows the thresholds are calibrated on "
                        f"(default: {default(cls, 'calibration_windows')})")
    _trust_flag(p)
    _workers_flag(p, cls, "evaluation actors, each with its own copy of the model")


def _add_mass_bits(sub) -> None:
    p = sub.add_parser(
        "mass-bits", help="move each centroid's bits to its members' largest activations",
        description="Keep each centroid's bit count and its members (the fitted assignment), "
                    "but set its bits on the neurons with the largest summed |a| over its "
                    "members instead of the most frequent ones. Reads the FFN inputs of a "
                    "predictor's features directory; writes a clustering directory.",
        epilog=examples(
            "actclust mass-bits --centroids runs/demo/clusters/k=64-theta=0.5 --features "
            "runs/demo/predictor/features --out runs/demo/k64-mass",
            "actclust mass-bits --centroids runs/demo/clusters/k=64-theta=0.5 --features "
            "runs/demo/predictor/features --budget 0.5 --counts fitted --out runs/demo/k64-budget"))
    _config_flag(p)
    p.add_argument("--centroids", metavar="DIR", help="clustering directory (required)")
    p.add_argument("--features", metavar="DIR",
                   help="features directory of a predictor trained on these centroids' masks "
                        "(required)")
    p.add_argument("--out", metavar="DIR", help="output clustering directory (required)")
    p.add_argument("--density", type=float, metavar="D",
                   help="give every centroid round(D d_ff) bits instead of its fitted count "
                        "(default: the fitted count)")
    p.add_argument("--budget", type=float, metavar="B",
                   help="choose a density per layer so that the FFN bytes read per token are "
                        "at most B of dense, by a greedy search on each layer's output error "
                        "(default: off)")
    p.add_argument("--counts", choices=C.BIT_COUNTS,
                   help="with --density or --budget: every centroid of a layer gets the "
                        "layer's density (equal), or its fitted bit count scaled so that the "
                        "layer's mean is that density (fitted; clusters fitted denser stay "
                        f"denser) (default: {default(C.MassBitsConfig, 'counts')})")
    p.add_argument("--mask-mode", dest="mask_mode", choices=C.MASK_MODES,
                   help="the mask mode the budget is counted in "
                        f"(default: {default(C.MassBitsConfig, 'mask_mode')})")
    p.add_argument("--sample-tokens", dest="sample_tokens", type=int, metavar="N",
                   help="fitting tokens each layer's error is measured on "
                        f"(default: {default(C.MassBitsConfig, 'sample_tokens')})")
    p.add_argument("--dense-prefix", dest="dense_prefix", type=int, metavar="P",
                   help="window positions < P, never masked, left out of the budget's "
                        f"errors (default: {default(C.MassBitsConfig, 'dense_prefix')})")
    _threads_flag(p)
    _trust_flag(p)


def _add_train_predictor(sub) -> None:
    cls = C.PredictorConfig
    p = sub.add_parser(
        "train-predictor", help="train per-layer cluster-id (or neuron) predictors with Ray Train",
        description="Fit, for every clustered layer, a small predictor of each token's cluster "
                    "id (or of its neuron mask) from the FFN input, on the fitting windows the "
                    "centroids were made from, with Ray Train; a checkpoint per epoch lets a "
                    "rerun resume. Writes predictor.json and the weights.",
        epilog=examples(
            "actclust train-predictor --centroids runs/demo/clusters/k=64-theta=0.5 "
            "--out runs/demo/predictor"))
    _config_flag(p)
    p.add_argument("--centroids", metavar="DIR",
                   help="clustering directory written by actclust cluster (required)")
    p.add_argument("--out", metavar="DIR", help="output directory of the predictor, a path or "
                   "an s3:// or gs:// URI (required)")
    p.add_argument("--kind", metavar="NAME",
                   help=f"cluster or neuron (default: {default(cls, 'kind')})")
    p.add_argument("--rank", type=int, metavar="R",
                   help="bottleneck width (default: the largest within 2%% of the FFN's "
                        "parameters)")
    p.add_argument("--epochs", type=int, metavar="N",
                   help=f"training epochs (default: {default(cls, 'epochs')})")
    _workers_flag(p, cls, "Ray Train workers")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, metavar="N",
                   help="fitting tokens to train on (default: as many as the clustering saw)")
    p.add_argument("--features", metavar="DIR",
                   help="feature directory to share between predictors (default: one under "
                        "--out)")
    p.add_argument("--seed", type=int, metavar="N",
                   help=f"seed of initialisation and shuffling (default: {default(cls, 'seed')})")


def _add_generate(sub) -> None:
    cls = C.GenerateConfig
    p = sub.add_parser(
        "generate", help="greedy generation with the sparse FFN (or --dense)",
        description="Generate greedily (transformers' generate, KV cache) with every clustered "
                    "layer's FFN replaced by one that computes only the neurons of the centroid "
                    "the predictor picks for each token; prints the continuation on stdout and "
                    "the new tokens' count and rate on stderr.",
        epilog=examples(
            "actclust generate --model embedded:smollm2-135m --centroids "
            "runs/demo/clusters/k=64-theta=0.5 --predictor runs/demo/predictor --prompt "
            "\"The for statement\" --max-new-tokens 32",
            "actclust generate --model embedded:smollm2-135m --dense --prompt "
            "\"The for statement\""))
    _config_flag(p)
    p.add_argument("--model", metavar="M",
                   help="model id, as for extract (default: the centroids' model)")
    p.add_argument("--centroids", metavar="DIR",
                   help="clustering directory written by actclust cluster (required, but not "
                        "with --dense)")
    p.add_argument("--predictor", metavar="DIR",
                   help="cluster predictor directory (required, but not with --dense)")
    p.add_argument("--prompt", metavar="TEXT", help="text to continue (required)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, metavar="N",
                   help=f"tokens to generate (default: {default(cls, 'max_new_tokens')})")
    p.add_argument("--dense", action="store_true", default=None,
                   help="the dense model, no sparsity, for comparison (default: off)")
    p.add_argument("--layout", metavar="NAME",
                   help=f"sparse weight layout: {', '.join(C.LAYOUTS)}; auto keeps per-centroid "
                        "slabs within --slab-budget-mb and gathers the rest "
                        f"(default: {default(cls, 'layout')})")
    p.add_argument("--slab-budget-mb", dest="slab_budget_mb", type=float, metavar="MB",
                   help="memory for per-centroid weight slabs over all layers, in MiB "
                        f"(default: {default(cls, 'slab_budget_mb'):g})")
    _threads_flag(p)
    p.add_argument("--mask-mode", dest="mask_mode", metavar="MODE",
                   help="replace: the centroid's neurons; and: of those, only the ones with "
                        "|a| above the layer's mask threshold reach the output projection "
                        "(default: and for centroids of site intermediate, else replace)")
    _trust_flag(p)


def _add_run(sub) -> None:
    cls = RunConfig
    p = sub.add_parser(
        "run", help="extract -> cluster -> evaluate -> report, for every K and theta",
        description="The whole pipeline: extract masks of the fitting windows, cluster them "
                    "for every K and theta, evaluate each clustering on held-out windows, and "
                    "write results.csv, results.json and report.html. Finished stages are "
                    "reused on a rerun. The config file also takes seq_len, eval_max_tokens, "
                    "sparsity, threshold, k, theta, seed, algorithm and predictor_epochs.",
        epilog=examples("actclust run --out runs/demo",
                         "actclust run --config jobs/presets/embedded_default.yaml"))
    _config_flag(p)
    p.add_argument("--out", metavar="DIR",
                   help=f"output directory of the run (default: {default(cls, 'out')})")
    p.add_argument("--model", metavar="M",
                   help=f"model id, as for extract (default: {default(cls, 'model')})")
    p.add_argument("--corpus", metavar="C",
                   help=f"corpus id or path, as for extract (default: {default(cls, 'corpus')})")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, metavar="N",
                   help="fitting tokens to record masks of (default: "
                        f"{default(cls, 'max_tokens')}); held-out tokens for perplexity are the "
                        f"config's eval_max_tokens (default: {default(cls, 'eval_max_tokens')})")
    _workers_flag(p, cls, "actors per stage")
    _predictor_kind_flag(p)


def _predictor_kind_flag(p) -> None:
    p.add_argument("--predictor", metavar="KIND",
                   help="per trial, train and evaluate a predictor: none, cluster, neuron or "
                        f"both (default: {default(RunConfig, 'predictor')})")


def _add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep", help="Ray Tune over K (and theta, algorithm) on one extraction",
        description="Extract once, then run one Ray Tune trial per (K, theta, algorithm), each "
                    "in its own placement group; writes sweep.parquet, sweep.csv and "
                    "report.html under the config's out. Rerunning the same command resumes "
                    "an interrupted sweep.",
        epilog=examples("actclust sweep --config jobs/presets/sweep_default.yaml"))
    p.add_argument("--config", metavar="FILE",
                   help="YAML sweep description: the keys of run plus lists for k, theta and "
                        "algorithm, worker_cpus, max_concurrent_trials (required)")
    _predictor_kind_flag(p)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="actclust", description=DESCRIPTION, epilog=OVERVIEW)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}",
                        help="print the version and exit")
    _verbose_flag(parser, default=0)
    sub = parser.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND",
                                title="commands")
    for add in (_add_extract, tools.add_verify, _add_cluster, _add_evaluate,
                _add_train_predictor, _add_mass_bits, _add_generate, _add_run, _add_sweep,
                tools.add_report, tools.add_compare, tools.add_fetch_model):
        add(sub)
    for p in sub.choices.values():
        _verbose_flag(p, default=argparse.SUPPRESS)
    return parser


def _verbose_flag(p: argparse.ArgumentParser, default) -> None:
    # SUPPRESS on commands: a command's default must not undo `actclust -v COMMAND`.
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="also show our debug lines and other libraries' messages and bars; "
                        "-vv: their debug lines too (default: ours only)")
