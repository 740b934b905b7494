"""One decode step's attention over a KV cache, SmolLM2-135M's shapes (30 layers, 9 query heads, 3 kv heads, head
dim 64), float32: the cache layout `model.forward` used before (`[L, B, S, Hkv, Dh]` for keys and values, read by
`model.attention`) against today's (`[L, B, Hkv, Dh, S]` keys, `[L, B, Hkv, S, Dh]` values, read by
`model.cached_attention`).

Each variant is what the cached forward does per layer, without the projections: a scan over the layers that
carries the stacked cache, takes layer i's slice and attends from one new token per row to S slots (10 % of them
masked). Median of `--repeats` calls after a warm-up; the floor column is the time to read the keys and values
once at the bandwidth `timing.stream_bandwidth` measures at the start of the run.

    python benchmarks/bench_decode_attention.py [--batch 8 64] [--slots 192 640] [--repeats 5]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from reclm_jax.llm import model
import timing
from timing import timed

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 30, 9, 3, 64


def step(attend):
    """A jitted 30-layer scan: each layer attends from q [B, 1, Hq, Dh] to its slice of the stacked cache."""
    def run(q, keys, values, mask):
        def layer(carry, i):
            out = attend(q + carry, jax.lax.dynamic_index_in_dim(keys, i, keepdims=False),
                         jax.lax.dynamic_index_in_dim(values, i, keepdims=False), mask)
            return carry + 1e-3 * out.reshape(q.shape), None
        return jax.lax.scan(layer, jnp.zeros_like(q), jnp.arange(LAYERS))[0]
    return jax.jit(run)


def main() -> None:
    parser = timing.parser(__doc__, repeats=5)
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--slots", type=int, nargs="+", default=[192, 640])
    args = parser.parse_args()
    bandwidth = timing.stream_bandwidth()
    print(f"# {timing.machine()}; memory streams at {bandwidth:.1f} GB/s")
    print("| batch | slots | before: [L,B,S,Hkv,Dh] ms | now: [L,B,Hkv,Dh,S] / [L,B,Hkv,S,Dh] ms | speed-up "
          "| now x read floor |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for b in args.batch:
        for s in args.slots:
            q = jnp.asarray(rng.standard_normal((b, 1, HEADS, HEAD_DIM)), jnp.float32)
            keys = jnp.asarray(rng.standard_normal((LAYERS, b, s, KV_HEADS, HEAD_DIM)), jnp.float32)
            values = jnp.asarray(rng.standard_normal((LAYERS, b, s, KV_HEADS, HEAD_DIM)), jnp.float32)
            mask = jnp.asarray(rng.random((b, 1, s)) < 0.9)
            before, now = step(model.attention), step(model.cached_attention)
            keys_now, values_now = keys.transpose(0, 1, 3, 4, 2), values.transpose(0, 1, 3, 2, 4)
            np.testing.assert_allclose(before(q, keys, values, mask), now(q, keys_now, values_now, mask),
                                       rtol=1e-4, atol=1e-5)
            _, t_before = timed(lambda: before(q, keys, values, mask).block_until_ready(), args.repeats)
            _, t_now = timed(lambda: now(q, keys_now, values_now, mask).block_until_ready(), args.repeats)
            floor = 2 * keys.nbytes / (bandwidth * 1e9)
            print(f"| {b} | {s} | {t_before * 1e3:.1f} | {t_now * 1e3:.1f} | {t_before / t_now:.2f}x "
                  f"| {t_now / floor:.1f} |", flush=True)


if __name__ == "__main__":
    main()
