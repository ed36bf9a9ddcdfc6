"""What the Ray job entry points share: each job is ``actclust <command>`` on a preset.

A job reads its preset (``--config``), narrows it to the keys its command takes (a preset
is usually a whole run's or sweep's, so the other stages' keys are left aside, while a key
no stage takes is refused as a typo), and hands it to :func:`actclust.cli.main`, so a job
refuses exactly what the command line refuses and writes exactly what it writes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from actclust import cli
from actclust.config import (ClusterConfig, EvaluateConfig, ExtractConfig, PredictorConfig,
                             load_yaml)
from actclust.errors import UserError
from actclust.orchestration.runconfig import RunConfig
from actclust.orchestration.sweep import SweepConfig

# The configuration each command builds (run and sweep take a whole preset).
COMMAND_CONFIGS = {"extract": ExtractConfig, "cluster": ClusterConfig,
                   "evaluate": EvaluateConfig, "train-predictor": PredictorConfig,
                   "run": RunConfig, "sweep": SweepConfig}

# Small settings that exercise every stage in about a minute on a CPU.
SMOKE = dict(model="tiny:opt", corpus="embedded:pydoc", seq_len=64, max_tokens=64 * 64,
             eval_max_tokens=64 * 8, k=[4, 8], theta=[0.5], workers=1)


def parse(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML preset (see jobs/presets/)")
    parser.add_argument("--smoke-test", action="store_true",
                        help="run small on a tiny model, ignoring the preset's sizes")
    parser.add_argument("--out", help="output directory (overrides the preset)")
    return parser.parse_args()


def values(args: argparse.Namespace, smoke: dict) -> dict:
    data = load_yaml(args.config) if args.config else {}
    if args.smoke_test:
        data.update(smoke)
        data["out"] = tempfile.mkdtemp(prefix="actclust-smoke-")  # never a preset's real output
    if args.out:
        data["out"] = args.out
    return data


def stage_keys(command: str, data: dict, source: str) -> dict:
    """The keys of ``data`` that ``command`` takes; a key that no command takes is refused."""
    known = set().union(*(c.__dataclass_fields__ for c in COMMAND_CONFIGS.values()))
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                        f"in {source}; no stage of actclust takes it")
    keys = COMMAND_CONFIGS[command].__dataclass_fields__
    return {k: v for k, v in data.items() if k in keys}


def run_command(command: str, data: dict, args: argparse.Namespace | None = None) -> int:
    """``actclust <command>`` on the settings ``data`` (exit status as the CLI's)."""
    source = (args.config if args is not None else None) or "arguments"
    # run and sweep take a whole preset: what their command refuses, the job refuses.
    chosen = data if command in ("run", "sweep") else stage_keys(command, data, source)
    return cli.main([command], preset=cli.Preset(chosen, source))


def smoke_inputs(with_centroids: bool) -> dict:
    """Tiny masks (and centroids) in a temporary directory for a smoke test."""
    root = tempfile.mkdtemp(prefix="actclust-smoke-")
    paths = {"root": root, "masks": f"{root}/masks"}
    _check(run_command("extract", dict(model="tiny:opt", seq_len=64, max_tokens=64 * 32,
                                       out=paths["masks"])))
    if with_centroids:
        paths["centroids"] = f"{root}/c"
        _check(run_command("cluster", dict(masks=paths["masks"], k=8, out=paths["centroids"])))
    return paths


def _check(status: int) -> None:
    if status != 0:
        raise SystemExit(status)


def main(job) -> None:
    sys.exit(cli.guarded(job))
