"""The command line: one `actclust: error:` line and exit 2 for every kind of bad input."""

import pytest

from actclust.cli import main
from helpers import assert_user_error, run_cli


def one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("actclust: error:"), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv, fragment", [
    ([], "give a command"),
    (["frobnicate"], "invalid choice"),
    (["extract", "--out", "X", "--model", "nonsense"], "unknown model 'nonsense'"),
    (["extract", "--out", "X", "--model", "tiny:bert"], "unknown tiny model"),
    (["extract", "--out", "X", "--corpus", "/no/such/file.txt"], "does not exist"),
    (["extract", "--out", "X", "--seq-len", "1"], "seq_len must be at least 2"),
    (["extract", "--out", "X", "--seq-len", "64", "--max-tokens", "10"], "smaller than one window"),
    (["extract", "--out", "X", "--sparsity", "1.5"], "sparsity must be in (0, 1)"),
    (["extract", "--out", "X", "--sparsity", "0.5", "--threshold", "0"], "not allowed with"),
    (["extract", "--out", "X", "--workers", "0"], "workers must be at least 1"),
    (["extract", "--out", "X", "--sites", "attn"], "sites must be one of"),
    (["extract"], "missing out"),
    (["extract", "--out", "X", "--seq-len", "abc"], "invalid int value"),
    (["cluster", "--masks", "M", "--out", "O"], "missing k"),
    (["evaluate", "--out", "O"], "missing centroids"),
    (["evaluate", "--centroids", "/nonexistent", "--out", "O"], "not a clustering directory"),
    (["verify", "/nonexistent"], "manifest.json is missing"),
    (["report", "/nonexistent"], "has no results.json"),
    (["sweep"], "sweep needs --config"),
])
def test_bad_arguments(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert fragment in one_error_line(capsys)
    assert not (tmp_path / "X" / "manifest.json").exists()


@pytest.mark.parametrize("content, fragment", [
    ("model: [unclosed", "is not valid YAML"),
    ("- a\n- b\n", "must hold a mapping"),
    ("colour: red\n", "unknown key colour"),
    ("seq_len: many\n", "seq_len in config file"),
    ("workers: 1.5\n", "workers in config file"),
])
def test_bad_config_files(content, fragment, capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(content)
    assert main(["extract", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert fragment in one_error_line(capsys)


def test_missing_config_file(capsys, tmp_path):
    assert main(["cluster", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in one_error_line(capsys)


def test_flags_override_the_config_file(tmp_path):
    from actclust import config as C

    cfg = C.build(C.ExtractConfig, {"seq_len": 128, "out": "a"}, {"seq_len": 64, "out": None})
    assert cfg.seq_len == 64 and cfg.out == "a"


def test_non_utf8_corpus_names_the_file_in_a_real_process(tmp_path):
    bad = tmp_path / "latin.txt"
    bad.write_bytes("na\xefve ".encode("latin-1") * 100)
    proc = run_cli("extract", "--model", "tiny:opt", "--corpus", str(bad), "--out",
                   str(tmp_path / "o"))
    assert_user_error(proc, "latin.txt", "not UTF-8")
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_gated_site_on_a_relu_model_is_one_clear_line(tmp_path):
    proc = run_cli("extract", "--model", "tiny:opt", "--sites", "gate", "--seq-len", "32",
                   "--max-tokens", "256", "--out", str(tmp_path / "o"))
    assert_user_error(proc, "needs a gated FFN")
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_module_and_console_script_agree():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "extract" in proc.stdout and "sweep" in proc.stdout
