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


def read_steam(reviews: str | Path, games: str | Path, name: str = "steam") -> RawData:
    items: dict[str, tuple[str, tuple[str, ...]]] = {}
    skipped = 0
    for _, rec in read_records(games):
        title = rec.get("title") or rec.get("app_name")
        cats = tuple(dict.fromkeys(c for c in (rec.get("genres") or []) + (rec.get("tags") or []) if isinstance(c, str)))
        if "id" not in rec or not isinstance(title, str) or not clean_title(title) or not cats:
            skipped += 1
            continue
        items.setdefault(str(rec["id"]), (title, cats))
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
    return RawData(name=name, items=items, interactions=interactions, notes=notes)
