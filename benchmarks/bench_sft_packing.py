"""SFT steps on real instruction samples, padded to buckets against packed rows (`tasks.pack_length`): the same
global batches from the same adapter, in one run.

Samples: epoch 0 of an SFT config's task mix (default `configs/sft/smollm2-135m.yaml`: ML-100k, the paper's
I0-I3 mix, SmolLM2-135M-Instruct) labelled by a trained teacher (`--teacher`; `make demo` leaves one in
runs/demo/teacher). The config's `tasks.max_length` is cut to `--length` (the mix's samples fit in 512
tokens) and LoRA dropout is off, so that both layouts compute the same loss and the per-step losses can be
compared. Each layout first runs the `--steps` global batches once, compiling every shape they need (the
compile time is reported); then `--repeats` rounds run the steps of each layout in turn (A B A B ...), from
the initial adapter again; the median round is reported.

    python benchmarks/bench_sft_packing.py [--teacher runs/demo/teacher] [--batch 16] [--steps 3] [--micro 4]
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np

from reclm_jax import config
from reclm_jax.data.load import load_dataset
from reclm_jax.llm import hf_io, lora as lora_lib
from reclm_jax.llm.chat import ChatPolicy
from reclm_jax.sft import step as step_lib
from reclm_jax.sft.config import SFTConfig
from reclm_jax.tasks.batches import sft_batches
from reclm_jax.tasks.encode import display_titles
from reclm_jax.tasks.samples import TaskContext
from reclm_jax.tasks.training import training_samples
from reclm_jax.teacher.query import Teacher
from reclm_jax.training import optim
import timing
from bench_sft_step import MATMUL_F32_GFLOPS, step_flops


def main() -> None:
    parser = timing.parser(__doc__)
    parser.add_argument("--config", default="configs/sft/smollm2-135m.yaml")
    parser.add_argument("--teacher", default="runs/demo/teacher")
    parser.add_argument("--batch", type=int, default=16, help="samples per step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro", type=int, default=4, help="rows per forward/backward pass, both layouts")
    parser.add_argument("--length", type=int, default=512, help="tasks.max_length and the packed row length")
    args = parser.parse_args()

    cfg = config.load(SFTConfig, args.config, [f"tasks.max_length={args.length}",
                                                f"tasks.max_response_tokens={args.length // 2}",
                                                "lora.dropout=0.0", "model.compute_dtype=float32"])
    tasks = replace(cfg.tasks, batch_size=args.batch, prefetch=0)
    policy = ChatPolicy.load(cfg.model.tokenizer)
    model_cfg, params = hf_io.load_model(cfg.model, policy.tokenizer, 0)
    params = jax.device_put(params)
    dataset = load_dataset(cfg.data)
    ctx = TaskContext(dataset, Teacher.load(args.teacher), tasks,
                      titles=display_titles(dataset.titles, policy, tasks.max_title_tokens))
    samples = training_samples(ctx, 0)
    lora = lora_lib.init(jax.random.key(0), params, model_cfg, cfg.lora)
    tx = optim.optimizer(cfg.optim, args.steps)

    layouts = {"bucketed": tasks, f"packed {args.length}": replace(tasks, pack_length=args.length)}
    runs, stats = {}, {}
    for name, layout in layouts.items():
        it = iter(sft_batches(lambda epoch: samples, policy, layout, 0, 1, row_multiple=args.micro))
        batches = [jax.device_put(next(it)) for _ in range(args.steps)]
        fn = step_lib.jit_train_step(model_cfg, cfg.lora, tx, args.micro, layout.answer_tokens_per_row)

        def run(fn=fn, batches=batches):
            state = step_lib.init_state(jax.tree.map(jnp.copy, lora), tx)
            losses = []
            for batch in batches:
                state, metrics = fn(state, params, batch, jax.random.key(1))
                losses.append(metrics["loss"])
            return np.asarray(jax.device_get(losses))

        start = time.perf_counter()
        losses = run()  # compiles each new shape
        shapes = sorted({b["tokens"].shape for b in batches})
        cells = sum(b["tokens"].size for b in batches)
        real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
        flops = sum(step_flops(model_cfg, *b["tokens"].shape, layout.answer_tokens_per_row, cfg.lora.rank)
                    for b in batches)
        stats[name] = dict(losses=losses, shapes=shapes, cells=cells, real=real, flops=flops,
                           first=time.perf_counter() - start)
        runs[name] = run
        print(f"{name}: shapes {shapes}, first pass (compiling) {stats[name]['first']:.0f} s, "
              f"losses {' '.join(f'{x:.4f}' for x in losses)}", flush=True)

    times, cpu = timing.interleaved(runs, args.repeats)
    base = next(iter(layouts))
    samples_run = args.steps * args.batch
    print(f"\nSmolLM2-135M float32, LoRA r {cfg.lora.rank} on {len(cfg.lora.targets)} kinds of layer, no dropout; "
          f"{args.steps} steps of {args.batch} samples of {cfg.data.name} epoch 0 ({args.config} task mix, "
          f"max_length {args.length}), micro-batches of {args.micro} rows; {timing.machine()} at the end; "
          f"median of {args.repeats} interleaved rounds")
    print(f"| layout | batch shapes | real tokens / cells | wall s per step (rounds) | samples/s | real tokens/s | "
          f"vs {base} | CPU s per step | executed GFLOP/s (of {MATMUL_F32_GFLOPS} f32) | loss vs {base} |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base_wall = statistics.median(times[base])
    for name in layouts:
        s, wall = stats[name], statistics.median(times[name])
        rounds = ", ".join(f"{x / args.steps:.1f}" for x in times[name])
        diff = np.abs(s["losses"] / stats[base]["losses"] - 1).max()
        print(f"| {name} | {', '.join(f'{r}x{t}' for r, t in s['shapes'])} | {s['real'] / s['cells']:.0%} | "
              f"{wall / args.steps:.1f} ({rounds}) | {samples_run / wall:.2f} | {s['real'] / wall:.0f} | "
              f"{base_wall / wall:.2f}x | {statistics.median(cpu[name]) / args.steps:.1f} | "
              f"{s['flops'] / wall / 1e9:.0f} ({100 * s['flops'] / wall / 1e9 / MATMUL_F32_GFLOPS:.0f} %) | "
              f"max rel. {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
