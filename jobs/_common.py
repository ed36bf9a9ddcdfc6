"""Argument handling shared by the Ray job entry points (nothing else lives here)."""

from __future__ import annotations

import argparse
import sys
import tempfile

from actclust import console
from actclust.capture.extract import run_extract
from actclust.cli import guarded
from actclust.clustering.distributed import run_cluster
from actclust.config import (ClusterConfig, EvaluateConfig, ExtractConfig, PredictorConfig,
                             build, load_yaml)
from actclust.errors import UserError
from actclust.orchestration.sweep import SweepConfig

# Every configuration a preset's keys may belong to (a sweep's includes a run's).
STAGE_CONFIGS = (ExtractConfig, ClusterConfig, EvaluateConfig, PredictorConfig, SweepConfig)

# Small settings that exercise every stage in about a minute on a CPU.
SMOKE = dict(model="tiny:opt", corpus="embedded:pydoc", seq_len=64, max_tokens=64 * 64,
             eval_max_tokens=64 * 8, k=[4, 8], theta=[0.5], workers=1)


def parse(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML preset (see jobs/presets/)")
    parser.add_argument("--smoke-test", action="store_true",
                        help="run small on a tiny model, ignoring the preset's sizes")
    parser.add_argument("--out", help="output directory (overrides the preset)")
    args = parser.parse_args()
    console.configure(0)
    return args


def values(args: argparse.Namespace, smoke: dict) -> dict:
    data = load_yaml(args.config) if args.config else {}
    if args.smoke_test:
        data.update(smoke)
        data["out"] = tempfile.mkdtemp(prefix="actclust-smoke-")  # never a preset's real output
    if args.out:
        data["out"] = args.out
    return data


def build_from(cls, data: dict, args: argparse.Namespace):
    """A validated ``cls`` from the keys of ``data`` that ``cls`` knows.

    A preset is a run or sweep config, so a stage's job leaves the other stages' keys
    aside; a key that no stage knows (a typo) is refused, as the CLI refuses it.
    """
    source = args.config or "arguments"
    known = set().union(*(c.__dataclass_fields__ for c in STAGE_CONFIGS))
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                        f"in {source}; no stage of actclust takes it")
    keys = set(cls.__dataclass_fields__)
    return build(cls, {k: v for k, v in data.items() if k in keys}, source=source)


def smoke_inputs(with_centroids: bool) -> dict:
    """Tiny masks (and centroids) in a temporary directory for a smoke test."""
    root = tempfile.mkdtemp(prefix="actclust-smoke-")
    run_extract(build(ExtractConfig, dict(model="tiny:opt", seq_len=64, max_tokens=64 * 32,
                                          out=f"{root}/masks")))
    paths = {"root": root, "masks": f"{root}/masks"}
    if with_centroids:
        run_cluster(build(ClusterConfig, dict(masks=f"{root}/masks", k=8, out=f"{root}/c")))
        paths["centroids"] = f"{root}/c"
    return paths


def main(fn) -> None:
    sys.exit(guarded(fn))
