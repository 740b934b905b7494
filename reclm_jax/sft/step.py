"""The SFT loss and jitted train step (pure functions; the loop is in `trainer.py`, the optimiser in
`training.optim`).

Only the LoRA adapter is trained: the base parameters are an argument the gradient is not taken for.
Train state: a `TrainState` whose params are the adapter (float32), checkpointed as it is.

Gradient accumulation is an explicit `lax.scan` over micro-batches inside the one jitted step (rather than
`optax.MultiSteps`): every call is one optimiser step on one global batch, so the step counter, the learning
rate schedule, checkpoints and the data position always agree, no half-accumulated gradient ever has to be
checkpointed, and peak memory is that of one micro-batch.

A step whose loss or gradient norm is not finite leaves the state unchanged and reports `finite = False`; the
loop stops the run on it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reclm_jax.llm import model, sharding
from reclm_jax.llm.config import LlamaConfig, LoraConfig
from reclm_jax.training.state import TrainState

Params = dict[str, Any]
BATCH_KEYS = ("tokens", "attention_mask", "loss_mask")


def response_loss(logprobs: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(loss, per-sample losses [B]) from response-token log-probs [B, R] and their validity mask [B, R].

    A sample's loss is the mean cross-entropy of its response tokens; the loss is the mean over samples, so
    long and short answers weigh the same (the paper's reference code). A sample without response tokens
    counts as 0.
    """
    mask = mask.astype(jnp.float32)
    per_sample = -(logprobs * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
    return per_sample.mean(), per_sample


def response_positions(loss_mask: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """(idx [B, size], valid [B, size]): the positions t - 1 whose states predict the response tokens t
    (`loss_mask[:, t]`), in order, padded with position 0 and marked invalid."""
    targets = loss_mask[:, 1:]
    size = min(size, targets.shape[1])
    idx = jax.vmap(lambda row: jnp.nonzero(row, size=size, fill_value=0)[0])(targets)
    valid = jnp.arange(size)[None, :] < targets.sum(-1, keepdims=True)
    return idx, valid


def batch_loss(lora: Params, params: Params, batch: dict[str, jax.Array], dropout_rng: jax.Array | None, *,
               cfg: LlamaConfig, lora_cfg: LoraConfig, response_len: int) -> jax.Array:
    """The response loss, with vocabulary logits computed only at the (at most `response_len`) positions per
    row that predict response tokens: at every position they would cost a third of the forward pass."""
    tokens, attention_mask = batch["tokens"], batch["attention_mask"]
    head_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, cfg.num_layers)
    _, hidden, _ = model.forward(params, cfg, tokens, model.positions_from_mask(attention_mask),
                                 attention_mask=attention_mask, lora=lora, lora_cfg=lora_cfg,
                                 dropout_rng=dropout_rng)  # its all-position logits are unused: XLA drops them
    idx, valid = response_positions(batch["loss_mask"], response_len)
    states = jnp.take_along_axis(hidden, idx[..., None], axis=1)
    logits = model.lm_logits(params, cfg, states, lora, lora_cfg, head_rng)
    targets = jnp.take_along_axis(tokens[:, 1:], idx, axis=1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return response_loss(picked - jax.nn.logsumexp(logits, axis=-1), valid)[0]


def init_state(lora: Params, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), lora, tx.init(lora))


def split_micro(batch: dict[str, jax.Array], accum: int) -> dict[str, jax.Array]:
    """[B, T] -> [accum, B / accum, T]; micro-batch i holds rows i, i + accum, ... so that a batch sharded in
    contiguous blocks over devices stays sharded the same way within every micro-batch."""
    def split(x):
        b = x.shape[0]
        if b % accum:
            raise ValueError(f"batch of {b} rows does not split into {accum} micro-batches")
        return x.reshape(b // accum, accum, *x.shape[1:]).swapaxes(0, 1)

    return {k: split(batch[k]) for k in BATCH_KEYS}


def train_step(state: TrainState, params: Params, batch: dict[str, jax.Array], dropout_key: jax.Array, *,
               cfg: LlamaConfig, lora_cfg: LoraConfig, tx: optax.GradientTransformation, accum: int,
               response_len: int, lr: optax.Schedule | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on `batch` ([B, T] arrays, B = accum x micro-batch) whose responses have at most
    `response_len` tokens. Dropout masks come from `dropout_key` folded with the step and micro-batch index,
    so a resumed run draws the same masks. `lr`, the optimiser's schedule, only adds the step's learning
    rate to the metrics."""
    step_key = jax.random.fold_in(dropout_key, state.step)
    grad_fn = jax.value_and_grad(functools.partial(batch_loss, cfg=cfg, lora_cfg=lora_cfg,
                                                    response_len=response_len))

    def micro_step(grads, xs):
        micro, i = xs
        loss, g = grad_fn(state.params, params, micro, jax.random.fold_in(step_key, i))
        return jax.tree.map(jnp.add, grads, g), loss

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, losses = jax.lax.scan(micro_step, zeros, (split_micro(batch, accum), jnp.arange(accum)))
    # Equal-size micro-batches: the mean of their per-sample means is the global batch's.
    grads = jax.tree.map(lambda g: g / accum, grads)
    loss = losses.mean()
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
               "tokens": batch["attention_mask"].sum(), "response_tokens": batch["loss_mask"].sum()}
    if lr is not None:
        metrics["lr"] = lr(state.step)
    return new, metrics


def train_shardings(mesh: Mesh, params: Params, lora: Params, tx: optax.GradientTransformation
                    ) -> tuple[Any, Any, Any]:
    """(state, params, batch) shardings for `jit_train_step` on `mesh` (arrays or shape structs): the frozen
    base, the adapter and its Adam moments by `llm.sharding`'s training rules, counters replicated, batches
    over the batch axes."""
    lora_sh = sharding.param_shardings(lora, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    shapes = jax.eval_shape(functools.partial(init_state, tx=tx), lora)
    state_sh = TrainState(replicated, lora_sh, optax.tree_map_params(tx, lambda _, sh: sh, shapes.opt_state, lora_sh,
                                                                     transform_non_params=lambda _: replicated))
    batch_sh = {k: sharding.batch_sharding(mesh, 2) for k in BATCH_KEYS}
    return state_sh, sharding.param_shardings(params, mesh), batch_sh


def jit_train_step(cfg: LlamaConfig, lora_cfg: LoraConfig, tx: optax.GradientTransformation, accum: int,
                   response_len: int, shardings: tuple[Any, Any, Any] | None = None,
                   lr: optax.Schedule | None = None, mesh: Mesh | None = None):
    """`train_step` jitted with the configs static and the state donated. `shardings` = (state, params,
    batch) shardings (pytrees of `jax.sharding.Sharding`) pins the layouts on a mesh; None lets inputs'
    placements decide (one device). On a `mesh`, activations are pinned to its batch axes (true FSDP)."""
    fn = functools.partial(train_step, cfg=cfg, lora_cfg=lora_cfg, tx=tx, accum=accum,
                           response_len=response_len, lr=lr)
    if mesh is not None:
        fn = _under_mesh(fn, mesh)
    if shardings is None:
        return jax.jit(fn, donate_argnums=0)
    state_sh, params_sh, batch_sh = shardings
    return jax.jit(fn, donate_argnums=0, in_shardings=(state_sh, params_sh, batch_sh, None),
                   out_shardings=(state_sh, None))


def _under_mesh(fn, mesh: Mesh):
    """`fn` traced under `mesh` (where `sharding.constrain_batch` finds the batch axes)."""
    @functools.wraps(fn)
    def wrapped(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return wrapped
