"""Line readers for the raw formats, with errors that name the file and line."""

from __future__ import annotations

import ast
import gzip
import json
import zlib
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
    lineno = 0
    try:
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
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: the gzip data is cut short or corrupt after line {lineno} ({e}); "
                        "download the file again") from None
