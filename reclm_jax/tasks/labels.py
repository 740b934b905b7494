"""Label construction as pure functions of (target, the teacher's ranked lists, category masks, rng).

The teacher's lists hold item ids best first, with -1 in slots it could not fill. "Label" is the list of
item ids a sample's response names, in order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from reclm_jax.core.controls import quota


def fill(head: list[int], ranked, k: int, banned) -> list[int]:
    """`head` then `ranked`, skipping -1, banned items and repeats, cut at k items."""
    banned = set(int(i) for i in banned)
    out: list[int] = []
    for item in list(head) + [int(i) for i in ranked]:
        if len(out) == k:
            break
        if item >= 0 and item not in banned and item not in out:
            out.append(item)
    return out


def seqrec_label(target: int, ranked, k: int, history) -> list[int]:
    """I0: the ground-truth target first, then the teacher's top items (paper section 2.2.2)."""
    return fill([target], ranked, k, history)


def control_label(target: int, target_ok: bool, ranked_ok, k: int, history) -> list[int]:
    """I1: the teacher's top-k among the items that satisfy the control, the target first when it does.

    The paper puts the target first; the reference only when the teacher already ranked it in the
    constrained top-k. The target leads here exactly when it satisfies the instruction (it cannot lead a
    +C list it is not in).
    """
    return fill([target] if target_ok else [], ranked_ok, k, history)


def proportion_count(kind: str, k: int, m: float, lo: int, hi: int, rng: np.random.Generator) -> int | None:
    """How many of the k label items are in C for an I2 instruction: uniform among the counts n that
    satisfy the instruction by the paper's CPA (eq. 8) and lie in [lo, hi] (what the data can fill).
    None when no count does."""
    km = float(quota(k, m))
    if kind == "<=":
        ok = range(0, math.floor(km) + 1)
    elif kind == ">=":
        ok = range(math.ceil(km), k + 1)
    elif kind == "~":
        ok = range(max(0, math.ceil(km - 1)), min(k, math.floor(km + 1)) + 1)
    else:
        raise ValueError(f"not a proportion control kind: {kind!r}")
    ns = [n for n in ok if lo <= n <= hi]
    return int(rng.choice(ns)) if ns else None


def proportion_label(target: int, target_in: bool, ranked_in, ranked_out, n: int, k: int, history,
                     rng: np.random.Generator) -> list[int]:
    """I2: n items of C from the teacher's top(+C) and k - n from its top(-C), shuffled, with the target
    first when its side has room (the paper puts the target first; the reference only shuffles)."""
    with_target = (n if target_in else k - n) > 0 and target not in set(int(i) for i in history)
    head = [target] if with_target else []
    inside = fill(head if target_in else [], ranked_in, n, history)
    outside = fill(head if not target_in else [], ranked_out, k - n, history)
    rest = [i for i in inside + outside if not (with_target and i == target)]
    rest = [rest[j] for j in rng.permutation(len(rest))]
    return head + rest if with_target else rest


def search_label(target: int, members: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """I3: the target first, then k - 1 other items of its category C drawn at random."""
    others = members[members != target]
    return [target] + [int(i) for i in rng.choice(others, size=min(k - 1, len(others)), replace=False)]


def candidates(label: list[int], num_items: int, size: int, banned, rng: np.random.Generator) -> list[int]:
    """The select-from-candidates list: the label plus random other items (not banned), `size` in all
    (at least the label), shuffled."""
    taken = set(label) | {int(i) for i in banned}
    want = min(max(size - len(label), 0), num_items - len(taken))
    extra: list[int] = []
    while len(extra) < want:  # rejection sampling: `taken` is a few items out of many
        i = int(rng.integers(num_items))
        if i not in taken:
            taken.add(i)
            extra.append(i)
    out = list(label) + extra
    return [out[j] for j in rng.permutation(len(out))]


def most_specific_category(target: int, category_matrix: np.ndarray, names: Sequence[str],
                           rng: np.random.Generator) -> int | None:
    """The +C test category: the target's category with the fewest catalogue items; among those, the
    longest name (`names`: category index -> name); remaining ties drawn at random. None when the target
    has no category.

    On hierarchical categories (Amazon's "Genre" > "Genre, Comedy" prefixes, where an item belongs to all
    its ancestors) this is the deepest one, as in the official code: a broad ancestor covers much of the
    catalogue and would make +C almost free. (An ancestor with the very items of its only child ties on
    size; the child's name extends the ancestor's, so the name breaks the tie.) Flat multi-genre data
    (MovieLens, Steam tags) has no depth, so the same reading of "most specific" picks the target's rarest
    genre: it never makes the instruction easier than any other of the target's genres."""
    own = np.flatnonzero(category_matrix[target])
    if not len(own):
        return None
    sizes = category_matrix[:, own].sum(0)
    smallest = own[sizes == sizes.min()]
    lengths = np.array([len(names[c]) for c in smallest])
    return int(rng.choice(smallest[lengths == lengths.max()]))


def negative_category(top, target: int, category_matrix: np.ndarray, rng: np.random.Generator,
                      skip=()) -> int | None:
    """The -C category: the most frequent category of the teacher's top list among those the target is not
    in (paper section 3.2.2), ties broken at random; if the top list has none, a random category the target
    is not in. Categories in `skip` are never chosen. None when no category is left."""
    allowed = ~category_matrix[target]
    allowed[list(skip)] = False
    if not allowed.any():
        return None
    top = np.asarray(top)
    counts = category_matrix[top[top >= 0]].sum(0)
    counts = np.where(allowed, counts, -1)
    best = counts.max()
    pool = np.flatnonzero(counts == best) if best > 0 else np.flatnonzero(allowed)
    return int(rng.choice(pool))
