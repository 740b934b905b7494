"""I4: general conversations from a local ShareGPT/Vicuna JSON file, mixed into the SL data.

The file is a JSON list (or JSON lines) of records `{"id": ..., "conversations": [{"from": "human"|"gpt",
"value": "..."}, ...]}`, read through `datasets`. A sample takes a random human turn with the turns before it
as context and the reply after it as the response (the reference). Records with no human turn followed by
a reply cannot give a sample and are counted; malformed records stop the reading with a message naming
the record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reclm_jax.tasks.samples import Sample

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class ShareGPTError(ValueError):
    """A malformed ShareGPT file: the message names the file and the record."""


@dataclass(frozen=True)
class Conversations:
    turns: list[tuple[tuple[str, str], ...]]  # per usable record: (role, text) turns
    skipped: int  # records without a human turn followed by a reply


def _record_error(path: Path, index: int, record) -> str | None:
    """Why record `index` is malformed, or None."""
    rid = record.get("id") if isinstance(record, dict) else None
    where = f"{path}: record {index}" + (f" (id {rid!r})" if rid is not None else "")
    if not isinstance(record, dict):
        return f"{where}: a record must be an object with a 'conversations' list"
    conv = record.get("conversations")
    if not isinstance(conv, list):
        return f"{where}: 'conversations' must be a list of turns, got {type(conv).__name__}"
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict):
            return f"{where}: turn {j} must be an object with 'from' and 'value'"
        if turn.get("from") not in ROLES:
            return f"{where}: turn {j} has 'from' = {turn.get('from')!r}; expected one of {sorted(ROLES)}"
        if not isinstance(turn.get("value"), str):
            return f"{where}: turn {j} has no text 'value'"
    return None


def _first_bad_record(path: Path) -> str | None:
    """Locate the malformed record with the standard JSON parser (datasets' Arrow errors name none)."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
    except json.JSONDecodeError as e:
        records = []
        for n, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                return f"{path}: not JSON (list or lines): {e.msg} at line {e.lineno}, and line {n + 1} is no JSON object"
    if not isinstance(records, list):
        return f"{path}: the top level must be a list of records"
    for i, record in enumerate(records):
        err = _record_error(path, i, record)
        if err:
            return err
    return None


def read_sharegpt(path: str | Path, cache_dir: str | Path | None = None) -> Conversations:
    """Read and check a ShareGPT file (through `datasets`, cached as Arrow in `cache_dir`)."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise ShareGPTError(f"ShareGPT file {path} does not exist (tasks.sharegpt_path)")
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset("json", data_files=str(path), split="train",
                                      cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as e:  # Arrow/JSON errors do not say which record is wrong: find it ourselves
        raise ShareGPTError(_first_bad_record(path) or f"{path}: cannot be read as ShareGPT JSON: {e}") from None
    if "conversations" not in table.column_names:
        raise ShareGPTError(f"{path}: records have no 'conversations' field (columns: {table.column_names})")
    turns, skipped = [], 0
    for i, record in enumerate(table):
        err = _record_error(path, i, record)
        if err:  # Arrow's type inference may have altered other records: name the one the file has wrong
            raise ShareGPTError(_first_bad_record(path) or err)
        conv = tuple((ROLES[t["from"]], t["value"]) for t in record["conversations"])
        if _reply_points(conv):
            turns.append(conv)
        else:
            skipped += 1
    if not turns:
        raise ShareGPTError(f"{path}: no record has a human turn followed by a reply")
    return Conversations(turns, skipped)


def _reply_points(conv) -> list[int]:
    """Indices of user turns that an assistant turn answers."""
    return [j for j in range(len(conv) - 1) if conv[j][0] == "user" and conv[j + 1][0] == "assistant"]


def sharegpt_samples(conversations: Conversations, count: int, rng: np.random.Generator) -> list[Sample]:
    """`count` samples: conversations in a random order (cycled when fewer), each cut at a random human
    turn; the turns before it are the context and the reply after it the response."""
    pool = conversations.turns
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-count // len(pool)))])[:count] if count else []
    out = []
    for idx in order:
        conv = pool[int(idx)]
        j = int(rng.choice(_reply_points(conv)))
        out.append(Sample("sharegpt", conv[: j + 1], conv[j + 1][1]))
    return out
