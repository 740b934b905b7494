"""`reclm-jax data ...`: build datasets, print their statistics, preview instruction samples."""

from __future__ import annotations

import argparse
import json

from reclm_jax.core.errors import UserError
from reclm_jax.data import DataConfig, DataError, load_dataset
from reclm_jax.data.config import Columns
from reclm_jax.tasks.preview import preview
from reclm_jax.teacher.query import Teacher


def dataset_from_args(args: argparse.Namespace):
    try:
        cfg = DataConfig(
            name=args.dataset,
            columns=Columns.parse(args.columns or ""),
            reviews=args.reviews,
            meta=args.meta,
            user_core=args.user_core,
            item_core=args.item_core,
            cache=not args.no_cache,
        )
    except ValueError as e:
        raise DataError(str(e)) from None
    return load_dataset(cfg)


def stats(args) -> int:
    ds = dataset_from_args(args)
    s = ds.stats()
    if args.json:
        print(json.dumps(s))
        return 0
    print(f"dataset       {ds.name}")
    print(f"users         {s['users']:,}")
    print(f"items         {s['items']:,}")
    print(f"interactions  {s['interactions']:,}")
    print(f"sparsity      {100 * s['sparsity']:.2f}%")
    print(f"categories    {s['categories']:,}")
    for note in ds.notes:
        print(f"note: {note}")
    return 0


def preview_samples(args) -> int:
    ds = dataset_from_args(args)
    try:
        teacher = Teacher.load(args.teacher)
        print(preview(ds, teacher, args.task, args.n, args.seed))
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    return 0
