"""The ``actclust`` command line: run a command, report bad input once, as one line.

Commands, flags, their help and examples live in :mod:`actclust.cliparser`. The
convention there (checked for every command by tests/test_cliparser.py): each flag's
help is one line with its unit and ``(default: ...)`` or ``(required)``, and each
command's help ends with an ``examples:`` epilog of one or two runnable lines.

Every command takes ``--config FILE`` (YAML); flags given on the command line
override the file. Exit status: 0 success, 2 bad input or usage, 1 internal
failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from actclust import config as C
from actclust.cliparser import build_parser
from actclust.errors import UserError
from actclust.orchestration.runconfig import RunConfig

log = logging.getLogger("actclust")


def _settings(args: argparse.Namespace) -> tuple[dict, str]:
    """The settings that flags override, and where they came from: a preset handed to
    :func:`main` (a Ray job's), the ``--config`` file, or nothing."""
    preset = getattr(args, "preset", None)
    if preset is not None:
        return dict(preset.values), preset.source
    if getattr(args, "config", None):
        return C.load_yaml(args.config), f"config file {args.config}"
    return {}, "arguments"


def _config(cls, args: argparse.Namespace, skip=("command", "config", "verbose", "preset")):
    file_values, source = _settings(args)
    overrides = {k: v for k, v in vars(args).items() if k not in skip}
    for flag, other in (("theta", "density"), ("density", "theta")):
        if overrides.get(flag) is not None:  # a flag replaces the file's objective
            file_values.pop(other, None)
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
    from actclust.evaluation.anchor_eval import run_anchor
    from actclust.evaluation.evaluate import run_evaluate

    cfg = _config(C.EvaluateConfig, args)
    if cfg.anchor is not None:
        result = run_anchor(cfg)
        keys = ("anchor", "anchor_sparsity", "dense_ppl", "anchor_ppl", "anchor_ppl_ci95",
                "anchor_realized_sparsity", "ffn_bytes_fraction")
        print(json.dumps({k: result[k] for k in keys}))
        return 0
    result = run_evaluate(cfg)
    keys = ("dense_ppl", "oracle_ppl", "cluster_ppl", "precision", "recall")
    if "predicted_ppl" in result:
        keys += ("predicted_ppl", "predicted_accuracy", "predicted_density")
    print(json.dumps({k: result[k] for k in keys}))
    return 0


def _cmd_mass_bits(args) -> int:
    from actclust.predict.mass import run_mass_bits

    cfg = _config(C.MassBitsConfig, args)
    run_mass_bits(cfg)
    log.info("wrote %s/centroids.parquet (bits by activation mass)", cfg.out)
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

    if not args.config and getattr(args, "preset", None) is None:
        raise UserError("sweep needs --config FILE (see jobs/presets/sweep_default.yaml)")
    values, source = _settings(args)
    overrides = {"predictor": args.predictor} if args.predictor is not None else None
    run_sweep(values, source=source, overrides=overrides)
    return 0


def _cmd_run(args) -> int:
    from actclust.orchestration.pipeline import run_pipeline

    cfg = _config(RunConfig, args)
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


def _cmd_compare(args) -> int:
    from actclust.evaluation.compare import format_table, run_compare

    print(format_table(run_compare(args.points, args.out, args.resamples, args.seed,
                                   args.plot)))
    return 0


def _cmd_fetch_model(args) -> int:
    from actclust.io.model_fetch import fetch_model

    path = fetch_model(args.name, find_links=args.find_links)
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
            "mass-bits": _cmd_mass_bits,
            "sweep": _cmd_sweep, "run": _cmd_run, "verify": _cmd_verify, "report": _cmd_report,
            "compare": _cmd_compare, "fetch-model": _cmd_fetch_model}


@dataclasses.dataclass(frozen=True)
class Preset:
    """Settings given as a mapping instead of ``--config FILE`` (a Ray job's preset, already
    read); ``source`` names it in error messages. Flags still override it."""

    values: dict
    source: str


def main(argv: list[str] | None = None, preset: Preset | None = None) -> int:
    def command() -> int:
        from actclust import console

        args = build_parser().parse_args(argv)
        args.preset = preset
        console.configure(args.verbose)
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
