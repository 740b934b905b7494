"""The -C answers of `reclm-jax evaluate` runs read several ways: the paper's -C TCP@K (Eq. 7: excluded-category
items per requested slot, so an invented title counts as compliant and a repeated one counts again), the
excluded category's share of the answer's real (catalogue) items, which an invented title cannot lower, and its
share of the distinct real items, which a repeat cannot move either; each with its 95 % bootstrap interval over
the users; the real items per list; and how many distinct real titles all the lists use together, and the
share of lists holding the commonest one (a model that gives everyone the same few popular titles has little
to choose from when told to leave a category out).

With `--i0 DIR`, where DIR/<model>/answers.jsonl holds the same model's I0 answers to the same users (an
evaluation with `--tasks seqrec` and the same `--limit`), it also gives the share of the user's excluded
category C among the distinct real items of that user's I0 list (the instruction-free list: the paper's
"without control" figure), and the paired difference with - without: below 0 when the instruction lowers C's
share, 0 for a model that ignores it; and, for each run after the first, that difference minus the first run's,
on the users both runs have it for (paired: the same bootstrap resamples of the same users).

    python scripts/excluded_share.py --dataset ml-100k [--i0 I0_OUT/runs] RUN_DIR [RUN_DIR ...]
    # RUN_DIR: <evaluate --out>/runs/<model>
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from reclm_jax.data.config import DataConfig
from reclm_jax.data.load import load_dataset
from reclm_jax.eval.metrics import Bootstrap, estimate


def interval(e: dict) -> str:
    return f"{e['mean']:.1f} [{e['lo']:.1f}, {e['hi']:.1f}] n={e['n']}"


def intervals(values: dict[str, list[float]], bootstrap: Bootstrap) -> dict[str, str]:
    """Mean [95 % interval] n=lists of each column, all columns with the same resamples, so a difference column
    is paired."""
    return {name: interval(e) for name, e in estimate(values, bootstrap, "-c").items()}


def tables_bootstrap(run: Path) -> Bootstrap:
    """The resamples the evaluation's own tables drew for this run (its test seed), so the intervals agree."""
    settings = json.loads((run / "metrics.json").read_text())["settings"]
    return Bootstrap(settings["bootstrap_resamples"], settings["seed"])


def read(run: Path, task: str) -> list[dict]:
    return [a for a in map(json.loads, (run / "answers.jsonl").read_text().splitlines()) if a["task"] == task]


def real_items(answer: dict, distinct: bool = False) -> list[int]:
    """The catalogue items among the answer's first k, in order (each once if `distinct`)."""
    items = [i for i in answer["items"][:answer["k"]] if i >= 0]
    return list(dict.fromkeys(items)) if distinct else items


def share(items: list[int], in_category: np.ndarray, category: int) -> float:
    return 100 * sum(bool(in_category[i, category]) for i in items) / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="model directories holding answers.jsonl")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--i0", type=Path, help="directory of the same models' I0 answers (<evaluate --out>/runs)")
    args = parser.parse_args()
    in_category = load_dataset(DataConfig(name=args.dataset)).category_matrix
    header = ["-C TCP@K (%)", "excluded share of real items (%)", "real items per list",
              "excluded share of distinct real items (%)", "distinct titles in all lists",
              "lists holding the commonest title (%)"]
    if args.i0:
        header += ["C's share of the distinct real items of the user's I0 list (%)", "paired: with - without"]
    print("| model | " + " | ".join(header) + " |\n|---|" + "---:|" * len(header))
    effects = {}  # run -> {user: with - without}
    for run in args.runs:
        plain = {}
        if args.i0:
            i0_file = args.i0 / run.name / "answers.jsonl"
            if not i0_file.exists():
                raise SystemExit(f"--i0: no I0 answers of {run.name} at {i0_file}")
            plain = {a["user"]: real_items(a, distinct=True) for a in read(args.i0 / run.name, "seqrec")}
        tcp, real, shares, distinct, with_, without, users = [], [], [], [], [], [], []
        answers = [a for a in read(run, "-c") if [c[0] for c in a["controls"]] == ["-c"]]  # not no-control twins
        for a in answers:
            (_, _, category), = a["controls"]
            items = real_items(a)
            tcp.append(100 * sum(bool(in_category[i, category]) for i in items) / a["k"])
            real.append(len(items))
            if items:
                shares.append(share(items, in_category, category))
                distinct.append(share(real_items(a, distinct=True), in_category, category))
                if args.i0:
                    if a["user"] not in plain:
                        raise SystemExit(f"--i0: user {a['user']} has no I0 answer of {run.name}")
                    if plain[a["user"]]:
                        users.append(a["user"])
                        with_.append(distinct[-1])
                        without.append(share(plain[a["user"]], in_category, category))
        titles = Counter(i for a in answers for i in real_items(a, distinct=True))
        bootstrap = tables_bootstrap(run)
        cells = [intervals({"x": x}, bootstrap)["x"] for x in (tcp, shares, real, distinct)] + [
                 str(len(titles)),
                 f"{100 * max(titles.values(), default=0) / len(answers):.0f}"]
        if args.i0:
            effect = np.subtract(with_, without)
            effects[run] = dict(zip(users, effect))
            paired = intervals({"without": without, "diff": list(effect)}, bootstrap)
            cells += [paired["without"], paired["diff"]]
        print(f"| {run.name} | " + " | ".join(cells) + " |")
    if len(effects) > 1:
        first, *rest = args.runs
        print(f"\n| model | (with - without) minus {first.name}'s, same users |\n|---|---:|")
        for run in rest:
            common = sorted(effects[first].keys() & effects[run].keys())
            diff = [effects[run][u] - effects[first][u] for u in common]
            print(f"| {run.name} | {intervals({'x': diff}, tables_bootstrap(run))['x']} |")


if __name__ == "__main__":
    main()
