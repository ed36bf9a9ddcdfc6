"""Security defaults: no remote code unless asked, outputs only under --out."""

from __future__ import annotations

import json

import pytest

from actclust import config as C
from actclust.errors import UserError
from actclust.io.models import load_model

pytestmark = pytest.mark.timeout(1200)


def test_trust_remote_code_is_off_by_default():
    for cls in (C.ExtractConfig, C.EvaluateConfig):
        assert cls.__dataclass_fields__["trust_remote_code"].default is False


def test_a_model_that_ships_its_own_code_is_refused_without_the_flag(tmp_path):
    model = load_model("tiny:llama").model
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel", "AutoConfig": "evil.EvilConfig"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    (tmp_path / "m" / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(UserError, match="cannot load model"):
        load_model(str(tmp_path / "m"))


def test_local_model_directory_loads_from_safetensors(tmp_path):
    load_model("tiny:gpt2").model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert not list((tmp_path / "m").glob("*.bin"))
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.model.config.model_type == "gpt2"


def test_extract_writes_only_under_out(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / "out"
    import subprocess
    import sys

    from helpers import REPO

    from .support import CLI_TIMEOUT_S, RAY_START_ATTEMPTS, RAY_START_TIMEOUT

    for _ in range(RAY_START_ATTEMPTS):
        proc = subprocess.run([sys.executable, "-m", "actclust", "extract", "--model", "tiny:opt",
                               "--seq-len", "32", "--max-tokens", "1024", "--out", str(out)],
                              cwd=cwd, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                              env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
        if RAY_START_TIMEOUT not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "masks"]
