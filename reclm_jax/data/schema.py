"""The canonical dataset every stage reads: items with unique titles and categories, users' items in time order.

Item ids are 0-based indices into `titles`; user ids are 0-based indices into `sequences`. The
leave-one-out split follows the paper (and the reference code): the last item of each sequence is the
test target, the one before it the valid target, and everything before those is training data.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from reclm_jax.core.errors import DataError

MIN_SEQUENCE = 3  # a leave-one-out split needs one train, one valid and one test item


@dataclass
class Dataset:
    name: str
    titles: list[str]  # item id -> unique, cleaned title
    item_categories: list[tuple[str, ...]]  # item id -> its categories (names from `categories`)
    sequences: list[np.ndarray]  # user id -> int32 item ids in time order (stable tie-break)
    user_names: list[str]  # user id -> the raw id in the source files
    item_names: list[str]  # item id -> the raw id in the source files
    notes: list[str] = field(default_factory=list)  # what was filtered or renamed, and why (counted)

    def __post_init__(self):
        n = len(self.titles)
        if len(self.item_categories) != n or len(self.item_names) != n:
            raise DataError(f"{self.name}: titles, item_categories and item_names differ in length")
        if len(self.user_names) != len(self.sequences):
            raise DataError(f"{self.name}: user_names and sequences differ in length")
        if len(set(self.titles)) != n:
            raise DataError(f"{self.name}: titles are not unique")

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return len(self.titles)

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    @cached_property
    def categories(self) -> list[str]:
        """All category names, sorted."""
        return sorted({c for cats in self.item_categories for c in cats})

    @cached_property
    def category_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.categories)}

    @cached_property
    def category_matrix(self) -> np.ndarray:
        """bool [num_items, num_categories]: item i belongs to category c."""
        m = np.zeros((self.num_items, len(self.categories)), dtype=bool)
        for i, cats in enumerate(self.item_categories):
            for c in cats:
                m[i, self.category_index[c]] = True
        return m

    @cached_property
    def title_index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.titles)}

    # ---- leave-one-out split ------------------------------------------------------------------------
    def train_sequence(self, user: int) -> np.ndarray:
        """Items a model may train on: all but the last two."""
        return self.sequences[user][:-2]

    def valid_example(self, user: int) -> tuple[np.ndarray, int]:
        """(history, target): the target is the second-to-last item, the history all items before it."""
        s = self.sequences[user]
        return s[:-2], int(s[-2])

    def test_example(self, user: int) -> tuple[np.ndarray, int]:
        """(history, target): the target is the last item, the history all items before it."""
        s = self.sequences[user]
        return s[:-1], int(s[-1])

    def stats(self) -> dict:
        """The paper's Table 1 columns."""
        inter = self.num_interactions
        return {
            "users": self.num_users,
            "items": self.num_items,
            "interactions": inter,
            "sparsity": 1.0 - inter / (self.num_users * self.num_items) if inter else 1.0,
            "categories": len(self.categories),
        }

    # ---- processed cache ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the processed dataset to one .npz file (written atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lengths = np.array([len(s) for s in self.sequences], dtype=np.int64)
        meta = {
            "name": self.name,
            "titles": self.titles,
            "item_categories": [list(c) for c in self.item_categories],
            "user_names": self.user_names,
            "item_names": self.item_names,
            "notes": self.notes,
        }
        tmp = path.with_name(f"{path.name}.{os.getpid()}.part")  # processes building it at once must not share it
        with open(tmp, "wb") as f:
            np.savez(
                f,
                meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                items=np.concatenate(self.sequences).astype(np.int32) if self.sequences else np.zeros(0, np.int32),
                lengths=lengths,
            )
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "Dataset":
        with np.load(path) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            items, lengths = z["items"], z["lengths"]
        sequences = np.split(items, np.cumsum(lengths)[:-1]) if len(lengths) else []
        return cls(
            name=meta["name"],
            titles=meta["titles"],
            item_categories=[tuple(c) for c in meta["item_categories"]],
            sequences=list(sequences),
            user_names=meta["user_names"],
            item_names=meta["item_names"],
            notes=meta["notes"],
        )
