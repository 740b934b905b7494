"""Time per PPO step, split into sampling (jitted sampler), host rewards (decode, parse, teacher ranks, rule
rewards, placement, batch assembly) and the update (one jitted PPO update), on a preset's real pipeline:
ML-100k RL prompts, the real tokenizer, the teacher.

    python benchmarks/bench_ppo.py --config configs/ppo/tiny.yaml [--teacher DIR] [--steps 8] [key=value ...]

Without --teacher a random-init SASRec of the paper's shape answers the rank queries (the same work as a
trained one). The first steps compile (every prompt-length bucket compiles the sampler and the update once),
so they are not timed; medians are over the later steps, wall and process CPU time (all threads). The update's
matrix-product FLOPs are counted in its compiled program for each timed step's batch shape (`hlo_stats`, loops
in full), to give its rate against this CPU's float32 matrix-product rate. Prints a Markdown table for
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

PARTS = ("sample", "rewards", "update")


def random_teacher(num_items: int):
    from flax import nnx

    from reclm_jax import config
    from reclm_jax.teacher.config import TeacherConfig
    from reclm_jax.teacher.query import Teacher, build_model

    cfg = config.load(TeacherConfig, "configs/teacher/paper.yaml")
    _, state = nnx.split(build_model(cfg, num_items))
    return Teacher(cfg, num_items, nnx.to_pure_dict(state))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/ppo/tiny.yaml")
    parser.add_argument("--teacher", help="a trained teacher directory (default: random-init SASRec)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="steps run first and not timed (compilation)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    import jax
    from bench_sft_step import MATMUL_F32_GFLOPS

    from reclm_jax import config, hlo_stats
    from reclm_jax.data import load_dataset
    from reclm_jax.rl import rollout
    from reclm_jax.rl.config import PPOConfig
    from reclm_jax.rl.trainer import build
    from reclm_jax.rl.update import ppo_update

    cfg = config.load(PPOConfig, args.config, args.overrides)
    if args.teacher:
        from reclm_jax.teacher.query import Teacher

        teacher = Teacher.load(args.teacher)
    else:
        teacher = random_teacher(load_dataset(cfg.data).num_items)
    trainer, stream = build(cfg, teacher=teacher)
    shapes = []  # each step's update batch, as abstract arrays
    build_batch = rollout.build_batch

    def recording_build_batch(*a, **kw):
        batch = build_batch(*a, **kw)
        shapes.append({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()})
        return batch

    rollout.build_batch = recording_build_batch
    rows, state = [], trainer.state
    for step in range(args.warmup + args.steps):
        prompts = next(stream)
        t, c = time.perf_counter(), time.process_time()
        state, metrics = trainer.step(state, prompts)
        metrics["time/step_s"], metrics["cpu/step_s"] = time.perf_counter() - t, time.process_time() - c
        if step >= args.warmup:
            rows.append(metrics)
    flops = {}  # batch shape -> the update's FLOPs
    for metrics, batch in zip(rows, shapes[args.warmup:]):
        key = tuple(sorted((k, v.shape) for k, v in batch.items()))
        if key not in flops:
            compiled = ppo_update.lower(trainer.base, state, batch, jax.random.key(0), model_cfg=trainer.model_cfg,
                                        actor_cfg=trainer.actor_cfg, critic_cfg=trainer.critic_cfg, hyper=cfg.ppo,
                                        optim=cfg.optim, shards=trainer.shards).compile()
            flops[key] = hlo_stats.analyse(compiled.as_text()).flops
        metrics["update_flops"] = flops[key]
    rate = sum(r["update_flops"] for r in rows) / sum(r["time/update_s"] for r in rows) / 1e9

    def median(name):
        return statistics.median(r[name] for r in rows)

    def share(name):
        return 100 * statistics.median(r[name] / r[name.split("/")[0] + "/step_s"] for r in rows)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"config {args.config} {' '.join(args.overrides)}; {cfg.batch_size} sequences/step "
          f"({cfg.rollout.prompts_per_step} prompts x {cfg.rollout.responses_per_prompt}), max_new_tokens "
          f"{cfg.rollout.max_new_tokens}, {trainer.model_cfg.num_params / 1e6:.1f} M params; "
          f"teacher {'trained' if args.teacher else 'random-init'}; jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind} ({platform.machine()}); load average {load:.1f}; "
          f"median of {len(rows)} steps after {args.warmup} warm-up steps; "
          f"mean response {statistics.mean(r['response_tokens'] for r in rows):.1f} tokens; update batches "
          f"{', '.join(sorted({'x'.join(map(str, b['tokens'].shape)) for b in shapes[args.warmup:]}))} tokens; "
          f"update {rate:.0f} GFLOP/s executed ({100 * rate / MATMUL_F32_GFLOPS:.0f} % of {MATMUL_F32_GFLOPS} f32)")
    print()
    print("| part | wall per step | share of the step (wall) | CPU per step | share of the step (CPU) |")
    print("|---|---|---|---|---|")
    for part in (*PARTS, "step"):
        w, c = f"time/{part}_s", f"cpu/{part}_s"
        print(f"| {part} | {1000 * median(w):.1f} ms | {share(w):.1f} % | "
              f"{1000 * median(c):.1f} ms | {share(c):.1f} % |")


if __name__ == "__main__":
    main()
