"""The paper's result tables (2, 3, 4, 5 and 7), and Table 5's formatting metrics on the I0 answers, from
per-model task metrics, as Markdown, CSV, JSON and PNG.

Input: rows in order, each (model name, {task: {metric: estimate}}) as `eval.evaluate.score_answers` (or
`teacher_metrics`) returns them, an estimate being {"mean", "lo", "hi", "n"} (`eval.metrics.estimate`).
A table shows every row that has at least one of its cells; a cell whose task or metric a row lacks (the
teacher has no control tasks, a run may skip a task) is left empty ("–" in Markdown, empty in CSV, null in
JSON). Every figure comes with its 95 % bootstrap interval and the number of users behind it: in Markdown
"19.2 [14.1, 24.9] n=64" (percentages to 1 decimal, fractions to 3), in JSON the estimate itself, in CSV
the columns "<label>", "<label> lo", "<label> hi", "<label> n". In Markdown the best mean of each column is
bold and the runner-up underlined, as in the paper (intervals say whether the difference is real); columns
marked with a "no control" value show it in parentheses, as the paper's Tables 3, 4 and 7 do. Paired
differences between runs (`eval.evaluate.paired_differences`) follow the tables in Markdown and JSON. Results
whose titles were matched leniently (`eval.parse`) say so in every table title. Table 5's Generalization
columns (MMLU, GSM8K) are not computed here.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reclm_jax.eval.metrics import NO_CONTROL

Estimate = Mapping[str, float]  # {"mean", "lo", "hi", "n"}
Metrics = Mapping[str, Mapping[str, Estimate]]  # task -> metric -> estimate
Rows = Sequence[tuple[str, Metrics]]


@dataclass(frozen=True)
class Column:
    group: str  # the instruction, e.g. "I1 +C" ("" when the table has one)
    task: str  # key in the metrics
    metric: str
    header: str
    higher_is_better: bool
    percent: bool = False  # a percentage (1 decimal), else a fraction (3 decimals)
    no_control: bool = False  # also show metric + NO_CONTROL in parentheses

    @property
    def label(self) -> str:
        return f"{self.group} {self.header}".strip()


@dataclass(frozen=True)
class Table:
    key: str  # file stem, e.g. "table3"
    title: str
    columns: tuple[Column, ...]
    chart: bool = False  # a control table: bar chart of its no_control columns


def _accuracy(group: str, task: str, k: str = "10") -> tuple[Column, Column]:
    return (Column(group, task, "HR@K", f"HR@{k}", True), Column(group, task, "NDCG@K", f"NDCG@{k}", True))


def _formatting(task: str) -> tuple[Column, ...]:
    return (Column("", task, "CorrectCount", "CorrectCount (%) ↑", True, percent=True),
            Column("", task, "RepeatItem@K", "RepeatItem@K (%) ↓", False, percent=True),
            Column("", task, "NonExist@K", "NonExist@K (%) ↓", False, percent=True),
            Column("", task, "InHistory@K", "InHistory@K (%) ↓", False, percent=True))


def _control(group: str, task: str, metric: str, header: str, higher: bool) -> Column:
    arrow = "↑" if higher else "↓"
    return Column(group, task, metric, f"{header} (%) {arrow}", higher, percent=True, no_control=True)


TABLES: tuple[Table, ...] = (
    Table("table2", "Table 2: sequential recommendation (I0)", (
        *_accuracy("", "seqrec"),
        Column("", "seqrec", "HR@5", "HR@5", True), Column("", "seqrec", "NDCG@5", "NDCG@5", True),
    )),
    # Not one of the paper's tables: Table 5's formatting metrics on the I0 answers, for runs that leave
    # out the item-count task (the demo).
    Table("format_i0", "Formatting quality of the I0 answers (k = 10; Table 5's metrics)", _formatting("seqrec")),
    # Eq. 7's TCP counts only catalogue items, so an invented title lowers -C TCP as a compliant one would (and
    # lowers +C TCP): each control's NonExist@10 stands beside it.
    Table("table3", "Table 3: category control (I1); in parentheses: the same model without the control text", (
        *_accuracy("+C", "+c"), _control("+C", "+c", "TCP@K", "TCP@10", True),
        Column("+C", "+c", "NonExist@K", "NonExist@10 (%) ↓", False, percent=True),
        *_accuracy("-C", "-c"), _control("-C", "-c", "TCP@K", "TCP@10", False),
        Column("-C", "-c", "NonExist@K", "NonExist@10 (%) ↓", False, percent=True),
    ), chart=True),
    Table("table4", "Table 4: category proportion control (I2); in parentheses: the same model without the "
          "control text", (
        *_accuracy("CP<=20%", "<=20%"), _control("CP<=20%", "<=20%", "CPA", "CPA", True),
        *_accuracy("CP~30%", "~30%"), _control("CP~30%", "~30%", "CPA", "CPA", True),
        *_accuracy("CP>=30%", ">=30%"), _control("CP>=30%", ">=30%", "CPA", "CPA", True),
    ), chart=True),
    Table("table5", "Table 5: formatting quality (k in 11..15) and precision", (
        *_formatting("item_count"), *_accuracy("", "item_count", "K"),
    )),
    Table("table7", "Table 7: combinatorial controls; in parentheses: the same model without the control text", (
        Column("+C1 & -C2", "+c1&-c2", "HR@K", "HR@10", True),
        _control("+C1 & -C2", "+c1&-c2", "TC1not2P@K", "TC1¬2P@10", True),
        Column("C1<=20% & -C2", "c1<=20%&-c2", "HR@K", "HR@10", True),
        _control("C1<=20% & -C2", "c1<=20%&-c2", "C1PA", "C1PA", True),
        _control("C1<=20% & -C2", "c1<=20%&-c2", "TC2P@K", "TC2P@10", False),
    ), chart=True),
    # Not one of the paper's tables: what its RL stage maximises, measured on the test users.
    Table("rewards", "The rule reward of each answer (sum of R_item + 10 x R_list, Eq. 2-5, with the teacher's "
          "ranks; no KL term)", tuple(
        Column(group, task, "Reward", "reward", True) for group, task in (
            ("I0", "seqrec"), ("+C", "+c"), ("-C", "-c"), ("CP<=20%", "<=20%"), ("CP~30%", "~30%"),
            ("CP>=30%", ">=30%"), ("item count", "item_count")))),
)


def cell(metrics: Metrics, column: Column, no_control: bool = False) -> Estimate | None:
    """The estimate of a column for one row (its "no control" value with no_control), or None if missing."""
    value = metrics.get(column.task, {}).get(column.metric + (NO_CONTROL if no_control else ""))
    return None if value is None or math.isnan(value["mean"]) else value


def _mean(metrics: Metrics, column: Column) -> float | None:
    value = cell(metrics, column)
    return None if value is None else value["mean"]


def table_rows(table: Table, rows: Rows) -> list[tuple[str, Metrics]]:
    """The rows that have at least one cell of `table`, in the given order."""
    return [(name, m) for name, m in rows if any(cell(m, c) is not None for c in table.columns)]


def _fmt(value: float, percent: bool, signed: bool = False) -> str:
    return f"{value:{'+' if signed else ''}.{1 if percent else 3}f}"


def _interval(value: Estimate, percent: bool, signed: bool = False) -> str:
    """ "19.2 [14.1, 24.9]": the mean and its 95 % interval."""
    lo, hi = _fmt(value["lo"], percent, signed), _fmt(value["hi"], percent, signed)
    return f"{_fmt(value['mean'], percent, signed)} [{lo}, {hi}]"


PAIRED = " — paired differences: each run minus the run before it, on the same users (bold: the interval excludes 0)"


def _title(table: Table, title_match: str, paired: bool = False) -> str:
    title = table.title + PAIRED if paired else table.title
    return title if title_match == "strict" else f"{title} [titles matched {title_match}: some invented titles count as real]"


def _excludes_zero(value: Estimate | None) -> bool:
    return value is not None and (value["lo"] > 0 or value["hi"] < 0)


def _emphasis(values: list[float | None], higher_is_better: bool) -> list[str]:
    """"best", "second" or "" per value (ties share a place)."""
    distinct = sorted({v for v in values if v is not None}, reverse=higher_is_better)
    place = {v: ("best" if i == 0 else "second") for i, v in enumerate(distinct[:2])} if len(distinct) > 1 else {}
    return [place.get(v, "") if v is not None else "" for v in values]


def markdown(table: Table, rows: Rows, title_match: str = "strict", paired: bool = False) -> str:
    """One table as GitHub Markdown: title (naming a non-strict title match), header, and per row each
    cell as "mean [lo, hi]", its no-control value in parentheses, and "n=" users. `paired`: the rows are
    differences between runs (`eval.evaluate.paired_differences`): signed, and bold where the interval
    excludes 0, instead of the best and runner-up marks."""
    shown = table_rows(table, rows)
    lines = [f"### {_title(table, title_match, paired)}", ""]
    lines.append("| Model | " + " | ".join(c.label for c in table.columns) + " |")
    lines.append("|---|" + "---:|" * len(table.columns))
    if paired:
        marks = [["best" if _excludes_zero(cell(m, c)) else "" for _, m in shown] for c in table.columns]
    else:
        marks = [_emphasis([_mean(m, c) for _, m in shown], c.higher_is_better) for c in table.columns]
    for r, (name, metrics) in enumerate(shown):
        cells = []
        for c, mark in zip(table.columns, marks):
            value = cell(metrics, c)
            if value is None:
                cells.append("–")
                continue
            mean = _fmt(value["mean"], c.percent, paired)
            text = {"best": f"**{mean}**", "second": f"<u>{mean}</u>", "": mean}[mark[r]]
            text += f" [{_fmt(value['lo'], c.percent, paired)}, {_fmt(value['hi'], c.percent, paired)}]"
            plain = cell(metrics, c, no_control=True) if c.no_control else None
            if plain is not None:
                text += f" ({_interval(plain, c.percent, paired)})"
            cells.append(f"{text} n={int(value['n'])}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _answer_counts(table: Table, rows: Rows) -> dict[str, str]:
    """task -> the number of scored answers (the estimates' n), or "a-b" when the rows differ."""
    out = {}
    for task in dict.fromkeys(c.task for c in table.columns):
        ns = sorted({int(e["n"]) for _, m in rows for e in m.get(task, {}).values()})
        if ns:
            out[task] = str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    return out


def records(table: Table, rows: Rows) -> list[dict[str, Estimate | str | None]]:
    """One dict per shown row: "model", then each column's label (and "<label> (no control)") -> estimate."""
    out = []
    for name, metrics in table_rows(table, rows):
        rec: dict[str, Estimate | str | None] = {"model": name}
        for c in table.columns:
            rec[c.label] = cell(metrics, c)
            if c.no_control:
                rec[f"{c.label} (no control)"] = cell(metrics, c, no_control=True)
        out.append(rec)
    return out


def _flat(record: Mapping[str, Estimate | str | None]) -> dict[str, float | str]:
    """A record as one CSV row: "<label>" (the mean), "<label> lo", "<label> hi", "<label> n"; "" if missing."""
    out: dict[str, float | str] = {}
    for key, value in record.items():
        if key == "model":
            out[key] = value
            continue
        out[key] = "" if value is None else value["mean"]
        for part in ("lo", "hi", "n"):
            out[f"{key} {part}"] = "" if value is None else value[part]
    return out


def bar_chart(table: Table, rows: Rows, path: str | Path, title_match: str = "strict") -> Path | None:
    """A grouped bar chart of a control table's control metrics: per metric one bar per model with the
    control text (solid) and without it (hatched). None when no row has a value to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in table.columns if c.no_control]
    shown = [(name, m) for name, m in table_rows(table, rows) if any(cell(m, c) is not None for c in columns)]
    if not shown:
        return None
    width = 0.8 / len(shown)
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(columns) * max(1, len(shown) / 3), 4.2))
    x = np.arange(len(columns))
    for i, (name, metrics) in enumerate(shown):
        color = f"C{i % 10}"
        # a missing value (NaN) draws no bar; error bars are the 95 % intervals
        with_ctl = _bars([cell(metrics, c) for c in columns])
        without = _bars([cell(metrics, c, no_control=True) for c in columns])
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos - width / 4, with_ctl[0], width / 2, yerr=with_ctl[1], capsize=2, color=color, label=name)
        ax.bar(pos + width / 4, without[0], width / 2, yerr=without[1], capsize=2, color=color, alpha=0.35,
               hatch="//", edgecolor=color)
    ax.set_xticks(x, [c.label for c in columns], fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    lenient = "" if title_match == "strict" else f" [titles matched {title_match}]"
    ax.set_title(table.title.split(";")[0] + lenient + "\nsolid: with the control text, hatched: without; "
                 "error bars: 95 % CI", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _bars(values: Sequence[Estimate | None]) -> tuple[list[float], list[list[float]]]:
    """Bar heights (NaN where missing) and matplotlib's yerr (distances down to lo and up to hi)."""
    means = [math.nan if v is None else v["mean"] for v in values]
    down = [math.nan if v is None else v["mean"] - v["lo"] for v in values]
    up = [math.nan if v is None else v["hi"] - v["mean"] for v in values]
    return means, [down, up]


def write_tables(rows: Rows, out_dir: str | Path, tables: Sequence[Table] = TABLES,
                 title_match: str = "strict", differences: Rows = ()) -> dict[str, list[Path]]:
    """Write tables.md, tables.json, <table>.csv and, for the control tables, <table>.png; returns the
    files per table key. Tables with no row are left out. `title_match` (`eval.parse.Catalogue.rule`) is
    recorded in tables.json and named in every table title unless it is "strict". `differences`: rows of
    paired differences between runs, each table's in tables.md after all tables and in tables.json under
    "differences"."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    md = [f"Each figure: mean [95 % bootstrap interval, users resampled] n=users; titles matched {title_match}.\n"]
    js = {}
    paired_md = []
    for table in tables:
        recs = records(table, rows)
        if not recs:
            continue
        md.append(markdown(table, rows, title_match))
        js[table.key] = {"title": _title(table, title_match), "title_match": title_match,
                         "answers_per_task": _answer_counts(table, table_rows(table, rows)), "rows": recs}
        if diff_recs := records(table, differences):
            js[table.key]["differences"] = diff_recs
            paired_md.append(markdown(table, differences, title_match, paired=True))
        csv_path = out_dir / f"{table.key}.csv"
        flat = [_flat(r) for r in recs]
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(flat[0]))
            writer.writeheader()
            writer.writerows(flat)
        written[table.key] = [csv_path]
        if table.chart and (png := bar_chart(table, rows, out_dir / f"{table.key}.png", title_match)):
            written[table.key].append(png)
    (out_dir / "tables.md").write_text("\n".join(md + paired_md), encoding="utf-8")
    (out_dir / "tables.json").write_text(json.dumps(js, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return written
