"""Turn raw interactions and item metadata into the canonical `Dataset`, the same way for every source.

Order of operations (each step that removes something says so, with counts, in `Dataset.notes`):
1. interactions whose item has no usable metadata are dropped;
2. each user's interactions are sorted by time with a stable sort, so ties keep file order;
3. repeated (user, item) pairs keep the first in time order;
4. k-core filtering (users >= user_core, items >= item_core), iterated to a fixed point;
5. users with fewer than `min_sequence` interactions are dropped (leave-one-out needs three);
6. items are numbered in catalogue order, titles cleaned and made unique with a " (n)" suffix.
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from reclm_jax.data.schema import MIN_SEQUENCE, DataError, Dataset


@dataclass
class RawData:
    """Interactions as columns of codes (users and items numbered in order of first appearance), plus the
    catalogue of items with usable metadata. `source` and `rows` let notes point at an example row."""

    name: str
    items: dict[str, tuple[str, tuple[str, ...]]]  # raw item id -> (title, categories), in catalogue order
    users: np.ndarray  # int32 [n]: index into user_ids, in file order
    user_ids: list[str]
    item_codes: np.ndarray  # int32 [n]: index into item_ids (which may hold ids missing from `items`)
    item_ids: list[str]
    times: np.ndarray  # float64 [n]: only the order matters
    source: str  # the interactions file
    rows: np.ndarray | None = None  # int64 [n]: each interaction's 1-based row in `source` (None: 1..n)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_records(cls, name: str, items: dict[str, tuple[str, tuple[str, ...]]],
                     interactions: list[tuple[str, str, float]], source: str, notes: list[str]) -> "RawData":
        """From (user id, item id, time) tuples in file order."""
        users, user_ids = encode(pa.array([r[0] for r in interactions], pa.string()))
        item_codes, item_ids = encode(pa.array([r[1] for r in interactions], pa.string()))
        times = np.array([r[2] for r in interactions], dtype=np.float64)
        return cls(name, items, users, user_ids, item_codes, item_ids, times, source, notes=notes)


def encode(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """Strings -> (int32 codes, the distinct values in order of first appearance)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    enc = values.dictionary_encode()
    return enc.indices.to_numpy().astype(np.int32, copy=False), enc.dictionary.to_pylist()


def clean_title(title: str) -> str:
    """Unescape HTML entities and collapse whitespace (Amazon titles carry both)."""
    return " ".join((html.unescape(title) if "&" in title else title).split())


def build(raw: RawData, user_core: int = 0, item_core: int = 0, min_sequence: int = MIN_SEQUENCE) -> Dataset:
    notes = list(raw.notes)
    n = len(raw.users)
    if not n:
        raise DataError(f"{raw.name}: no interactions were read from {raw.source}")
    if not raw.items:
        raise DataError(f"{raw.name}: no usable metadata records (items with a title and a category)")
    rows = raw.rows if raw.rows is not None else np.arange(1, n + 1, dtype=np.int64)

    def example(i: int) -> str:
        return f"{raw.source} row {rows[i]} (user {raw.user_ids[users[i]]!r}, item {raw.item_ids[raw_items[i]]!r})"

    catalogue = {item_id: k for k, item_id in enumerate(raw.items)}
    to_catalogue = np.array([catalogue.get(i, -1) for i in raw.item_ids], dtype=np.int32)
    users, raw_items, times = raw.users, raw.item_codes, raw.times
    known = to_catalogue[raw_items] >= 0
    if not known.all():
        first = int(np.argmin(known))
        if not known.any():
            raise DataError(
                f"{raw.name}: no interaction's item has usable metadata (e.g. {example(first)}; catalogue ids look "
                f"like {list(raw.items)[:3]}): do the two files number items the same way?"
            )
        notes.append(f"dropped {n - int(known.sum())} interactions whose item has no usable metadata, e.g. "
                     f"{example(first)}")
        keep = np.flatnonzero(known)
        users, raw_items, times, rows = users[keep], raw_items[keep], times[keep], rows[keep]

    # Each user's interactions in time order (lexsort is stable: ties keep file order); users are numbered in
    # order of their first appearance; a repeated (user, item) pair keeps its earliest interaction.
    order = np.lexsort((times, users))
    users, raw_items, rows = users[order], raw_items[order], rows[order]
    first_seen = np.full(len(raw.user_ids), np.iinfo(np.int64).max)
    starts = _run_starts(users)
    first_seen[users[starts]] = np.minimum.reduceat(rows, starts)
    items = to_catalogue[raw_items].astype(np.int64)
    num_items = len(raw.items)
    _, first_pair = np.unique(users.astype(np.int64) * num_items + items, return_index=True)
    if len(first_pair) < len(items):
        keep = np.zeros(len(items), dtype=bool)
        keep[first_pair] = True
        first = int(np.flatnonzero(~keep)[np.argmin(rows[~keep])])
        notes.append(f"dropped {len(items) - len(first_pair)} repeated (user, item) interactions (kept the "
                     f"earliest), e.g. {example(first)}")
        users, raw_items, rows, items = (a[keep] for a in (users, raw_items, rows, items))

    if user_core > 1 or item_core > 1:
        keep = _k_core(users, items, len(raw.user_ids), num_items, user_core, item_core, notes)
        users, raw_items, rows, items = (a[keep] for a in (users, raw_items, rows, items))

    lengths = np.bincount(users, minlength=len(raw.user_ids))
    short = (lengths > 0) & (lengths < min_sequence)
    if short.any():
        first = int(np.argmax(short[users]))
        notes.append(f"dropped {int(short.sum())} users with fewer than {min_sequence} interactions, e.g. "
                     f"{example(first)}")
        keep = ~short[users]
        users, raw_items, rows, items = (a[keep] for a in (users, raw_items, rows, items))
    if not len(items):
        raise DataError(f"{raw.name}: no user has {min_sequence} or more interactions after filtering")

    used = np.zeros(num_items, dtype=bool)
    used[items] = True
    catalogue_ids = list(raw.items)
    item_names = [catalogue_ids[k] for k in np.flatnonzero(used)]
    if len(item_names) < num_items:
        notes.append(f"{num_items - len(item_names)} catalogue items have no kept interactions and are left out")
    titles, renamed = unique_titles([clean_title(raw.items[i][0]) for i in item_names])
    if renamed:
        notes.append(f"{renamed} items shared a title with an earlier item and got a ' (n)' suffix")
    new_index = np.cumsum(used, dtype=np.int64) - 1
    starts = _run_starts(users)
    sequences = np.split(new_index[items].astype(np.int32), starts[1:])
    user_order = np.argsort(first_seen[users[starts]], kind="stable")
    return Dataset(
        name=raw.name,
        titles=titles,
        item_categories=[raw.items[i][1] for i in item_names],
        sequences=[sequences[k] for k in user_order],
        user_names=[raw.user_ids[users[starts[k]]] for k in user_order],
        item_names=item_names,
        notes=notes,
    )


def _run_starts(sorted_codes: np.ndarray) -> np.ndarray:
    """Where each run of equal values starts in a sorted array."""
    return np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])


def unique_titles(titles: list[str]) -> tuple[list[str], int]:
    """Make titles unique: the second "X" becomes "X (2)", the third "X (3)", skipping names already taken."""
    taken = set(titles)
    counts: Counter[str] = Counter()
    out, renamed = [], 0
    for t in titles:
        counts[t] += 1
        if counts[t] == 1:
            out.append(t)
            continue
        n = counts[t]
        while f"{t} ({n})" in taken:
            n += 1
        counts[t] = n
        out.append(f"{t} ({n})")
        taken.add(out[-1])
        renamed += 1
    return out, renamed


def _k_core(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int, user_core: int,
           item_core: int, notes: list[str]) -> np.ndarray:
    """The mask of interactions kept by iterated k-core filtering: drop rare items, then short users, repeat."""
    def distinct(codes: np.ndarray, size: int) -> int:
        return int(np.count_nonzero(np.bincount(codes, minlength=size)))

    keep = np.ones(len(items), dtype=bool)
    users_before, items_before = distinct(users, num_users), distinct(items, num_items)
    rounds = 0
    while True:
        rounds += 1
        item_counts = np.bincount(items[keep], minlength=num_items)
        kept = keep & (item_counts[items] >= item_core)
        user_counts = np.bincount(users[kept], minlength=num_users)
        kept &= user_counts[users] >= user_core
        if (kept == keep).all():
            break
        keep = kept
    notes.append(
        f"{user_core}-core users / {item_core}-core items ({rounds} rounds): kept {distinct(users[keep], num_users)} "
        f"of {users_before} users and {distinct(items[keep], num_items)} of {items_before} items"
    )
    return keep
