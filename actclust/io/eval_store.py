"""The evaluation store: ``OUT/eval.json``, written atomically, read back as a dict."""

from __future__ import annotations

from pathlib import Path

from actclust.io.files import read_json, write_json_atomic

EVAL_FILE = "eval.json"


def eval_path(out) -> Path:
    return Path(out) / EVAL_FILE


def write_eval(report: dict, out) -> Path:
    path = eval_path(out)
    write_json_atomic(report, path)
    return path


def read_eval(out) -> dict | None:
    """eval.json of ``out``, or None if the evaluation has not finished there."""
    path = eval_path(out)
    return read_json(path) if path.is_file() else None
