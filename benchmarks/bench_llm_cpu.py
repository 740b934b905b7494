"""SmolLM2-135M on this CPU, same weights, same dtype on both sides (float32 and bfloat16 by default): our JAX
prefill/decode against transformers' `generate`.

Measures prompt-processing tokens/s (prefill of `--prompt-len` tokens per row) and generated tokens/s (greedy
decode of `--new-tokens` per row, no early stop) at each batch size, both sides in the same process, timing
the median of `--repeats` runs after one warm-up (our first call compiles; its time is reported apart).
Decode time = generate time - prefill time of the same shapes.

    python benchmarks/bench_llm_cpu.py [--batch 1 8] [--prompt-len 64] [--new-tokens 64] [--repeats 3]
                                       [--dtype float32 bfloat16]

Each row also gives the decode step's distance from the weight-streaming floor: a step reads every weight once,
so it cannot beat (weight bytes) / (bandwidth); `--bandwidth` (GB/s) is by default the rate at which a jitted
vector-matrix product reads a 512 MB matrix here (`timing.stream_bandwidth`).
"""

from __future__ import annotations

import jax
import numpy as np
import torch
import transformers

from reclm_jax.llm import gguf_io, hf_io, sampling
from reclm_jax.llm.config import LlamaConfig
import timing
from timing import timed


def main() -> None:
    parser = timing.parser(__doc__)
    timing.add_decode_args(parser, new_tokens=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--bandwidth", type=float, help="memory bandwidth in GB/s (default: measured)")
    args = parser.parse_args()

    config, state = gguf_io.read_gguf(hf_io.resolve_model_path("smollm2-135m"))
    bandwidth = args.bandwidth or timing.stream_bandwidth()
    p, n = args.prompt_len, args.new_tokens
    print(f"# SmolLM2-135M, prompt {p} tokens, {n} new tokens; {timing.machine()}; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); weights stream at {bandwidth:.1f} GB/s")
    print("| dtype | batch | side | prompt tok/s | generated tok/s | decode step ms | x weight-streaming floor "
          "| first call (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in args.dtype:
        cfg = LlamaConfig.from_hf(config, param_dtype=dtype, compute_dtype=dtype)
        params = jax.device_put(hf_io.params_from_hf(state, cfg))
        reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf())).eval()
        reference.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=False)
        reference.tie_weights()
        reference.to(getattr(torch, dtype))
        floor_ms = sum(x.nbytes for x in jax.tree.leaves(params)) / (bandwidth * 1e9) * 1e3
        run(args, cfg, params, reference, dtype, floor_ms)


def run(args, cfg: LlamaConfig, params, reference, dtype: str, floor_ms: float) -> None:
    p, n = args.prompt_len, args.new_tokens
    rng = np.random.default_rng(0)
    for b in args.batch:
        prompts = rng.integers(100, cfg.vocab_size, (b, p)).astype(np.int32)
        tokens, mask = sampling.left_pad(prompts.tolist(), sampling.bucket(p), 0)

        def ours_prefill():
            logits, _ = sampling.prefill(params, None, tokens, mask, cfg=cfg, lora_cfg=None,
                                             cache_len=sampling.bucket(p) + sampling.bucket(n))
            jax.block_until_ready(logits)

        def ours_generate():
            # No stop ids: every row decodes exactly n tokens, as transformers does with min_new_tokens.
            sampling.generate(params, cfg, prompts.tolist(), max_new_tokens=n, eos_ids=[])

        prompt_ids = torch.from_numpy(prompts).long()
        attention = torch.ones_like(prompt_ids)

        def ref_prefill():
            with torch.no_grad():
                reference(prompt_ids, attention_mask=attention, use_cache=True)

        def ref_generate():
            with torch.no_grad():
                reference.generate(prompt_ids, attention_mask=attention, max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=0)

        for side, prefill, generate in (("ours (JAX)", ours_prefill, ours_generate),
                                        ("transformers", ref_prefill, ref_generate)):
            first_prefill, t_prefill = timed(prefill, args.repeats)
            first_generate, t_generate = timed(generate, args.repeats)
            decode = max(t_generate - t_prefill, 1e-9)
            step_ms = decode / n * 1e3
            print(f"| {dtype} | {b} | {side} | {b * p / t_prefill:,.0f} | {b * n / decode:,.1f} | {step_ms:.1f} | "
                  f"{step_ms / floor_ms:.1f} | {first_prefill + first_generate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
