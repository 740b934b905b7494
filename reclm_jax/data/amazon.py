"""Amazon review data (2018, "v2"): a 5-core reviews file and a metadata file, JSON lines, gzipped or not.

Follows the reference preprocessing: items need a non-empty title and a category below the top level; a
user's reviews are ordered by `unixReviewTime`; every prefix of `category[1:]` joined with ", " is a
category, so an item belongs to all its ancestors (the top level, e.g. "Movies & TV", is dropped).
"""

from __future__ import annotations

from pathlib import Path

from reclm_jax.data.build import RawData, clean_title
from reclm_jax.data.readers import read_records
from reclm_jax.data.schema import DataError


def category_prefixes(path: list[str]) -> tuple[str, ...]:
    """["Movies & TV", "Genre", "Drama"] -> ("Genre", "Genre, Drama")."""
    parts = [clean_title(p) for p in path[1:] if isinstance(p, str) and clean_title(p)]
    return tuple(", ".join(parts[: i + 1]) for i in range(len(parts)))


def read_amazon(reviews: str | Path, meta: str | Path, name: str = "amazon") -> RawData:
    items: dict[str, tuple[str, tuple[str, ...]]] = {}
    skipped, not_a_path, records = 0, None, 0
    for lineno, rec in read_records(meta):
        records += 1
        if "asin" not in rec:
            raise DataError(f"{meta}:{lineno}: metadata record has no 'asin' field")
        title = rec.get("title")
        cats = rec.get("category") or rec.get("categories") or []
        if isinstance(cats, list) and cats and isinstance(cats[0], list):  # 2014: the path nested one level deeper
            cats = cats[0]
        if not isinstance(cats, list):
            not_a_path = not_a_path or (lineno, cats)  # a dict or a number: not a category path
            cats = []
        cats = category_prefixes(cats)
        if not isinstance(title, str) or not clean_title(title) or not cats:
            skipped += 1
            continue
        items.setdefault(str(rec["asin"]), (title, cats))
    if not items:
        raise DataError(f"{meta}: no usable metadata records ({records} read; each needs an 'asin', a 'title' "
                        "and a 'category' list below the top level)")
    notes = [f"{skipped} metadata records lack a title or a category below the top level"] if skipped else []
    if not_a_path:
        notes.append(f"{meta}: some 'category' values are not a list (e.g. line {not_a_path[0]}: "
                     f"{str(not_a_path[1])[:60]}); those records count as lacking a category")
    interactions = []
    for lineno, rec in read_records(reviews):
        try:
            interactions.append((str(rec["reviewerID"]), str(rec["asin"]), float(rec["unixReviewTime"])))
        except KeyError as e:
            raise DataError(f"{reviews}:{lineno}: review record has no {e.args[0]!r} field") from None
        except (TypeError, ValueError):
            raise DataError(f"{reviews}:{lineno}: unixReviewTime {rec['unixReviewTime']!r} is not a number") from None
    return RawData.from_records(name, items, interactions, str(reviews), notes)
