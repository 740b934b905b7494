"""One SFT micro-step of SmolLM2-135M (float32) on this CPU: where its time goes, all variants in one run.

Compares the step's loss with vocabulary logits at the response positions only (what `sft.step` does) against
logits at every position (`model.token_logprobs`, the previous loss), and LoRA settings: the paper's (all
linear layers, r 16, dropout 0.1), no dropout (the CPU demo), attention layers only. Shapes: `--batch` rows of
`--length` tokens whose last `--response` tokens are the answer (the demo's SL samples: about 290 tokens, 110
of them answer). Median of `--repeats` steps after one compiling step.

    python benchmarks/bench_sft_step.py [--batch 8] [--length 320] [--response 110] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np

from reclm_jax.llm import hf_io, model
from reclm_jax.llm import lora as lora_lib
from reclm_jax.llm.config import LAYER_TARGETS, LoraConfig
from reclm_jax.sft import step as step_lib
from reclm_jax.sft.config import OptimConfig
from timing import timed


def all_position_loss(lora, params, batch, dropout_rng, *, cfg, lora_cfg, response_len):
    """The loss with logits at every position (what SFT computed before gathering the response positions)."""
    del response_len
    logprobs, _ = model.token_logprobs(params, cfg, batch["tokens"], batch["attention_mask"], lora=lora,
                                       lora_cfg=lora_cfg, dropout_rng=dropout_rng)
    return step_lib.response_loss(logprobs, batch["loss_mask"][:, 1:])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=320)
    parser.add_argument("--response", type=int, default=110)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg, params = hf_io.load_pretrained("smollm2-135m")
    params = jax.device_put(params)
    b, t = args.batch, args.length
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
    loss_mask = np.zeros((b, t), bool)
    loss_mask[:, t - args.response:] = True
    batch = {"tokens": jnp.asarray(tokens), "attention_mask": jnp.ones((b, t), bool), "loss_mask": jnp.asarray(loss_mask)}
    paper = LoraConfig(rank=16, alpha=8.0, dropout=0.1, targets=LAYER_TARGETS)
    variants = [
        ("paper LoRA, logits at every position", paper, all_position_loss),
        ("paper LoRA, logits at response positions", paper, step_lib.batch_loss),
        ("no dropout, logits at response positions", replace(paper, dropout=0.0), step_lib.batch_loss),
        ("attention-only LoRA, no dropout, response positions", replace(paper, dropout=0.0, targets=("q", "k", "v", "o")),
         step_lib.batch_loss),
    ]
    print(f"SmolLM2-135M float32, micro-batch {b} x {t} tokens ({args.response} answer tokens per row), "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    print("| variant | ms per micro-step | tokens/s | vs the first |")
    print("|---|---:|---:|---:|")
    base = None
    for name, lora_cfg, loss_fn in variants:
        tx = step_lib.optimizer(OptimConfig(), 100)
        state = step_lib.init_state(lora_lib.init(jax.random.key(0), params, cfg, lora_cfg), tx)
        step_lib_loss, step_lib.batch_loss = step_lib.batch_loss, loss_fn  # the step looks the loss up by name
        try:
            fn = jax.jit(functools.partial(step_lib.train_step, cfg=cfg, lora_cfg=lora_cfg, tx=tx, accum=1,
                                           response_len=args.response))
            _, seconds = timed(lambda: jax.block_until_ready(fn(state, params, batch, jax.random.key(1))),
                               args.repeats)
        finally:
            step_lib.batch_loss = step_lib_loss
        base = base or seconds
        print(f"| {name} | {seconds * 1e3:.0f} | {b * t / seconds:.0f} | {base / seconds:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
