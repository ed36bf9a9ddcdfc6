"""Argument handling shared by the Ray job entry points (nothing else lives here)."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile

from actclust.cli import guarded
from actclust.config import load_yaml

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
    logging.basicConfig(level=logging.INFO, format="actclust: %(message)s", stream=sys.stderr)
    return args


def values(args: argparse.Namespace, smoke: dict) -> dict:
    data = load_yaml(args.config) if args.config else {}
    if args.smoke_test:
        data.update(smoke)
        data["out"] = tempfile.mkdtemp(prefix="actclust-smoke-")  # never a preset's real output
    if args.out:
        data["out"] = args.out
    return data


def main(fn) -> None:
    sys.exit(guarded(fn))
