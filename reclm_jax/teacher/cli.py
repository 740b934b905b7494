"""`reclm-jax teacher ...`: train and evaluate the SASRec teacher."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reclm_jax import config as config_lib
from reclm_jax.core.errors import UserError
from reclm_jax.data.cli import add_dataset_args, dataset_from_args
from reclm_jax.teacher import checkpoint
from reclm_jax.teacher.config import TeacherConfig
from reclm_jax.teacher.evaluate import evaluate
from reclm_jax.teacher.query import Teacher
from reclm_jax.teacher.train import train_teacher


def register(sub) -> None:
    teacher = sub.add_parser("teacher", help="the SASRec teacher: train and evaluate")
    cmds = teacher.add_subparsers(dest="teacher_command", metavar="<teacher command>", required=True)

    train = cmds.add_parser("train", help="train a teacher (resumes an interrupted run in --out)")
    add_dataset_args(train)
    train.add_argument("--config", help="YAML config, e.g. configs/teacher/sasrec-ml1m.yaml (default: built-in defaults)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=3e-4")
    train.add_argument("--out", required=True, help="output directory (checkpoints, config, metrics.json)")
    train.add_argument("--no-resume", action="store_true", help="start afresh even if --out holds a run")
    train.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    train.set_defaults(handler=_train)

    ev = cmds.add_parser("eval", help="evaluate a trained teacher in both protocols (full ranking, sampled negatives)")
    add_dataset_args(ev)
    ev.set_defaults(dataset=None)  # default: the dataset the teacher was trained on
    ev.add_argument("--teacher", required=True, help="a trained teacher directory")
    ev.add_argument("--out", help="write the metrics JSON here (default: <teacher>/eval.json)")
    ev.set_defaults(handler=_eval)


def _train(args: argparse.Namespace) -> int:
    cfg = config_lib.load(TeacherConfig, args.config, args.overrides)
    dataset = dataset_from_args(args)
    try:
        train_teacher(dataset, cfg, args.out, resume=not args.no_resume, progress=not args.quiet)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(json.dumps(json.load(open(f"{args.out}/metrics.json"))["eval"], indent=1))
    return 0


def _eval(args: argparse.Namespace) -> int:
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
