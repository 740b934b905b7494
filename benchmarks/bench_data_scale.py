"""Loading and building your own dataset at scale: 10 M generated interactions, wall time and peak memory.

    python benchmarks/bench_data_scale.py [--interactions 10000000] [--formats csv,parquet] [--dir /tmp/x]

Generates a synthetic log (users with 20-180 interactions, Zipf-like item popularity, integer timestamps, some
repeated pairs) as a CSV and a Parquet interactions table plus a CSV items table ("A|B" categories), then, for
each format, loads it in a fresh child process (`load_dataset` with the cache off: read, detect columns, parse
times, join, dedup, k-core, leave-one-out lengths, unique titles, then the cache write) and reports the wall
time of each phase and the child's own peak resident memory (ru_maxrss), then a second load served from the cache
(content hashing included). Prints Markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from reclm_jax.data import DataConfig, load_dataset
from reclm_jax.data.build import build
from reclm_jax.data.files import locate, read_files
cfg = DataConfig(name=sys.argv[1], meta=sys.argv[2], user_core=5, item_core=5, cache=sys.argv[3] == "cache")
def clock():
    return time.perf_counter(), time.process_time()
def since(a, b):
    return [b[0] - a[0], b[1] - a[1]]  # [wall, CPU of all threads]
t1 = clock()
if sys.argv[3] == "cache":
    ds = load_dataset(cfg)
    phases = {"cached load": since(t1, clock())}
else:
    src = locate(cfg)
    raw = read_files(cfg, src)
    t2 = clock()
    ds = build(raw, *cfg.cores, min_sequence=cfg.min_sequence)
    t3 = clock()
    ds.save(sys.argv[4])
    t4 = clock()
    phases = {"read": since(t1, t2), "build": since(t2, t3), "save": since(t3, t4), "total": since(t1, t4)}
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
print(json.dumps({"phases": phases, "peak_gib": peak, "stats": ds.stats(), "notes": ds.notes}))
"""


def generate(folder: Path, n: int, seed: int = 0) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 181, size=n // 100 + 1)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), n) + 1]
    lengths[-1] -= lengths.sum() - n
    num_items = 50_000
    users = np.repeat(np.arange(len(lengths)), lengths)
    popularity = 1.0 / np.arange(1, num_items + 1) ** 0.8
    items = rng.choice(num_items, size=n, p=popularity / popularity.sum())
    times = 1_600_000_000 + rng.integers(0, 3 * 10**7, size=n)
    table = pa.table({
        "user_id": pc_format("u", users), "item_id": pc_format("i", items), "rating": rng.integers(1, 6, size=n),
        "timestamp": times,
    })
    csv, parquet, meta = folder / "interactions.csv", folder / "interactions.parquet", folder / "items.csv"
    pcsv.write_csv(table, csv)
    pq.write_table(table, parquet)
    genres = np.array(["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Documentary", "Animation"])
    pcsv.write_csv(pa.table({
        "item_id": pc_format("i", np.arange(num_items)),
        "title": [f"Title {i} of the synthetic catalogue" for i in range(num_items)],
        "genres": [f"{genres[i % 8]}|{genres[(i * 5 + 1) % 8]}" for i in range(num_items)],
    }), meta)
    return csv, parquet, meta


def pc_format(prefix: str, ids: np.ndarray) -> pa.Array:
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(ids), pa.string()), "")


def run_child(args: list[str], cache: Path) -> tuple[dict, float]:
    """The child's report (its own peak RSS included) and its wall time, Python start and imports included."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True,
                         env=os.environ | {"RECLM_JAX_CACHE": str(cache)})
    return json.loads(out.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--interactions", type=int, default=10_000_000)
    ap.add_argument("--formats", default="csv,parquet")
    ap.add_argument("--dir", help="where to write the generated files (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        csv, parquet, meta = generate(tmp, args.interactions)
        print(f"generated {args.interactions:,} interactions in {time.perf_counter() - start:.0f} s: "
              f"{csv.stat().st_size / 2**20:.0f} MiB CSV, {parquet.stat().st_size / 2**20:.0f} MiB Parquet")
        print("wall / CPU seconds (CPU: all threads of the process)")
        print("| format | read | build | save | load + build total | child wall incl. Python start | peak RSS (GiB) "
              "| cached load |")
        print("|---|---|---|---|---|---|---|---|")
        for fmt in args.formats.split(","):
            path = parquet if fmt == "parquet" else csv
            result, wall = run_child([str(path), str(meta), "nocache", str(tmp / f"{fmt}.npz")], tmp / "cache")
            run_child([str(path), str(meta), "cache", ""], tmp / "cache")  # builds and writes the cache
            cached, _ = run_child([str(path), str(meta), "cache", ""], tmp / "cache")  # served from it
            p = {k: f"{w:.1f} / {c:.1f}" for k, (w, c) in (result["phases"] | cached["phases"]).items()}
            print(f"| {fmt} | {p['read']} | {p['build']} | {p['save']} | {p['total']} | {wall:.1f} | "
                  f"{result['peak_gib']:.2f} | {p['cached load']} |", flush=True)
        print("stats:", json.dumps(result["stats"]))
        for note in result["notes"]:
            print("note:", note)


if __name__ == "__main__":
    main()
