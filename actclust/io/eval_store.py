"""The evaluation store: ``OUT/eval.json``, written whole (its existence is the commit
record of an evaluation), read back as a dict."""

from __future__ import annotations

from actclust.io import storage
from actclust.io.storage import read_json, write_json_atomic

EVAL_FILE = "eval.json"


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
