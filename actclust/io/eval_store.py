"""The evaluation store: ``OUT/eval.json``, written whole (its existence is the commit
record of an evaluation), read back as a dict, and a run's shared baseline
``baseline.json`` (the centroid-free dense and oracle passes)."""

from __future__ import annotations

from actclust.io import storage
from actclust.io.storage import read_json, write_json_atomic

EVAL_FILE = "eval.json"
BASELINE_FILE = "baseline.json"


def eval_path(out) -> str:
    return storage.join(out, EVAL_FILE)


def write_eval(report: dict, out) -> str:
    path = eval_path(out)
    write_json_atomic(report, path)
    return path


def read_eval(out) -> dict | None:
    """eval.json of ``out``, or None if the evaluation has not finished there."""
    path = eval_path(out)
    return read_json(path) if storage.is_file(path) else None


def read_baseline(directory, identity: dict, seq: list[int]) -> dict | None:
    """The cached baseline of ``directory`` if it was computed for exactly these settings
    and windows (``seq``, in order)."""
    if directory is None:
        return None
    path = storage.join(directory, BASELINE_FILE)
    if not storage.is_file(path):
        return None
    cached = read_json(path)
    if cached.get("identity") != identity or cached.get("seq") != list(seq):
        return None
    return cached


def write_baseline(directory, baseline: dict) -> None:
    write_json_atomic(baseline, storage.join(directory, BASELINE_FILE))
