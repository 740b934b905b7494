"""The one training loop: every stage supplies a step function and its batches, the loop does the rest.

    run = RunDir(out_dir, cfg, resume=True, may_change=("train.steps",))   # checks only, writes nothing
    ... load models and data (a failure here leaves nothing behind) ...
    result = train(run, state, step_fn, batches, total_steps=..., checkpoint=cfg.checkpoint)

The run directory:
    config.yaml                    the stage's config (written when the run starts)
    log.jsonl, tensorboard/        `RunLog` (each step once: a resumed run first drops the records after its
                                   checkpoint, which it is about to write again)
    checkpoints/last/<step>/       the `TrainState`, the batch iterator's position, extra JSON (`Checkpointer`)
    checkpoints/best/<step>/       the best trainable params by `checkpoint.best_metric` (only if validating)

Resuming: an existing run directory is resumed when its recorded config matches (apart from `may_change`
keys); a different config is refused before anything is written, naming the keys, unless `resume=False`,
which starts afresh and removes the old run's checkpoints and logs. The newest checkpoint that restores is
used; a damaged one is reported and the one before it tried. Every random draw of a step must come from the
seed and the step number (the stages fold the step into their keys), and the batch iterator is restored to
its saved position, so a run killed at any moment (kill -9 included) continues exactly as if it had not been.

A step whose metrics say `finite: False` (the stage's step left its state unchanged) stops the run with a
`RunError` naming the last good checkpoint.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jax
import yaml

from reclm_jax import config as config_lib
from reclm_jax.config import Count, Section
from reclm_jax.core.errors import RunError
from reclm_jax.training.checkpoints import Checkpointer, abstract
from reclm_jax.training.run_log import RunLog
from reclm_jax.training.state import TrainState

CONFIG, CHECKPOINTS, LOG, TENSORBOARD = "config.yaml", "checkpoints", "log.jsonl", "tensorboard"

# (state, host batch) -> (new state, host scalars). Scalars may carry "finite" (bool), "tokens" (processed
# tokens, for throughput) and "flops" (model FLOPs of the step, for MFU); the loop takes those out.
StepFn = Callable[[TrainState, Any], tuple[TrainState, dict[str, Any]]]


@dataclass(frozen=True)
class CheckpointConfig(Section):
    """When the loop saves, how many it keeps, and which validation metric picks the best."""

    every: Count = 200  # steps between checkpoints (and one at the end)
    keep_last: Count = 3
    async_save: bool = True
    best_metric: str | None = None  # a validation metric ("<task>/<metric>"); None: no best checkpoint
    best_mode: Literal["max", "min"] = "max"


class RunDir:
    """An output directory checked against `cfg` before anything is created (see the module docstring)."""

    def __init__(self, out_dir: str | Path, cfg: Any, *, resume: bool = True, may_change: Sequence[str] = ()):
        self.path, self.cfg, self.resume = Path(out_dir), cfg, resume
        self.checkpoints = self.path / CHECKPOINTS
        self.has_run = (self.checkpoints / "last").is_dir() and any((self.checkpoints / "last").iterdir())
        if resume and self.has_run and (self.path / CONFIG).is_file():
            old = _flatten(yaml.safe_load((self.path / CONFIG).read_text()) or {})
            new = _flatten(config_lib.to_dict(cfg))
            # A key added since the run was recorded is the same setting as long as it keeps its default.
            default = _flatten(config_lib.to_dict(type(cfg)()))
            # A run directory may be moved or copied, and a multi-process run is restarted on new ports, with
            # process 0's own process_id recorded: none of these changes what the run computes.
            may_change = ("out_dir", "mesh.coordinator_address", "mesh.process_id", "mesh.heartbeat_timeout_s",
                          *may_change)

            def change(k: str) -> str | None:  # how k changed, None if it did not
                if k not in old:
                    return None if k in default and new[k] == default[k] else \
                        f"{k}: not recorded (a key added since, default {default.get(k)!r}) -> {new[k]!r}"
                if k not in new:
                    return f"{k}: {old[k]!r} -> (no longer a key)"
                return None if old[k] == new[k] else f"{k}: {old[k]!r} -> {new[k]!r}"

            changed = [change(k) for k in sorted(old.keys() | new.keys())
                       if change(k) and not any(k == m or k.startswith(m + ".") for m in may_change)]
            if changed:
                shown = ", ".join(changed[:8]) + (", ..." if len(changed) > 8 else "")
                raise RunError(f"{self.path} holds a run with another config ({shown}); "
                               "choose a new out_dir, or pass --no-resume to start afresh there")

    def start(self) -> None:
        """Create the directory (removing the old run's checkpoints and logs when not resuming) and record
        the config. Only process 0 writes."""
        if jax.process_index() != 0:
            return
        if not self.resume:
            shutil.rmtree(self.checkpoints, ignore_errors=True)
            shutil.rmtree(self.path / TENSORBOARD, ignore_errors=True)
            (self.path / LOG).unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        config_lib.dump(self.cfg, self.path / CONFIG)


@dataclass
class Result:
    state: TrainState
    step: int  # optimiser steps done
    losses: dict[int, float] = field(default_factory=dict)  # of this call, by step
    last: dict[str, float] = field(default_factory=dict)  # the last logged scalars
    valid: dict[str, float] = field(default_factory=dict)  # the last validation
    best: dict[str, Any] | None = None  # the best checkpoint's info
    resumed_from: int = 0


def train(run: RunDir, state: TrainState, step_fn: StepFn, batches: Iterator, *, total_steps: int,
          checkpoint: CheckpointConfig, progress: bool = True, description: str = "train", log_every: int = 1,
          valid_every: int = 0, validate: Callable[[TrainState, int], dict[str, float]] | None = None,
          patience: int | None = None, peak_flops: float | None = None, max_steps: int | None = None,
          stop: Callable[[dict[str, Any]], str | None] | None = None) -> Result:
    """Run (or resume) `step_fn` over `batches` until `total_steps` (or the batches end). `batches` is a
    grain `DatasetIterator` (its position is checkpointed). `validate(state, step)` runs every `valid_every`
    steps and at the end; its metrics are logged as valid/<name> and pick the best checkpoint; with `patience`,
    the run stops after that many validations in a row without a better best_metric (early stopping, also
    across restarts). `stop(scalars)`, asked after every step, stops the run there when it returns a reason
    (logged; a stopped run stays stopped when resumed). `max_steps` stops after that many steps of this call
    (how tests interrupt a run)."""
    run.start()
    ckpt = Checkpointer(run.checkpoints, keep_last=checkpoint.keep_last, best_metric=checkpoint.best_metric,
                        best_mode=checkpoint.best_mode, async_save=checkpoint.async_save)
    log = None
    try:
        start, extra = 0, {}
        if run.resume and ckpt.latest_step() is not None:
            state, extra, start, warnings = ckpt.restore_newest(abstract(state), data=batches)
            for w in warnings:
                print(f"warning: {w}", flush=True)
            if extra.get("total_steps") not in (None, total_steps):
                print(f"warning: the run was started for {extra['total_steps']} steps, now {total_steps}: a "
                      "decaying learning-rate schedule changes from here on (a constant one does not)", flush=True)
        log = RunLog(run.path, total_steps, start, progress=progress, peak=peak_flops, description=description)
        if start:
            log.write(f"{description}: resumed from step {start} ({run.checkpoints})")
        result = Result(state, start, resumed_from=start)
        step, tokens, flops = start, 0, 0.0
        bad_evals, stopped = extra.get("bad_evals", 0), extra.get("stopped", False)

        def save(step: int) -> None:
            ckpt.save(step, state, data=batches, extra={"loss": result.losses.get(step), "total_steps": total_steps,
                                                        "bad_evals": bad_evals, "stopped": stopped})
            log.pause()

        while not stopped and step < total_steps and (max_steps is None or step - start < max_steps):
            try:
                batch = next(batches)
            except StopIteration:
                log.write(f"the data ended after step {step}")
                break
            try:
                state, scalars = step_fn(state, batch)
            except jax.errors.JaxRuntimeError as e:
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                ckpt.wait()
                raise RunError(f"step {step + 1} ran out of memory ({str(e).splitlines()[0]}); the last checkpoint is "
                               f"step {ckpt.latest_step()} in {run.checkpoints}. For SFT and PPO runs `reclm-jax plan "
                               f"--config {run.path / CONFIG}` shows each program's memory and what to lower (a "
                               "smaller batch or minibatch, shorter sequences, model.remat=full)") from e
            if not scalars.pop("finite", True):
                ckpt.wait()
                raise RunError(f"step {step + 1}: loss {scalars.get('loss')} or gradient norm {scalars.get('grad_norm')}"
                               f" is not finite; the run stopped. The last good checkpoint is step {ckpt.latest_step()} "
                               f"in {run.checkpoints} (lower the learning rate, check the data, or compute in float32)")
            step += 1
            tokens += scalars.pop("tokens", 0)
            step_flops = scalars.pop("flops", None)
            flops = None if step_flops is None else flops + step_flops
            if "loss" in scalars:
                result.losses[step] = float(scalars["loss"])
            done = step >= total_steps
            if stop is not None and (reason := stop(scalars)):
                stopped = True
                log.write(f"step {step}: {reason}; stopping")
            if step % log_every == 0 or done or stopped:
                result.last = log.step(step, scalars, tokens=tokens, flops=flops)
                tokens, flops = 0, 0.0
            if validate is not None and valid_every and (step % valid_every == 0 or done):
                result.valid = validate(state, step)
                log.scalars(step, {f"valid/{k}": v for k, v in result.valid.items()})
                if checkpoint.best_metric in result.valid and ckpt.save_best(step, state.params, result.valid):
                    log.write(f"step {step}: best {checkpoint.best_metric} = {result.valid[checkpoint.best_metric]:.4f}")
                    bad_evals = 0
                else:
                    bad_evals += 1
                    if patience is not None and bad_evals >= patience:
                        stopped = True
                        log.write(f"step {step}: {patience} validations without a better {checkpoint.best_metric}; "
                                  "stopping early")
                log.pause()
            if step % checkpoint.every == 0 or done or stopped:
                save(step)
        if step > start and ckpt.latest_step() != step:
            save(step)
        ckpt.wait()
        result.state, result.step, result.best = state, step, ckpt.best_info()
        return result
    finally:
        ckpt.close()
        if log is not None:
            log.close()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): list(tree) if isinstance(tree, tuple) else tree}
