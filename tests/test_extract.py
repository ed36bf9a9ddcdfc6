"""Extraction writes the masks an independent hook computation gives, once each, resumably."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from actclust.io import mask_store as store
from actclust.config import ExtractConfig, build
from actclust.io.corpus import load_windows
from actclust.capture.extract import run_extract
from actclust.io.models import ByteTokenizer, ffn_sites, load_model
from actclust.capture.verify import verify
from helpers import REPO, SHARED_RAY, assert_same_layers, assert_user_error, run_cli


def extract(tmp_path, name="out", **kw):
    values = dict(model="tiny:opt", corpus="embedded:pydoc", seq_len=32, max_tokens=32 * 24,
                  out=str(tmp_path / name), shard_windows=8, workers=1)
    values.update(kw)
    cfg = build(ExtractConfig, values)
    return cfg, run_extract(cfg)


def read_all(root):
    manifest = store.read_manifest(root)
    return {layer: pq.read_table(store.layer_files(root, manifest, layer)[0].parent).sort_by(
        [("seq", "ascending"), ("pos", "ascending")]) for layer in manifest["layers"]}


def independent_activations(model_name, cfg):
    """Activations entering each FFN output projection, with hooks written here."""
    loaded = load_model(model_name)
    windows = load_windows(cfg.corpus, ByteTokenizer(), cfg.seq_len, split=cfg.split,
                           max_tokens=cfg.max_tokens)
    acts = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: acts.setdefault(i, []).append(
        args[0].reshape(-1, args[0].shape[-1]).clone())) for i, m in enumerate(ffn_sites(loaded.model))]
    with torch.inference_mode():
        for w in windows.ids:  # one window at a time: a different batching than extraction
            loaded.model(torch.tensor(w[None]))
    for h in handles:
        h.remove()
    return windows, {i: torch.cat(v).numpy() for i, v in acts.items()}


@pytest.mark.parametrize("model_name", ["tiny:opt", "tiny:llama"])
def test_masks_equal_independent_computation(tmp_path, ray_session, model_name):
    cfg, manifest = extract(tmp_path, model=model_name)
    windows, acts = independent_activations(model_name, cfg)
    tables = read_all(cfg.out)
    for layer, a in acts.items():
        tau = manifest["thresholds"][layer]
        bits = store.bits_to_numpy(tables[layer].column("bits"))
        got = store.unpack(bits, manifest["d_ff"])
        want = np.abs(a) > tau
        # Away from the threshold, batching cannot flip a bit.
        safe = (np.abs(np.abs(a) - tau) > 1e-5) | (a == 0)  # ReLU zeros are exact
        np.testing.assert_array_equal(got[safe], want[safe])
        assert safe.mean() > 0.99
        np.testing.assert_array_equal(tables[layer].column("token").to_numpy(),
                                      windows.ids.reshape(-1))
    if model_name == "tiny:opt":
        assert manifest["thresholds"] == [0.0, 0.0]  # ReLU default: "fired" is a > 0
        for layer, a in acts.items():
            got = store.unpack(store.bits_to_numpy(tables[layer].column("bits")), manifest["d_ff"])
            assert np.array_equal(got, a > 0)


def test_calibrated_sparsity_hits_target(tmp_path, ray_session):
    cfg, manifest = extract(tmp_path, model="tiny:llama", sparsity=0.7, calibration_windows=24)
    assert manifest["identity"]["sparsity"] == 0.7
    assert manifest["sparsity_target"] == 0.7
    for layer, table in read_all(cfg.out).items():
        bits = store.unpack(store.bits_to_numpy(table.column("bits")), manifest["d_ff"])
        assert abs((1 - bits.mean()) - 0.7) < 0.02


def test_rows_and_manifest(tmp_path, ray_session):
    cfg, manifest = extract(tmp_path)
    assert manifest["tokens"] == 24 * 32 and manifest["windows"] == 24
    assert manifest["sparsity_target"] is None  # ReLU: tau = 0, no sparsity applied
    assert [s["status"] for s in manifest["shards"]] == ["complete"] * 3
    for table in read_all(cfg.out).values():
        assert table.num_rows == 24 * 32
        assert table.schema.field("bits").type.byte_width == 32  # d_ff 256 / 8
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == manifest
    assert verify(cfg.out) == []


def test_two_workers_write_identical_content(tmp_path, ray_session):
    one, _ = extract(tmp_path, "one", model="tiny:llama", workers=1)
    two, _ = extract(tmp_path, "two", model="tiny:llama", workers=2)
    a, b = read_all(one.out), read_all(two.out)
    assert_same_layers(a, b)


def test_foreign_config_on_existing_out_is_refused(tmp_path, ray_session):
    extract(tmp_path)
    proc = run_cli("extract", "--model", "tiny:llama", "--corpus", "embedded:pydoc", "--seq-len",
                   "32", "--max-tokens", str(32 * 24), "--out", str(tmp_path / "out"),
                   "--shard-windows", "8")
    assert_user_error(proc, "different configuration", "model")


def test_killed_driver_resumes_to_identical_output(tmp_path, ray_session):
    reference, _ = extract(tmp_path, "ref", shard_windows=2, max_tokens=32 * 40)
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "actclust", "extract", "--model", "tiny:opt", "--corpus",
            "embedded:pydoc", "--seq-len", "32", "--max-tokens", str(32 * 40), "--out", str(out),
            "--shard-windows", "2", "--workers", "1"]
    # The killed driver joins the shared cluster, as the resumed one does.
    env = SHARED_RAY.client_env()
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            done = len(store.complete_shards(store.read_manifest(out)))
        except Exception:
            done = 0
        if done >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = store.read_manifest(out)
    assert 2 <= len(store.complete_shards(partial)) < len(partial["shards"])
    assert verify(str(out)) != []  # incomplete is reported, not passed
    res = run_cli(*args[3:])
    assert res.returncode == 0, res.stderr[-2000:]
    assert verify(str(out)) == []
    a, b = read_all(reference.out), read_all(str(out))
    assert_same_layers(a, b)


def test_verify_detects_truncation_and_flipped_byte(tmp_path, ray_session):
    cfg, manifest = extract(tmp_path)
    files = store.layer_files(cfg.out, manifest, 1)
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])
    flipped = bytearray(files[1].read_bytes())
    flipped[len(flipped) // 3] ^= 0x40
    files[1].write_bytes(bytes(flipped))
    problems = verify(cfg.out)
    assert any(files[0].name in p and "layer=1" in p for p in problems)
    assert any(files[1].name in p and "sha256" in p for p in problems)
    proc = run_cli("verify", cfg.out)
    assert_user_error(proc, "failed verification")
    assert proc.stderr.count("actclust: verify:") == len(problems)
