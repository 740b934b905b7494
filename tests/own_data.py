"""A tiny invented dataset ("a bookshop") written in every format `--dataset PATH` reads.

Nothing here comes from a public set: titles are made of invented words, readers follow a genre taste with a
fixed seed, and times are ISO date-times one hour apart (some sharing an hour, to exercise stable ties).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

GENRES = ("Mystery", "Romance", "Fantasy", "History", "Poetry", "Travel")
WORDS = ("Amber", "Harbour", "Lantern", "Willow", "Copper", "Meadow", "Ember", "Orchard", "Quill", "Tide")


def bookshop(num_users: int = 48, num_items: int = 30, per_user: int = 7, seed: int = 0):
    """(interactions, items): interactions as (user, item, ISO time) rows in file order; items as
    (item id, title, [categories]). Each reader prefers one genre, so there is a pattern to learn."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(num_items):
        cats = sorted({GENRES[i % len(GENRES)], GENRES[int(rng.integers(len(GENRES)))]})
        title = f"The {WORDS[i % len(WORDS)]} {WORDS[(i * 7 + 3) % len(WORDS)]} {'IVX'[i % 3] * (1 + i // 10)}"
        items.append((f"b{i:03d}", title, cats))
    start = datetime(2023, 1, 1, tzinfo=timezone.utc)
    rows = []
    for u in range(num_users):
        taste = GENRES[u % len(GENRES)]
        liked = [k for k, it in enumerate(items) if taste in it[2]]
        weights = np.where(np.isin(np.arange(num_items), liked), 5.0, 1.0)
        picks = rng.choice(num_items, size=per_user, replace=False, p=weights / weights.sum())
        for j, k in enumerate(picks):
            when = start + timedelta(hours=int(u * 3 + j - (j == 2)))  # items 1 and 2 share an hour
            rows.append((f"reader{u}", items[k][0], when.isoformat().replace("+00:00", "Z")))
    return rows, items


def write_bookshop(folder, fmt: str = "csv", **kwargs) -> None:
    """Write the bookshop into `folder` as interactions + items tables in `fmt` (csv, tsv, parquet, jsonl),
    "onetable" (one CSV with title and genres on each row) or "atomic" (RecBole's .inter + .item)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, items = bookshop(**kwargs)
    if fmt == "atomic":
        with open(folder / "shop.inter", "w") as f:
            f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
            for u, i, t in rows:
                f.write(f"{u}\t{i}\t4\t{_epoch(t)}\n")
        with open(folder / "shop.item", "w") as f:
            f.write("item_id:token\ttitle:token_seq\tgenre:token_seq\n")
            for i, title, cats in items:
                f.write(f"{i}\t{title}\t{' '.join(cats)}\n")
        return
    inter = {"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows], "timestamp": [r[2] for r in rows]}
    meta = {"item_id": [i[0] for i in items], "title": [i[1] for i in items], "genres": ["|".join(i[2]) for i in items]}
    if fmt == "onetable":
        by_id = {i[0]: i for i in items}
        inter |= {"title": [by_id[i][1] for i in inter["item_id"]],
                  "genres": ["|".join(by_id[i][2]) for i in inter["item_id"]]}
        pcsv.write_csv(pa.table(inter), folder / "log.csv")
        return
    if fmt == "parquet":
        meta["genres"] = [i[2] for i in items]  # a list column
        pq.write_table(pa.table(inter), folder / "interactions.parquet")
        pq.write_table(pa.table(meta), folder / "items.parquet")
    elif fmt == "jsonl":
        for name, table in (("interactions", inter), ("items", meta)):
            with open(folder / f"{name}.jsonl", "w") as f:
                for values in zip(*table.values()):
                    f.write(json.dumps(dict(zip(table, values))) + "\n")
    else:
        opts = pcsv.WriteOptions(delimiter="\t" if fmt == "tsv" else ",", quoting_style="needed")
        pcsv.write_csv(pa.table(inter), folder / f"interactions.{fmt}", opts)
        pcsv.write_csv(pa.table(meta), folder / f"items.{fmt}", opts)


def _epoch(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp())
