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
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from reclm_jax.data.schema import MIN_SEQUENCE, DataError, Dataset


@dataclass
class RawData:
    name: str
    items: dict[str, tuple[str, tuple[str, ...]]]  # raw item id -> (title, categories), in catalogue order
    interactions: list[tuple[str, str, float]]  # (raw user id, raw item id, time), in file order
    notes: list[str] = field(default_factory=list)


def clean_title(title: str) -> str:
    """Unescape HTML entities and collapse whitespace (Amazon titles carry both)."""
    return re.sub(r"\s+", " ", html.unescape(title)).strip()


def build(raw: RawData, user_core: int = 0, item_core: int = 0, min_sequence: int = MIN_SEQUENCE) -> Dataset:
    notes = list(raw.notes)
    if not raw.interactions:
        raise DataError(f"{raw.name}: no interactions were read")

    by_user: dict[str, list[tuple[float, str]]] = {}
    unknown = 0
    for user, item, time in raw.interactions:
        if item not in raw.items:
            unknown += 1
            continue
        by_user.setdefault(user, []).append((time, item))
    if unknown:
        notes.append(f"dropped {unknown} interactions whose item has no usable metadata (title and category)")

    sequences: dict[str, list[str]] = {}
    repeats = 0
    for user, events in by_user.items():
        events.sort(key=lambda e: e[0])  # stable: ties keep file order
        seen: set[str] = set()
        seq = []
        for _, item in events:
            if item in seen:
                repeats += 1
                continue
            seen.add(item)
            seq.append(item)
        sequences[user] = seq
    if repeats:
        notes.append(f"dropped {repeats} repeated (user, item) interactions (kept the earliest)")

    if user_core > 1 or item_core > 1:
        sequences = _k_core(sequences, user_core, item_core, notes)

    short = [u for u, s in sequences.items() if len(s) < min_sequence]
    if short:
        notes.append(f"dropped {len(short)} users with fewer than {min_sequence} interactions")
        for u in short:
            del sequences[u]
    if not sequences:
        raise DataError(f"{raw.name}: no user has {min_sequence} or more interactions after filtering")

    used = {i for s in sequences.values() for i in s}
    item_names = [i for i in raw.items if i in used]
    if len(item_names) < len(raw.items):
        notes.append(f"{len(raw.items) - len(item_names)} catalogue items have no kept interactions and are left out")
    titles, renamed = unique_titles([clean_title(raw.items[i][0]) for i in item_names])
    if renamed:
        notes.append(f"{renamed} items shared a title with an earlier item and got a ' (n)' suffix")
    index = {name: i for i, name in enumerate(item_names)}
    return Dataset(
        name=raw.name,
        titles=titles,
        item_categories=[raw.items[i][1] for i in item_names],
        sequences=[np.array([index[i] for i in s], dtype=np.int32) for s in sequences.values()],
        user_names=list(sequences),
        item_names=item_names,
        notes=notes,
    )


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


def _k_core(sequences: dict[str, list[str]], user_core: int, item_core: int, notes: list[str]) -> dict[str, list[str]]:
    users_before = len(sequences)
    items_before = len({i for s in sequences.values() for i in s})
    rounds = 0
    while True:
        rounds += 1
        counts = Counter(i for s in sequences.values() for i in s)
        kept = {u: [i for i in s if counts[i] >= item_core] for u, s in sequences.items()}
        kept = {u: s for u, s in kept.items() if len(s) >= user_core}
        if kept == sequences:
            break
        sequences = kept
    items_after = len({i for s in sequences.values() for i in s})
    notes.append(
        f"{user_core}-core users / {item_core}-core items ({rounds} rounds): kept {len(sequences)} of "
        f"{users_before} users and {items_after} of {items_before} items"
    )
    return sequences
