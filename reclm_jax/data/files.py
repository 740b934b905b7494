"""Your own dataset: interactions and items in CSV, TSV, Parquet, JSON lines or RecBole atomic files.

`--dataset PATH` names a directory or one table. In a directory, a RecBole `<name>.inter` goes with its
`<name>.item`; otherwise the table with user and item columns holds the interactions and a table with item
and title columns (if there is one) the items, else the interactions table carries titles and categories
itself. Columns are found by name (`CANDIDATES`, compared ignoring case and `_`), or named in the config.

Rows are counted from 1 after the header; every note and error names the file, the column and an example.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reclm_jax.data.build import RawData, clean_title, encode
from reclm_jax.data.config import DataConfig
from reclm_jax.data.schema import DataError
from reclm_jax.data.tables import Table, table_format

CANDIDATES = {
    "user": ("user_id", "user", "uid", "reviewer_id", "customer_id", "visitor_id", "username", "user_name"),
    "item": ("item_id", "item", "iid", "movie_id", "product_id", "parent_asin", "asin", "business_id", "book_id",
             "news_id", "track_id", "game_id", "app_id"),
    "time": ("timestamp", "time", "ts", "datetime", "date", "unix_review_time", "event_time", "created_at"),
    "rating": ("rating", "score", "stars", "overall", "rate"),
    "title": ("title", "name", "movie_title", "item_name", "product_title", "book_title", "app_name"),
    "categories": ("categories", "category", "genres", "genre", "tags", "class", "category_path"),
}
AUTO_SEPARATORS = ("|", ";", ">", ",")  # tried in this order on string category values
PATH_JOIN = " > "


@dataclass(frozen=True)
class Sources:
    interactions: Table
    items: Table | None  # None: titles and categories are columns of the interactions table

    @property
    def paths(self) -> list[Path]:
        return [t.path for t in (self.interactions, self.items) if t is not None]


def _norm(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "").replace(" ", "")


def find_column(table: Table, role: str, cfg: DataConfig) -> str | None:
    """The column playing `role` in `table`: the configured name, else a known one. A configured item column
    missing from a table may be named differently there (interactions vs items), so it falls back too."""
    explicit = getattr(cfg.columns, role)
    if explicit is not None and (explicit in table.names or role != "item"):
        return explicit if explicit in table.names else None
    by_norm = {}
    for name in table.names:
        by_norm.setdefault(_norm(name), name)
    return next((by_norm[_norm(c)] for c in CANDIDATES[role] if _norm(c) in by_norm), None)


def require_column(table: Table, role: str, cfg: DataConfig) -> str:
    col = find_column(table, role, cfg)
    if col is None:
        explicit = getattr(cfg.columns, role)
        wanted = f"no column {explicit!r} (data.columns.{role})" if explicit else f"no {role} column (looked for {', '.join(CANDIDATES[role])})"
        raise DataError(f"{table.path}: {wanted}; its columns are {table.names}. Name it with --columns "
                        f"{role}=COLUMN (data.columns.{role} in a config)")
    return col


def locate(cfg: DataConfig) -> Sources:
    """Which file holds the interactions and which the items."""
    path = Path(cfg.name).expanduser()
    if not path.exists():
        raise DataError(f"unknown dataset {cfg.name!r}: not one of ml-100k, ml-1m, amazon, steam, nor an existing "
                        "file or directory")
    meta = Table(Path(cfg.meta).expanduser()) if cfg.meta else None
    if path.is_file():
        inter = Table(path)
        if meta is None and inter.format == "atomic" and path.with_suffix(".item").is_file():
            meta = Table(path.with_suffix(".item"))
        return Sources(inter, meta)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and table_format(p))
    if not files:
        raise DataError(f"{path}: no tables here (.csv, .tsv, .parquet, .jsonl, or RecBole's .inter and .item)")
    inters = [p for p in files if table_format(p) == "atomic" and ".inter" in p.suffixes]
    if len(inters) > 1:
        raise DataError(f"{path}: several .inter files ({', '.join(p.name for p in inters)}); give one as --dataset")
    if inters:
        item_file = inters[0].with_suffix(".item")
        return Sources(Table(inters[0]), meta or (Table(item_file) if item_file.is_file() else None))
    tables = [Table(p) for p in files if meta is None or p.resolve() != meta.path.resolve()]
    with_users = [t for t in tables if find_column(t, "user", cfg) and find_column(t, "item", cfg)]
    if len(with_users) != 1:
        found = "; ".join(f"{t.path.name}: {t.names}" for t in tables)
        which = "none of its tables has" if not with_users else "several tables have"
        raise DataError(f"{path}: {which} both a user and an item column ({found}); give the interactions "
                        "file as --dataset (and the items file as --meta)")
    inter = with_users[0]
    if meta is None:
        items = [t for t in tables if t is not inter and find_column(t, "item", cfg) and find_column(t, "title", cfg)]
        if len(items) > 1:
            raise DataError(f"{path}: several tables could hold the items ({', '.join(t.path.name for t in items)}); "
                            "give one with --meta")
        meta = items[0] if items else None
    return Sources(inter, meta)


def read_files(cfg: DataConfig, sources: Sources) -> RawData:
    inter = sources.interactions
    cols = {role: require_column(inter, role, cfg) for role in ("user", "item", "time")}
    if cfg.min_rating is not None:
        cols["rating"] = require_column(inter, "rating", cfg)
    same_table = sources.items is None
    if same_table:
        if find_column(inter, "title", cfg) is None:
            raise DataError(f"{inter.path}: no items table was found and this table has no title column "
                            f"(looked for {', '.join(CANDIDATES['title'])}; its columns are {inter.names}); put the "
                            "items (id, title, categories) in a second file, or name the column with --columns "
                            "title=COLUMN")
        cols |= {role: require_column(inter, role, cfg) for role in ("title", "categories")}
    table = inter.read(list(dict.fromkeys(cols.values())))
    for role in ("user", "item"):
        _check_id_type(table[cols[role]], inter, cols[role])
    notes: list[str] = []
    rows = np.arange(1, table.num_rows + 1, dtype=np.int64)

    missing = _missing(table[cols["user"]]) | _missing(table[cols["item"]])
    if missing.any():  # a blank id is nobody's: counted and left out
        k = int(np.argmax(missing))
        notes.append(f"{inter.path.name}: dropped {int(missing.sum())} rows without a user or item id, e.g. row "
                     f"{rows[k]} ({cols['user']}={table[cols['user']][k].as_py()!r}, "
                     f"{cols['item']}={table[cols['item']][k].as_py()!r})")
        table, rows = table.filter(pa.array(~missing)), rows[~missing]
    if cfg.min_rating is not None:
        ratings = _numbers(table[cols["rating"]], inter, cols["rating"], rows)
        low = ratings < cfg.min_rating
        if low.any():
            notes.append(f"{inter.path.name}: dropped {int(low.sum())} rows with {cols['rating']} < "
                         f"{cfg.min_rating:g} (data.min_rating)")
            table, rows = table.filter(pa.array(~low)), rows[~low]
    times = parse_times(table[cols["time"]], inter, cols["time"], rows)
    users, user_ids = _encode_ids(table[cols["user"]])
    item_codes, item_ids = _encode_ids(table[cols["item"]])

    if same_table:
        _, first = np.unique(item_codes, return_index=True)
        first = np.sort(first)
        items = _catalogue(inter, cfg, cols, table.take(pa.array(first)), rows[first], notes,
                           ids=[item_ids[c] for c in item_codes[first]])
    else:
        items = read_items(sources.items, cfg, notes)
    return RawData(
        name=str(Path(cfg.name).expanduser().resolve()),
        items=items,
        users=users,
        user_ids=user_ids,
        item_codes=item_codes,
        item_ids=item_ids,
        times=times,
        source=inter.path.name,
        rows=rows,
        notes=notes,
    )


def read_items(table: Table, cfg: DataConfig, notes: list[str]) -> dict[str, tuple[str, tuple[str, ...]]]:
    cols = {role: require_column(table, role, cfg) for role in ("item", "title", "categories")}
    data = table.read(list(dict.fromkeys(cols.values())))
    rows = np.arange(1, data.num_rows + 1, dtype=np.int64)
    missing = _missing(data[cols["item"]])
    if missing.any():
        notes.append(f"{table.path.name}: {int(missing.sum())} rows have no {cols['item']!r}, e.g. row "
                     f"{rows[np.argmax(missing)]}; they are left out")
        data, rows = data.filter(pa.array(~missing)), rows[~missing]
    _check_id_type(data[cols["item"]], table, cols["item"])
    codes, ids = _encode_ids(data[cols["item"]])
    return _catalogue(table, cfg, cols, data, rows, notes, ids=[ids[c] for c in codes])


def _catalogue(table: Table, cfg: DataConfig, cols: dict[str, str], data: pa.Table, rows: np.ndarray,
               notes: list[str], ids: list[str]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """item id -> (title, categories) from an items table's rows; every item left out is counted."""
    name, tcol, ccol = table.path.name, cols["title"], cols["categories"]
    categories = _category_parser(table, cfg, ccol, data[ccol], notes)
    items: dict[str, tuple[str, tuple[str, ...]]] = {}
    untitled, repeated, uncategorised = [], [], []
    for row, item_id, title, cats in zip(rows, ids, data[tcol].to_pylist(), data[ccol].to_pylist()):
        title = clean_title(str(title)) if title is not None else ""
        if not title:
            untitled.append((row, item_id))
            continue
        if item_id in items:
            repeated.append((row, item_id))
            continue
        items[item_id] = (title, categories(cats))
        if not items[item_id][1]:
            uncategorised.append((row, item_id))
    if not items:
        raise DataError(f"{table.path}: no item has a title in column {tcol!r} (e.g. row {rows[0] if len(rows) else 1})"
                        if untitled or not len(rows) else f"{table.path}: no items")
    if len(uncategorised) == len(items):
        raise DataError(f"{table.path}: column {ccol!r} is empty for every item (e.g. row {uncategorised[0][0]}: item "
                        f"{uncategorised[0][1]!r}); the method needs categories: name another column with "
                        "--columns categories=COLUMN")
    for what, found in ((f"have no title in {tcol!r}; they and their interactions are left out", untitled),
                        ("repeat an item id of an earlier row (the first row is kept)", repeated),
                        (f"have no category in {ccol!r} (kept; they belong to no category)", uncategorised)):
        if found:
            notes.append(f"{name}: {len(found)} items {what}, e.g. row {found[0][0]} (item {found[0][1]!r})")
    return items


def _category_parser(table: Table, cfg: DataConfig, col: str, values: pa.ChunkedArray, notes: list[str]):
    """A function from one cell of the category column to the item's categories."""
    sep = cfg.category_sep
    if sep is None and table.atomic_types.get(col) == "token_seq":
        sep = " "  # RecBole's sequence separator
    if sep is None and (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        sample = values.drop_null()
        sep = next((s for s in AUTO_SEPARATORS if pc.any(pc.match_substring(sample, s)).as_py()), None)
        if sep is not None:
            notes.append(f"{table.path.name}: categories in {col!r} split on {sep!r} (detected; set "
                         "data.category_sep to change it)")
    is_path = cfg.category_path if cfg.category_path is not None else sep in (">", "/")

    def names(parts) -> list[str]:
        return [p for p in (clean_title(str(x)) for x in parts if x is not None) if p]

    def prefixes(parts: list[str]) -> list[str]:
        return [PATH_JOIN.join(parts[: i + 1]) for i in range(len(parts))]

    def expand(parts: list[str]) -> list[str]:
        return prefixes(parts) if is_path else parts

    def parse(cell) -> tuple[str, ...]:
        if cell is None:
            return ()
        if isinstance(cell, list):
            if cell and all(isinstance(c, list) for c in cell):  # several paths (Amazon 2014 style)
                return tuple(dict.fromkeys(c for path in cell for c in prefixes(names(path))))
            return tuple(dict.fromkeys(expand(names(cell))))
        text = str(cell)
        return tuple(dict.fromkeys(expand(names(text.split(sep) if sep else [text]))))

    return parse


def _missing(col: pa.ChunkedArray) -> np.ndarray:
    """True where a cell is null or an empty string (CSV readers give null for an empty field already)."""
    missing = pc.is_null(col)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        missing = pc.or_kleene(missing, pc.equal(col, ""))
    return missing.to_numpy(zero_copy_only=False)


def _check_id_type(col: pa.ChunkedArray, table: Table, name: str) -> None:
    t = col.type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise DataError(f"{table.path}: column {name!r} holds {t} values (e.g. row 1: {col[0].as_py()!r}), not ids; "
                        "ids are strings or numbers")


def _encode_ids(col: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """Ids as codes and their spellings (compared exactly); whole floats (ids that went through pandas with
    NaNs) lose their ".0"."""
    if pa.types.is_floating(col.type) and pc.all(pc.equal(col, pc.floor(col))).as_py():
        col = pc.cast(col, pa.int64())
    codes, vocab = encode(col)
    return codes, [str(v) for v in vocab]


def _numbers(col: pa.ChunkedArray, table: Table, name: str, rows: np.ndarray) -> np.ndarray:
    """A numeric column as float64; a blank or non-number cell is an error naming its row."""
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
        values = pc.cast(col, pa.float64())
    else:
        try:
            values = pc.cast(pc.utf8_trim_whitespace(pc.cast(col, pa.string())), pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            bad = next(i for i, v in enumerate(col.to_pylist()) if v is not None and not _is_number(v))
            raise DataError(f"{table.path}: column {name!r}: {col[bad].as_py()!r} in row {rows[bad]} is not a number") from None
    if values.null_count:
        bad = int(np.argmax(pc.is_null(values).to_numpy(zero_copy_only=False)))
        raise DataError(f"{table.path}: column {name!r} is empty in row {rows[bad]}")
    return values.to_numpy().astype(np.float64, copy=False)


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def parse_times(col: pa.ChunkedArray, table: Table, name: str, rows: np.ndarray) -> np.ndarray:
    """Times as float64 seconds (numbers are taken as they are: only their order matters): integers, floats,
    ISO 8601 dates and date-times (an offset or "Z" is honoured; a time without one is taken as UTC)."""
    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        tz = col.type.tz if pa.types.is_timestamp(col.type) else None
        return _numbers(pc.cast(pc.cast(col, pa.timestamp("us", tz=tz)), pa.int64()), table, name, rows) / 1e6
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return _numbers(col, table, name, rows)
    if col.null_count or pc.any(pc.equal(col, "")).as_py():
        bad = int(np.argmax(_missing(col)))
        raise DataError(f"{table.path}: column {name!r} is empty in row {rows[bad]}; every interaction needs a time")
    text = pc.utf8_trim_whitespace(col)
    for target in (pa.float64(), pa.timestamp("us"), pa.timestamp("us", tz="UTC")):
        try:
            values = pc.cast(text, target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
        values = values if target == pa.float64() else pc.divide(pc.cast(values, pa.int64()), 1e6)
        return values.to_numpy().astype(np.float64, copy=False)
    return _times_one_by_one(text.to_pylist(), table, name, rows)


def _times_one_by_one(values: list[str], table: Table, name: str, rows: np.ndarray) -> np.ndarray:
    """The slow path for columns Arrow cannot cast in one go: mixed offsets, or a bad value to point at."""
    out = np.empty(len(values), dtype=np.float64)
    kinds: dict[str, int] = {}
    for i, v in enumerate(values):
        try:
            out[i], kind = float(v), "number"
        except ValueError:
            try:
                t = datetime.fromisoformat(v)
            except ValueError:
                raise DataError(f"{table.path}: column {name!r}: {v!r} in row {rows[i]} is neither a number nor an "
                                "ISO 8601 date/time (e.g. 2024-05-01 or 2024-05-01T13:45:00Z)") from None
            out[i], kind = (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp(), "date"
        kinds.setdefault(kind, i)
        if len(kinds) > 1:
            a, b = sorted(kinds.values())
            raise DataError(f"{table.path}: column {name!r} mixes numbers and dates (row {rows[a]}: {values[a]!r}, "
                            f"row {rows[b]}: {values[b]!r})")
    return out
