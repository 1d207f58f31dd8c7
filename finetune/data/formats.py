"""Reading training datasets from any path the user names, on top of :mod:`inference.conversations`.

Validating conversations has one home, :mod:`inference.conversations` (the runtime needs it too and may not import
``finetune``): the JSON-lines reader, format detection, ShareGPT conversion and message/tool normalization, and
:class:`Example`. This module adds what only training reads: ``save_to_disk`` directories and parquet files or
directories through HF ``datasets`` (offline, imported only when such data is actually loaded), and the dataset
fingerprint recorded in a run's lineage.

Any bad input raises :class:`DataError` with a one-line message that says where: ``data/x.jsonl:17: ...`` for
JSON-lines files, ``DIR[row 17]: ...`` (0-based row index) for rows that come through HF ``datasets``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from inference.conversations import (
    SAVED_DATASET_FILES,
    Example,
    MessageError,
    Records,
    read_examples,
    read_jsonl,
    to_example,
)

__all__ = ["DataError", "Example", "dataset_fingerprint", "find_problems", "load_examples"]


class DataError(MessageError):
    """A dataset file, record or message is malformed; the message names the file and line (or row)."""


# ----------------------------------------------------------------------------------------------- public entry points

def load_examples(path: str | Path, format: str = "auto", limit: int | None = None) -> list[Example]:
    """Read ``path`` (a .jsonl/.json file, a .parquet file or an HF dataset directory) into normalized examples.

    ``format`` is ``auto`` (decided per record), ``openai`` or ``sharegpt``; ``limit`` stops after that many.
    """
    try:
        return read_examples(path, _records, format, limit)
    except DataError:
        raise
    except MessageError as exc:  # the shared validator's errors, as the one type training code catches
        raise DataError(str(exc)) from None


def dataset_fingerprint(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes; for a directory, of its sorted relative file names, sizes and bytes."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset not found: {path}")
    h = hashlib.sha256()
    if path.is_file():
        _hash_into(h, path)
        return h.hexdigest()
    files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    for rel, p in files:
        h.update(f"{rel}\0{p.stat().st_size}\0".encode())
        _hash_into(h, p)
    return h.hexdigest()


def _hash_into(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)


# ------------------------------------------------------------------------------------------------- finding records

def find_problems(path: str | Path, format: str = "auto") -> list[str]:
    """Every malformed line or record of a dataset, one message each (``python -m finetune validate``), where
    :func:`load_examples` stops at the first."""
    problems: list[str] = []
    path, count = Path(path), 0
    if path.is_file() and path.suffix in (".yaml", ".yml"):   # a recipe given as data: one line, not one per line
        return [f"{path}: is a YAML file; a dataset is JSON lines (.jsonl), parquet or a saved HF dataset"]
    try:
        for source, record in _records(path, problems):
            count += 1
            try:
                to_example(record, source, format)
            except MessageError as exc:
                problems.append(str(exc))
    except (DataError, MessageError) as exc:   # the dataset as a whole: missing, the wrong kind, unreadable
        problems.append(str(exc))
    if not count and not problems:
        problems.append(f"{path}: no examples")
    return problems


def _records(path: Path, problems: list[str] | None = None) -> Records:
    """(source, record) pairs from a file or directory, in order (``problems``: see ``read_jsonl``)."""
    if not path.exists():
        raise DataError(f"dataset not found: {path}")
    if path.is_file():
        yield from _hf_records(path, [path]) if path.suffix == ".parquet" else read_jsonl(path, problems)
        return
    if any((path / name).exists() for name in SAVED_DATASET_FILES):
        yield from _hf_records(path, None)
        return
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".parquet", ".jsonl", ".json"))
    parquet = [p for p in files if p.suffix == ".parquet"]
    if not files:
        raise DataError(f"{path}: not a saved HF dataset and holds no .parquet, .jsonl or .json files")
    if parquet and len(parquet) < len(files):
        raise DataError(f"{path}: holds both .parquet and .jsonl/.json files; keep one kind")
    if parquet:
        yield from _hf_records(path, parquet)
    else:  # our own reader, not datasets' json builder: exact line numbers, and no schema inferred from early rows
        for file in files:
            yield from read_jsonl(file, problems)


def _hf_records(path: Path, parquet: list[Path] | None) -> Records:
    """Rows of parquet files or a ``save_to_disk`` directory. Arrow fills keys missing from a row with None (its
    schema is the union over rows), so None-valued keys are dropped."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    try:
        if parquet:
            ds = datasets.load_dataset("parquet", data_files=[str(p) for p in parquet], split="train")
        else:
            ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # a user's broken files surface as many different library errors
        cause = exc
        while cause.__cause__ is not None:  # datasets wraps the useful error (e.g. a schema mismatch)
            cause = cause.__cause__
        detail = " ".join(str(cause).split())[:300]
        raise DataError(f"{path}: could not load dataset ({type(cause).__name__}: {detail})") from exc
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: saved DatasetDict has no 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    for i, row in enumerate(ds):
        yield f"{path}[row {i}]", _drop_nones(row)


def _drop_nones(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _drop_nones(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_drop_nones(v) for v in x]
    return x
