"""Training curves (loss, reward, KL, TCP, accuracy over steps) as PNG from the trainers' JSONL logs.

A log holds one JSON object per line with an integer "step"; other numeric fields are values at that step,
nested objects are flattened with "/" ("valid": {"+c": {"TCP@K": 40}} -> "valid/+c/TCP@K"). Each series
goes to the panel whose pattern its name matches first (PANELS); fields matching none (learning rate,
timings, counters) are not plotted. Lines without a "step" (headers, config records) are skipped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

# (panel title, pattern on the flattened field name), first match wins.
PANELS: tuple[tuple[str, re.Pattern], ...] = (
    ("KL", re.compile(r"(^|[/_.\-])kl($|[/_.\-@])", re.I)),
    ("loss", re.compile(r"loss", re.I)),
    ("reward", re.compile(r"reward|score|return", re.I)),
    ("TCP (%)", re.compile(r"tcp", re.I)),
    ("accuracy", re.compile(r"(^|/)(hr|ndcg)@|cpa", re.I)),
)


class LogError(ValueError):
    """A training log that cannot be read; the message names the file and line."""


def _flatten(record: Mapping, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= _flatten(value, name + "/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def read_log(path: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """series name -> (steps, values), in file order."""
    path = Path(path)
    if not path.is_file():
        raise LogError(f"log file {path} does not exist")
    series: dict[str, tuple[list[int], list[float]]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LogError(f"{path}:{n}: not a JSON object ({e.msg})") from None
        if not isinstance(record, dict) or "step" not in record:
            continue
        step = record["step"]
        for name, value in _flatten({k: v for k, v in record.items() if k != "step"}).items():
            steps, values = series.setdefault(name, ([], []))
            steps.append(int(step))
            values.append(value)
    return series


def panels(series: Mapping[str, tuple[list[int], list[float]]]) -> dict[str, list[str]]:
    """panel title -> the series names it plots (panels without a series are left out)."""
    out: dict[str, list[str]] = {}
    for name in series:
        if name.startswith(("time/", "cpu/")):  # stage timings ("time/rewards_s") are not rewards
            continue
        for title, pattern in PANELS:
            if pattern.search(name):
                out.setdefault(title, []).append(name)
                break
    return {title: out[title] for title, _ in PANELS if title in out}


def plot_log(path: str | Path, out: str | Path, title: str | None = None) -> Path:
    """Plot one log's curves into the PNG `out` (one panel per kind of curve); returns `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_log(path)
    groups = panels(series)
    if not groups:
        raise LogError(f"{path}: no loss, reward, KL, TCP or accuracy field in any line with a 'step'")
    fig, axes = plt.subplots(len(groups), 1, figsize=(7, 2.6 * len(groups)), sharex=True, squeeze=False)
    for ax, (panel, names) in zip(axes[:, 0], groups.items()):
        for name in names:
            steps, values = series[name]
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=name)
        ax.set_ylabel(panel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title or Path(path).name, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_logs(paths: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """`plot_log` for each log, written as <out_dir>/<log file stem>.png, or <run directory>-<stem>.png when
    stems repeat (every trainer writes <run>/log.jsonl)."""
    paths = [Path(p) for p in paths]
    stems = [p.stem for p in paths]
    names = [p.stem if stems.count(p.stem) == 1 else f"{p.resolve().parent.name}-{p.stem}" for p in paths]
    if len(set(names)) < len(names):
        raise LogError(f"logs {[str(p) for p in paths]} would overwrite each other's plots: plot them into "
                       "different --out directories")
    return [plot_log(p, Path(out_dir) / f"{name}.png", title=f"{p.resolve().parent.name}/{p.name}")
            for p, name in zip(paths, names)]
