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
BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_weight")  # `tasks.batches`' layout


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
    """The sum of the response tokens' cross-entropies times their `loss_weight` (summed over a global batch:
    the mean over samples of each sample's mean, so long and short answers weigh the same, as in the paper's
    reference code). Vocabulary logits are computed only at the (at most `response_len`) positions per row
    that predict response tokens: at every position they would cost a third of the forward pass."""
    tokens, segments = batch["tokens"], batch["segment_ids"]
    head_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, cfg.num_layers)
    _, hidden, _ = model.forward(params, cfg, tokens, batch["positions"], attention_mask=segments > 0,
                                 segment_ids=segments, lora=lora, lora_cfg=lora_cfg,
                                 dropout_rng=dropout_rng)  # its all-position logits are unused: XLA drops them
    idx, valid = response_positions(batch["loss_weight"] > 0, response_len)
    states = jnp.take_along_axis(hidden, idx[..., None], axis=1)
    logits = model.lm_logits(params, cfg, states, lora, lora_cfg, head_rng)
    targets = jnp.take_along_axis(tokens[:, 1:], idx, axis=1)
    weights = jnp.where(valid, jnp.take_along_axis(batch["loss_weight"][:, 1:], idx, axis=1), 0.0)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return -((picked - jax.nn.logsumexp(logits, axis=-1)) * weights).sum()


def init_state(lora: Params, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), lora, tx.init(lora))


def split_micro(batch: dict[str, jax.Array], micro_rows: int) -> dict[str, jax.Array]:
    """[B, T] -> [B / micro_rows, micro_rows, T]; with accum = B / micro_rows micro-batches, micro-batch i holds
    rows i, i + accum, ... so that a batch sharded in contiguous blocks over devices stays sharded the same way
    within every micro-batch."""
    b = batch["tokens"].shape[0]
    if b % micro_rows:
        raise ValueError(f"batch of {b} rows does not split into micro-batches of {micro_rows} rows")
    return {k: batch[k].reshape(micro_rows, b // micro_rows, *batch[k].shape[1:]).swapaxes(0, 1)
            for k in BATCH_KEYS}


def train_step(state: TrainState, params: Params, batch: dict[str, jax.Array], dropout_key: jax.Array, *,
               cfg: LlamaConfig, lora_cfg: LoraConfig, tx: optax.GradientTransformation, micro_rows: int,
               response_len: int, lr: optax.Schedule | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on `batch` (`tasks.batches`' [B, T] arrays of a global batch, run in micro-batches
    of `micro_rows` rows) whose rows have at most `response_len` response tokens. Dropout masks come from
    `dropout_key` folded with the step and micro-batch index, so a resumed run draws the same masks. `lr`,
    the optimiser's schedule, only adds the step's learning rate to the metrics."""
    step_key = jax.random.fold_in(dropout_key, state.step)
    grad_fn = jax.value_and_grad(functools.partial(batch_loss, cfg=cfg, lora_cfg=lora_cfg,
                                                    response_len=response_len))

    def micro_step(grads, xs):
        micro, i = xs
        loss, g = grad_fn(state.params, params, micro, jax.random.fold_in(step_key, i))
        return jax.tree.map(jnp.add, grads, g), loss

    micro = split_micro(batch, micro_rows)
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    # The loss weights are normalised over the global batch: its loss and gradient are the micro-batches' sums.
    grads, losses = jax.lax.scan(micro_step, zeros, (micro, jnp.arange(micro["tokens"].shape[0])))
    loss = losses.sum()
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    real = batch["segment_ids"] > 0
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "tokens": real.sum(),
               "response_tokens": (batch["loss_weight"] > 0).sum(), "samples": (real & (batch["positions"] == 0)).sum()}
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


def jit_train_step(cfg: LlamaConfig, lora_cfg: LoraConfig, tx: optax.GradientTransformation, micro_rows: int,
                   response_len: int, shardings: tuple[Any, Any, Any] | None = None,
                   lr: optax.Schedule | None = None, mesh: Mesh | None = None):
    """`train_step` jitted with the configs static and the state donated. `shardings` = (state, params,
    batch) shardings (pytrees of `jax.sharding.Sharding`) pins the layouts on a mesh; None lets inputs'
    placements decide (one device). On a `mesh`, activations are pinned to its batch axes (true FSDP)."""
    fn = functools.partial(train_step, cfg=cfg, lora_cfg=lora_cfg, tx=tx, micro_rows=micro_rows,
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
