import json

import numpy as np
import pytest

from actclust.io.corpus import in_split, load_windows, read_texts
from actclust.errors import UserError
from actclust.io.models import ByteTokenizer

TOK = ByteTokenizer()


def test_pydoc_windows_are_deterministic():
    a = load_windows("embedded:pydoc", TOK, 128, split="all", max_tokens=128 * 50)
    b = load_windows("embedded:pydoc", TOK, 128, split="all", max_tokens=128 * 50)
    assert a.ids.shape == (50, 128)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.seq, np.arange(50))


def test_heldout_split_is_disjoint_and_covers_everything():
    all_ = load_windows("embedded:pydoc", TOK, 256, split="all", max_tokens=256 * 100)
    train = load_windows("embedded:pydoc", TOK, 256, split="train", max_tokens=256 * 90)
    held = load_windows("embedded:pydoc", TOK, 256, split="heldout", max_tokens=256 * 10)
    assert set(train.seq).isdisjoint(held.seq)
    assert sorted(set(train.seq) | set(held.seq)) == list(all_.seq)
    assert list(held.seq) == [9, 19, 29, 39, 49, 59, 69, 79, 89, 99]
    np.testing.assert_array_equal(held.ids, all_.ids[held.seq])
    assert not any(in_split(s, "heldout", 10) for s in train.seq)


def test_max_tokens_caps_windows():
    w = load_windows("embedded:pydoc", TOK, 100, max_tokens=1050)
    assert len(w) == 10 and w.tokens == 1000


def test_jsonl_and_parquet_and_glob(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["alpha " * 30, "beta " * 30, "gamma " * 30]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs))
    pq.write_table(pa.table({"body": docs}), tmp_path / "b.parquet")
    assert list(read_texts(str(tmp_path / "a.jsonl"), "body")) == docs
    assert list(read_texts(str(tmp_path / "b.parquet"), "body")) == docs
    assert list(read_texts(str(tmp_path / "*.*"), "body")) == docs + docs
    w = load_windows(str(tmp_path / "a.jsonl"), TOK, 16, split="all", text_column="body")
    assert w.ids[0].tolist() == list(b"alpha alpha alph")


@pytest.mark.parametrize("setup, corpus, column, message", [
    (None, "missing.txt", "text", "does not exist"),
    ("empty", "c.txt", "text", "empty or shorter than one window"),
    ("short", "c.txt", "text", "empty or shorter than one window"),
    ("nocol", "c.jsonl", "text", "has no field 'text'"),
    ("nocolpq", "c.parquet", "text", "has no column 'text'"),
    ("latin1", "c.txt", "text", "is not UTF-8"),
    (None, "hf:", "text", "hf:NAME"),
])
def test_bad_corpora(tmp_path, setup, corpus, column, message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / corpus
    if setup == "empty":
        path.write_text("")
    elif setup == "short":
        path.write_text("tiny")
    elif setup == "nocol":
        path.write_text(json.dumps({"body": "x" * 100}) + "\n")
    elif setup == "nocolpq":
        pq.write_table(pa.table({"body": ["x" * 100]}), path)
    elif setup == "latin1":
        path.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    target = corpus if corpus.startswith("hf:") else str(path)
    with pytest.raises(UserError, match=message) as info:
        load_windows(target, TOK, 32, split="all", text_column=column)
    if setup == "latin1":
        assert str(path) in str(info.value)
