"""The paper's result tables (2, 3, 4, 5 and 7) from per-model task metrics, as Markdown, CSV, JSON and PNG.

Input: rows in order, each (model name, {task: {metric: value}}) as `eval.evaluate.score_answers` (or
`teacher_metrics`) returns them. A table shows every row that has at least one of its cells; a cell whose
task or metric a row lacks (the teacher has no control tasks, a run may skip a task) is left empty ("–" in
Markdown, empty in CSV, null in JSON). In Markdown the best value of each column is bold and the runner-up
underlined, as in the paper; columns marked with a "no control" value show it in parentheses, as the
paper's Tables 3, 4 and 7 do. Table 5's Generalization columns (MMLU, GSM8K) are not computed here.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from reclm_jax.eval.evaluate import NO_CONTROL

Metrics = Mapping[str, Mapping[str, float]]  # task -> metric -> value
Rows = Sequence[tuple[str, Metrics]]


@dataclass(frozen=True)
class Column:
    group: str  # the instruction, e.g. "I1 +C" ("" when the table has one)
    task: str  # key in the metrics
    metric: str
    header: str
    higher_is_better: bool
    percent: bool = False  # a percentage (2 decimals), else a fraction (4 decimals)
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


def _control(group: str, task: str, metric: str, header: str, higher: bool) -> Column:
    arrow = "↑" if higher else "↓"
    return Column(group, task, metric, f"{header} (%) {arrow}", higher, percent=True, no_control=True)


TABLES: tuple[Table, ...] = (
    Table("table2", "Table 2: sequential recommendation (I0)", (
        *_accuracy("", "seqrec"),
        Column("", "seqrec", "HR@5", "HR@5", True), Column("", "seqrec", "NDCG@5", "NDCG@5", True),
    )),
    Table("table3", "Table 3: category control (I1); in parentheses: the same model without the control text", (
        *_accuracy("+C", "+c"), _control("+C", "+c", "TCP@K", "TCP@10", True),
        *_accuracy("-C", "-c"), _control("-C", "-c", "TCP@K", "TCP@10", False),
    ), chart=True),
    Table("table4", "Table 4: category proportion control (I2); in parentheses: the same model without the "
          "control text", (
        *_accuracy("CP<=20%", "<=20%"), _control("CP<=20%", "<=20%", "CPA", "CPA", True),
        *_accuracy("CP~30%", "~30%"), _control("CP~30%", "~30%", "CPA", "CPA", True),
        *_accuracy("CP>=30%", ">=30%"), _control("CP>=30%", ">=30%", "CPA", "CPA", True),
    ), chart=True),
    Table("table5", "Table 5: formatting quality (k in 11..15) and precision", (
        Column("", "item_count", "CorrectCount", "CorrectCount (%) ↑", True, percent=True),
        Column("", "item_count", "RepeatItem@K", "RepeatItem@K (%) ↓", False, percent=True),
        Column("", "item_count", "NonExist@K", "NonExist@K (%) ↓", False, percent=True),
        Column("", "item_count", "InHistory@K", "InHistory@K (%) ↓", False, percent=True),
        *_accuracy("", "item_count", "K"),
    )),
    Table("table7", "Table 7: combinatorial controls; in parentheses: the same model without the control text", (
        Column("+C1 & -C2", "+c1&-c2", "HR@K", "HR@10", True),
        _control("+C1 & -C2", "+c1&-c2", "TC1not2P@K", "TC1¬2P@10", True),
        Column("C1<=20% & -C2", "c1<=20%&-c2", "HR@K", "HR@10", True),
        _control("C1<=20% & -C2", "c1<=20%&-c2", "C1PA", "C1PA", True),
        _control("C1<=20% & -C2", "c1<=20%&-c2", "TC2P@K", "TC2P@10", False),
    ), chart=True),
)


def cell(metrics: Metrics, column: Column, no_control: bool = False) -> float | None:
    """The value of a column for one row (its "no control" value with no_control), or None if missing."""
    value = metrics.get(column.task, {}).get(column.metric + (NO_CONTROL if no_control else ""))
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def table_rows(table: Table, rows: Rows) -> list[tuple[str, Metrics]]:
    """The rows that have at least one cell of `table`, in the given order."""
    return [(name, m) for name, m in rows if any(cell(m, c) is not None for c in table.columns)]


def _fmt(value: float | None, percent: bool) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if percent else f"{value:.4f}"


def _emphasis(values: list[float | None], higher_is_better: bool) -> list[str]:
    """"best", "second" or "" per value (ties share a place)."""
    distinct = sorted({v for v in values if v is not None}, reverse=higher_is_better)
    place = {v: ("best" if i == 0 else "second") for i, v in enumerate(distinct[:2])} if len(distinct) > 1 else {}
    return [place.get(v, "") if v is not None else "" for v in values]


def markdown(table: Table, rows: Rows) -> str:
    """One table as GitHub Markdown (title, header, rows, and how many answers each task scored)."""
    shown = table_rows(table, rows)
    lines = [f"### {table.title}", ""]
    lines.append("| Model | " + " | ".join(c.label for c in table.columns) + " |")
    lines.append("|---|" + "---:|" * len(table.columns))
    marks = [_emphasis([cell(m, c) for _, m in shown], c.higher_is_better) for c in table.columns]
    for r, (name, metrics) in enumerate(shown):
        cells = []
        for c, mark in zip(table.columns, marks):
            text = _fmt(cell(metrics, c), c.percent)
            text = {"best": f"**{text}**", "second": f"<u>{text}</u>", "": text}[mark[r]]
            if c.no_control and cell(metrics, c) is not None:
                text += f" ({_fmt(cell(metrics, c, no_control=True), c.percent)})"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    counts = _answer_counts(table, shown)
    if counts:
        lines += ["", "Answers per task: " + ", ".join(f"{task} {n}" for task, n in counts.items()) + "."]
    return "\n".join(lines) + "\n"


def _answer_counts(table: Table, rows: Rows) -> dict[str, str]:
    """task -> the number of scored answers ("n"), or "a-b" when the rows differ."""
    out = {}
    for task in dict.fromkeys(c.task for c in table.columns):
        ns = sorted({int(m[task]["n"]) for _, m in rows if "n" in m.get(task, {})})
        if ns:
            out[task] = str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    return out


def records(table: Table, rows: Rows) -> list[dict[str, float | str | None]]:
    """One dict per shown row: "model", then each column's label (and "<label> (no control)") -> value."""
    out = []
    for name, metrics in table_rows(table, rows):
        rec: dict[str, float | str | None] = {"model": name}
        for c in table.columns:
            rec[c.label] = cell(metrics, c)
            if c.no_control:
                rec[f"{c.label} (no control)"] = cell(metrics, c, no_control=True)
        out.append(rec)
    return out


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def bar_chart(table: Table, rows: Rows, path: str | Path) -> Path | None:
    """A grouped bar chart of a control table's control metrics: per metric one bar per model with the
    control text (solid) and without it (hatched). None when no row has a value to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    columns = [c for c in table.columns if c.no_control]
    shown = [(name, m) for name, m in table_rows(table, rows) if any(cell(m, c) is not None for c in columns)]
    if not shown:
        return None
    width = 0.8 / len(shown)
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(columns) * max(1, len(shown) / 3), 4.2))
    x = np.arange(len(columns))
    for i, (name, metrics) in enumerate(shown):
        color = f"C{i % 10}"
        # a missing value (NaN) draws no bar
        with_ctl = [_or_nan(cell(metrics, c)) for c in columns]
        without = [_or_nan(cell(metrics, c, no_control=True)) for c in columns]
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos - width / 4, with_ctl, width / 2, color=color, label=name)
        ax.bar(pos + width / 4, without, width / 2, color=color, alpha=0.35, hatch="//", edgecolor=color)
    ax.set_xticks(x, [c.label for c in columns], fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(table.title.split(";")[0] + "\nsolid: with the control text, hatched: without", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_tables(rows: Rows, out_dir: str | Path, tables: Sequence[Table] = TABLES) -> dict[str, list[Path]]:
    """Write tables.md, tables.json, <table>.csv and, for the control tables, <table>.png; returns the
    files per table key. Tables with no row are left out."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    md, js = [], {}
    for table in tables:
        recs = records(table, rows)
        if not recs:
            continue
        md.append(markdown(table, rows))
        js[table.key] = {"title": table.title, "answers_per_task": _answer_counts(table, table_rows(table, rows)),
                         "rows": recs}
        csv_path = out_dir / f"{table.key}.csv"
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(recs[0]))
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in recs)
        written[table.key] = [csv_path]
        if table.chart and (png := bar_chart(table, rows, out_dir / f"{table.key}.png")):
            written[table.key].append(png)
    (out_dir / "tables.md").write_text("\n".join(md), encoding="utf-8")
    (out_dir / "tables.json").write_text(json.dumps(js, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return written
