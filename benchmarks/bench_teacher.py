"""SASRec teacher speed: one training epoch per preset, and top-k query throughput (histories/s).

    python benchmarks/bench_teacher.py [--dataset ml-1m] [--append BENCHMARKS.md]

Compilation is excluded: every batch shape an epoch uses is compiled (one step each) before timing.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import jax
from flax import nnx

from reclm_jax import config as config_lib
from reclm_jax.data import load_dataset
from reclm_jax.teacher.batches import epoch_batches, training_windows
from reclm_jax.teacher.config import TeacherConfig
from reclm_jax.teacher.query import Teacher, build_model
from reclm_jax.teacher.train import train_step
from reclm_jax.training.optim import optimizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "teacher"
PRESETS = ("paper", "sasrec-ml1m")


def epoch_seconds(dataset, cfg: TeacherConfig, max_steps: int | None = None) -> tuple[float, int, int]:
    """(wall seconds of one training epoch, its number of steps, steps timed), data pipeline included.

    With max_steps, only the epoch's first max_steps batches (a random sample: batches are shuffled) are
    timed and the epoch time is extrapolated from them."""
    graphdef, state = nnx.split(build_model(cfg, dataset.num_items))
    params = nnx.to_pure_dict(state)
    tx = optimizer(cfg.optim)
    opt_state = tx.init(params)
    windows = training_windows(dataset, cfg.model.max_len)
    key = jax.random.key(0)

    def batches():
        return epoch_batches(dataset, windows, cfg=cfg.model, batch_size=cfg.train.batch_size,
                             negatives=cfg.train.loss == "bce", seed=cfg.seed, epoch=1)

    total = len(batches())
    timed = total if max_steps is None else min(max_steps, total)
    shapes = {b["tokens"].shape: b for b in batches()}
    for batch in shapes.values():  # compile each shape once
        params, opt_state, loss = train_step(graphdef, tx, cfg.train.loss, params, opt_state, batch, key)
    loss.block_until_ready()
    start = time.perf_counter()
    for _, batch in zip(range(timed), batches()):
        params, opt_state, loss = train_step(graphdef, tx, cfg.train.loss, params, opt_state, batch, key)
    loss.block_until_ready()
    return (time.perf_counter() - start) * total / timed, total, timed


def topk_rate(dataset, cfg: TeacherConfig, k: int = 10) -> float:
    """Histories per second for top-k over all users' test histories (random weights: speed only)."""
    _, state = nnx.split(build_model(cfg, dataset.num_items))
    teacher = Teacher(cfg, dataset.num_items, nnx.to_pure_dict(state))
    histories = [dataset.test_example(u)[0] for u in range(dataset.num_users)]
    teacher.topk(histories, k)  # compile
    start = time.perf_counter()
    teacher.topk(histories, k)
    return len(histories) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="ml-1m")
    ap.add_argument("--machine", default="2-core CPU dev box")
    ap.add_argument("--steps", type=int, help="time only this many steps per preset and extrapolate the epoch")
    ap.add_argument("--append", help="append the results table to this markdown file")
    args = ap.parse_args()
    ds = load_dataset(args.dataset)
    rows = []
    for name in PRESETS:
        cfg = config_lib.load(TeacherConfig, CONFIGS / f"{name}.yaml")
        seconds, steps, timed = epoch_seconds(ds, cfg, args.steps)
        rate = topk_rate(ds, cfg)
        rows.append((name, seconds, steps, timed, rate))
        print(f"{name}: epoch {seconds:.1f} s ({steps} steps, {timed} timed, {seconds / steps * 1e3:.0f} ms/step), "
              f"top-10 {rate:.0f} histories/s", flush=True)
    base = rows[0]
    lines = [
        f"\n## SASRec teacher ({args.dataset}, {args.machine}, jax {jax.__version__}, {platform.processor() or platform.machine()})\n",
        f"`python benchmarks/bench_teacher.py --dataset {args.dataset}"
        + (f" --steps {args.steps}`: epoch times extrapolated from the first {args.steps} (shuffled) batches" if args.steps else "`")
        + f"; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; compilation excluded; top-10 over every user's test history. "
        "Other jobs were running on the machine at the same time, so absolute timings are noisy; "
        "ratios are from this one run.\n",
        "| preset | epoch (s) | steps/epoch | ms/step | epoch vs paper | top-10 queries (histories/s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, seconds, steps, _, rate in rows:
        lines.append(f"| {name} | {seconds:.1f} | {steps} | {seconds / steps * 1e3:.0f} | {seconds / base[1]:.2f}x "
                     f"| {rate:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
