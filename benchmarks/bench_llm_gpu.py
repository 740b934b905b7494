"""LoRA training MFU and KV-cache decode throughput of a Llama-2-7B-shaped model (random weights, bf16).

Needs only jax, optax and numpy (plus this repository's pure-JAX `reclm_jax.llm`, found from the script's
location), so it runs on a GPU box without the project's other dependencies.

- Training: one LoRA step (rank 16 on q/k/v/o/gate/up/down, AdamW on the adapter only, frozen bf16 base) on
  `--batch` x `--seq` tokens. Model FLOPs per sequence = 4 N T (weights: forward, and the backward
  product for the activations; the frozen base needs no weight gradients, so not 6 N T) + 3 x 4 L T^2 d
  (attention: forward, and both operands' gradients in the backward; full T x T square, PaLM convention),
  with N the matmul parameters incl. lm_head, T tokens, d = Hq * Dh. The adapters' own FLOPs (<1 %) and
  recomputation under remat are not counted (MFU, not hardware utilisation).
- Decode: greedy generation of `--new-tokens` after a `--prompt-len` prompt at batch 1 and 64, timed
  without the prefill. Roofline: each step must read every weight once plus the valid part of the KV cache,
  so tokens/s <= batch x HBM bandwidth / (weight bytes + KV bytes at the mean context).

    python benchmarks/bench_llm_gpu.py           # on an H100 / H200
    python benchmarks/bench_llm_gpu.py --tiny    # the same code on tiny shapes (a CPU smoke run)
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from reclm_jax.llm import lora, model, sampling  # noqa: E402
from reclm_jax.llm.config import LAYER_TARGETS, PRESETS, LlamaConfig, LoraConfig  # noqa: E402
from reference_logprobs import token_logprobs  # noqa: E402  (scores every position)
from timing import timed  # noqa: E402

# Dense bf16 peak FLOP/s and HBM bandwidth (bytes/s) from the vendors' data sheets (SXM parts).
PEAKS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.039e12)}


def device_peaks(args) -> tuple[float | None, float | None, str]:
    kind = jax.devices()[0].device_kind
    flops, hbm = next((v for k, v in PEAKS.items() if k in kind), (None, None))
    if args.peak_tflops:
        flops = args.peak_tflops * 1e12
    if args.hbm_gbps:
        hbm = args.hbm_gbps * 1e9
    return flops, hbm, kind


def matmul_params(cfg: LlamaConfig) -> int:
    """Parameters used in matrix products per token: every layer kernel and the output projection."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    attn = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    return cfg.num_layers * (attn + 3 * d * f) + d * cfg.vocab_size


def lora_step_flops(cfg: LlamaConfig, batch: int, seq: int) -> float:
    attention = 4 * cfg.num_layers * seq * seq * cfg.num_heads * cfg.head_dim
    return batch * (4 * matmul_params(cfg) * seq + 3 * attention)


def train_step_fn(cfg: LlamaConfig, lora_cfg: LoraConfig, optimizer):
    def loss_fn(adapter, params, tokens, rng):
        logp, _ = token_logprobs(params, cfg, tokens, lora=adapter, lora_cfg=lora_cfg, dropout_rng=rng)
        return -jnp.mean(logp)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(adapter, opt_state, params, tokens, rng):
        loss, grads = jax.value_and_grad(loss_fn)(adapter, params, tokens, rng)
        updates, opt_state = optimizer.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, loss

    return step


def measure_training(cfg, params, args, peak_flops) -> dict:
    lora_cfg = LoraConfig(rank=16, alpha=32.0, dropout=0.05, targets=LAYER_TARGETS)
    optimizer = optax.adamw(1e-4)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, cfg.vocab_size, jnp.int32)
    errors = []
    for remat in args.remat:  # the first policy that fits in memory
        run_cfg = cfg.replace(remat=remat)
        adapter = lora.init(jax.random.key(2), params, run_cfg, lora_cfg)
        state = {"adapter": adapter, "opt": optimizer.init(adapter)}
        step = train_step_fn(run_cfg, lora_cfg, optimizer)

        def run():
            state["adapter"], state["opt"], loss = step(state["adapter"], state["opt"], params, tokens,
                                                        jax.random.key(3))
            jax.block_until_ready(loss)

        try:
            first, seconds = timed(run, args.repeats)
        except Exception as e:  # XLA reports out-of-memory as a runtime error
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            errors.append(remat)
            continue
        flops = lora_step_flops(cfg, args.batch, args.seq)
        return {"remat": remat, "oom_with": errors, "step_s": seconds, "first_call_s": first,
                "tokens_per_s": args.batch * args.seq / seconds, "model_tflops_per_s": flops / seconds / 1e12,
                "mfu": None if peak_flops is None else flops / seconds / peak_flops}
    raise RuntimeError(f"LoRA training step ran out of memory with every remat policy {args.remat}")


def measure_decode(cfg, params, batch, args, hbm) -> dict:
    rng = np.random.default_rng(batch)
    prompts = rng.integers(3, cfg.vocab_size, (batch, args.prompt_len)).tolist()
    tokens, mask = sampling.left_pad(prompts, sampling.bucket(args.prompt_len), 0)
    cache_len = sampling.bucket(args.prompt_len) + sampling.bucket(args.new_tokens)

    def prefill():
        jax.block_until_ready(sampling.prefill(params, None, tokens, mask, cfg=cfg, lora_cfg=None,
                                               cache_len=cache_len)[0])

    def generate():  # no stop ids: exactly new_tokens steps per row
        sampling.generate(params, cfg, prompts, max_new_tokens=args.new_tokens, eos_ids=[])

    _, t_prefill = timed(prefill, args.repeats)
    first, t_generate = timed(generate, args.repeats)
    decode_s = t_generate - t_prefill
    tok_s = batch * args.new_tokens / decode_s
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    if not cfg.tie_embeddings:  # the input embedding is a lookup of `batch` rows, not a full read
        weight_bytes -= params["embed"].size * params["embed"].dtype.itemsize
    mean_context = args.prompt_len + args.new_tokens / 2
    kv_bytes = 2 * cfg.num_layers * batch * mean_context * cfg.num_kv_heads * cfg.head_dim * 2  # bf16 k and v
    roofline = None if hbm is None else batch * hbm / (weight_bytes + kv_bytes)
    return {"batch": batch, "decode_tokens_per_s": tok_s, "step_ms": 1e3 * decode_s / args.new_tokens,
            "prefill_s": t_prefill, "first_call_s": first, "roofline_tokens_per_s": roofline,
            "fraction_of_roofline": None if roofline is None else tok_s / roofline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run of the same code)")
    parser.add_argument("--batch", type=int, default=8, help="training sequences per step")
    parser.add_argument("--seq", type=int, default=1024, help="training sequence length")
    parser.add_argument("--remat", nargs="+", default=["dots", "full"], help="remat policies to try in order")
    parser.add_argument("--decode-batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, help="override the device's peak bf16 TFLOP/s")
    parser.add_argument("--hbm-gbps", type=float, help="override the device's memory bandwidth (GB/s)")
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.seq, args.prompt_len, args.new_tokens = 2, 64, 16, 8
        args.decode_batch = [1, 4]
    cfg = (PRESETS["tiny"] if args.tiny else PRESETS["llama2-7b"]).replace(param_dtype="bfloat16",
                                                                            compute_dtype="bfloat16")
    peak_flops, hbm, kind = device_peaks(args)
    params = jax.jit(model.init_params, static_argnums=1)(jax.random.key(0), cfg)
    jax.block_until_ready(params)

    results = {"device": kind, "jax": jax.__version__, "model": "tiny" if args.tiny else "llama2-7b",
               "train": {"batch": args.batch, "seq": args.seq, **measure_training(cfg, params, args, peak_flops)},
               "decode": [measure_decode(cfg, params, b, args, hbm) for b in args.decode_batch]}
    train = results["train"]
    mfu = "n/a (unknown peak)" if train["mfu"] is None else f"{100 * train['mfu']:.1f} %"
    print(f"device: {kind}; LoRA step {args.batch}x{args.seq} (remat {train['remat']}): {train['step_s']:.3f} s, "
          f"{train['tokens_per_s']:,.0f} tokens/s, {train['model_tflops_per_s']:.1f} model TFLOP/s, MFU {mfu}")
    for d in results["decode"]:
        roof = "n/a" if d["roofline_tokens_per_s"] is None else (
            f"{d['roofline_tokens_per_s']:,.0f} tokens/s roofline, {100 * d['fraction_of_roofline']:.1f} %")
        print(f"decode batch {d['batch']}: {d['decode_tokens_per_s']:,.1f} tokens/s "
              f"({d['step_ms']:.2f} ms/step; {roof})")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
