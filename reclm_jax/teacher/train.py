"""Train the SASRec teacher: optax Adam, early stopping on valid NDCG@10 (full ranking), orbax checkpoints."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm import tqdm

from reclm_jax import config as config_lib
from reclm_jax.data.schema import DataError, Dataset
from reclm_jax.teacher import checkpoint
from reclm_jax.teacher.batches import epoch_batches, training_windows
from reclm_jax.teacher.config import TeacherConfig
from reclm_jax.teacher.evaluate import FULL, evaluate, evaluate_split
from reclm_jax.teacher.query import Teacher, build_model

SELECT = "NDCG@10"
RESUMABLE_CHANGES = ("max_epochs", "patience", "eval_every")


def softmax_loss(logits, targets, mask):
    """Mean cross-entropy over all items at the masked positions. logits [..., N]; targets 0-based [...]."""
    per = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(per * mask) / jnp.maximum(jnp.sum(mask), 1)


def bce_loss(pos, neg, mask):
    """SASRec's loss: -log sigmoid(pos) - log(1 - sigmoid(neg)), averaged over the masked positions."""
    per = -jax.nn.log_sigmoid(pos) - jax.nn.log_sigmoid(-neg)
    return jnp.sum(per * mask) / jnp.maximum(jnp.sum(mask), 1)


def batch_loss(graphdef, loss: str, params, batch, key):
    model = nnx.merge(graphdef, params)
    hidden = model(batch["tokens"], deterministic=False, rngs=nnx.Rngs(dropout=key))
    mask = batch["targets"] > 0
    if loss == "softmax":
        return softmax_loss(model.item_scores(hidden), jnp.maximum(batch["targets"] - 1, 0), mask)
    return bce_loss(model.token_scores(hidden, batch["targets"]), model.token_scores(hidden, batch["negatives"]), mask)


@functools.cache  # one object per setting, so the jitted train step (tx is static) compiles once per setting
def make_optimizer(lr: float, b1: float, b2: float) -> optax.GradientTransformation:
    return optax.adam(lr, b1=b1, b2=b2)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3, 4))
def train_step(graphdef, tx, loss, params, opt_state, batch, key):
    value, grads = jax.value_and_grad(functools.partial(batch_loss, graphdef, loss))(params, batch, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


def _check_resumable(out_dir: Path, cfg: TeacherConfig, dataset: Dataset) -> None:
    """A run may be resumed with the same config and dataset; only the stopping schedule may change
    (train.max_epochs, train.patience, train.eval_every), since it never alters the training trajectory."""
    try:
        old_cfg, info = checkpoint.read_info(out_dir)
    except FileNotFoundError:
        return
    old, new = config_lib.to_dict(old_cfg), config_lib.to_dict(cfg)
    for key in RESUMABLE_CHANGES:
        old["train"].pop(key), new["train"].pop(key)
    if old != new or info["dataset"] != dataset.name or info["num_items"] != dataset.num_items:
        raise ValueError(f"{out_dir} holds a teacher run with another config or dataset; "
                         "choose a new output directory or pass resume=False (--no-resume)")


def train_teacher(dataset: Dataset, cfg: TeacherConfig, out_dir: str | Path, *, resume: bool = True,
                  progress: bool = True) -> Teacher:
    """Train (or resume) a teacher in `out_dir`, evaluate its best epoch in both protocols, and return it."""
    out_dir = Path(out_dir)
    n = dataset.num_items
    windows = training_windows(dataset, cfg.model.max_len)
    if not windows:
        raise DataError(f"{dataset.name}: no user has two training items, nothing to train on")
    if resume:
        _check_resumable(out_dir, cfg, dataset)
    checkpoint.write_info(out_dir, cfg, n, dataset.name)

    graphdef, state = nnx.split(build_model(cfg, n))
    params = nnx.to_pure_dict(state)
    tx = make_optimizer(cfg.train.lr, cfg.train.adam_b1, cfg.train.adam_b2)
    opt_state = tx.init(params)
    prog = {"epoch": 0, "best": None, "best_epoch": None, "bad_evals": 0, "stopped_early": False, "log": []}
    restored = checkpoint.load_state(out_dir, params, opt_state) if resume else None
    if restored is not None:
        params, opt_state, prog = restored
        if progress:
            tqdm.write(f"resuming {out_dir} after epoch {prog['epoch']}")

    t = cfg.train
    key = jax.random.key(cfg.seed)
    for epoch in range(prog["epoch"] + 1, t.max_epochs + 1):
        if prog["stopped_early"]:
            break
        start = time.perf_counter()
        batches = epoch_batches(dataset, windows, cfg=cfg.model, batch_size=t.batch_size,
                                negatives=t.loss == "bce", seed=cfg.seed, epoch=epoch)
        losses = []
        bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", disable=not progress, leave=False)
        for i, batch in enumerate(bar):
            step_key = jax.random.fold_in(jax.random.fold_in(key, epoch), i)
            params, opt_state, loss = train_step(graphdef, tx, t.loss, params, opt_state, batch, step_key)
            losses.append(loss)
            if i % 10 == 0:
                bar.set_postfix(loss=f"{float(loss):.4f}")
        entry = {"epoch": epoch, "loss": float(jnp.mean(jnp.stack(losses))),
                 "time_s": round(time.perf_counter() - start, 3)}
        if epoch % t.eval_every == 0 or epoch == t.max_epochs:
            score = evaluate_split(Teacher(cfg, n, params), dataset, "valid")[FULL][SELECT]
            entry[f"valid_{SELECT}"] = score
            if prog["best"] is None or score > prog["best"]:
                prog.update(best=score, best_epoch=epoch, bad_evals=0)
                checkpoint.save_best(out_dir, epoch, params)
            else:
                prog["bad_evals"] += 1
            prog["stopped_early"] = prog["bad_evals"] >= t.patience
        prog["epoch"] = epoch
        prog["log"].append(entry)
        checkpoint.save_state(out_dir, epoch, params, opt_state, prog)
        if progress:
            tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))

    teacher = Teacher.load(out_dir)
    metrics = {"dataset": dataset.name, "best_epoch": prog["best_epoch"], f"best_valid_{SELECT}": prog["best"],
               "selection": f"valid {SELECT}, {FULL}", "eval": evaluate(teacher, dataset), "epochs": prog["log"]}
    (out_dir / checkpoint.METRICS).write_text(json.dumps(metrics, indent=1))
    return teacher
