"""The catalogue automaton on the host (numpy only, so vLLM's process can load it): built from titles and a
tokenizer, saved and loaded, per-row rules, and `Walker`, one request's walk for a per-request logits processor.
`llm.constrain` runs the same automaton on device inside the sampler; see its docstring for the design.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reclm_jax.core.controls import PROPORTION_KINDS, quota
from reclm_jax.llm.tokenizer import stop_token_ids


END = -1  # the trie's end-of-title label (sorts before every token, so a title sorts before its extensions)
_PROBE = ("A", "Z")  # two one-word titles with different first tokens: what separates the format from a title
# Phases of a row's automaton state.
FIXED, TITLE = 0, 1


@dataclasses.dataclass(frozen=True)
class Intent:
    """What a row's list must satisfy besides being new catalogue titles: every item in all `include`
    categories (+C), none in an `exclude` category (-C), and `share` = (category, kind, m): the proportion
    control of kind "<=", ">=" or "~" on k * m items of the category."""

    include: tuple[int, ...] = ()
    exclude: tuple[int, ...] = ()
    share: tuple[int, str, float] | None = None

    def __post_init__(self):
        if self.share is not None and (self.share[1] not in PROPORTION_KINDS or not 0 <= self.share[2] <= 1):
            raise ValueError(f"Intent.share {self.share}: kind must be one of {PROPORTION_KINDS}, m in [0, 1]")

    @classmethod
    def of_controls(cls, controls) -> "Intent":
        """The intent of a sample's `controls` ((Control, category) pairs, as `tasks.samples.Sample` has)."""
        include, exclude, share = [], [], None
        for control, category in controls:
            if control.kind == "+c":
                include.append(category)
            elif control.kind == "-c":
                exclude.append(category)
            elif control.kind in PROPORTION_KINDS:
                if share is not None:
                    raise ValueError("at most one proportion control per list can be enforced")
                share = (category, control.kind, control.m)
        return cls(tuple(include), tuple(exclude), share)

    def bounds(self, k: int) -> tuple[int, int]:
        """(lo, hi): the allowed range of in-category items among k, as `eval.metrics` scores the control."""
        if self.share is None:
            return 0, k
        _, kind, m = self.share
        q = float(quota(k, m))
        lo, hi = {"<=": (0, math.floor(q)), ">=": (math.ceil(q), k), "~": (math.ceil(q - 1), math.floor(q + 1))}[kind]
        return max(lo, 0), min(hi, k)


@dataclasses.dataclass(frozen=True)
class Automaton:
    """The catalogue trie (host numpy arrays) and the answer format's fixed token pieces; see the module doc."""

    items: np.ndarray  # [N] item id at each sorted position
    node_lo: np.ndarray  # [M] first sorted position under the node
    node_hi: np.ndarray  # [M] one past the last
    edge_start: np.ndarray  # [M + 1] CSR offsets into the edge arrays
    edge_token: np.ndarray  # [E] token id, or END
    edge_child: np.ndarray  # [E] child node
    first_line: tuple[int, ...]  # H_1
    final: tuple[int, ...]  # F (its last token is a stop token)
    joins: dict  # i -> G_i for lines i >= 2, extended on demand by `join`
    probe: Any  # (response function, T(A)) to derive G_i for more lines
    dropped: dict[str, list[int]]  # reason -> item ids left out
    num_items: int  # size of the item id space (the catalogue, dropped items included)

    @property
    def max_degree(self) -> int:
        return int(np.diff(self.edge_start).max(initial=1))

    @property
    def longest_title(self) -> int:
        """Tokens of the longest title (the trie's depth, END excluded)."""
        depth = np.zeros(len(self.node_lo), np.int64)
        for node in range(len(self.node_lo)):  # children are created after their parent: one pass in order
            depth[self.edge_child[self.edge_start[node]:self.edge_start[node + 1]]] = depth[node] + 1
        return int(depth.max(initial=1)) - 1

    def answer_tokens(self, lines: int) -> int:
        """Enough new tokens for any answer of `lines` items, the stop token included."""
        return sum(map(len, self.pieces(lines))) + lines * self.longest_title

    def pieces(self, lines: int) -> list[tuple[int, ...]]:
        """The fixed pieces of a list of up to `lines` lines: H_1, G_2 ... G_lines, F (piece i opens line i+1)."""
        return [self.first_line] + [self.join(i) for i in range(2, lines + 1)] + [self.final]

    def join(self, line: int) -> tuple[int, ...]:
        """G_line: the tokens between line-1's title and line's title."""
        if line not in self.joins:
            if self.probe is None:
                raise ValueError(f"this automaton was saved for lists of at most {max(self.joins, default=1)} lines")
            respond, t_a = self.probe

            def up_to_title(n: int) -> list[int]:  # the answer's tokens before the title on line n
                lines = [f"{j}. {_PROBE[0]}" for j in range(1, n)]
                return _common_prefix(*(respond("\n".join(lines + [f"{n}. {x}"])) for x in _PROBE))

            rest = up_to_title(line)[len(up_to_title(line - 1)):]
            if rest[:len(t_a)] != t_a or len(rest) == len(t_a):
                raise ValueError(f"the tokenizer's chat template does not render line {line} of a list as "
                                 "separate tokens; constrained decoding cannot follow it")
            self.joins[line] = tuple(rest[len(t_a):])
        return self.joins[line]

    def rows(self, ks: Sequence[int], histories: Sequence[Sequence[int]], intents: Sequence[Intent] | None = None,
             category_matrix: np.ndarray | None = None) -> "RowConstraints":
        """Per-prompt constraints: exactly ks[b] items, none of histories[b], and intents[b] (default: none)."""
        b = len(ks)
        intents = list(intents) if intents is not None else [Intent()] * b
        if len(histories) != b or len(intents) != b:
            raise ValueError(f"rows: {b} ks, {len(histories)} histories, {len(intents)} intents")
        if any(k < 1 for k in ks):
            raise ValueError(f"rows: every k must be >= 1, got {min(ks)}")
        n = len(self.items)
        base = np.ones((b, n), bool)
        share_in = np.zeros((b, n), bool)
        lo, hi = np.zeros(b, np.int32), np.asarray(ks, np.int32).copy()
        position = np.full(self.num_items, -1, np.int64)
        position[self.items] = np.arange(n)
        for row, (history, intent) in enumerate(zip(histories, intents)):
            pos = position[np.asarray(history, np.int64)]
            base[row, pos[pos >= 0]] = False
            if intent.include or intent.exclude or intent.share:
                if category_matrix is None:
                    raise ValueError("rows: an intent needs the category matrix")
                cats = np.asarray(category_matrix)[self.items]
                for c in intent.include:
                    base[row] &= cats[:, c]
                for c in intent.exclude:
                    base[row] &= ~cats[:, c]
                if intent.share:
                    share_in[row] = cats[:, intent.share[0]]
                    lo[row], hi[row] = intent.bounds(ks[row])
        return RowConstraints(self, np.asarray(ks, np.int32), base, share_in, lo, hi)


@dataclasses.dataclass(frozen=True)
class RowConstraints:
    """A batch's per-row rules over an automaton's sorted positions (built by `Automaton.rows`)."""

    automaton: Automaton
    k: np.ndarray  # [B]
    base: np.ndarray  # [B, N] allowed before anything is listed (history and +C/-C applied)
    share_in: np.ndarray  # [B, N] in the proportion control's category
    lo: np.ndarray  # [B] in-category items needed at least
    hi: np.ndarray  # [B] and at most

    def shortfall(self, row: int) -> str | None:
        """Why row `row` will list fewer than k items (None when k are reachable)."""
        k, base, lo, hi = int(self.k[row]), self.base[row], int(self.lo[row]), int(self.hi[row])
        inside, outside = int((base & self.share_in[row]).sum()), int((base & ~self.share_in[row]).sum())
        if inside + outside < k:
            return f"only {inside + outside} catalogue items are allowed (history and categories excluded)"
        if inside < lo:
            return f"the proportion control needs {lo} items of its category, only {inside} are allowed"
        if outside < k - hi:
            return f"the proportion control needs {k - hi} items outside its category, only {outside} are allowed"
        return None

    def select(self, rows: Sequence[int]) -> "RowConstraints":
        """The constraints of the given rows, in that order."""
        rows = np.asarray(rows, np.int64)
        return dataclasses.replace(self, k=self.k[rows], base=self.base[rows], share_in=self.share_in[rows],
                                   lo=self.lo[rows], hi=self.hi[rows])


_CACHE: dict[tuple, Automaton] = {}


def catalogue_automaton(titles: Sequence[str], tokenizer: Any) -> Automaton:
    """The automaton of `titles` (item id = position) under `tokenizer`'s chat template; cached per pair."""
    vocab = tokenizer.get_vocab()
    key = (hashlib.sha256("\n".join(titles).encode()).hexdigest(), len(vocab), tokenizer.chat_template,
           hashlib.sha256(repr(sorted(vocab.items())[:: max(1, len(vocab) // 512)]).encode()).hexdigest())
    if key not in _CACHE:
        _CACHE[key] = _build(list(titles), tokenizer)
    return _CACHE[key]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> list[int]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return list(a[:n])


def _responses(tokenizer: Any):
    """answers -> the assistant turn's token ids as training encodes them (`tasks.encode`), up to and
    including the first stop token; batched (the chat template is rendered once around a placeholder)."""
    mark = "\x00answer\x00"
    chat = [{"role": "user", "content": "x"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": mark}], tokenize=False)
    if not full.startswith(prompt) or full.count(mark) != 1:
        raise ValueError("the tokenizer's chat template does not extend the generation prompt with the answer")
    before, after = full.split(mark)
    prompt_ids = tokenizer([prompt], add_special_tokens=False)["input_ids"][0]
    stops = set(stop_token_ids(tokenizer))

    def respond_many(answers: Sequence[str]) -> list[list[int]]:
        out = []
        for ids in tokenizer([before + a + after for a in answers], add_special_tokens=False)["input_ids"]:
            if ids[:len(prompt_ids)] != prompt_ids:
                raise ValueError("the chat template's prompt tokens change when an answer follows")
            ids = ids[len(prompt_ids):]
            ends = [j for j, t in enumerate(ids) if t in stops]
            out.append(ids[:ends[0] + 1] if ends else ids)
        return out

    return respond_many


def _build(titles: list[str], tokenizer: Any) -> Automaton:
    respond_many = _responses(tokenizer)
    respond = lambda answer: respond_many([answer])[0]
    a, z = respond_many([f"1. {_PROBE[0]}", f"1. {_PROBE[1]}"])
    first_line = _common_prefix(a, z)
    final = _common_prefix(a[::-1], z[::-1])[::-1]
    t_a = a[len(first_line):len(a) - len(final)]
    if not first_line or not final or not t_a or final[-1] not in stop_token_ids(tokenizer):
        raise ValueError("the tokenizer's chat template does not render a numbered list as the automaton needs")

    dropped: dict[str, list[int]] = {}
    keep = []
    for item, title in enumerate(titles):
        reason = ("empty title" if not title.strip() else "line break in the title" if "\n" in title or "\r" in title
                  else "leading or trailing spaces" if title != title.strip() else None)
        if reason:
            dropped.setdefault(reason, []).append(item)
        else:
            keep.append(item)
    # Each title alone on line 1, on line 2 after probe A, and on line 1 before "2. A": the same tokens.
    texts = [titles[i] for i in keep]
    alone = respond_many([f"1. {t}" for t in texts])
    second = respond_many([f"1. {_PROBE[0]}\n2. {t}" for t in texts])
    before_line2 = respond_many([f"1. {t}\n2. {_PROBE[0]}" for t in texts])
    automaton_stub = Automaton(np.zeros(0, np.int64), *(np.zeros(1, np.int32),) * 3, np.zeros(0, np.int32),
                               np.zeros(0, np.int32), tuple(first_line), tuple(final), {}, (respond, t_a), {}, 0)
    join2 = list(automaton_stub.join(2))
    sequences: dict[tuple[int, ...], int] = {}
    for item, one, two, three in zip(keep, alone, second, before_line2):
        seq = one[len(first_line):len(one) - len(final)]
        ok = (one[:len(first_line)] == first_line and one[len(one) - len(final):] == final and seq
              and two == first_line + t_a + join2 + seq + final and three == first_line + seq + join2 + t_a + final)
        if not ok:
            dropped.setdefault("tokens change with the position in the list", []).append(item)
        elif tuple(seq) in sequences:
            dropped.setdefault("duplicate title", []).append(item)
        else:
            sequences[tuple(seq)] = item
    title_tokens = {t for seq in sequences for t in seq}
    if join2[0] in title_tokens:
        raise ValueError(f"token {join2[0]} both starts a new list line and occurs inside titles")
    if final[0] in title_tokens:  # e.g. Llama-2's "▁" before "</s>": end with the bare stop token instead
        final = final[-1:]

    ordered = sorted(sequences)
    items = np.asarray([sequences[s] for s in ordered], np.int64)
    node_lo, node_hi, children = [0], [len(ordered)], [[]]
    path, prev = [0], ()
    for pos, seq in enumerate(ordered):
        seq = seq + (END,)
        common = len(_common_prefix(prev, seq))
        for node in path[common + 1:]:
            node_hi[node] = pos
        del path[common + 1:]
        for token in seq[common:]:
            node = len(node_lo)
            node_lo.append(pos)
            node_hi.append(len(ordered))
            children.append([])
            children[path[-1]].append((token, node))
            path.append(node)
        prev = seq
    edge_start = np.zeros(len(node_lo) + 1, np.int64)
    edge_start[1:] = np.cumsum([len(c) for c in children])
    edges = [e for c in children for e in c]
    return dataclasses.replace(
        automaton_stub, items=items, node_lo=np.asarray(node_lo, np.int32), node_hi=np.asarray(node_hi, np.int32),
        edge_start=edge_start.astype(np.int32), edge_token=np.asarray([t for t, _ in edges], np.int32),
        edge_child=np.asarray([c for _, c in edges], np.int32), final=tuple(final), joins={2: tuple(join2)},
        dropped=dropped, num_items=len(titles))




class Walker:
    """One request's walk through the automaton on the host: `allowed()` token ids, then `advance(token)`.
    The same rules as the device loop (`llm.constrain`), for per-request logits processors (vLLM)."""

    def __init__(self, rows: RowConstraints, row: int = 0):
        self.a, self.k = rows.automaton, int(rows.k[row])
        self.share_in, self.lo, self.hi = rows.share_in[row], int(rows.lo[row]), int(rows.hi[row])
        self.pieces = self.a.pieces(self.k)
        self.allowed_items = rows.base[row].copy()
        self.count = self.inside = 0
        self.title, self.node, self.pos = False, 0, 0
        self.piece = 0 if self.eligible().any() else len(self.pieces) - 1

    def eligible(self, count: int | None = None, inside: int | None = None) -> np.ndarray:
        count = self.count if count is None else count
        inside = self.inside if inside is None else inside
        take_in, take_out = inside < self.hi, self.lo - inside < self.k - count
        return self.allowed_items & np.where(self.share_in, take_in, take_out)

    def _edges(self) -> dict[int, tuple[int, int]]:
        """token -> (child node, END item position or -1) of the open edges at the current node."""
        a, eligible = self.a, self.eligible()
        out = {}
        for e in range(a.edge_start[self.node], a.edge_start[self.node + 1]):
            child = int(a.edge_child[e])
            lo, hi = int(a.node_lo[child]), int(a.node_hi[child])
            if not eligible[lo:hi].any():
                continue
            if a.edge_token[e] != END:
                out[int(a.edge_token[e])] = (child, -1)
                continue
            inside = self.inside + int(self.share_in[lo])
            after = self.allowed_items.copy()
            after[lo] = False
            left = (after & np.where(self.share_in, inside < self.hi, self.lo - inside < self.k - self.count - 1)).any()
            piece = self.count + 1 if self.count + 1 < self.k and left else len(self.pieces) - 1
            out[self.pieces[piece][0]] = (piece, lo)
        return out

    def allowed(self) -> list[int]:
        if self.title:
            return sorted(self._edges())
        if self.pos < len(self.pieces[self.piece]):
            return [self.pieces[self.piece][self.pos]]
        return [self.pieces[-1][-1]]  # the answer has ended

    def advance(self, token: int) -> None:
        if not self.title:
            self.pos += 1
            self.title = self.pos >= len(self.pieces[self.piece]) and self.piece != len(self.pieces) - 1
            self.node = 0
            return
        target, item = self._edges()[token]
        if item < 0:
            self.node = target
            return
        self.allowed_items[item] = False
        self.count += 1
        self.inside += int(self.share_in[item])
        self.piece, self.pos, self.node = target, 1, 0
        self.title = len(self.pieces[target]) == 1 and target != len(self.pieces) - 1


_ARRAYS = ("items", "node_lo", "node_hi", "edge_start", "edge_token", "edge_child")


def save_automaton(automaton: Automaton, path: str | Path, max_lines: int, categories: Sequence[str] = (),
                   category_matrix: np.ndarray | None = None) -> None:
    """Write the automaton (its joins for up to `max_lines` lines) and the catalogue's categories (names, and
    bool [items, categories]) to one .npz file that `load_automaton` reads without a tokenizer (vLLM's process)."""
    meta = {"first_line": automaton.first_line, "final": automaton.final, "num_items": automaton.num_items,
            "joins": {str(i): automaton.join(i) for i in range(2, max_lines + 1)}, "dropped": automaton.dropped,
            "categories": list(categories)}
    matrix = np.zeros((automaton.num_items, 0), bool) if category_matrix is None else np.asarray(category_matrix)
    np.savez(path, meta=np.asarray(json.dumps(meta)), category_matrix=matrix,
             **{k: getattr(automaton, k) for k in _ARRAYS})


def load_automaton(path: str | Path) -> Automaton:
    with np.load(path) as f:
        meta = json.loads(str(f["meta"]))
        arrays = {k: f[k] for k in _ARRAYS}
    return Automaton(**arrays, first_line=tuple(meta["first_line"]), final=tuple(meta["final"]),
                     joins={int(i): tuple(v) for i, v in meta["joins"].items()}, probe=None,
                     dropped=meta["dropped"], num_items=meta["num_items"])


def load_categories(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(category names, bool [items, categories]) saved beside an automaton."""
    with np.load(path) as f:
        return json.loads(str(f["meta"]))["categories"], f["category_matrix"]
