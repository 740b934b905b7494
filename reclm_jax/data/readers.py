"""Line readers for the raw formats, with errors that name the file and line."""

from __future__ import annotations

import ast
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from reclm_jax.data.schema import DataError


def open_text(path: str | Path):
    """Open a text file, gzipped or not (decided by its magic bytes, not its name); CRLF becomes LF."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    if gz:
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline=None)
    return open(path, encoding="utf-8", errors="replace", newline=None)


def read_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) from a file of one record per line.

    Accepts strict JSON lines (Amazon 2018) and Python-literal lines (the "loose JSON" of Amazon 2014 and of
    the Steam files of Kang & McAuley, which use single quotes and True/False). Blank lines are skipped.
    """
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                try:
                    rec = ast.literal_eval(line)
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    raise DataError(f"{path}:{lineno}: not a JSON or Python-literal record: {line[:80]!r}") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected an object, got {type(rec).__name__}")
            yield lineno, rec


def read_atomic(path: str | Path, required: dict[str, str]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, {field: value}) from a RecBole atomic file (TSV with `name:type` headers).

    `required` maps a logical name to the header field name (without its `:type`); a missing column, or a row
    with the wrong number of fields, is an error naming the file and line.
    """
    with open_text(path) as f:
        header = f.readline().rstrip("\n")
        names = [h.split(":", 1)[0] for h in header.split("\t")]
        missing = [col for col in required.values() if col not in names]
        if missing:
            raise DataError(f"{path}:1: missing column(s) {missing}; the header has {names}")
        idx = {key: names.index(col) for key, col in required.items()}
        for lineno, line in enumerate(f, 2):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != len(names):
                raise DataError(f"{path}:{lineno}: expected {len(names)} tab-separated fields, got {len(fields)}")
            yield lineno, {key: fields[i] for key, i in idx.items()}
