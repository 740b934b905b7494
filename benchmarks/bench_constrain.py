"""Constrained against unconstrained decoding, same run: SmolLM2-135M (float32), the ML-1M catalogue.

Per batch size: the decode time per step of `sampling.generate` greedy with and without the catalogue automaton
(k=10 lists, none of the user's history: both sides decode exactly `--new-tokens` steps, since no 10-title list
of ML-1M fits in them and the unconstrained side has no stop token), after one warm-up call, median of
`--repeats`. Decode time = generate time - prefill time of the same shapes. Also the automaton's build time
(tokenizing every title in the chat template, three contexts each) and size for ML-1M and for a synthetic
catalogue of `--synthetic` titles (words of ML-1M titles recombined, with a year), and the mask step's cost
on the synthetic catalogue.

    python benchmarks/bench_constrain.py [--batch 1 8] [--new-tokens 96] [--repeats 3] [--synthetic 100000]
"""

from __future__ import annotations

import time
import tracemalloc

import jax
import numpy as np

from reclm_jax.data.load import load_dataset
from reclm_jax.llm import hf_io, sampling
from reclm_jax.llm.automaton import catalogue_automaton
from reclm_jax.llm.tokenizer import load_tokenizer, stop_token_ids
from reclm_jax.tasks.config import TaskConfig
from reclm_jax.tasks.samples import Sample
from reclm_jax.tasks.templates import load_templates
from reclm_jax.llm.chat import ChatPolicy
from reclm_jax.tasks.encode import display_titles
import timing
from timing import timed


def build(titles, tok, label):
    tracemalloc.start()
    start = time.perf_counter()
    auto = catalogue_automaton(titles, tok)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    size = sum(getattr(auto, k).nbytes for k in ("items", "node_lo", "node_hi", "edge_start", "edge_token",
                                                  "edge_child"))
    print(f"{label}: {len(titles)} titles -> {len(auto.node_lo)} trie nodes, {len(auto.edge_token)} edges, "
          f"max degree {auto.max_degree}; build {seconds:.1f} s, peak host memory {peak / 2**20:.0f} MiB, "
          f"device arrays {size / 2**20:.1f} MiB + per row {len(auto.items)} B (allowed bits) "
          f"+ {len(auto.items)} B (category bits); dropped: "
          + (", ".join(f"{r} {len(v)}" for r, v in auto.dropped.items()) or "none"))
    return auto


def main() -> None:
    parser = timing.parser(__doc__)
    timing.add_decode_args(parser, new_tokens=96)
    parser.add_argument("--synthetic", type=int, default=100_000)
    args = parser.parse_args()

    tok = load_tokenizer("smollm2-135m")
    cfg, params = hf_io.load_pretrained("smollm2-135m")
    params = jax.device_put(params)
    ds = load_dataset("ml-1m")
    titles = display_titles(ds.titles, ChatPolicy.of(tok), TaskConfig.max_title_tokens)
    auto = build(titles, tok, "ML-1M")
    templates = load_templates()
    rng = np.random.default_rng(0)

    for b in args.batch:
        users = rng.choice(ds.num_users, b, replace=False)
        histories = [ds.sequences[u][-10:].tolist() for u in users]
        prompts = [ChatPolicy.of(tok).prompt_ids(Sample("bench", (("user", templates.prompt(
            "seqrec", "generate", history=templates.titles_in_prompt([titles[i] for i in h]), item_count=10)),)).messages,
            512) for h in histories]
        rows = auto.rows([10] * b, histories)
        length = sampling.bucket(max(map(len, prompts)))
        tokens, mask = sampling.left_pad(prompts, length, 0)

        def prefill():
            jax.block_until_ready(sampling.prefill(params, None, tokens, mask, cfg=cfg, lora_cfg=None,
                                                   cache_len=length + sampling.bucket(args.new_tokens)))

        def run(constraint):
            out = sampling.generate(params, cfg, prompts, max_new_tokens=args.new_tokens, eos_ids=[],
                                    constraint=constraint)
            assert (out.lengths == args.new_tokens).all(), "a list ended early: raise k or lower --new-tokens"

        _, t_prefill = timed(prefill, args.repeats)
        first_u, t_u = timed(lambda: run(None), args.repeats)
        first_c, t_c = timed(lambda: run(rows), args.repeats)
        step_u, step_c = (t_u - t_prefill) / args.new_tokens, (t_c - t_prefill) / args.new_tokens
        print(f"B={b}: prefill {t_prefill * 1e3:.0f} ms; decode per step unconstrained {step_u * 1e3:.1f} ms, "
              f"constrained {step_c * 1e3:.1f} ms: overhead {100 * (step_c / step_u - 1):+.1f} % "
              f"(first calls with compilation {first_u:.1f} s / {first_c:.1f} s)")
        answer = sampling.generate(params, cfg, prompts[:1], max_new_tokens=256, eos_ids=stop_token_ids(tok),
                                   constraint=rows.select([0]))
        if b == args.batch[0]:
            print("a constrained greedy answer:\n" + tok.decode(answer.tokens[0, :answer.lengths[0]].tolist(),
                                                                skip_special_tokens=True))

    if args.synthetic:
        words = sorted({w for t in ds.titles for w in t.split()[:-1] if w.isalpha()})
        synthetic = sorted({" ".join(rng.choice(words, rng.integers(1, 5))) + f" ({rng.integers(1920, 2025)})"
                            for _ in range(int(args.synthetic * 1.05))})[:args.synthetic]
        big = build(synthetic, tok, f"synthetic {len(synthetic)}")
        b = args.batch[-1]
        rows = big.rows([10] * b, [[]] * b)
        prompts = [[1] * 64] * b
        first, t_c = timed(lambda: sampling.generate(params, cfg, prompts, max_new_tokens=args.new_tokens,
                                                     eos_ids=[], constraint=rows), args.repeats)
        _, t_u = timed(lambda: sampling.generate(params, cfg, prompts, max_new_tokens=args.new_tokens, eos_ids=[]),
                       args.repeats)
        print(f"synthetic, B={b}, generate of {args.new_tokens} tokens: unconstrained {t_u:.2f} s, constrained "
              f"{t_c:.2f} s ({100 * (t_c / t_u - 1):+.1f} %, prefill included)")


if __name__ == "__main__":
    main()
