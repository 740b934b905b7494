"""Catalogue- and intent-constrained decoding: a token automaton over the catalogue that runs inside the sampler.

    automaton = llm.automaton.catalogue_automaton(titles, tokenizer)  # once per (catalogue, tokenizer), cached
    rows = automaton.rows(ks, histories, intents, category_matrix)    # per-prompt k, exclusions and controls
    llm.sampling.generate(params, cfg, prompts, ..., constraint=rows)  # every answer: k distinct allowed titles

This module is the device side (`device_tables`, and `init_state` / `allowed_tokens` / `advance`, called by
`llm.sampling.decode` inside its loop); `llm.automaton` builds the automaton on the host.

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

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reclm_jax.llm import sharding
from reclm_jax.llm.automaton import END, RowConstraints

# Phases of a row's automaton state.
FIXED, TITLE = 0, 1


ROW_KEYS = ("k", "base", "share_in", "lo", "hi")  # the per-row tables; the rest is the automaton, shared by all rows


def device_tables(rows: RowConstraints, batch: int, vocab_size: int, mesh: Mesh | None = None
                  ) -> dict[str, jax.Array]:
    """The loop's constant inputs for a batch padded to `batch` rows (fillers copy row 0). On a `mesh` the
    per-row tables are split over its batch axes like the prompts, so each device keeps the automaton state of
    its own rows only; the automaton itself is replicated."""
    a = rows.automaton
    pieces = a.pieces(int(rows.k.max()))
    width = max(len(p) for p in pieces)
    fixed = np.zeros((len(pieces), width), np.int32)
    for i, p in enumerate(pieces):
        fixed[i, :len(p)] = p
    too_big = max(max(p) for p in pieces if p)
    if max(too_big, int(a.edge_token.max(initial=0))) >= vocab_size:
        raise ValueError(f"the automaton's tokens exceed the model's vocabulary of {vocab_size}")
    pad = lambda x: np.concatenate([x, np.repeat(x[:1], batch - len(x), axis=0)]) if batch > len(x) else x
    tables = {
        "node_lo": a.node_lo, "node_hi": a.node_hi, "edge_start": a.edge_start, "edge_token": a.edge_token,
        "edge_child": a.edge_child, "degree": np.zeros((a.max_degree,), np.int8),
        "fixed": fixed, "fixed_len": np.asarray([len(p) for p in pieces]),
        "k": pad(rows.k), "base": pad(rows.base), "share_in": pad(rows.share_in), "lo": pad(rows.lo),
        "hi": pad(rows.hi), "vocab": np.zeros((vocab_size,), np.int8),
    }
    tables = {k: v.astype(np.int32) if v.dtype.kind in "iu" and v.dtype != np.int8 else v for k, v in tables.items()}
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in tables.items()}
    replicated = NamedSharding(mesh, PartitionSpec())
    return {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim) if k in ROW_KEYS else replicated)
            for k, v in tables.items()}


# ---- inside the sampler's loop ---------------------------------------------------------------------------
def init_state(tables: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Every row starts emitting H_1, or F at once when nothing is allowed."""
    b = tables["k"].shape[0]
    final = tables["fixed_len"].shape[0] - 1
    zero = jnp.zeros((b,), jnp.int32)
    empty = ~jnp.any(_eligible(tables, tables["base"], zero, zero), axis=1)
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
