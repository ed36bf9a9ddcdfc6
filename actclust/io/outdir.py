"""Open an output directory that carries an identity: what its results were made from.

The identity is written once, when the directory is first used, and compared
once, on every later use: a rerun of the same command resumes, a different
configuration is refused with one line that names what differs.
"""

from __future__ import annotations

from actclust.errors import UserError
from actclust.io import storage
from actclust.io.storage import read_json, write_json_atomic


def differences(previous: dict, current: dict) -> list[str]:
    """Keys of ``current`` whose value differs in ``previous``, in ``current``'s order."""
    return [k for k in current if previous.get(k) != current[k]]


def refuse_changed(out, previous: dict, current: dict, holds: str, *, values: bool = False,
                   hint: str = "use a new --out") -> None:
    """Raise one UserError line if ``previous`` and ``current`` differ.

    ``holds`` says what ``out`` holds ("masks of a different configuration");
    with ``values`` the line shows each key's old and new value.
    """
    changed = differences(previous, current)
    if not changed:
        return
    if values:
        what = ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in changed)
    else:
        what = f"{', '.join(changed)} differ"
    raise UserError(f"{out} holds {holds} ({what}); {hint}")


def refuse_foreign(out, marker: str) -> None:
    """Refuse a directory (or object-store prefix) with contents but without our ``marker``."""
    if not storage.is_empty(out):
        raise UserError(f"output directory {out} exists, is not empty and has no {marker}; "
                        "choose an empty or new --out")


def open_output(out, marker: str, identity: dict, holds: str, *, fresh_only: bool = True,
                hint: str = "use a new --out") -> bool:
    """Open ``out`` for results of ``identity``; returns True when it resumes.

    New or empty directory: ``identity`` is written to ``out/marker``. One whose
    marker matches: resumed. Another marker: refused, naming what differs. With
    ``fresh_only``, a non-empty directory without the marker is refused too.
    """
    path = storage.join(out, marker)
    if storage.is_file(path):
        refuse_changed(out, read_json(path), identity, holds, hint=hint)
        return True
    if fresh_only and not storage.is_empty(out):
        raise UserError(f"output directory {out} exists and is not empty; choose a new --out")
    storage.makedirs(out)
    write_json_atomic(identity, path)
    return False
