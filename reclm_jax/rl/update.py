"""One PPO update as a single jitted function over a rollout batch (the math is `ppo_math`'s).

    state = init_state(key, base, model_cfg, cfg)              # a TrainState: adapters + value head, optimiser
    state, metrics = ppo_update(base, state, batch, key, model_cfg=..., actor_cfg=..., critic_cfg=..., hyper=...,
                                optim=...)

Three models share one copy of the frozen base weights `base` (the SFT-merged model):
- policy = base + actor LoRA (trained);
- critic = base + critic LoRA + value head (all trained: the head is in the optimised state, unlike the
  official code's, which never reaches its optimiser);
- reference = base with no adapter. `base` is never updated and never donated, so the reference is the SFT
  model for the whole run (the official code trains the lm_head, which its reference shares, so its
  reference drifts).

A rollout `batch` (see `rollout.build_batch`) has one row per prompt: the prompt, then its k sampled responses one
after another, then padding. Each response attends to the prompt and to itself only (`model.forward`'s
`shared_prefix`), with positions continuing the prompt's, so every response sees exactly its own sequence while
the prompt's tokens are computed once for all k. For G prompts, k responses and R response columns:
    tokens, positions, segment_ids [G, L] int32   segment 0 the prompt, i the i-th response, -1 padding
    predict_at [G, k, R] int32     the row position whose state predicts response token j (the prompt's last
                                   token for j = 0, else the response's previous token)
    targets [G, k, R] int32        the sampled response tokens
    response_mask [G, k, R] f32    1 on the sampled tokens (the stop token included)
    logprobs [G, k, R] f32         log pi(y_t) of each sampled token at sampling time (temperature 1)
    scores [G, k, R] f32           the placed rule rewards: R_item on each item's last token, 10 R_list on the last
    allowed [G, k, R, V/8] uint8   only for rollouts of the constrained policy (`rollout.constrain`): the tokens
                                   the sampler allowed at each step, bits packed along the vocabulary
Values are read from the same hidden states as the logits that predict the token.

With "allowed", every distribution of the update (policy, old policy, reference; ratio, KL and entropy) is
the constrained one, softmax over the allowed tokens only: PPO then trains the policy that samples and serves
the lists, and its gradient moves mass only among continuations that the constraint leaves open.

The update, all inside one jit: reference log-probs and critic values of the batch (in minibatch chunks, no
gradient), and with `recompute_logprobs` the policy's log-probs too (replacing the sampler's, see PPOHyper);
per-token rewards scores - eta * KL; reward whitening to unit std with the mean kept (TRL's shift_mean=False);
GAE as a reverse scan; advantage whitening; then `epochs` passes over shuffled minibatches of prompts
(`lax.scan`; with the batch split over devices, each device shuffles its own rows and every minibatch takes
rows of every device, so the batch is never gathered: data-parallel PPO), each
minibatch a clipped policy loss + vf_coef * clipped value loss - ent_coef * entropy, one AdamW step after global-norm
clipping. Early stop: once a minibatch's approximate KL to the sampling policy (measured in its own forward
pass, before its step) exceeds `target_kl`, that step and all later ones in this update are skipped.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from reclm_jax.llm import lora as lora_lib
from reclm_jax.llm import model
from reclm_jax.llm.config import LlamaConfig, LoraConfig
from reclm_jax.llm.sharding import constrain_batch
from reclm_jax.rl import critic, ppo_math as pm
from reclm_jax.rl.config import PPOConfig, PPOHyper
from reclm_jax.training.optim import OptimConfig, optimizer
from reclm_jax.training.state import TrainState

Params = dict[str, Any]
BATCH_KEYS = ("tokens", "positions", "segment_ids", "predict_at", "targets", "response_mask", "logprobs", "scores")
MASK_KEY = "allowed"  # the optional masks of constrained rollouts
NOT_ALLOWED = -1e9  # a finite floor, so that entropy's 0 x log 0 terms stay 0 (-inf would give NaN)


def init_state(key: jax.Array, base: Params, model_cfg: LlamaConfig, cfg: PPOConfig) -> TrainState:
    """Fresh actor LoRA, critic LoRA and value head (the trained parameters), their optimiser state, step 0."""
    k_actor, k_critic, k_head = jax.random.split(key, 3)
    trainable = {
        "actor": lora_lib.init(k_actor, base, model_cfg, cfg.actor_lora),
        "critic": {"lora": lora_lib.init(k_critic, base, model_cfg, cfg.critic_lora),
                   "head": critic.init_head(k_head, model_cfg.hidden_size, cfg.value_head_width)},
    }
    return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer(cfg.optim).init(trainable))


def _response_forward(base, model_cfg, mb, adapter, adapter_cfg, rng=None):
    """(logits [G, k, R, V], hidden [G, k, R, D]) at the states that predict the response tokens of `mb`; with
    masks (`MASK_KEY`) the tokens not allowed get logit `NOT_ALLOWED`, so every softmax is the constrained one.

    Logits are computed for those states only: the model's all-position logits are unused, so XLA drops them
    (over a 512-token prompt and a 32k-50k vocabulary they would dominate the update's cost)."""
    segments = mb["segment_ids"]
    _, hidden, _ = model.forward(base, model_cfg, mb["tokens"], mb["positions"], attention_mask=segments >= 0,
                                 segment_ids=segments, shared_prefix=True, lora=adapter, lora_cfg=adapter_cfg,
                                 dropout_rng=rng)
    at = mb["predict_at"]
    hidden = jnp.take_along_axis(hidden, at.reshape(at.shape[0], -1)[..., None], axis=1).reshape(*at.shape, -1)
    logits = model.lm_logits(base, model_cfg, hidden, adapter, adapter_cfg, rng)
    if MASK_KEY in mb:
        allowed = jnp.unpackbits(mb[MASK_KEY], axis=-1, count=logits.shape[-1]).astype(bool)
        logits = jnp.where(allowed, logits, NOT_ALLOWED)
    return logits, hidden


def _gather_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def score_batch(base, trainable, batch, *, model_cfg, actor_cfg, critic_cfg, chunks: int, policy: bool):
    """Reference log-probs, critic values and (if `policy`) the policy's own log-probs, all [G, k, R], of a
    rollout batch; no gradient, `chunks` groups of prompts at a time (memory of one minibatch)."""

    def one(mb):
        def logprobs(adapter, adapter_cfg):
            logits, _ = _response_forward(base, model_cfg, mb, adapter, adapter_cfg)
            return _gather_logprobs(logits, mb["targets"])

        _, hidden = _response_forward(base, model_cfg, mb, trainable["critic"]["lora"], critic_cfg)
        out = {"ref": logprobs(None, None), "values": critic.value(trainable["critic"]["head"], hidden)}
        if policy:
            out["policy"] = logprobs(trainable["actor"], actor_cfg)
        return out

    keys = ("tokens", "positions", "segment_ids", "predict_at", "targets", MASK_KEY)
    chunked = {k: _interleave(batch[k], chunks) for k in keys if k in batch}
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), jax.lax.map(one, chunked))


def _interleave(x: jax.Array, chunks: int) -> jax.Array:
    """[N, ...] -> [chunks, N / chunks, ...], chunk i = rows i, i + chunks, ...: a batch split over devices in
    contiguous blocks keeps every chunk split the same way (no device computes another's rows)."""
    return x.reshape(x.shape[0] // chunks, chunks, *x.shape[1:]).swapaxes(0, 1)


def minibatches(data: dict[str, jax.Array], key: jax.Array, m: int, shards: int) -> dict[str, jax.Array]:
    """Shuffled minibatches [m, G / m, ...] of a batch of G prompts split into `shards` contiguous blocks (one per
    device): each block is shuffled on its own and every minibatch takes G / (m x shards) prompts of each block,
    so the rows never leave their device. One shard is the plain global shuffle."""
    n = data["tokens"].shape[0]
    if n % (m * shards):
        raise ValueError(f"ppo_update: {n} prompts do not split into {m} minibatches x {shards} batch shards")
    keys = key[None] if shards == 1 else jax.random.split(key, shards)
    perms = jax.vmap(lambda k: jax.random.permutation(k, n // shards))(keys)

    def leaf(x):
        rest = x.shape[1:]
        blocks = jax.vmap(lambda block, perm: block[perm])(x.reshape(shards, n // shards, *rest), perms)
        mbs = blocks.reshape(shards, m, n // (m * shards), *rest).swapaxes(0, 1).reshape(m, n // m, *rest)
        return constrain_batch(mbs, dim=1)

    return jax.tree.map(leaf, data)


def advantages(batch, ref_logprobs, values, hyper: PPOHyper):
    """Per-token rewards (Eq. 6), optionally whitened; GAE (or with `hyper.baseline` "group", leave-one-out
    advantages among a prompt's responses); whitened advantages; GAE's returns. All shaped like the response
    mask ([G, k, R])."""
    shape = batch["response_mask"].shape
    rows = lambda x: x.reshape(-1, shape[-1])  # noqa: E731
    mask = rows(batch["response_mask"])
    rewards, kl = pm.token_rewards(rows(batch["scores"]), rows(batch["logprobs"]), rows(ref_logprobs), mask,
                                   hyper.kl_coef)
    if hyper.whiten_rewards:
        rewards = pm.masked_whiten(rewards, mask, shift_mean=False)
    adv, returns = pm.gae(rewards, rows(values), mask, hyper.gamma, hyper.lam)  # the returns train the critic
    if hyper.baseline == "group":
        adv = rows(pm.group_advantages(rewards.reshape(shape), batch["response_mask"]))
    return tuple(x.reshape(shape) for x in (pm.masked_whiten(adv, mask), returns, kl))


def minibatch_loss(trainable, base, mb, rng, *, model_cfg, actor_cfg, critic_cfg, hyper: PPOHyper):
    """pg_loss + vf_coef * vf_loss - ent_coef * entropy on one minibatch, and its statistics."""
    mask = mb["response_mask"]
    rng_actor, rng_critic = jax.random.split(rng)
    logits, _ = _response_forward(base, model_cfg, mb, trainable["actor"], actor_cfg, rng_actor)
    _, hidden = _response_forward(base, model_cfg, mb, trainable["critic"]["lora"], critic_cfg, rng_critic)
    values = critic.value(trainable["critic"]["head"], hidden)
    pg_loss, pg_stats = pm.policy_loss(_gather_logprobs(logits, mb["targets"]), mb["logprobs"], mb["advantages"], mask,
                                       hyper.clip_eps)
    vf_loss, vf_stats = pm.value_loss(values, mb["values"], mb["returns"], mask, hyper.value_clip)
    ent = pm.entropy(logits, mask)
    loss = pg_loss + hyper.vf_coef * vf_loss - hyper.ent_coef * ent
    return loss, {"loss": loss, "pg_loss": pg_loss, "vf_loss": vf_loss, "entropy": ent, **pg_stats, **vf_stats}


@functools.partial(jax.jit, static_argnames=("model_cfg", "actor_cfg", "critic_cfg", "hyper", "optim", "shards"),
                   donate_argnames=("state",))
def ppo_update(base: Params, state: TrainState, batch: dict[str, jax.Array], key: jax.Array, *, model_cfg: LlamaConfig,
               actor_cfg: LoraConfig, critic_cfg: LoraConfig, hyper: PPOHyper,
               optim: OptimConfig, shards: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
    """One PPO step on a rollout batch; see the module docstring. Returns the new state and scalar metrics.
    `shards`: the batch's split over devices (`sharding.batch_shards(mesh)`), which the minibatches keep."""
    batch = {k: batch[k] for k in (*BATCH_KEYS, MASK_KEY) if k in batch}
    n = batch["tokens"].shape[0]
    m = hyper.minibatches
    if n % m:
        raise ValueError(f"ppo_update: {n} prompts do not divide into {m} minibatches")
    mask = batch["response_mask"]
    trainable = state.params
    scored = score_batch(base, trainable, batch, model_cfg=model_cfg, actor_cfg=actor_cfg, critic_cfg=critic_cfg,
                         chunks=m, policy=hyper.recompute_logprobs)
    if hyper.recompute_logprobs:
        batch = {**batch, "logprobs": scored["policy"] * mask}
    values = scored["values"]
    adv, returns, kl = advantages(batch, scored["ref"], values, hyper)
    data = {**batch, "advantages": adv, "returns": returns, "values": values}

    opt = optimizer(optim)
    grad_fn = jax.value_and_grad(functools.partial(minibatch_loss, model_cfg=model_cfg, actor_cfg=actor_cfg,
                                                   critic_cfg=critic_cfg, hyper=hyper), has_aux=True)

    def compute(params, opt_state, mb, rng):
        (_, stats), grads = grad_fn(params, base, mb, rng)
        too_far = jnp.bool_(False) if hyper.target_kl is None else stats["approx_kl"] > hyper.target_kl
        updates, new_opt = opt.update(grads, opt_state, params)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(too_far, b, a), new, old)  # noqa: E731
        stats = {**stats, "grad_norm": optax.tree.norm(grads), "evaluated": jnp.float32(1.0),
                 "applied": jnp.where(too_far, 0.0, 1.0)}
        return keep(optax.apply_updates(params, updates), params), keep(new_opt, opt_state), too_far, stats

    def minibatch_step(carry, xs):
        params, opt_state, stopped = carry
        mb, rng = xs
        shapes = jax.eval_shape(compute, params, opt_state, mb, rng)[3]

        def skip(params, opt_state, mb, rng):
            return params, opt_state, jnp.bool_(True), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        params, opt_state, stop, stats = jax.lax.cond(stopped, skip, compute, params, opt_state, mb, rng)
        return (params, opt_state, stopped | stop), stats

    def epoch(carry, rng):
        perm_key, mb_key = jax.random.split(rng)
        mbs = minibatches(data, perm_key, m, shards)
        return jax.lax.scan(minibatch_step, carry, (mbs, jax.random.split(mb_key, m)))

    (trainable, opt_state, _), stats = jax.lax.scan(epoch, (trainable, state.opt_state, jnp.bool_(False)),
                                                    jax.random.split(key, hyper.epochs))
    evaluated = jnp.maximum(stats["evaluated"].sum(), 1.0)
    metrics = {name: v.sum() / evaluated for name, v in stats.items() if name not in ("evaluated", "applied")}
    metrics |= {
        "updates": stats["applied"].sum(),
        "kl": kl.sum(-1).mean(),  # per response: sum over its tokens of log pi - log pi_ref
        "kl_per_token": pm.masked_mean(kl, mask),
        "explained_variance": pm.explained_variance(values, returns, mask),
        "value_mean": pm.masked_mean(values, mask),
        "return_mean": pm.masked_mean(returns, mask),
    }
    return TrainState(state.step + 1, trainable, opt_state), metrics
