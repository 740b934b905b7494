"""One SFT micro-step of SmolLM2-135M on this CPU: step variants timed in one run, interleaved.

Variants (`--variants`, default `f32-jax-lora f32 bf16-matmul`; the first is the ratios' base):
  f32-jax-lora   the step before issue 13: float32, the LoRA path's backward by JAX's own rule (XLA then
                 writes the [tokens, out] cotangents transposed for the b gradients)
  f32            today's step: float32 weights and compute (`lora.low_rank`'s backward)
  bf16-matmul    bfloat16-stored base weights, the weight products on bfloat16 inputs with float32
                 accumulation (`LlamaConfig.matmul_dtype`), everything else and the LoRA path in float32
  f32-bf16-matmul  the same products from float32-stored weights (converted inside every step)
  bf16           bfloat16 weights and compute (`compute_dtype`)
  all-positions  float32 with vocabulary logits at every position (the loss before issue 9)
  dropout        float32 with LoRA dropout 0.1 (the paper's setting)
All use LoRA r 16 on every linear layer. Shapes: `--batch` rows of `--length` tokens whose last `--response`
tokens are the answer (the demo's SL samples: about 290 tokens, 110 of them answer). After one compiling
call per variant, `--repeats` rounds each time every variant once (A B A B ...), so a shared, loaded
machine slows all alike; the median per variant is reported. `--profile DIR` instead traces one step per
variant and prints its 15 costliest XLA ops (trace in DIR, open with xprof/TensorBoard).

    python benchmarks/bench_sft_step.py [--batch 8] [--length 320] [--response 110] [--repeats 3]

`variant(name, cfg, params)` (model config, LoRA config, base weights, patches) is shared with
`sft_dtype_curves.py`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import glob
import gzip
import json
import os
import re
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from reclm_jax.llm import hf_io
from reclm_jax.llm import lora as lora_lib
from reclm_jax.llm.config import LAYER_TARGETS, LoraConfig
from reclm_jax.sft import step as step_lib
from reclm_jax.sft.config import SFT_OPTIM
from reclm_jax.tasks.batches import collate
from reclm_jax.training import optim
import timing

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from reference_logprobs import token_logprobs  # noqa: E402  (scores every position)

MATMUL_F32_GFLOPS = 390  # this CPU's float32 matrix-product rate (shared/notes/assets.md)


def all_position_loss(lora, params, batch, dropout_rng, *, cfg, lora_cfg, response_len):
    """The loss with logits at every position (what SFT computed before gathering the response positions)."""
    del response_len
    logprobs, _ = token_logprobs(params, cfg, batch["tokens"], batch["segment_ids"] > 0, lora=lora,
                                 lora_cfg=lora_cfg, dropout_rng=dropout_rng)
    return -(logprobs * batch["loss_weight"][:, 1:]).sum()


def jax_rule_low_rank(x, a, b, scale, out_dtype):
    """The LoRA path as before issue 13: plain products, differentiated by JAX's own rule."""
    return (scale * jnp.dot(jnp.dot(x, a), b, preferred_element_type=out_dtype)).astype(out_dtype)


VARIANTS = ("f32-jax-lora", "f32", "bf16-matmul", "f32-bf16-matmul", "bf16", "all-positions", "dropout")
LORA = LoraConfig(rank=16, alpha=8.0, dropout=0.0, targets=LAYER_TARGETS)


def variant(name: str, cfg, params):
    """(model config, LoRA config, base weights, patches {(module, attribute): replacement} to apply while
    tracing) of a variant named in the module docstring."""
    bf16_params = lambda: jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)  # noqa: E731
    if name == "f32-jax-lora":
        return cfg, LORA, params, {(lora_lib, "low_rank"): jax_rule_low_rank}
    if name == "f32":
        return cfg, LORA, params, {}
    if name == "bf16-matmul":
        return cfg.replace(param_dtype="bfloat16", matmul_dtype="bfloat16"), LORA, bf16_params(), {}
    if name == "f32-bf16-matmul":
        return cfg.replace(matmul_dtype="bfloat16"), LORA, params, {}
    if name == "bf16":
        return cfg.replace(param_dtype="bfloat16", compute_dtype="bfloat16"), LORA, bf16_params(), {}
    if name == "all-positions":  # the step looks the loss up by name
        return cfg, LORA, params, {(step_lib, "batch_loss"): all_position_loss}
    if name == "dropout":
        return cfg, replace(LORA, dropout=0.1), params, {}
    raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")


@contextlib.contextmanager
def patched(patches):
    """Apply a variant's patches (module attributes swapped while a step is traced)."""
    saved = {(m, a): getattr(m, a) for m, a in patches}
    try:
        for (m, a), value in patches.items():
            setattr(m, a, value)
        yield
    finally:
        for (m, a), value in saved.items():
            setattr(m, a, value)


def step_flops(cfg, b: int, t: int, response: int, lora_rank: int) -> float:
    """Matrix-product FLOPs of one step: forward and input-gradient products of every weight (frozen base:
    no weight gradients), attention scores and mixing (forward x 3), LoRA (forward x 3), vocabulary logits
    at the response positions (forward x 2: no embedding gradient)."""
    d, f, dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    weights = d * dh * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * f
    lora = lora_rank * (4 * d + dh * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * (d + f))
    attention = 2 * t * cfg.num_heads * dh
    per_token = cfg.num_layers * (2 * 2 * weights + 3 * 2 * lora + 3 * 2 * attention)
    return b * t * per_token + 2 * 2 * b * response * d * cfg.vocab_size


def profile(name: str, fn, out_dir: str) -> None:
    """Trace one call of `fn` and print its costliest XLA ops (names as in the compiled HLO)."""
    trace_dir = os.path.join(out_dir, name)
    jax.profiler.start_trace(trace_dir)
    fn()
    jax.profiler.stop_trace()
    events = json.load(gzip.open(sorted(glob.glob(f"{trace_dir}/plugins/profile/*/*.trace.json.gz"))[-1]))
    wrappers = re.compile(r"ThunkExecutor|\.py:|Pjit|SlinkyThreadPool|DevicePut|Transpose|H2D|Execute")
    total, count = collections.Counter(), collections.Counter()
    for e in events["traceEvents"]:
        if e.get("ph") == "X" and not wrappers.search(e["name"]):
            total[e["name"]] += e["dur"]
            count[e["name"]] += 1
    everything = sum(total.values())
    kinds = collections.Counter()
    for op, us in total.items():
        kinds[re.sub(r"\.\d+$", "", op)] += us
    print(f"\n{name}: {everything / 1e6:.2f} s in XLA ops; by kind: "
          + ", ".join(f"{k} {100 * v / everything:.0f} %" for k, v in kinds.most_common(6)))
    for op, us in total.most_common(15):
        print(f"  {us / 1e6:7.3f} s  {100 * us / everything:4.1f} %  x{count[op]:<3d} {op}")


def main() -> None:
    parser = timing.parser(__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=320)
    parser.add_argument("--response", type=int, default=110)
    parser.add_argument("--variants", nargs="+", default=["f32-jax-lora", "f32", "bf16-matmul"], choices=VARIANTS)
    parser.add_argument("--profile", metavar="DIR")
    args = parser.parse_args()

    cfg, params = hf_io.load_pretrained("smollm2-135m")
    params = jax.device_put(params)
    b, t = args.batch, args.length
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
    answer = np.arange(t) >= t - args.response
    batch = jax.device_put(collate([{"tokens": row, "loss_mask": answer} for row in tokens], [[i] for i in range(b)],
                                   t, pad_id=0))

    steps = {}
    for name in args.variants:
        vcfg, vlora, vparams, patches = variant(name, cfg, params)
        tx = optim.optimizer(SFT_OPTIM, 100)
        state = step_lib.init_state(lora_lib.init(jax.random.key(0), params, cfg, vlora), tx)
        with patched(patches):
            fn = jax.jit(functools.partial(step_lib.train_step, cfg=vcfg, lora_cfg=vlora, tx=tx, micro_rows=b,
                                           response_len=args.response))
            compiled = fn.lower(state, vparams, batch, jax.random.key(1)).compile()
        steps[name] = functools.partial(lambda c, s, p: jax.block_until_ready(c(s, p, batch, jax.random.key(1))),
                                        compiled, state, vparams)
        loss = float(steps[name]()[1]["loss"])  # warm-up
        print(f"{name}: first-step loss {loss:.5f}", flush=True)
    if args.profile:
        for name, run in steps.items():
            profile(name, run, args.profile)
        return

    times, cpu = timing.interleaved(steps, args.repeats)
    flops = step_flops(cfg, b, t, args.response, LORA.rank)
    print(f"SmolLM2-135M, micro-batch {b} x {t} tokens ({args.response} answer tokens per row), LoRA r 16 on "
          f"every linear layer, no dropout; {flops / 1e12:.2f} TFLOP of matrix products per step; "
          f"{timing.machine()} at the end; median of {args.repeats} interleaved rounds")
    print(f"| variant | wall s per step (runs) | tokens/s | vs {args.variants[0]} | of {MATMUL_F32_GFLOPS} GFLOP/s "
          f"f32 | CPU s per step (runs) | CPU vs {args.variants[0]} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base, base_cpu = statistics.median(times[args.variants[0]]), statistics.median(cpu[args.variants[0]])
    for name in args.variants:
        s, c = statistics.median(times[name]), statistics.median(cpu[name])
        runs, cpu_runs = (", ".join(f"{x:.1f}" for x in v[name]) for v in (times, cpu))
        print(f"| {name} | {s:.2f} ({runs}) | {b * t / s:.0f} | {base / s:.2f}x | "
              f"{100 * flops / s / 1e9 / MATMUL_F32_GFLOPS:.0f} % | {c:.1f} ({cpu_runs}) | {base_cpu / c:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
