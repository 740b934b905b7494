"""Catalogue- and intent-constrained decoding: a token automaton over the catalogue that runs inside the sampler.

    automaton = catalogue_automaton(titles, tokenizer)              # built once per (catalogue, tokenizer), cached
    rows = automaton.rows(ks, histories, intents, category_matrix)  # per-prompt k, exclusions and controls
    generate(params, cfg, prompts, ..., constraint=rows)            # every answer: k distinct allowed titles

The answer format is the one the models are trained on (`tasks.templates.Templates.response`): "1. <title>",
one numbered line per item, then the chat template's end of the answer. Each piece is the exact token sequence
the tokenizer produces for it inside the chat template's assistant turn (probed through the template, so BPE
merges across the number, the leading space, the newline and the closing tokens are what training saw):

    H_1 T(a) G_2 T(b) G_3 ... T(z) F

H_1 opens line 1 ("1."), G_i joins line i ("\\n" "i" "."), T(t) is a title with its leading space, F closes
the answer (e.g. "<|im_end|>", or "▁" "</s>" for Llama-2's template). Every title's T(t) is checked in line-1
and line-2 context and before G_2; a title whose tokens depend on the context, an empty title, one with a line
break or a duplicate is left out of the automaton (`Automaton.dropped` says which and why).

Device form: the titles' token sequences T(t) + [END], sorted, make a trie whose every node covers a contiguous
range [lo, hi) of sorted positions; its edges are in CSR form (`edge_start`, `edge_token`, `edge_child`). Per
row the sampler keeps a bool vector of still-allowed positions; a prefix sum over it gives each child's number
of allowed items, and an edge is open only when that number is positive, so a walk can never enter a dead
subtree. END edges emit the first token of G_{n+2} (more items follow) or of F (k items listed, or nothing
allowed is left: a shorter list). All of it runs inside the `lax.while_loop` of `llm.sampling.decode`.

Per-row rules (`Intent`): no title already listed, none of the history, items in every `include` category
(+C), none in an `exclude` category (-C), and at most one proportion control ("<=", ">=", "~" of k * m items
in a category) enforced with a per-row count of in-category items: an in-category item is allowed while the
count is below its upper bound, an out-of-category one while the remaining slots can still reach the lower
bound. `RowConstraints.shortfall` tells before decoding why a row cannot reach k items.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reclm_jax.eval.controls import PROPORTION_KINDS, quota
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

    def join(self, line: int) -> tuple[int, ...]:
        """G_line: the tokens between line-1's title and line's title."""
        if line not in self.joins:
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

    def device(self, batch: int, vocab_size: int) -> dict[str, jax.Array]:
        """The loop's constant inputs for a batch padded to `batch` rows (fillers copy row 0)."""
        a = self.automaton
        lines = int(self.k.max())
        pieces = [a.first_line] + [a.join(i) for i in range(2, lines + 1)] + [a.final]
        width = max(len(p) for p in pieces)
        fixed = np.zeros((len(pieces), width), np.int32)
        for i, p in enumerate(pieces):
            fixed[i, :len(p)] = p
        too_big = max(max(p) for p in pieces if p)
        if max(too_big, int(a.edge_token.max(initial=0))) >= vocab_size:
            raise ValueError(f"the automaton's tokens exceed the model's vocabulary of {vocab_size}")
        pad = lambda x: np.concatenate([x, np.repeat(x[:1], batch - len(x), axis=0)]) if batch > len(x) else x
        return {
            "node_lo": jnp.asarray(a.node_lo, jnp.int32), "node_hi": jnp.asarray(a.node_hi, jnp.int32),
            "edge_start": jnp.asarray(a.edge_start, jnp.int32), "edge_token": jnp.asarray(a.edge_token, jnp.int32),
            "edge_child": jnp.asarray(a.edge_child, jnp.int32), "degree": jnp.zeros((a.max_degree,), jnp.int8),
            "fixed": jnp.asarray(fixed), "fixed_len": jnp.asarray([len(p) for p in pieces], jnp.int32),
            "k": jnp.asarray(pad(self.k)), "base": jnp.asarray(pad(self.base)),
            "share_in": jnp.asarray(pad(self.share_in)), "lo": jnp.asarray(pad(self.lo)),
            "hi": jnp.asarray(pad(self.hi)), "vocab": jnp.zeros((vocab_size,), jnp.int8),
        }

    def item_ids(self, positions: np.ndarray) -> np.ndarray:
        return self.automaton.items[positions]


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
    """answers -> the assistant turn's token ids as training encodes them (`tasks.tokenize`), up to and
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


# ---- inside the sampler's loop ---------------------------------------------------------------------------
def init_state(tables: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Every row starts emitting H_1, or F at once when nothing is allowed."""
    b = tables["k"].shape[0]
    final = tables["fixed_len"].shape[0] - 1
    empty = ~jnp.any(tables["base"], axis=1)
    return {"allowed": tables["base"], "count": jnp.zeros((b,), jnp.int32), "inside": jnp.zeros((b,), jnp.int32),
            "phase": jnp.full((b,), FIXED, jnp.int32), "piece": jnp.where(empty, final, 0).astype(jnp.int32),
            "pos": jnp.zeros((b,), jnp.int32), "node": jnp.zeros((b,), jnp.int32)}


def _eligible(tables, allowed, count, inside):
    """[B, N]: allowed now, given the proportion counts (in-category while below hi, out while lo is reachable)."""
    take_in = inside < tables["hi"]
    take_out = tables["lo"] - inside < tables["k"] - count
    return allowed & jnp.where(tables["share_in"], take_in[:, None], take_out[:, None])


def allowed_tokens(tables: dict[str, jax.Array], state: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
    """(bool [B, V] tokens each row may emit next, what `advance` needs to follow the emitted token)."""
    b = state["node"].shape[0]
    vocab = tables["vocab"].shape[0]
    final = tables["fixed_len"].shape[0] - 1
    rows = jnp.arange(b)
    eligible = _eligible(tables, state["allowed"], state["count"], state["inside"])
    cum = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.cumsum(eligible, axis=1, dtype=jnp.int32)], axis=1)

    # The current node's edges, padded to the largest degree; an edge is open when its subtree holds an item.
    edge = tables["edge_start"][state["node"]][:, None] + jnp.arange(tables["degree"].shape[0])
    real = edge < tables["edge_start"][state["node"] + 1][:, None]
    edge = jnp.where(real, edge, 0)
    child = tables["edge_child"][edge]
    lo, hi = tables["node_lo"][child], tables["node_hi"][child]
    open_ = real & (jnp.take_along_axis(cum, hi, axis=1) - jnp.take_along_axis(cum, lo, axis=1) > 0)

    # An END edge lists the item at `lo`: emit the next line's join, or the answer's end when k items are
    # listed or nothing would be allowed after this one.
    is_end = tables["edge_token"][edge] == END
    item = jnp.where(is_end, lo, 0)
    item_in = jnp.take_along_axis(tables["share_in"], item, axis=1)  # [B, D]
    count1, inside1 = state["count"][:, None] + 1, state["inside"][:, None] + item_in.astype(jnp.int32)
    more = (count1 < tables["k"][:, None]) & (_left_after(tables, state, item_in, count1, inside1) > 0)
    next_piece = jnp.where(more, count1, final)  # piece i is G_{i+1} (0: H_1), the last one F
    token = jnp.where(is_end, tables["fixed"][next_piece, 0], tables["edge_token"][edge])
    in_title = jnp.zeros((b, vocab), jnp.int8).at[rows[:, None], token].max(open_.astype(jnp.int8)) > 0

    fixed_token = tables["fixed"][state["piece"], state["pos"]]
    mask = jnp.where((state["phase"] == TITLE)[:, None], in_title, jax.nn.one_hot(fixed_token, vocab, dtype=bool))
    return mask, {"token": token, "open": open_, "child": child, "is_end": is_end, "item": item, "item_in": item_in,
                  "next_piece": next_piece}


def _left_after(tables, state, item_in, count1, inside1):
    """[B, D]: eligible items left for the next line if an END edge's item (in the category: item_in) were
    listed now, making the counts count1 and inside1."""
    allowed = state["allowed"]
    inside_now = jnp.sum(allowed & tables["share_in"], axis=1, dtype=jnp.int32)[:, None]  # [B, 1]
    outside_now = jnp.sum(allowed & ~tables["share_in"], axis=1, dtype=jnp.int32)[:, None]
    item_in = item_in.astype(jnp.int32)
    take_in = inside1 < tables["hi"][:, None]
    take_out = tables["lo"][:, None] - inside1 < tables["k"][:, None] - count1
    return (jnp.where(take_in, inside_now - item_in, 0) + jnp.where(take_out, outside_now - (1 - item_in), 0))


def advance(tables: dict[str, jax.Array], state: dict[str, jax.Array], aux: dict, token: jax.Array,
            live: jax.Array) -> dict[str, jax.Array]:
    """The rows' automaton states after emitting `token` [B] (rows not `live` keep theirs)."""
    b = token.shape[0]
    rows = jnp.arange(b)
    lengths = tables["fixed_len"]
    final = lengths.shape[0] - 1
    # Fixed piece: next token; at its end the next title starts (or, after F, nothing follows).
    pos = state["pos"] + 1
    fixed_done = pos >= lengths[state["piece"]]
    fixed = {**state, "pos": pos, "phase": jnp.where(fixed_done, TITLE, FIXED), "node": jnp.zeros_like(pos)}

    # Title: follow the emitted token's edge.
    hit = aux["open"] & (aux["token"] == token[:, None])
    j = jnp.argmax(hit, axis=1)
    is_end = aux["is_end"][rows, j]
    item, item_in, piece = aux["item"][rows, j], aux["item_in"][rows, j], aux["next_piece"][rows, j]
    listed = state["allowed"].at[rows, item].set(False)
    one = lengths[piece] == 1
    ended = {
        "allowed": listed, "count": state["count"] + 1, "inside": state["inside"] + item_in.astype(jnp.int32),
        "phase": jnp.where(one & (piece != final), TITLE, FIXED), "piece": piece, "pos": jnp.ones_like(pos),
        "node": jnp.zeros_like(pos),
    }
    walked = {**state, "node": aux["child"][rows, j]}
    title = jax.tree.map(lambda e, w: jnp.where(_rows_like(is_end, e), e, w), ended, walked)

    in_title = state["phase"] == TITLE
    new = jax.tree.map(lambda t, f: jnp.where(_rows_like(in_title, t), t, f), title, fixed)
    return jax.tree.map(lambda n, o: jnp.where(_rows_like(live, n), n, o), new, state)


def _rows_like(flag: jax.Array, x: jax.Array) -> jax.Array:
    return flag.reshape(flag.shape + (1,) * (x.ndim - 1))
