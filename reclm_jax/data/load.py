"""`load_dataset`: read a source, build the canonical dataset, and cache the result."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

from reclm_jax import assets
from reclm_jax.data.amazon import read_amazon
from reclm_jax.data.build import build
from reclm_jax.data.config import DataConfig
from reclm_jax.data.files import locate, read_files
from reclm_jax.data.movielens import read_movielens
from reclm_jax.data.schema import DataError, Dataset
from reclm_jax.data.steam import read_steam

BUILD_VERSION = 2  # bump when the processing changes, to invalidate cached datasets


def load_dataset(cfg: DataConfig | str) -> Dataset:
    """Load a dataset by name ("ml-100k", "ml-1m"), path (your own files) or config; the processed result is
    cached under a key made of the config and the files' contents, so an edited file is never served stale."""
    if isinstance(cfg, str):
        try:
            cfg = DataConfig(name=cfg)
        except ValueError as e:
            raise DataError(str(e)) from None
    own = locate(cfg) if cfg.is_path else None
    sources = own.paths if own else _source_files(cfg)
    cache_path = _cache_path(cfg, sources)
    if cfg.cache and cache_path.is_file():
        return Dataset.load(cache_path)
    print(f"building dataset {cfg.name} from {', '.join(str(s) for s in sources)} ...", file=sys.stderr)
    if own:
        raw = read_files(cfg, own)
    elif cfg.name == "amazon":
        raw = read_amazon(cfg.reviews, cfg.meta)
    elif cfg.name == "steam":
        raw = read_steam(cfg.reviews, cfg.meta)
    else:
        raw = read_movielens(sources[0].parent, cfg.name)
    user_core, item_core = cfg.cores
    ds = build(raw, user_core=user_core, item_core=item_core, min_sequence=cfg.min_sequence)
    if cfg.cache:
        ds.save(cache_path)
    return ds


def _source_files(cfg: DataConfig) -> list[Path]:
    if cfg.name in ("amazon", "steam"):
        paths = [Path(cfg.reviews), Path(cfg.meta)]
    else:
        folder = assets.fetch(cfg.name)
        paths = [folder / f"{cfg.name}.inter", folder / f"{cfg.name}.item"]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: no such file")
    return paths


def _cache_path(cfg: DataConfig, sources: list[Path]) -> Path:
    stamp = [_digest(p) for p in sources]
    key = json.dumps([BUILD_VERSION, asdict(cfg) | {"cache": None}, stamp], sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    stem = Path(cfg.name).name.split(".")[0] if cfg.is_path else cfg.name
    return assets.cache_dir() / "processed" / f"{stem}-{digest}.npz"


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()
