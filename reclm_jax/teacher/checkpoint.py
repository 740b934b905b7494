"""A trained teacher directory, written with orbax.

    config.yaml     the TeacherConfig
    teacher.json    num_items and the dataset name
    best/<epoch>/   parameters with the best valid NDCG@10 (what `Teacher.load` reads)
    state/<epoch>/  parameters, optimiser state and progress after the latest epoch (to resume a run)
    metrics.json    per-epoch log and the final evaluation
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from reclm_jax import config as config_lib
from reclm_jax.teacher.config import TeacherConfig

CONFIG, INFO, BEST, STATE, METRICS = "config.yaml", "teacher.json", "best", "state", "metrics.json"


def write_info(out_dir: Path, cfg: TeacherConfig, num_items: int, dataset: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    config_lib.dump(cfg, out_dir / CONFIG)
    (out_dir / INFO).write_text(json.dumps({"num_items": num_items, "dataset": dataset}, indent=1))


def read_info(path: Path) -> tuple[TeacherConfig, dict]:
    if not (path / INFO).is_file() or not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path}: not a trained teacher directory (no {INFO} / {CONFIG})")
    return config_lib.load(TeacherConfig, path / CONFIG), json.loads((path / INFO).read_text())


def manager(out_dir: Path, which: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(out_dir.absolute() / which, options=ocp.CheckpointManagerOptions(max_to_keep=1))


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def save_best(out_dir: Path, epoch: int, params) -> None:
    with manager(out_dir, BEST) as mgr:
        mgr.save(epoch, args=ocp.args.StandardSave(params), force=True)


def load_best(out_dir: Path, like_params):
    with manager(out_dir, BEST) as mgr:
        step = mgr.latest_step()
        if step is None:
            raise FileNotFoundError(f"{out_dir / BEST}: no saved parameters")
        return mgr.restore(step, args=ocp.args.StandardRestore(_abstract(like_params)))


def save_state(out_dir: Path, epoch: int, params, opt_state, progress: dict[str, Any]) -> None:
    with manager(out_dir, STATE) as mgr:
        mgr.save(epoch, force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            progress=ocp.args.JsonSave(progress),
        ))


def load_state(out_dir: Path, like_params, like_opt_state):
    """(params, opt_state, progress) of the latest epoch, or None when there is nothing to resume."""
    if not (out_dir / STATE).is_dir():
        return None
    with manager(out_dir, STATE) as mgr:
        step = mgr.latest_step()
        if step is None:
            return None
        r = mgr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(like_params)),
            opt_state=ocp.args.StandardRestore(_abstract(like_opt_state)),
            progress=ocp.args.JsonRestore(),
        ))
    return r["params"], r["opt_state"], r["progress"]
