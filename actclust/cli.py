"""The ``actclust`` command line. Bad input is reported here, once, as one line.

Every command takes ``--config FILE`` (YAML); flags given on the command line
override the file. Exit status: 0 success, 2 bad input or usage, 1 internal
failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from actclust import config as C
from actclust.errors import UserError

log = logging.getLogger("actclust")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in the project's one-line form."""

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _corpus_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"model id (default {C.DEFAULT_MODEL})")
    p.add_argument("--corpus", help=f"corpus id or path (default {C.DEFAULT_CORPUS})")
    p.add_argument("--text-column", dest="text_column")
    p.add_argument("--seq-len", dest="seq_len", type=int)
    p.add_argument("--max-tokens", dest="max_tokens", type=int)
    p.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true",
                   default=None, help="allow a hub model's own code to run (off by default)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="actclust", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    p = sub.add_parser("extract", help="record packed FFN activation masks to Parquet")
    p.add_argument("--config")
    _corpus_flags(p)
    p.add_argument("--out")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--sparsity", type=float, help="calibrate tau_l so this fraction is inactive")
    group.add_argument("--threshold", type=float, help="fixed tau for every layer (0 = 'fired')")
    p.add_argument("--sites", help="intermediate (default), gate, up or down_out")
    p.add_argument("--split", help="train (default), heldout or all")
    p.add_argument("--workers", type=int)
    p.add_argument("--shard-windows", dest="shard_windows", type=int)

    p = sub.add_parser("cluster", help="distributed Hamming k-means of the masks, per layer")
    p.add_argument("--config")
    p.add_argument("--masks")
    p.add_argument("--k", type=int)
    p.add_argument("--out")
    objective = p.add_mutually_exclusive_group()
    objective.add_argument("--theta", type=float,
                           help="centroid bit = member frequency >= theta (default 0.5)")
    objective.add_argument("--density", type=float,
                           help="every centroid keeps exactly round(D * d_ff) bits, the most "
                                "frequent among its members")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--backend")
    p.add_argument("--algorithm")
    p.add_argument("--init")
    p.add_argument("--batch-size", dest="batch_size", type=int,
                   help="mini-batch rows per worker per iteration (default: full batch)")
    p.add_argument("--max-iter", dest="max_iter", type=int)
    p.add_argument("--layers", type=int, nargs="+")
    p.add_argument("--pool-layers", dest="pool_layers", action="store_true", default=None)
    p.add_argument("--memory-budget-mb", dest="memory_budget_mb", type=float,
                   help="per-worker memory for masks; a larger share is streamed from Parquet")

    p = sub.add_parser("evaluate", help="precision/recall and masked perplexity on held-out windows")
    p.add_argument("--config")
    _corpus_flags(p)
    p.add_argument("--centroids")
    p.add_argument("--out")
    p.add_argument("--workers", type=int)
    p.add_argument("--split", help="heldout (default) or train: the windows to evaluate")
    p.add_argument("--heldout-every", dest="heldout_every", type=int,
                   help="must equal the value the centroids' masks were extracted with")
    p.add_argument("--dense-prefix", dest="dense_prefix", type=int,
                   help="positions < P of every window are never masked (default 1; 0 = strict)")
    p.add_argument("--mask-mode", dest="mask_mode",
                   help="replace (a*c, default) or and (a*m*c, the paper artifact's metric)")
    p.add_argument("--predictor", help="predictor directory: adds the mode `predicted`")
    p.add_argument("--top-m", dest="top_m", type=int,
                   help="mask with the union of the top-M predicted centroids")

    p = sub.add_parser("train-predictor",
                       help="train per-layer cluster-id (or neuron) predictors with Ray Train")
    p.add_argument("--config")
    p.add_argument("--centroids")
    p.add_argument("--out")
    p.add_argument("--kind", help="cluster (default) or neuron")
    p.add_argument("--rank", type=int, help="bottleneck width (default: 2%% of the FFN's params)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--max-tokens", dest="max_tokens", type=int)
    p.add_argument("--features", help="feature directory to share between predictors")
    p.add_argument("--seed", type=int)

    p = sub.add_parser("generate", help="greedy generation with the sparse FFN (or --dense)")
    p.add_argument("--config")
    p.add_argument("--model", help="model id (default: the centroids' model)")
    p.add_argument("--centroids", help="clustering directory (centroids.parquet)")
    p.add_argument("--predictor", help="cluster predictor directory")
    p.add_argument("--prompt")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    p.add_argument("--dense", action="store_true", default=None,
                   help="the dense model, no sparsity")
    p.add_argument("--layout", help="auto (default), slab or gather")
    p.add_argument("--slab-budget-mb", dest="slab_budget_mb", type=float,
                   help="memory for per-centroid weight slabs, all layers (default 1024)")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true",
                   default=None)

    p = sub.add_parser("sweep", help="Ray Tune over K (and theta, algorithm)")
    p.add_argument("--config", required=False)

    p = sub.add_parser("run", help="extract -> cluster -> evaluate -> report")
    p.add_argument("--config")
    p.add_argument("--out")
    p.add_argument("--model")
    p.add_argument("--corpus")
    p.add_argument("--max-tokens", dest="max_tokens", type=int)
    p.add_argument("--workers", type=int)

    p = sub.add_parser("verify", help="re-check a mask directory against its manifest")
    p.add_argument("dir")

    p = sub.add_parser("report", help="plots and report.html for a run or sweep directory")
    p.add_argument("dir")
    return parser


def _config(cls, args: argparse.Namespace, skip=("command", "config", "verbose")):
    file_values = C.load_yaml(args.config) if getattr(args, "config", None) else {}
    overrides = {k: v for k, v in vars(args).items() if k not in skip}
    for flag, other in (("theta", "density"), ("density", "theta")):
        if overrides.get(flag) is not None:  # a flag replaces the file's objective
            file_values.pop(other, None)
    source = f"config file {args.config}" if getattr(args, "config", None) else "arguments"
    return C.build(cls, file_values, overrides, source)


def _cmd_extract(args) -> int:
    from actclust.capture.extract import run_extract

    cfg = _config(C.ExtractConfig, args)
    manifest = run_extract(cfg)
    log.info("wrote masks of %d layers x %d tokens to %s", len(manifest["layers"]),
             manifest["tokens"], cfg.out)
    return 0


def _cmd_cluster(args) -> int:
    from actclust.clustering.distributed import run_cluster

    cfg = _config(C.ClusterConfig, args)
    result = run_cluster(cfg)
    log.info("wrote %s/centroids.parquet (%s, mean cost %.2f bits)", cfg.out,
             result["rule"]["kind"], result["mean_cost"])
    if result["hit_cap"]:
        log.warning("%d layer(s) stopped at max_iter without converging: %s",
                    len(result["hit_cap"]), ", ".join(map(str, result["hit_cap"])))
    return 0


def _cmd_evaluate(args) -> int:
    from actclust.evaluation.evaluate import run_evaluate

    cfg = _config(C.EvaluateConfig, args)
    result = run_evaluate(cfg)
    keys = ("dense_ppl", "oracle_ppl", "cluster_ppl", "precision", "recall")
    if "predicted_ppl" in result:
        keys += ("predicted_ppl", "predicted_accuracy", "predicted_density")
    print(json.dumps({k: result[k] for k in keys}))
    return 0


def _cmd_generate(args) -> int:
    from actclust.sparse.generate import run_generate

    result = run_generate(_config(C.GenerateConfig, args))
    print(result.text)
    print(f"actclust: {result.mode}: {len(result.tokens)} new tokens in {result.seconds:.2f} s, "
          f"{result.tokens_per_s:.1f} tokens/s (prompt {result.prompt_tokens} tokens)",
          file=sys.stderr)
    return 0


def _cmd_train_predictor(args) -> int:
    from actclust.predict.train import run_train_predictor

    cfg = _config(C.PredictorConfig, args)
    record = run_train_predictor(cfg)
    log.info("wrote %s/predictor.json (%s, rank %d, %.2f%% of the FFN's parameters)", cfg.out,
             record["kind"], record["rank"], 100 * record["params_fraction"])
    return 0


def _cmd_sweep(args) -> int:
    from actclust.orchestration.sweep import run_sweep

    if not args.config:
        raise UserError("sweep needs --config FILE (see jobs/presets/sweep_default.yaml)")
    run_sweep(C.load_yaml(args.config), source=args.config)
    return 0


def _cmd_run(args) -> int:
    from actclust.orchestration.pipeline import run_pipeline

    cfg = _config(C.RunConfig, args)
    run_pipeline(cfg)
    return 0


def _cmd_verify(args) -> int:
    from actclust.capture.verify import verify

    problems = verify(args.dir)
    if problems:
        for p in problems:
            print(f"actclust: verify: {p}", file=sys.stderr)
        raise UserError(f"{args.dir} failed verification with {len(problems)} problem(s)")
    print(f"{args.dir}: OK")
    return 0


def _cmd_report(args) -> int:
    from actclust.evaluation.report import write_report

    path = write_report(args.dir)
    print(path)
    return 0


def _disk_full(exc: BaseException) -> str | None:
    """The failing path or message if ``exc`` (or what caused it) is ENOSPC."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and (exc.errno == errno.ENOSPC
                                         or "No space left on device" in str(exc)):
            return exc.filename or str(exc).strip().splitlines()[0]
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


COMMANDS = {"extract": _cmd_extract, "cluster": _cmd_cluster, "evaluate": _cmd_evaluate,
            "generate": _cmd_generate, "train-predictor": _cmd_train_predictor,
            "sweep": _cmd_sweep, "run": _cmd_run, "verify": _cmd_verify, "report": _cmd_report}


def main(argv: list[str] | None = None) -> int:
    def command() -> int:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="actclust: %(message)s", stream=sys.stderr)
        if not args.command:
            raise UserError("give a command: " + ", ".join(COMMANDS) + " (see `actclust --help`)")
        return COMMANDS[args.command](args)
    return guarded(command)


def guarded(fn) -> int:
    """Run ``fn``; bad input becomes one ``actclust: error:`` line and exit status 2."""
    try:
        return fn()
    except UserError as exc:
        # Raised in a Ray actor, it arrives as Ray's error class derived from UserError.
        cause = getattr(exc, "cause", None)
        print(f"actclust: error: {cause if isinstance(cause, UserError) else exc}",
              file=sys.stderr)
        return 2
    except Exception as exc:
        cause = getattr(exc, "cause", None)  # a UserError raised inside a Ray task or actor
        if isinstance(cause, UserError):
            print(f"actclust: error: {cause}", file=sys.stderr)
            return 2
        full = _disk_full(exc)
        if full is not None:
            print(f"actclust: error: no space left on device ({full}); nothing incomplete was "
                  "recorded as done: free space and rerun the same command to resume",
                  file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("actclust: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
