"""What PPO's advantages can learn from: how a model's sampled answers to the same RL prompt differ.

Samples `rollout.responses_per_prompt` answers to each of `rollout.prompts_per_step` RL prompts of a PPO config
(the run's first prompts, its sampling settings, rewards and SFT model; no actor), then splits each per-answer
figure's variance into the part between prompts and the part within a prompt (what the answers of one prompt
differ in, which is all a per-prompt comparison sees), and regresses the answers' reward, within each prompt,
on their counts of excluded-category (C) items and of invented titles among the first k, one count at a time:

    python scripts/within_prompt_spread.py --config runs/repro/ppo/config.yaml model.sft_adapter=... \\
        'prompts.kinds=[-c]' rollout.top_k=20 rollout.prompts_per_step=32 rollout.responses_per_prompt=4
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from reclm_jax import config
from reclm_jax.eval.rewards import answer_rewards
from reclm_jax.rl.config import PPOConfig
from reclm_jax.rl.trainer import build


def spread(values: np.ndarray) -> str:
    """values [prompts, answers]: mean, and the standard deviation between prompt means and within prompts."""
    within = np.sqrt(np.mean(values.var(axis=1, ddof=1)))
    return f"{values.mean():.2f} | {values.mean(axis=1).std(ddof=1):.2f} | {within:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a PPO config (e.g. a run's config.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args()
    cfg = config.load(PPOConfig, args.config, args.overrides)
    trainer, stream = build(cfg)
    prompts = next(stream)
    r = cfg.rollout
    gen = trainer.sample(trainer.state.params["actor"], prompts, jax.random.key(cfg.seed))
    scorer = trainer.scorer
    owners = [p for p in prompts for _ in range(r.responses_per_prompt)]
    _, _, ids, flags = scorer.parse(owners, [gen.tokens[i, :gen.lengths[i]].tolist() for i in range(len(owners))])
    shape = (len(prompts), r.responses_per_prompt)
    in_c = np.array([sum(f[:p.k]) for f, p in zip(flags, owners)], float).reshape(shape)
    invented = np.array([sum(i < 0 for i in row[:p.k]) for row, p in zip(ids, owners)], float).reshape(shape)
    reward = answer_rewards(scorer.teacher, ids, [p.k for p in owners], [p.history for p in owners],
                            [p.target for p in owners], flags, [p.control for p in owners],
                            scorer.options).reshape(shape)
    print(f"{len(prompts)} prompts x {r.responses_per_prompt} sampled answers")
    print("| per answer | mean | sd between prompts | sd within a prompt |\n|---|---:|---:|---:|")
    for name, v in (("C items among the first k", in_c), ("invented titles among the first k", invented),
                    ("rule reward", reward)):
        print(f"| {name} | {spread(v)} |")
    # within a prompt (deviations from each prompt's mean): the reward's slope on each count, and the share of the
    # within-prompt reward variance that count alone explains (R^2 of the one-variable fit)
    dev = {name: (v - v.mean(axis=1, keepdims=True)).ravel() for name, v in
           (("C items", in_c), ("invented titles", invented), ("reward", reward))}
    for name in ("C items", "invented titles"):
        slope = dev[name] @ dev["reward"] / max(dev[name] @ dev[name], 1e-12)
        r2 = np.corrcoef(dev[name], dev["reward"])[0, 1] ** 2 if dev[name].any() else 0.0
        print(f"within a prompt, {name}: reward {slope:+.2f} per one more, {r2:.0%} of the reward's variance")


if __name__ == "__main__":
    main()
