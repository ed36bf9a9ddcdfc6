"""Open an output directory that carries an identity: what its results were made from.

The identity is written once, when the directory is first used, and compared
once, on every later use: a rerun of the same command resumes, a different
configuration is refused with one line that names what differs.
"""

from __future__ import annotations

from pathlib import Path

from actclust.errors import UserError
from actclust.io.files import read_json, write_json_atomic


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


def refuse_foreign(out: Path, marker: str) -> None:
    """Refuse a directory with contents but without our ``marker`` file."""
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {out} exists, is not empty and has no {marker}; "
                        "choose an empty or new --out")


def open_output(out, marker: str, identity: dict, holds: str, *, fresh_only: bool = True,
                hint: str = "use a new --out") -> bool:
    """Open ``out`` for results of ``identity``; returns True when it resumes.

    New or empty directory: ``identity`` is written to ``out/marker``. One whose
    marker matches: resumed. Another marker: refused, naming what differs. With
    ``fresh_only``, a non-empty directory without the marker is refused too.
    """
    out = Path(out)
    path = out / marker
    if path.is_file():
        refuse_changed(out, read_json(path), identity, holds, hint=hint)
        return True
    if fresh_only and out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {out} exists and is not empty; choose a new --out")
    write_json_atomic(identity, path)
    return False
