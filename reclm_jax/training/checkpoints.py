"""Training checkpoints with orbax: the latest few for resuming, and the best by a validation metric.

    <directory>/last/<step>/state   the train-state pytree (trainable params, optimiser state, step, ...)
                           /data    the input iterator's state, one JSON file per process (grain's handler)
                           /extra   any JSON (config, progress counters)
    <directory>/best/<step>/params  the trainable params of the best validation so far (only with a best_metric)
                           /extra   {"metric": name, "value": v, "metrics": {...}, ...}

The training loop (`training.loop`) is its one user: `state` is any pytree of arrays, `data` any grain
`DatasetIterator`.
Saves are asynchronous (arrays are copied off the device, then written in the background; the next save,
`wait()` and `close()` block until the previous one is on disk). Orbax writes each step into a temporary
folder and renames it when complete, so a run killed mid-save (kill -9) leaves the previous checkpoint
as the latest one and the unfinished folder is ignored and cleaned up on the next start. A checkpoint damaged
afterwards (a deleted or corrupted file) fails to restore: `restore_newest` then falls back to the one before.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import grain
import jax
import orbax.checkpoint as ocp

from reclm_jax.core.errors import RunError

LAST, BEST = "last", "best"


def _manager(directory: Path, items: tuple[str, ...], keep: int, async_save: bool) -> ocp.CheckpointManager:
    handlers = {name: ocp.JsonCheckpointHandler() if name == "extra" else ocp.StandardCheckpointHandler()
                for name in items}
    if "data" in items:
        handlers["data"] = grain.checkpoint.CheckpointHandler()
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for name, handler in handlers.items():
        args_cls = {"extra": (ocp.args.JsonSave, ocp.args.JsonRestore),
                    "data": (grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore)}.get(
            name, (ocp.args.StandardSave, ocp.args.StandardRestore))
        for cls in args_cls:
            registry.add(name, cls, handler)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(directory.absolute(), options=options, handler_registry=registry)


class Checkpointer:
    """The latest `keep_last` train states under `last/`, and the best by `best_metric` under `best/`."""

    def __init__(self, directory: str | Path, *, keep_last: int = 3, best_metric: str | None = None,
                 best_mode: Literal["max", "min"] = "max", async_save: bool = True):
        if keep_last < 1:
            raise ValueError(f"checkpoint keep_last must be >= 1, got {keep_last}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"checkpoint best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = Path(directory)
        self.best_metric, self.best_mode = best_metric, best_mode
        self._last = _manager(self.directory / LAST, ("state", "data", "extra"), keep_last, async_save)
        self._best = _manager(self.directory / BEST, ("params", "extra"), 1, async_save) if best_metric else None
        best = self.best_info()
        self.best_value = best["value"] if best else None

    # ---- latest train state
    def latest_step(self) -> int | None:
        return self._last.latest_step()

    def save(self, step: int, state: Any, *, data: grain.DatasetIterator | None = None,
             extra: dict[str, Any] | None = None) -> None:
        """Save the train state after `step` (asynchronously), with the input iterator's position."""
        args = {"state": ocp.args.StandardSave(state), "extra": ocp.args.JsonSave(extra or {})}
        if data is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data)
        self._last.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, abstract_state: Any, *, data: grain.DatasetIterator | None = None,
                step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """(state, extra) of `step` (default: the latest). `abstract_state` gives shapes, dtypes and
        shardings (`jax.ShapeDtypeStruct`s or arrays); `data`, if given, is moved to the saved position."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory / LAST}")
        args = {"state": ocp.args.StandardRestore(abstract_state), "extra": ocp.args.JsonRestore()}
        if data is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data)
        out = self._last.restore(step, args=ocp.args.Composite(**args))
        return out["state"], out["extra"]

    def restore_newest(self, abstract_state: Any, *, data: grain.DatasetIterator | None = None
                       ) -> tuple[Any, dict[str, Any], int, list[str]]:
        """(state, extra, step, warnings) of the newest checkpoint that restores: a damaged one is named in the
        warnings and the one before it tried. Raises RunError when none restores."""
        warnings: list[str] = []
        damaged: list[int] = []
        for step in sorted(self._last.all_steps(), reverse=True):
            try:
                state, extra = self.restore(abstract_state, data=data, step=step)
                if warnings:
                    # The run saves these steps again as it passes them: orbax refuses to overwrite a step.
                    for bad in damaged:
                        self._last.delete(bad)
                    warnings.append(f"resuming from step {step} instead (removed the damaged "
                                    f"step{'s' if len(damaged) > 1 else ''} {', '.join(map(str, damaged))})")
                return state, extra, step, warnings
            except Exception as e:  # orbax and tensorstore raise many types for a damaged or mismatched file
                damaged.append(step)
                warnings.append(f"checkpoint step {step} in {self.directory / LAST} cannot be restored "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        raise RunError("; ".join(warnings) + " - no checkpoint is left to resume from; pass --no-resume to "
                       "start afresh")

    # ---- best by validation
    def improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.best_mode == "max" else value < self.best_value

    def save_best(self, step: int, params: Any, metrics: dict[str, float], extra: dict[str, Any] | None = None) -> bool:
        """Save `params` as the best if `metrics[best_metric]` beats the best so far; returns whether it did."""
        if self._best is None:
            raise ValueError("save_best needs the Checkpointer's best_metric")
        if self.best_metric not in metrics:
            raise KeyError(f"checkpoint best_metric {self.best_metric!r} is not among the validation metrics "
                           f"({', '.join(sorted(metrics))})")
        value = float(metrics[self.best_metric])
        if not self.improves(value):
            return False
        info = {**(extra or {}), "step": step, "metric": self.best_metric, "value": value, "metrics": metrics}
        self._best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                      extra=ocp.args.JsonSave(info)), force=True)
        self.best_value = value
        return True

    def best_info(self) -> dict[str, Any] | None:
        step = None if self._best is None else self._best.latest_step()
        if step is None:
            return None
        return self._best.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]

    def restore_best(self, abstract_params: Any) -> tuple[Any, dict[str, Any]]:
        step = None if self._best is None else self._best.latest_step()
        if step is None:
            raise FileNotFoundError(f"no best checkpoint under {self.directory / BEST}")
        out = self._best.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params),
                                                               extra=ocp.args.JsonRestore()))
        return out["params"], out["extra"]

    def wait(self) -> None:
        """Block until every started save is on disk."""
        for manager in (self._last, self._best):
            if manager is not None:
                manager.wait_until_finished()

    def close(self) -> None:
        for manager in (self._last, self._best):
            if manager is not None:
                manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def abstract(tree: Any) -> Any:
    """Shape/dtype/sharding stand-ins for a pytree of arrays (what `restore` needs). A leaf without a sharding
    (from `jax.eval_shape`) is restored whole onto this process's first device: left to orbax, it would go to
    the device it was saved from, which in a multi-process run belongs to one process only."""
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or local), tree)
