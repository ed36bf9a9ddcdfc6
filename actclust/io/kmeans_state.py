"""The k-means state store: per-iteration checkpoints and finished layers, as .npz.

A state dict (see :func:`actclust.clustering.kmeans.fit`) holds numpy arrays and
JSON values; it is written as one .npz without pickle (the JSON part in
``_meta``) and replaced atomically, so a rerun resumes from the last complete one.

Layout under a clustering directory::

    OUT/checkpoints/layer=<l>.npz   the state after the latest iteration
    OUT/layers/layer=<l>.npz        a finished layer's result
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from actclust.io.files import write_bytes_atomic


def checkpoint_path(out: Path, layer: int) -> Path:
    return Path(out) / "checkpoints" / f"layer={layer}.npz"


def finished_path(out: Path, layer: int) -> Path:
    return Path(out) / "layers" / f"layer={layer}.npz"


def save_state(state: dict, path: Path) -> None:
    """A k-means state dict as one .npz (no pickle), replaced atomically."""
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    meta = {k: v for k, v in state.items() if k not in arrays}
    buffer = io.BytesIO()
    np.savez(buffer, _meta=np.array(json.dumps(meta)), **arrays)
    write_bytes_atomic(buffer.getvalue(), path)


def load_state(path: Path) -> dict | None:
    """The state saved at ``path``, or None if there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        state = json.loads(str(data["_meta"]))
        for key in data.files:
            if key != "_meta":
                state[key] = data[key]
    for key in ("sums", "counts"):
        state.setdefault(key, None)
    return state
