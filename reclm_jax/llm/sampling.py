"""Batched KV-cache sampling: one jitted prefill, then a jitted `lax.while_loop` decode with the cache donated.

    generate(params, cfg, prompts: list[list[int]], *, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0,
             rng=None, eos_ids=None, pad_id=0, lora=None, lora_cfg=None) -> GenerationResult

Prompts are left-padded into one batch; RoPE positions count real tokens only, and padding is masked out of
attention, so a row's output does not depend on the other rows. `temperature=0` is greedy; otherwise logits
are divided by the temperature, then filtered by top-k (`top_k > 0`) and nucleus top-p (`top_p < 1`), and a
token is drawn with `rng` (a `jax.random` key; required unless greedy). A row stops after emitting any of
`eos_ids` (default: `cfg.eos_token_id`; the stop token is included) or after `max_new_tokens`.

Shapes are bucketed so a long run compiles a handful of programs: batch to a power of two, prompt length and
decode budget to a power of two up to 64 and to multiples of 64 above (`bucket`). Sampling options that change
the program (greedy, top-k on/off, top-p on/off) are static; their values (temperature, k, p) are not.

Sharding: on weights placed on a multi-device mesh (`llm.sharding`; `sharding.for_sampling` gives the
sampling layout), the batch is rounded up to a multiple of the batch shards and prompts, KV cache and outputs
are split over the mesh's batch axes: each device samples its own rows.

Lower-level jitted pieces: `prefill(params, lora, tokens, mask, *, cfg, lora_cfg, cache_len)` ->
(last logits [B, V], cache) and `decode(...)` (see its docstring).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from reclm_jax.llm import constrain, model, sharding
from reclm_jax.llm.automaton import RowConstraints
from reclm_jax.llm.config import LlamaConfig, LoraConfig

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """Per prompt (row): generated tokens and their log-probabilities, padded after the row's length.

    `logprobs` are under the model itself: log-softmax of the raw logits (temperature 1, no top-k/top-p), i.e.
    what PPO's ratio and KL use. `lengths` count generated tokens including the stop token.
    """

    tokens: np.ndarray  # [B, max_new_tokens] int32, pad_id after each row's length
    logprobs: np.ndarray  # [B, max_new_tokens] float32, 0 after each row's length
    lengths: np.ndarray  # [B] int32
    # with a constraint and keep_allowed: the tokens each step allowed, bits packed along the vocabulary
    # (`np.unpackbits(..., axis=-1, count=V)`), [B, max_new_tokens, ceil(V / 8)] uint8; what PPO needs to train
    # the constrained policy (`rl.update`)
    allowed: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class SamplingMode:
    """The static (program-changing) part of the sampling options."""

    greedy: bool
    top_k: bool
    top_p: bool


def bucket(n: int, step: int = 64) -> int:
    """Round n up: powers of two up to `step`, then multiples of `step`."""
    if n <= step:
        return max(1, 1 << (n - 1).bit_length())
    return -(-n // step) * step


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [B, length] with each prompt at the right end, and the real-token mask."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            tokens[row, length - len(prompt):] = prompt
            mask[row, length - len(prompt):] = True
    return tokens, mask


@functools.partial(jax.jit, static_argnames=("cfg", "lora_cfg", "cache_len"))
def prefill(params: Params, lora: Params | None, tokens: jax.Array, mask: jax.Array, *, cfg: LlamaConfig,
            lora_cfg: LoraConfig | None, cache_len: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Run left-padded prompts [B, P] into a fresh cache of `cache_len` slots; logits [B, V] of the last slot."""
    cache = model.init_cache(cfg, tokens.shape[0], cache_len)
    logits, _, cache = model.forward(params, cfg, tokens, model.positions_from_mask(mask), attention_mask=mask,
                                     lora=lora, lora_cfg=lora_cfg, cache=cache, last_only=True)
    return logits[:, 0], cache


def sample_token(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
                 top_p: jax.Array, mode: SamplingMode) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row from logits [B, V]; returns (token, raw-model logprob)."""
    raw = jax.nn.log_softmax(logits, axis=-1)
    if mode.greedy:
        token = jnp.argmax(logits, axis=-1)
    else:
        scaled = logits / temperature
        if mode.top_k or mode.top_p:
            ranked = jnp.flip(jnp.sort(scaled, axis=-1), axis=-1)  # descending
            threshold = jnp.full(scaled.shape[:-1], -jnp.inf)
            if mode.top_k:
                kth = jax.lax.dynamic_index_in_dim(ranked, jnp.clip(top_k, 1, ranked.shape[-1]) - 1, axis=-1,
                                                   keepdims=False)
                threshold = jnp.maximum(threshold, kth)
                ranked = jnp.where(ranked >= kth[:, None], ranked, -jnp.inf)
            if mode.top_p:
                probs = jax.nn.softmax(ranked, axis=-1)
                before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
                kept = jnp.where(before < top_p, ranked, jnp.inf)
                threshold = jnp.maximum(threshold, jnp.min(kept, axis=-1))
            scaled = jnp.where(scaled >= threshold[:, None], scaled, -jnp.inf)
        token = jax.random.categorical(key, scaled, axis=-1)
    token = token.astype(jnp.int32)
    return token, jnp.take_along_axis(raw, token[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("cfg", "lora_cfg", "mode", "out_len", "keep_allowed"),
                   donate_argnames=("cache",))
def decode(params: Params, lora: Params | None, cache: dict[str, jax.Array], logits: jax.Array,
           positions: jax.Array, done: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array, eos_ids: jax.Array, max_new_tokens: jax.Array, pad_id: jax.Array,
           constraint: dict[str, jax.Array] | None = None, *,
           cfg: LlamaConfig, lora_cfg: LoraConfig | None, mode: SamplingMode, out_len: int,
           keep_allowed: bool = False) -> dict[str, jax.Array]:
    """Sample up to `max_new_tokens` (<= out_len) tokens per row after a prefill.

    `logits` [B, V] predict each row's next token at RoPE position `positions` [B]; rows with `done` set
    emit nothing. Stops early once every row is done. `constraint` (`constrain.device_tables`): tokens outside
    each row's catalogue automaton are masked out before sampling, inside the loop; with `keep_allowed` the
    masks are returned too ("allowed" [B, out_len, ceil(V / 8)], bits packed). Returns {"tokens", "logprobs"}
    [B, out_len], "lengths" [B] and the final "cache" (returned so the donated one is updated in place).
    """
    b = logits.shape[0]

    def emit(state, logits):
        key, sub = jax.random.split(state["key"])
        if constraint is not None:
            allowed, walk = constrain.allowed_tokens(constraint, state["automaton"])
            logits = jnp.where(allowed, logits, -jnp.inf)
            if keep_allowed:
                state = {**state, "allowed": jax.lax.dynamic_update_slice(
                    state["allowed"], jnp.packbits(allowed, axis=-1)[:, None], (0, state["step"], 0))}
        token, lp = sample_token(logits, sub, temperature, top_k, top_p, mode)
        live = ~state["done"]
        if constraint is not None:
            state = {**state, "automaton": constrain.advance(constraint, state["automaton"], walk, token, live)}
        token = jnp.where(live, token, pad_id)
        col = (0, state["step"])
        return {
            **state, "key": key, "step": state["step"] + 1, "last": token,
            "tokens": jax.lax.dynamic_update_slice(state["tokens"], token[:, None], col),
            "logprobs": jax.lax.dynamic_update_slice(state["logprobs"], jnp.where(live, lp, 0)[:, None], col),
            "lengths": state["lengths"] + live,
            "done": state["done"] | jnp.isin(token, eos_ids),
        }

    def cond(state):
        return (state["step"] < max_new_tokens) & ~jnp.all(state["done"])

    def body(state):
        logits, _, cache = model.forward(params, cfg, state["last"][:, None], state["positions"][:, None],
                                         lora=lora, lora_cfg=lora_cfg, cache=state["cache"])
        state = {**state, "cache": cache, "positions": state["positions"] + 1}
        return emit(state, logits[:, 0])

    state = {
        "cache": cache, "key": key, "step": jnp.zeros((), jnp.int32), "positions": positions,
        "done": done, "last": jnp.zeros((b,), jnp.int32),
        "tokens": jnp.full((b, out_len), pad_id, jnp.int32), "logprobs": jnp.zeros((b, out_len), jnp.float32),
        "lengths": jnp.zeros((b,), jnp.int32),
    }
    if constraint is not None:
        state["automaton"] = constrain.init_state(constraint)
        if keep_allowed:
            state["allowed"] = jnp.zeros((b, out_len, -(-logits.shape[-1] // 8)), jnp.uint8)
    state = jax.lax.while_loop(cond, body, emit(state, logits))
    return {k: state[k] for k in ("tokens", "logprobs", "lengths", "cache", "allowed") if k in state}


def generate(
    params: Params,
    cfg: LlamaConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    eos_ids: Iterable[int] | None = None,
    pad_id: int = 0,
    lora: Params | None = None,
    lora_cfg: LoraConfig | None = None,
    constraint: RowConstraints | None = None,
    keep_allowed: bool = False,
) -> GenerationResult:
    """Sample continuations of `prompts` (token id lists); see the module docstring. With `constraint` (one
    row per prompt), every answer follows its row's catalogue automaton (`llm.constrain`); `logprobs` are then
    those of the masked distribution the tokens were drawn from, and `keep_allowed` also returns each step's
    mask (`GenerationResult.allowed`: PPO of the constrained policy, `rl.config.RolloutConfig.constrain`)."""
    if not prompts:
        raise ValueError("generate: prompts is empty")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"generate: top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    mode = SamplingMode(greedy=temperature == 0.0, top_k=top_k > 0, top_p=top_p < 1.0)
    if not mode.greedy and rng is None:
        raise ValueError("generate: sampling with temperature > 0 needs rng (a jax.random key)")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"generate: prompt length {longest} + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's max_position_embeddings {cfg.max_position_embeddings}")
    stop = set(eos_ids) if eos_ids is not None else {cfg.eos_token_id}
    if keep_allowed and constraint is None:
        raise ValueError("generate: keep_allowed needs a constraint (without one every token is allowed)")
    if constraint is not None:
        if len(constraint.k) != len(prompts):
            raise ValueError(f"generate: {len(constraint.k)} constraint rows for {len(prompts)} prompts")
        stop.add(constraint.automaton.final[-1])
    stop = sorted(stop)
    stop += [-1] * (8 - len(stop) % 8)  # -1 never matches; a multiple of 8 ids: no recompile per set size

    n = len(prompts)
    # On a mesh (the weights' placement) prompts, cache and outputs are split over the batch axes.
    mesh = sharding.mesh_of(params)
    shards = sharding.batch_shards(mesh)
    batch = -(-bucket(n, step=1 << 30) // shards) * shards
    prompt_len, out_len = bucket(longest), bucket(max_new_tokens)
    rows = list(prompts) + [prompts[0]] * (batch - n)  # filler rows start done and emit nothing
    tokens, mask = left_pad(rows, prompt_len, pad_id)
    positions, done = mask.sum(1).astype(np.int32), np.arange(batch) >= n
    if mesh is not None:
        tokens, mask, positions, done = (jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
                                         for x in (tokens, mask, positions, done))
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        logits, cache = prefill(params, lora, tokens, mask, cfg=cfg, lora_cfg=lora_cfg,
                                cache_len=prompt_len + out_len)
        out = decode(
            params, lora, cache, logits, positions, done,
            rng if rng is not None else jax.random.key(0), jnp.float32(temperature or 1.0), jnp.int32(top_k),
            jnp.float32(top_p), jnp.asarray(stop, jnp.int32), jnp.int32(max_new_tokens), jnp.int32(pad_id),
            None if constraint is None else constrain.device_tables(constraint, batch, cfg.vocab_size, mesh),
            cfg=cfg, lora_cfg=lora_cfg, mode=mode, out_len=out_len, keep_allowed=keep_allowed,
        )
    out = {k: v for k, v in out.items() if k != "cache"}
    # Several processes: each holds its devices' rows; every process gets all of them.
    out = multihost_utils.process_allgather(out, tiled=True) if jax.process_count() > 1 else jax.device_get(out)
    return GenerationResult(
        tokens=out["tokens"][:n, :max_new_tokens], logprobs=out["logprobs"][:n, :max_new_tokens],
        lengths=out["lengths"][:n], allowed=out["allowed"][:n, :max_new_tokens] if keep_allowed else None,
    )
