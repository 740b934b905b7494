"""`reclm-jax teacher ...`: train and evaluate the SASRec teacher."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reclm_jax import config as config_lib
from reclm_jax.core.errors import UserError
from reclm_jax.data.cli import dataset_from_args
from reclm_jax.teacher import checkpoint
from reclm_jax.teacher.config import TeacherConfig
from reclm_jax.teacher.evaluate import evaluate
from reclm_jax.teacher.query import Teacher
from reclm_jax.teacher.train import train_teacher


def train(args: argparse.Namespace) -> int:
    cfg = config_lib.load(TeacherConfig, args.config, args.overrides)
    dataset = dataset_from_args(args)
    try:
        train_teacher(dataset, cfg, args.out, resume=not args.no_resume, progress=not args.quiet)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(json.dumps(json.load(open(f"{args.out}/metrics.json"))["eval"], indent=1))
    return 0


def eval_teacher(args: argparse.Namespace) -> int:
    path = Path(args.teacher)
    try:
        _, info = checkpoint.read_info(path)
        teacher = Teacher.load(path)
    except FileNotFoundError as e:
        raise UserError(f"--teacher: {e}") from None
    args.dataset = args.dataset or info["dataset"]
    dataset = dataset_from_args(args)
    try:
        result = {"teacher": str(path), "dataset": dataset.name} | evaluate(teacher, dataset)
    except ValueError as e:
        raise UserError(str(e)) from None
    out = Path(args.out) if args.out else path / "eval.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0
