"""Tables from files through pyarrow: CSV, TSV, Parquet, JSON lines and RecBole atomic files, gzipped or not.

A file's format comes from its extension and is then checked against its first bytes, so a Parquet file
named .csv, a TSV named .csv or a saved web page named .parquet is an error that says what the file looks
like. Text formats are read with every column as a string: ids keep their exact spelling (leading zeros,
mixed digits and letters) and the caller converts times and ratings with errors that name the bad value.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from reclm_jax.data.schema import DataError

FORMATS = {
    ".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet",
    ".jsonl": "json", ".ndjson": "json", ".json": "json", ".inter": "atomic", ".item": "atomic",
}
COMPRESSION = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\x28\xb5\x2f\xfd": "zstd"}
_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst")


def table_format(path: Path) -> str | None:
    """The format an extension names ("ratings.csv.gz" -> "csv"), or None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED_SUFFIXES:
        suffixes.pop()
    return FORMATS.get(suffixes[-1]) if suffixes else None


class Table:
    """One table file: its column names, then the columns asked for, as a pyarrow Table of strings (text
    formats) or of the file's own types (Parquet, JSON lines)."""

    def __init__(self, path: str | Path, fmt: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such file")
        self.format = fmt or table_format(self.path)
        if self.format is None:
            raise DataError(f"{self.path}: unknown table format; use .csv, .tsv, .parquet, .jsonl or RecBole's "
                            ".inter/.item (optionally gzipped)")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        self._compression = next((c for m, c in COMPRESSION.items() if magic.startswith(m)), None)
        self._check_contents(magic)

    def _stream(self):
        return pa.input_stream(str(self.path), compression=self._compression)

    def _check_contents(self, magic: bytes) -> None:
        what = {"csv": "CSV", "tsv": "TSV", "parquet": "Parquet", "json": "JSON lines", "atomic": "RecBole atomic"}
        name = f"{self.path}: not a {what[self.format]} file"
        if self.format == "parquet":
            if magic != b"PAR1":
                raise DataError(f"{name} (it starts with {self._head()[:40]!r}, no Parquet signature)")
            return
        if magic == b"PAR1":
            raise DataError(f"{name}: it is a Parquet file; name it .parquet")
        head = self._head()
        if magic.startswith(b"PK\x03\x04"):
            raise DataError(f"{name}: it is a zip archive; unpack it first")
        if b"\x00" in head:
            raise DataError(f"{name}: it holds binary data (it starts with {head[:20]!r})")
        text = head.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
        first_line = text.split("\n", 1)[0]
        if text.startswith("<"):
            raise DataError(f"{name}: it looks like HTML or XML (a saved web page?): {first_line[:60]!r}")
        if self.format == "json":
            if text.startswith("["):
                raise DataError(f"{name}: it is one JSON array; write one object per line (JSON lines)")
            if text and not text.startswith("{"):
                raise DataError(f"{name}: its first line is not a JSON object: {first_line[:60]!r}")
            return
        if text.startswith("{"):
            raise DataError(f"{name}: it looks like JSON lines; name it .jsonl")
        if self.format == "csv" and "\t" in first_line and "," not in first_line:
            raise DataError(f"{name}: its header is tab-separated; name it .tsv")
        if self.format in ("tsv", "atomic") and "\t" not in first_line and "," in first_line:
            raise DataError(f"{name}: its header is comma-separated, not tab-separated; name it .csv")
        if self.format == "atomic" and not all(":" in h for h in first_line.rstrip("\r").split("\t")):
            raise DataError(f"{name}: its header fields need RecBole's name:type form (e.g. user_id:token), "
                            f"got {first_line[:80]!r}")

    @contextmanager
    def _named_errors(self):
        """Arrow's and the OS's errors, as one line naming the file."""
        try:
            yield
        except OSError as e:  # before ArrowException: Arrow's IO errors are both
            raise DataError(f"{self.path}: cannot read it ({e}); a truncated or corrupt download?") from None
        except pa.ArrowException as e:
            raise DataError(f"{self.path}: {e}") from None

    def _head(self, size: int = 4096) -> bytes:
        with self._named_errors(), self._stream() as s:
            return s.read(size)

    @property
    def _parse_options(self) -> pcsv.ParseOptions:
        # RecBole's atomic files are plain tab-separated text: a quote is part of a title, never a delimiter
        atomic = self.format == "atomic"
        return pcsv.ParseOptions(delimiter="," if self.format == "csv" else "\t", quote_char=False if atomic else '"')

    # ---- column names ---------------------------------------------------------------------------------
    @cached_property
    def _header(self) -> list[str]:
        """The raw header fields of a text table (with RecBole's `:type` suffixes)."""
        with self._named_errors():
            return pcsv.open_csv(self._stream(), parse_options=self._parse_options,
                                 read_options=pcsv.ReadOptions(block_size=1 << 20)).schema.names

    @cached_property
    def names(self) -> list[str]:
        if self.format == "parquet":
            with self._named_errors():
                return pq.ParquetFile(self.path).schema_arrow.names
        if self.format == "json":
            return self._json.column_names
        return [h.split(":", 1)[0] for h in self._header] if self.format == "atomic" else list(self._header)

    @cached_property
    def atomic_types(self) -> dict[str, str]:
        """RecBole's column types (token, token_seq, float, float_seq) by column name; {} for other formats."""
        if self.format != "atomic":
            return {}
        return dict(h.split(":", 1) for h in self._header)

    # ---- reading ---------------------------------------------------------------------------------------
    def read(self, columns: list[str]) -> pa.Table:
        """The named columns (which must exist), in the file's row order."""
        if self.format == "json":
            return self._json.select(columns)
        with self._named_errors():
            if self.format == "parquet":
                return pq.read_table(self.path, columns=columns)
            return self._read_text(columns)

    def _read_text(self, columns: list[str]) -> pa.Table:
        read = pcsv.ReadOptions(column_names=self.names, skip_rows=1, block_size=16 << 20) if self.format == "atomic" \
            else pcsv.ReadOptions(block_size=16 << 20)
        convert = pcsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns},
                                      strings_can_be_null=True, quoted_strings_can_be_null=False)
        return pcsv.read_csv(self._stream(), read_options=read, parse_options=self._parse_options, convert_options=convert)

    @cached_property
    def _json(self) -> pa.Table:
        with self._named_errors():
            try:
                return pjson.read_json(self._stream())
            except pa.ArrowInvalid as e:
                raise DataError(self._explain_json_error(str(e))) from None

    def _explain_json_error(self, message: str) -> str:
        """Arrow names the column whose type changed but not the line; find the first line that differs."""
        changed = re.search(r"Column\(/([^)]*)\) changed from (\w+) to (\w+)", message)
        if not changed:
            return f"{self.path}: {message}"
        column = changed.group(1)
        kinds: dict[type, tuple[int, object]] = {}
        with self._stream() as s:
            for lineno, line in enumerate(s.read().decode("utf-8", errors="replace").splitlines(), 1):
                try:
                    value = json.loads(line).get(column)
                except (json.JSONDecodeError, AttributeError):
                    continue
                kind = str if isinstance(value, str) else (int if isinstance(value, (int, float)) else type(value))
                if value is not None and kind not in kinds:
                    kinds[kind] = (lineno, value)
                if len(kinds) > 1:
                    break
        examples = "; ".join(f"line {n}: {v!r}" for n, v in kinds.values())
        return (f"{self.path}: column {column!r} mixes {changed.group(2)}s and {changed.group(3)}s ({examples}); "
                "write every value of a column with one JSON type (ids as strings, for instance)")
