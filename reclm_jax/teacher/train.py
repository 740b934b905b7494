"""Train the SASRec teacher in the one training loop (Adam, `optim`), early stopping on valid NDCG@10 (full
ranking), the loop's orbax checkpoints (`teacher.checkpoint` describes the directory)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from reclm_jax.core.errors import DataError, RunError
from reclm_jax.data.schema import Dataset
from reclm_jax.teacher import checkpoint
from reclm_jax.teacher.batches import epoch_batches, training_windows
from reclm_jax.teacher.checkpoint import SELECT
from reclm_jax.teacher.config import TeacherConfig
from reclm_jax.teacher.evaluate import FULL, evaluate, evaluate_split
from reclm_jax.teacher.query import Teacher, build_model
from reclm_jax.training import loop, optim
from reclm_jax.training.loop import LOG, CheckpointConfig, RunDir
from reclm_jax.training.state import TrainState

# A run may be resumed with a changed stopping schedule: it never alters the training trajectory.
RESUMABLE_CHANGES = ("train.max_epochs", "train.patience", "train.eval_every")


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


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3, 4))
def train_step(graphdef, tx, loss, params, opt_state, batch, key):
    value, grads = jax.value_and_grad(functools.partial(batch_loss, graphdef, loss))(params, batch, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


class EpochBatches(grain.DatasetIterator):
    """The training batches of epochs 1, 2, ... in order (`batches.epoch_batches`), each with its (epoch,
    index) for the dropout key; its state {"epoch", "index"} is what a checkpoint stores."""

    def __init__(self, dataset: Dataset, windows, cfg: TeacherConfig):
        super().__init__()
        self.dataset, self.windows, self.cfg = dataset, windows, cfg
        self.epoch, self.index, self._batches = 1, 0, None

    def _epoch(self):
        if self._batches is None:
            t = self.cfg.train
            self._batches = epoch_batches(self.dataset, self.windows, cfg=self.cfg.model, batch_size=t.batch_size,
                                          negatives=t.loss == "bce", seed=self.cfg.seed, epoch=self.epoch)
        return self._batches

    def __len__(self) -> int:  # batches per epoch (the same every epoch)
        return len(self._epoch())

    def __next__(self) -> dict:
        batches = self._epoch()
        if self.index >= len(batches):
            self.epoch, self.index, self._batches = self.epoch + 1, 0, None
            batches = self._epoch()
        batch = {**batches[self.index], "epoch": self.epoch, "index": self.index}
        self.index += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._batches = int(state["epoch"]), int(state["index"]), None


def train_teacher(dataset: Dataset, cfg: TeacherConfig, out_dir: str | Path, *, resume: bool = True,
                  progress: bool = True, max_steps: int | None = None) -> Teacher:
    """Train (or resume) a teacher in `out_dir` in the one training loop: a step per batch, validation (valid
    NDCG@10, full ranking) every train.eval_every epochs picks the best parameters and stops after
    train.patience evaluations without improvement. Then evaluate the best in both protocols and return it.
    `max_steps` stops after that many steps of this call (how tests interrupt a run)."""
    out_dir = Path(out_dir)
    run = RunDir(out_dir, cfg, resume=resume, may_change=RESUMABLE_CHANGES)
    if resume and run.has_run:
        _, info = checkpoint.read_info(out_dir)
        if info["dataset"] != dataset.name or info["num_items"] != dataset.num_items:
            raise RunError(f"{out_dir} holds a teacher of dataset {info['dataset']} ({info['num_items']} items), not "
                           f"{dataset.name} ({dataset.num_items}); choose a new --out, or pass --no-resume")
    n = dataset.num_items
    windows = training_windows(dataset, cfg.model.max_len)
    if not windows:
        raise DataError(f"{dataset.name}: no user has two training items, nothing to train on")

    graphdef, state = nnx.split(build_model(cfg, n))
    params = nnx.to_pure_dict(state)
    t = cfg.train
    key = jax.random.key(cfg.seed)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        step_key = jax.random.fold_in(jax.random.fold_in(key, batch.pop("epoch")), batch.pop("index"))
        params, opt_state, loss = train_step(graphdef, tx, t.loss, state.params, state.opt_state, batch, step_key)
        return TrainState(state.step + 1, params, opt_state), {"loss": float(loss)}

    def validate(state: TrainState, step: int) -> dict[str, float]:
        return {SELECT: evaluate_split(Teacher(cfg, n, state.params), dataset, "valid")[FULL][SELECT]}

    batches = EpochBatches(dataset, windows, cfg)
    per_epoch = len(batches)
    tx = optim.optimizer(cfg.optim, t.max_epochs * per_epoch)
    run.start()
    checkpoint.write_info(out_dir, cfg, n, dataset.name)
    result = loop.train(run, TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)), step, batches,
                        total_steps=t.max_epochs * per_epoch, description="teacher", progress=progress,
                        checkpoint=CheckpointConfig(every=per_epoch, keep_last=2, best_metric=SELECT),
                        valid_every=t.eval_every * per_epoch, validate=validate, patience=t.patience,
                        max_steps=max_steps)

    teacher = Teacher.load(out_dir)
    best = result.best or {}
    metrics = {"dataset": dataset.name, "best_epoch": best.get("step", 0) // per_epoch,
               f"best_valid_{SELECT}": best.get("value"), "selection": f"valid {SELECT}, {FULL}",
               "eval": evaluate(teacher, dataset), "epochs": epoch_log(out_dir / LOG, per_epoch)}
    (out_dir / checkpoint.METRICS).write_text(json.dumps(metrics, indent=1))
    return teacher


def epoch_log(path: Path, per_epoch: int) -> list[dict]:
    """Per epoch: the mean training loss and the validation score, from the run's log.jsonl."""
    losses: dict[int, list[float]] = {}
    valid: dict[int, float] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        epoch = (record["step"] - 1) // per_epoch + 1
        if "loss" in record:
            losses.setdefault(epoch, []).append(record["loss"])
        if f"valid/{SELECT}" in record:
            valid[epoch] = record[f"valid/{SELECT}"]
    return [{"epoch": e, "loss": sum(values) / len(values), **({f"valid_{SELECT}": valid[e]} if e in valid else {})}
            for e, values in sorted(losses.items())]
