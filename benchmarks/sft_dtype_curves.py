"""Loss curves of one fixed SFT run with float32 weight products (today's step) and with bfloat16-input
products (`LlamaConfig.matmul_dtype="bfloat16"`, bfloat16-stored base weights, float32 LoRA master weights):
SmolLM2-135M, LoRA r 16 on every linear layer, the same batches (windows of the RecLM-gen paper's text, the
last `--response` tokens of each the answer) and the same initial adapter. Writes the two curves to `--out`
(PNG) and prints the largest per-step loss difference.

    python benchmarks/sft_dtype_curves.py [--steps 40] [--batch 4] [--length 96] [--response 32]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from reclm_jax.llm import hf_io
from reclm_jax.llm import lora as lora_lib
from reclm_jax.llm.config import LAYER_TARGETS, LoraConfig
from reclm_jax.llm.tokenizer import load_tokenizer
from reclm_jax.sft import step as step_lib
from reclm_jax.sft.config import SFT_OPTIM
from reclm_jax.training import optim

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

PAPER = "/work/shared/paper/reclm-gen-2403.05063.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--response", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/sft_dtype_curves.png")
    args = parser.parse_args()

    cfg, params = hf_io.load_pretrained("smollm2-135m")
    ids = np.asarray(load_tokenizer("smollm2-135m").encode(open(PAPER).read(), add_special_tokens=False), np.int32)
    b, t = args.batch, args.length
    rows = ids[: args.steps * b * t].reshape(args.steps, b, t)  # each step its own batch, in order
    loss_mask = np.zeros((b, t), bool)
    loss_mask[:, t - args.response:] = True
    lora_cfg = LoraConfig(rank=16, alpha=8.0, dropout=0.0, targets=LAYER_TARGETS)
    runs = {"float32 (today)": (cfg, params),
            "bfloat16 matmul inputs": (cfg.replace(param_dtype="bfloat16", matmul_dtype="bfloat16"),
                                       jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params))}
    curves = {}
    for name, (vcfg, vparams) in runs.items():
        tx = optim.optimizer(SFT_OPTIM, args.steps)
        state = step_lib.init_state(lora_lib.init(jax.random.key(0), params, cfg, lora_cfg), tx)
        step = jax.jit(functools.partial(step_lib.train_step, cfg=vcfg, lora_cfg=lora_cfg, tx=tx, accum=1,
                                         response_len=args.response), donate_argnums=0)
        losses = []
        for i in range(args.steps):
            batch = {"tokens": jnp.asarray(rows[i]), "attention_mask": jnp.ones((b, t), bool),
                     "loss_mask": jnp.asarray(loss_mask)}
            state, metrics = step(state, vparams, batch, jax.random.key(1))
            losses.append(float(metrics["loss"]))
        curves[name] = np.asarray(losses)
        print(name, " ".join(f"{x:.3f}" for x in losses), flush=True)
    a, c = curves.values()
    print(f"max |loss difference| over {args.steps} steps: {np.abs(a - c).max():.4f} "
          f"(mean {np.abs(a - c).mean():.4f}; losses from {a.min():.2f} to {a.max():.2f})")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, losses in curves.items():
        ax.plot(np.arange(1, args.steps + 1), losses, label=name)
    ax.set(xlabel="step", ylabel="response loss", title=f"SmolLM2-135M LoRA SFT, {b} x {t} tokens per step, same batches")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
