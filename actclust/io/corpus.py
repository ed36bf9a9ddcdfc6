"""Corpora and their deterministic token windows.

Corpus identifiers (docs/formats.md): ``embedded:pydoc``, ``hf:NAME[:CONFIG[:SPLIT]]``
and local paths or globs of ``.txt``, ``.jsonl`` and ``.parquet`` files.

Documents are tokenized in corpus order and joined with the tokenizer's
end-of-text id; the stream is cut into ``seq_len`` windows numbered
``seq = 0, 1, ...`` (a trailing partial window is dropped).

Held-out rule: window ``seq`` is held out iff ``seq % heldout_every ==
heldout_every - 1`` (every 10th window by default). Fitting ("train") and
evaluation ("heldout") therefore never share a window, the rule needs no
knowledge of the corpus length, and a ``max_tokens`` cap takes the first windows
of the requested split.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from actclust.errors import UserError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclasses.dataclass
class Windows:
    """Token windows of one split: ``ids`` (W, seq_len) int64, ``seq`` (W,) int64."""

    seq: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.seq)

    @property
    def tokens(self) -> int:
        return int(self.ids.size)

    def take(self, index) -> "Windows":
        return Windows(self.seq[index], self.ids[index])


def read_texts(corpus: str, text_column: str = "text") -> Iterator[str]:
    """Yield the documents of ``corpus`` in a deterministic order."""
    if corpus == "embedded:pydoc":
        yield from _pydoc_texts()
    elif corpus.startswith("embedded:"):
        raise UserError(f"unknown embedded corpus {corpus!r}; the embedded corpus is embedded:pydoc")
    elif corpus.startswith("hf:"):
        yield from _hf_texts(corpus, text_column)
    else:
        for path in _local_files(corpus):
            yield from _file_texts(path, text_column)


def _pydoc_texts() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def _hf_texts(corpus: str, text_column: str) -> Iterator[str]:
    parts = corpus[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise UserError(f"bad corpus {corpus!r}: use hf:NAME[:CONFIG[:SPLIT]]")
    name, config, split = (parts + [None, None])[:3]
    import datasets

    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # datasets raises many types for "not found / offline"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load corpus {corpus!r}: {first}") from None
    if text_column not in ds.column_names:
        raise UserError(f"corpus {corpus!r} has no column {text_column!r}; columns: "
                        f"{', '.join(ds.column_names)} (choose one with --text-column)")
    for text in ds[text_column]:
        if text:
            yield text


def _local_files(corpus: str) -> list[Path]:
    if any(ch in corpus for ch in "*?["):
        paths = sorted(Path(p) for p in glob.glob(corpus, recursive=True))
    elif os.path.isdir(corpus):
        paths = sorted(p for p in Path(corpus).rglob("*") if p.suffix in LOCAL_SUFFIXES)
    elif os.path.exists(corpus):
        paths = [Path(corpus)]
    else:
        raise UserError(f"corpus {corpus!r} does not exist: give embedded:pydoc, "
                        "hf:NAME[:CONFIG[:SPLIT]], or a path or glob of .txt/.jsonl/.parquet files")
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise UserError(f"corpus {corpus!r} matches no files")
    bad = [p for p in paths if p.suffix not in LOCAL_SUFFIXES]
    if bad:
        raise UserError(f"corpus file {bad[0]} has an unsupported type; use .txt, .jsonl or .parquet")
    return paths


def _file_texts(path: Path, text_column: str) -> Iterator[str]:
    if path.suffix == ".parquet":
        yield from _parquet_texts(path, text_column)
        return
    try:
        content = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"corpus file {path} is not UTF-8 text (bad byte at offset {exc.start})") from None
    if path.suffix == ".txt":
        yield content
        return
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno} is not valid JSON: {exc.msg}") from None
        if not isinstance(record, dict) or text_column not in record:
            raise UserError(f"{path}:{lineno} has no field {text_column!r} "
                            "(choose the field with --text-column)")
        if not isinstance(record[text_column], str):
            raise UserError(f"{path}:{lineno}: field {text_column!r} is not a string")
        yield record[text_column]


def _parquet_texts(path: Path, text_column: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"corpus file {path} is not a readable Parquet file: {exc}") from None
    names = pf.schema_arrow.names
    if text_column not in names:
        raise UserError(f"corpus file {path} has no column {text_column!r}; columns: "
                        f"{', '.join(names)} (choose one with --text-column)")
    for batch in pf.iter_batches(columns=[text_column]):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


def iter_windows(texts: Iterator[str], tokenizer, seq_len: int) -> Iterator[np.ndarray]:
    """Cut the joined token stream into consecutive (seq_len,) windows."""
    buffer: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        buffer.extend(tokenizer.encode(text))
        if eos is not None:
            buffer.append(eos)
        while len(buffer) >= seq_len:
            yield np.asarray(buffer[:seq_len], dtype=np.int64)
            del buffer[:seq_len]


def in_split(seq: int, split: str, heldout_every: int) -> bool:
    held = seq % heldout_every == heldout_every - 1
    return split == "all" or (split == "heldout") == held


def load_windows(corpus: str, tokenizer, seq_len: int, *, split: str = "train",
                 max_tokens: int | None = None, heldout_every: int = 10,
                 text_column: str = "text") -> Windows:
    """The windows of ``split``, at most ``max_tokens // seq_len`` of them."""
    limit = None if max_tokens is None else max_tokens // seq_len
    seqs: list[int] = []
    rows: list[np.ndarray] = []
    total = 0
    for seq, window in enumerate(iter_windows(read_texts(corpus, text_column), tokenizer, seq_len)):
        total += 1
        if in_split(seq, split, heldout_every):
            seqs.append(seq)
            rows.append(window)
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        if total == 0:
            raise UserError(f"corpus {corpus!r} is empty or shorter than one window of "
                            f"{seq_len} tokens; lower --seq-len or add text")
        raise UserError(f"corpus {corpus!r} has {total} window(s) of {seq_len} tokens, none in "
                        f"the {split!r} split (every {heldout_every}th window is held out); "
                        "lower --seq-len or add text")
    return Windows(np.asarray(seqs, dtype=np.int64), np.stack(rows))
