"""A trained teacher directory (the training loop's run directory, `training.loop`, plus two files):

    config.yaml         the TeacherConfig
    teacher.json        num_items and the dataset name
    checkpoints/best/   parameters with the best valid NDCG@10 (what `Teacher.load` reads)
    checkpoints/last/   parameters, optimiser state and the batch position of the latest epochs (to resume)
    log.jsonl, tensorboard/, metrics.json (per-epoch summary and the final evaluation)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reclm_jax import config as config_lib
from reclm_jax.teacher.config import TeacherConfig
from reclm_jax.training.checkpoints import Checkpointer, abstract
from reclm_jax.training.loop import CHECKPOINTS, CONFIG

INFO, METRICS = "teacher.json", "metrics.json"
SELECT = "NDCG@10"  # the validation metric (full ranking) that picks the best epoch and stops early


def write_info(out_dir: Path, cfg: TeacherConfig, num_items: int, dataset: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    config_lib.dump(cfg, out_dir / CONFIG)
    (out_dir / INFO).write_text(json.dumps({"num_items": num_items, "dataset": dataset}, indent=1))


def read_info(path: Path) -> tuple[TeacherConfig, dict]:
    if not (path / INFO).is_file() or not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path}: not a trained teacher directory (no {INFO} / {CONFIG})")
    return config_lib.load(TeacherConfig, path / CONFIG), json.loads((path / INFO).read_text())


def best_checkpoints(out_dir: Path) -> Checkpointer:
    return Checkpointer(out_dir / CHECKPOINTS, best_metric=SELECT)


def save_best(out_dir: Path, step: int, params: Any, value: float = 0.0) -> None:
    """Record `params` as the teacher's best (what the training loop does; tests build teachers with it)."""
    with best_checkpoints(out_dir) as ckpt:
        ckpt.save_best(step, params, {SELECT: value})


def load_best(out_dir: Path, like_params: Any) -> Any:
    with best_checkpoints(out_dir) as ckpt:
        return ckpt.restore_best(abstract(like_params))[0]
