"""The predictor store: a trained predictor (``predictor.json`` + safetensors), the run
record of its training, and the feature shards it is trained on, on a local directory
or an object-store URI (:mod:`actclust.io.storage`).

Layout of a predictor directory::

    OUT/run.json                          identity of the training run, written first
    OUT/features/features.json            what the shards hold (windows, model, thresholds)
    OUT/features/shard-<i>.parquet        one shard of FFN inputs and true masks
    OUT/features/shard-<i>.json           its commit record: name, rows, sha256
    OUT/ray/train/                        Ray Train's checkpoints (same file system)
    OUT/predictor.safetensors             the weights
    OUT/predictor.json                    the commit record of the predictor, written last

Commit by record, as in the other stores: a predictor is complete once
``predictor.json`` names it, a feature shard once its ``.json`` record is written
after the Parquet object. An object without its record (a killed writer's) is
ignored and overwritten by the rerun; each shard has one writer, so no record is
ever written by two processes.
"""

from __future__ import annotations

import hashlib

from actclust.errors import UserError
from actclust.io import outdir, storage
from actclust.io.storage import read_json, write_json_atomic

KINDS = ("cluster", "neuron")
WEIGHTS = "predictor.safetensors"
META = "predictor.json"
RUN_RECORD = "run.json"
FEATURES_RECORD = "features.json"


# --- the predictor ---------------------------------------------------------------------


def save(directory, meta: dict, tensors: dict) -> None:
    """Weights first, then predictor.json (the record that the directory is complete)."""
    from safetensors.torch import save as to_bytes

    storage.makedirs(directory)
    weights = to_bytes({n: t.detach().cpu().contiguous() for n, t in tensors.items()})
    storage.write_bytes_atomic(weights, storage.join(directory, WEIGHTS))
    write_json_atomic(meta, storage.join(directory, META))


def is_finished(directory) -> bool:
    return storage.is_file(storage.join(directory, META))


def read_meta(directory) -> dict:
    """predictor.json of a finished predictor directory, checked for its required fields."""
    path = storage.join(directory, META)
    if not storage.is_file(path) or not storage.is_file(storage.join(directory, WEIGHTS)):
        raise UserError(f"{directory} is not a predictor directory ({META} and {WEIGHTS} "
                        "expected; create them with actclust train-predictor)")
    meta = storage.read_json_record(path)
    missing = [k for k in ("kind", "k", "rank", "layers", "width", "identity") if k not in meta]
    if missing or meta.get("kind") not in KINDS:
        raise UserError(f"{path} is not a predictor record (missing {', '.join(missing) or 'kind'})")
    return meta


def read_tensors(directory) -> dict:
    """The weights of a predictor directory as CPU tensors by name."""
    from safetensors.torch import load as from_bytes

    return from_bytes(storage.read_bytes(storage.join(directory, WEIGHTS)))


# --- the training run ------------------------------------------------------------------


def finished_run(out, identity: dict) -> dict | None:
    """predictor.json of ``out`` if it holds the predictor of ``identity``; None if none."""
    if not is_finished(out):
        return None
    record = read_meta(out)
    old = {k: v for k, v in record["identity"].items() if k in identity}
    if old != identity:
        raise UserError(f"{out} holds a predictor of another run; choose a new --out")
    return record


def open_run(out, identity: dict) -> bool:
    """Record the run in ``out``; True when a rerun of the same run resumes there.

    A directory with another run record, or with contents and no run record (foreign),
    is refused.
    """
    return outdir.open_output(out, RUN_RECORD, identity,
                              "an unfinished predictor run with other settings",
                              hint="rerun that command or choose a new --out")


def checkpoint_storage(out) -> tuple[str, object]:
    """``(storage_path, storage_filesystem)`` of Ray Train's checkpoints under ``out``."""
    return storage.ray_storage(storage.join(out, "ray"))


# --- feature shards --------------------------------------------------------------------


def open_features(root, want: dict) -> None:
    """Claim ``root`` for the feature shards described by ``want``; refuse other shards."""
    path = storage.join(root, FEATURES_RECORD)
    if storage.is_file(path):
        if read_json(path) != want:
            raise UserError(f"feature directory {root} was written for other windows, "
                            "model or thresholds; choose another --features directory")
        return
    storage.makedirs(root)
    write_json_atomic(want, path)


def shard_path(root, name: str) -> str:
    return storage.join(root, name)


def _record_path(root, name: str) -> str:
    return storage.join(root, name.rsplit(".", 1)[0] + ".json")


def shard_complete(root, name: str) -> bool:
    """True once the shard's commit record exists (an object without one is a stray)."""
    return storage.is_file(_record_path(root, name))


def write_shard(root, name: str, table) -> dict:
    """The shard's Parquet object, then its record; returns the record."""
    digest = storage.write_table_atomic(table, shard_path(root, name))
    record = {"name": name, "rows": table.num_rows, "sha256": digest}
    write_json_atomic(record, _record_path(root, name))
    return record


def read_shard(root, name: str):
    """A committed shard as a pyarrow Table, checked against its record's sha256."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    record_path = _record_path(root, name)
    if not storage.is_file(record_path):
        raise UserError(f"feature shard {shard_path(root, name)} has no commit record; "
                        "rerun train-predictor to write it")
    record = read_json(record_path)
    data = storage.read_bytes(shard_path(root, name))
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise UserError(f"feature shard {shard_path(root, name)} does not match its record's "
                        "sha256; delete it and its .json record and rerun train-predictor")
    return pq.read_table(pa.BufferReader(data))
