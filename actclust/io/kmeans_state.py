"""The k-means state store: per-iteration checkpoints and finished layers, as .npz.

A state dict (see :func:`actclust.clustering.kmeans.fit`) holds numpy arrays and
JSON values; it is written as one .npz without pickle (the JSON part in
``_meta``) and written whole (:mod:`actclust.io.storage`: local or object store),
so a rerun resumes from the last complete one.

Layout under a clustering directory::

    OUT/checkpoints/layer=<l>.npz   the state after the latest iteration
    OUT/layers/layer=<l>.npz        a finished layer's result
"""

from __future__ import annotations

import io
import json

import numpy as np

from actclust.io import storage


def checkpoint_path(out, layer: int) -> str:
    return storage.join(out, "checkpoints", f"layer={layer}.npz")


def finished_path(out, layer: int) -> str:
    return storage.join(out, "layers", f"layer={layer}.npz")


def save_state(state: dict, path) -> None:
    """A k-means state dict as one .npz (no pickle), written whole (local or object store)."""
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    meta = {k: v for k, v in state.items() if k not in arrays}
    buffer = io.BytesIO()
    np.savez(buffer, _meta=np.array(json.dumps(meta)), **arrays)
    storage.write_bytes_atomic(buffer.getbuffer(), path)


def delete_state(path) -> None:
    """Remove a checkpoint once its layer is finished (nothing if it is not there)."""
    storage.delete_file(path)


def load_state(path) -> dict | None:
    """The state saved at ``path``, or None if there is none."""
    if not storage.is_file(path):
        return None
    with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as data:
        state = json.loads(str(data["_meta"]))
        for key in data.files:
            if key != "_meta":
                state[key] = data[key]
    for key in ("sums", "counts"):
        state.setdefault(key, None)
    return state
