"""Steam (Kang & McAuley 2018): `steam_reviews.json.gz` and `steam_games.json.gz`, Python-literal lines.

Reviews carry `username`, `product_id` and a `date` (a day, so ties are common: stable order keeps the file's).
Games carry `id`, `title` (or `app_name`), `genres` and `tags`; both genres and tags become categories.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

from reclm_jax.data.build import RawData, clean_title
from reclm_jax.data.readers import read_records
from reclm_jax.data.schema import DataError


def _labels(value) -> list[str]:
    """A genres/tags value: a list of strings, or one string of comma-separated names."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def read_steam(reviews: str | Path, games: str | Path, name: str = "steam") -> RawData:
    items: dict[str, tuple[str, tuple[str, ...]]] = {}
    skipped, records = 0, 0
    for _, rec in read_records(games):
        records += 1
        title = rec.get("title") or rec.get("app_name")
        cats = tuple(dict.fromkeys(_labels(rec.get("genres")) + _labels(rec.get("tags"))))
        if "id" not in rec or not isinstance(title, str) or not clean_title(title) or not cats:
            skipped += 1
            continue
        items.setdefault(str(rec["id"]), (title, cats))
    if not items:
        raise DataError(f"{games}: no usable metadata records ({records} read; each needs an 'id', a 'title' or "
                        "'app_name', and 'genres' or 'tags')")
    notes = [f"{skipped} game records lack an id, a title or any genre/tag"] if skipped else []
    interactions = []
    for lineno, rec in read_records(reviews):
        try:
            user, item, day = rec["username"], rec["product_id"], rec["date"]
        except KeyError as e:
            raise DataError(f"{reviews}:{lineno}: review record has no {e.args[0]!r} field") from None
        try:
            t = date.fromisoformat(str(day)).toordinal()
        except ValueError:
            raise DataError(f"{reviews}:{lineno}: date {day!r} is not YYYY-MM-DD") from None
        interactions.append((str(user), str(item), float(t)))
    return RawData.from_records(name, items, interactions, str(reviews), notes)
