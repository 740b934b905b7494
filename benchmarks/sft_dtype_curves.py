"""Loss curves of one fixed SFT run in step variants of `bench_sft_step.py` (default: today's float32 step
and bfloat16-input weight products, `LlamaConfig.matmul_dtype="bfloat16"` with bfloat16-stored base weights
and float32 LoRA master weights): SmolLM2-135M, LoRA r 16 on every linear layer, the same batches (windows
of the RecLM-gen paper's text, the last `--response` tokens of each the answer) and the same initial adapter.
Writes the curves to `--out` (PNG) and prints the largest per-step loss difference to the first variant.

    python benchmarks/sft_dtype_curves.py [--steps 30] [--batch 4] [--length 96] [--response 32]
"""

from __future__ import annotations

import functools

import jax
import matplotlib
import numpy as np

from reclm_jax.llm import hf_io
from reclm_jax.llm import lora as lora_lib
from reclm_jax.llm.tokenizer import load_tokenizer
from reclm_jax.sft import step as step_lib
from reclm_jax.sft.config import SFT_OPTIM
from reclm_jax.tasks.batches import collate
from reclm_jax.training import optim
import timing
from bench_sft_step import VARIANTS, patched, variant

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

PAPER = "/work/shared/paper/reclm-gen-2403.05063.txt"


def main() -> None:
    parser = timing.parser(__doc__, repeats=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--response", type=int, default=32)
    parser.add_argument("--variants", nargs="+", default=["f32", "bf16-matmul"], choices=VARIANTS)
    parser.add_argument("--out", default="benchmarks/sft_dtype_curves.png")
    args = parser.parse_args()

    cfg, params = hf_io.load_pretrained("smollm2-135m")
    ids = np.asarray(load_tokenizer("smollm2-135m").encode(open(PAPER).read(), add_special_tokens=False), np.int32)
    b, t = args.batch, args.length
    rows = ids[: args.steps * b * t].reshape(args.steps, b, t)  # each step its own batch, in order
    answer = np.arange(t) >= t - args.response
    curves = {}
    for name in args.variants:
        vcfg, lora_cfg, vparams, patches = variant(name, cfg, params)
        tx = optim.optimizer(SFT_OPTIM, args.steps)
        state = step_lib.init_state(lora_lib.init(jax.random.key(0), params, cfg, lora_cfg), tx)
        step = jax.jit(functools.partial(step_lib.train_step, cfg=vcfg, lora_cfg=lora_cfg, tx=tx, micro_rows=b,
                                         response_len=args.response), donate_argnums=0)
        losses = []
        for i in range(args.steps):
            batch = collate([{"tokens": row, "loss_mask": answer} for row in rows[i]], [[j] for j in range(b)], t, 0)
            with patched(patches):  # only the first call traces
                state, metrics = step(state, vparams, batch, jax.random.key(1))
            losses.append(float(metrics["loss"]))
        curves[name] = np.asarray(losses)
        print(name, " ".join(f"{x:.3f}" for x in losses), flush=True)
    first, *others = curves.values()
    for name, c in zip(args.variants[1:], others):
        print(f"{name} vs {args.variants[0]}: max |loss difference| over {args.steps} steps "
              f"{np.abs(first - c).max():.4f} (mean {np.abs(first - c).mean():.4f}; losses from "
              f"{first.min():.2f} to {first.max():.2f}); {timing.machine()}")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, losses in curves.items():
        ax.plot(np.arange(1, args.steps + 1), losses, label=name)
    ax.set(xlabel="step", ylabel="response loss", title=f"SmolLM2-135M LoRA SFT, {b} x {t} tokens per step, same batches")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
