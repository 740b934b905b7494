"""Which dataset to load and how to filter it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Annotated

from reclm_jax.config import Rule, Section

MOVIELENS = ("ml-100k", "ml-1m")
FILE_SOURCES = ("amazon", "steam")  # read from files the user supplies
DATASETS = MOVIELENS + FILE_SOURCES

# k-core defaults per source: the reference's Amazon setting (25-core users, 10-core items); MovieLens is
# already 20-core by construction and is used as shipped. Your own files (a path) default to no k-core.
DEFAULT_CORES = {"amazon": (25, 10), "steam": (25, 10), "ml-100k": (0, 0), "ml-1m": (0, 0)}


@dataclass(frozen=True)
class Columns:
    """Column names in your own files; None: found by name (see `reclm_jax.data.files.CANDIDATES`)."""

    user: str | None = None
    item: str | None = None  # the item id, in the interactions and in the items table
    time: str | None = None  # integers/floats (any unit) or ISO 8601 dates and times
    rating: str | None = None  # optional; read only for `min_rating`
    title: str | None = None
    categories: str | None = None  # a list column, or a string split by `category_sep`

    @classmethod
    def parse(cls, text: str) -> "Columns":
        """"user=uid,item=asin" -> Columns(user="uid", item="asin") (the --columns option)."""
        known = [f.name for f in fields(cls)]
        pairs = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in known or not value.strip():
                raise ValueError(f"--columns {part!r}: expected ROLE=COLUMN with ROLE one of {', '.join(known)}")
            pairs[key.strip()] = value.strip()
        return cls(**pairs)


@dataclass(frozen=True)
class DataConfig(Section):
    name: str = "ml-100k"  # one of DATASETS, or a path to your own files (a directory or one table)
    reviews: str | None = None  # amazon: the 5-core reviews JSON; steam: steam_reviews.json.gz
    meta: str | None = None  # amazon: the metadata JSON; steam: steam_games.json.gz; a path: the items table
    user_core: int | None = None  # None: the source's default (DEFAULT_CORES)
    item_core: int | None = None
    min_sequence: Annotated[int, Rule(lambda v: v >= 3, "must be >= 3 for a leave-one-out split")] = 3
    cache: bool = True  # keep the processed dataset in the user cache
    # your own files only:
    columns: Columns = field(default_factory=Columns)
    category_sep: str | None = None  # None: the first of | ; > , that the values hold (else one category each)
    category_path: bool | None = None  # categories are a root-to-leaf path (every prefix is a category);
    # None: when the separator is ">" or "/"
    min_rating: float | None = None  # drop interactions rated below this (needs a rating column)

    def check(self) -> None:
        if self.name in FILE_SOURCES and (self.reviews is None or self.meta is None):
            what = "--reviews and --meta" if self.name == "amazon" else "--reviews (steam_reviews.json.gz) and --meta (steam_games.json.gz)"
            raise ValueError(f"name: dataset {self.name!r} is read from your files: give {what}")
        if self.is_path and self.reviews is not None:
            raise ValueError("reviews (--reviews) is for amazon and steam; for your own files give the interactions "
                             "table (or its directory) as --dataset")
        if self.category_sep == "":
            raise ValueError("category_sep must not be empty (None: detect it)")

    @property
    def is_path(self) -> bool:
        """Your own files rather than a named source."""
        return self.name not in DATASETS

    @property
    def cores(self) -> tuple[int, int]:
        du, di = DEFAULT_CORES.get(self.name, (0, 0))
        return (du if self.user_core is None else self.user_core, di if self.item_core is None else self.item_core)
