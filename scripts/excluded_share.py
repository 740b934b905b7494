"""The -C answers of `reclm-jax evaluate` runs read two ways: the paper's -C TCP@K (Eq. 7: excluded-category
items per requested slot, so an invented title counts as compliant) and the excluded category's share of the
answer's real (catalogue) items, which an invented title cannot lower; each with its 95 % bootstrap interval
over the users, and the real items per list.

    python scripts/excluded_share.py --dataset ml-100k RUN_DIR [RUN_DIR ...]   # <evaluate --out>/runs/<model>
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reclm_jax.data.config import DataConfig
from reclm_jax.data.load import load_dataset
from reclm_jax.eval.metrics import Bootstrap, estimate


def interval(values: list[float]) -> str:
    """Mean [95 % interval] n=lists, bootstrapped as the evaluation tables are (users resampled per task)."""
    e = estimate({"x": values}, Bootstrap(), "-c")["x"]
    return f"{e['mean']:.1f} [{e['lo']:.1f}, {e['hi']:.1f}] n={e['n']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="model directories holding answers.jsonl")
    parser.add_argument("--dataset", default="ml-100k")
    args = parser.parse_args()
    in_category = load_dataset(DataConfig(name=args.dataset)).category_matrix
    print("| model | -C TCP@K (%) | excluded share of real items (%) | real items per list |\n|---|---:|---:|---:|")
    for run in args.runs:
        answers = [json.loads(line) for line in (Path(run) / "answers.jsonl").open()]
        tcp, share, real = [], [], []
        for a in answers:
            (kind, _, category), = a["controls"]
            if a["task"] != "-c" or kind != "-c":  # the -C answers, not their no-control twins
                continue
            items = [i for i in a["items"][:a["k"]] if i >= 0]
            excluded = sum(bool(in_category[i, category]) for i in items)
            tcp.append(100 * excluded / a["k"])
            real.append(len(items))
            if items:
                share.append(100 * excluded / len(items))
        print(f"| {Path(run).name} | {interval(tcp)} | {interval(share)} | {interval(real)} |")


if __name__ == "__main__":
    main()
