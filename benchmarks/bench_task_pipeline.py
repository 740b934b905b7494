"""Instruction-data throughput: one SL epoch of samples (teacher queries included) and its tokenisation.

    python benchmarks/bench_task_pipeline.py [--dataset ml-100k] [--tokenizer smollm2-135m]

The teacher is an untrained SASRec of the paper's size (2 blocks, width 128, 2 heads, max_len 10): query cost
does not depend on its weights. Prints a Markdown table row set for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from flax import nnx

from reclm_jax.data import load_dataset
from reclm_jax.llm.chat import ChatPolicy
from reclm_jax.tasks.config import TaskConfig
from reclm_jax.tasks.evaluation import build_eval_set
from reclm_jax.tasks.batches import sft_batches
from reclm_jax.tasks.samples import TaskContext
from reclm_jax.tasks.encode import display_titles, encode_samples
from reclm_jax.tasks.training import training_samples
from reclm_jax.teacher.config import ModelConfig, TeacherConfig
from reclm_jax.teacher.query import Teacher, build_model


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--tokenizer", default="smollm2-135m")
    args = ap.parse_args()
    ds = load_dataset(args.dataset)
    tcfg = TeacherConfig(model=ModelConfig(max_len=10, width=128, num_heads=2, ffn_dim=256, activation="gelu"))
    _, state = nnx.split(build_model(tcfg, ds.num_items))
    teacher = Teacher(tcfg, ds.num_items, nnx.to_pure_dict(state))
    tok = ChatPolicy.load(args.tokenizer)
    cfg = TaskConfig(sharegpt_ratio=0.0, batch_size=64, num_epochs=1)
    titles, wall, cpu = timed(lambda: display_titles(ds.titles, tok, cfg.max_title_tokens))
    rows = [("display_titles (cut to 64 tokens)", f"{ds.num_items} titles", wall, cpu)]
    ctx = TaskContext(ds, teacher, cfg, titles=titles)
    training_samples(ctx, 99)  # compile the teacher's queries
    samples, wall, cpu = timed(lambda: training_samples(ctx, 0))
    rows.append(("training_samples, one epoch (v2 without I4)", f"{len(samples)} samples", wall, cpu))
    ev, wall, cpu = timed(lambda: build_eval_set(ctx, "test"))
    rows.append(("build_eval_set test (9 tasks)", f"{sum(map(len, ev.tasks.values()))} samples", wall, cpu))
    sub = samples[:2000]
    enc, wall, cpu = timed(lambda: [encode_samples([s], tok, cfg.max_length, cfg.max_response_tokens)[0]
                                    for s in sub])
    rows.append((f"encode one sample at a time ({args.tokenizer} chat template)", f"{len(sub)} samples", wall, cpu))
    batched, wall, cpu = timed(lambda: [e for i in range(0, len(sub), 64)
                                        for e in encode_samples(sub[i:i + 64], tok, cfg.max_length,
                                                                cfg.max_response_tokens)])
    rows.append(("encode 64 samples per call (batched Rust tokenizer)", f"{len(sub)} samples", wall, cpu))
    assert all((a["tokens"] == b["tokens"]).all() for a, b in zip(enc, batched))
    lengths = np.array([len(e["tokens"]) for e in enc])
    batches = sft_batches(lambda e: samples[:2048], tok, TaskConfig(sharegpt_ratio=0.0, batch_size=64, num_epochs=1, prefetch=0), 0, 1)
    out, wall, cpu = timed(lambda: sum(1 for _ in batches))
    rows.append(("sft_batches: encode + bucket + collate", f"{out} batches of 64", wall, cpu))
    print(f"dataset {ds.name}: {ds.num_users} users, {ds.num_items} items; tokens/sample mean {lengths.mean():.0f}, "
          f"p99 {np.percentile(lengths, 99):.0f}, max {lengths.max()}")
    print("| step | work | wall | CPU time | per item (wall) |\n|---|---|---|---|---|")
    for name, work, w, c in rows:
        n = int(work.split()[0])
        print(f"| {name} | {work} | {w:.2f} s | {c:.2f} s | {1e3 * w / n:.2f} ms |")


if __name__ == "__main__":
    main()
