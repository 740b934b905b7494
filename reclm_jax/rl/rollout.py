"""Rollouts: sample responses with the policy, score them with the paper's rule rewards on the host, and build
the per-token batch that `update.ppo_update` trains on.

    prompts = prompts_from_samples(samples, policy, max_prompt_tokens)     # tasks' RL samples -> token ids
    gen = sample(base, actor_lora, prompts, key, model_cfg=..., actor_cfg=..., rollout=..., policy=...)
    scores, stats = scorer.score(prompts, gen.tokens, gen.lengths, responses_per_prompt)
    batch = build_batch(prompts, gen, scores, responses_per_prompt, policy.pad_id)

Sampling runs the jitted KV-cache sampler on the policy (base + actor LoRA) at the configured temperature,
`responses_per_prompt` independent draws per prompt (rows r * n ... r * n + n - 1 belong to prompt r), and keeps
each sampled token's log-probability under the policy itself (temperature 1): the PPO ratio's denominator.

Scoring decodes each response from its sampled ids (`ChatPolicy.decode`, as evaluation does), parses the
items (`eval.parse`, title spans), asks the teacher for the ranks of all known items of the batch in one
batched call (`eval.rewards.teacher_ranks`), computes R_item and 10 x R_list (`eval.rewards.batch_rewards`)
and puts them on the sampled tokens (`placement`). The text is never re-rendered or re-encoded (the
official code trains on a re-rendered copy of the parsed list): the policy is trained on exactly what it
sampled, so format errors (bad numbering, chatter, unknown titles) carry their penalty.

The batch holds each prompt once, with its responses after it in the same row (`build_batch`; the layout is
described in `update`): the update then computes a prompt's tokens once, not once per response.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from reclm_jax.core.controls import Control
from reclm_jax.eval import metrics
from reclm_jax.eval.lists import in_category
from reclm_jax.eval.parse import Catalogue
from reclm_jax.eval.rewards import RewardOptions, batch_rewards, teacher_ranks
from reclm_jax.llm import sampling
from reclm_jax.llm.automaton import Automaton
from reclm_jax.llm.chat import ChatPolicy
from reclm_jax.llm.config import LlamaConfig, LoraConfig
from reclm_jax.rl.config import RolloutConfig
from reclm_jax.rl.placement import place_rewards

# `eval.metrics` of the sampled lists: formatting-error rates, and accuracy against the target
FORMAT_METRICS = ("CorrectCount", "NonExist@K", "RepeatItem@K", "InHistory@K")
ACCURACY_METRICS = ("HR@K", "NDCG@K")


@dataclass(frozen=True)
class Prompt:
    """One RL instruction: its prompt token ids and what its rewards need."""

    tokens: tuple[int, ...]
    history: tuple[int, ...]
    target: int
    k: int
    control: Control = Control("seq")
    category: int = -1  # the control's category C (-1: none, for I0)


def prompts_from_samples(samples: Sequence[Any], policy: ChatPolicy, max_prompt_tokens: int) -> list[Prompt]:
    """`tasks` RL samples -> Prompts, rendered with the chat template as SFT renders them."""
    return [Prompt(tokens=tuple(policy.prompt_ids(s.messages, max_prompt_tokens)), history=tuple(s.history),
                   target=s.target, k=s.k, control=s.control or Control("seq"), category=s.category)
            for s in samples]


def sample(base, actor, prompts: Sequence[Prompt], key: jax.Array, *, model_cfg: LlamaConfig,
           actor_cfg: LoraConfig, rollout: RolloutConfig, policy: ChatPolicy,
           automaton: Automaton | None = None) -> sampling.GenerationResult:
    """`rollout.responses_per_prompt` sampled responses per prompt from the policy (base + actor LoRA); with
    `automaton` (the catalogue's, `rollout.constrain: catalogue`), each a list of exactly k distinct catalogue
    titles outside the prompt's history, drawn from the constrained policy, whose masks come back with it."""
    owners = [p for p in prompts for _ in range(rollout.responses_per_prompt)]
    constraint = None if automaton is None else automaton.rows([p.k for p in owners], [p.history for p in owners])
    return sampling.generate(base, model_cfg, [list(p.tokens) for p in owners], max_new_tokens=rollout.max_new_tokens,
                             temperature=rollout.temperature, top_k=rollout.top_k, top_p=rollout.top_p, rng=key,
                             eos_ids=policy.stop_ids, pad_id=policy.pad_id, lora=actor, lora_cfg=actor_cfg,
                             constraint=constraint, keep_allowed=constraint is not None)


class Scorer:
    """Rule rewards of sampled responses, placed on their tokens (see the module docstring)."""

    def __init__(self, catalogue: Catalogue, teacher: Any, category_matrix: np.ndarray, decode,
                 options: RewardOptions = RewardOptions()):
        self.catalogue = catalogue
        self.teacher = teacher
        self.category_matrix = np.asarray(category_matrix, bool)
        self.decode = decode
        self.options = options

    def parse(self, owners: Sequence[Prompt], responses: Sequence[Sequence[int]]):
        """(texts, parsed items, item ids (-1: not a title), in_target flags) of responses, response i answering
        owners[i]."""
        texts = [self.decode(r) for r in responses]
        parsed = [self.catalogue.parse(t) for t in texts]
        item_ids = [[it.item_id for it in items] for items in parsed]
        return texts, parsed, item_ids, in_category(item_ids, [p.category for p in owners], self.category_matrix)

    def score(self, prompts: Sequence[Prompt], tokens: np.ndarray, lengths: np.ndarray, responses_per_prompt: int,
              stop_ids: Sequence[int] = ()) -> tuple[np.ndarray, dict[str, float]]:
        """(scores [N, W] float32 with W = tokens.shape[1], statistics) for N = len(prompts) x responses_per_prompt
        responses; response i answers prompts[i // responses_per_prompt] and has lengths[i] sampled tokens."""
        n = len(lengths)
        if n != len(prompts) * responses_per_prompt:
            raise ValueError(f"{n} responses for {len(prompts)} prompts x {responses_per_prompt}")
        owners = [prompts[i // responses_per_prompt] for i in range(n)]
        responses = [np.asarray(tokens[i, : lengths[i]]).tolist() for i in range(n)]
        texts, parsed, item_ids, in_target = self.parse(owners, responses)

        ks, histories = [p.k for p in owners], [p.history for p in owners]
        ranks = teacher_ranks(self.teacher, item_ids, ks, histories)
        r_item, r_list = batch_rewards(item_ids, ks, histories, [p.target for p in owners], ranks, in_target,
                                       [p.control for p in owners], self.options)

        scores = np.stack([
            place_rewards(responses[i], self.decode, texts[i], [it.end for it in parsed[i]],
                          r_item[i, : len(parsed[i])], float(r_list[i]), tokens.shape[1])
            for i in range(n)
        ])
        counts = np.array([len(ids) for ids in item_ids])
        fmt = metrics.evaluate_batch(item_ids, ks, histories, [p.target for p in owners], in_target)
        kinds = np.array([p.control.kind for p in owners])
        stopped = np.array([bool(r) and r[-1] in set(stop_ids) for r in responses]) if stop_ids else None
        stats = {
            "reward": float(scores.sum(1).mean()),  # rule reward per response: sum of R_item + scale x R_list
            "r_item": float(sum(r_item[i, :c].sum() for i, c in enumerate(counts)) / max(counts.sum(), 1)),
            "r_list": float(np.mean(r_list) / self.options.list_scale),  # R_list of Eq. 5
            "items_per_response": float(counts.mean()),
            "empty_rate": float(100.0 * np.mean(counts == 0)),  # % of responses with no parsed item
            "response_tokens": float(np.mean(lengths)),
            **{f"format/{name}": float(np.mean(fmt[name])) for name in FORMAT_METRICS},
            **{f"sample/{name}": float(np.mean(fmt[name])) for name in ACCURACY_METRICS},
            # how each control kind's sampled lists follow it (the curve the RL stage is meant to move)
            **{f"control/{kind}/TCP@K": float(np.mean(fmt["TCP@K"][kinds == kind]))
               for kind in sorted(set(kinds.tolist()) - {"seq"})},
        }
        if stopped is not None:
            stats["truncated_rate"] = float(100.0 * np.mean(~stopped))  # % cut at max_new_tokens
        return scores, stats


def empty_batch(prompts: int, responses_per_prompt: int, row_len: int, response_len: int,
                pad_id: int, mask_bytes: int = 0) -> dict[str, np.ndarray]:
    """The `update.ppo_update` batch layout (see there), all padding: one row of `row_len` tokens per prompt,
    per-token arrays [prompts, responses_per_prompt, response_len]; with `mask_bytes`, also the constrained
    policy's per-token masks of that many bytes (nothing allowed)."""
    rows, per_token = (prompts, row_len), (prompts, responses_per_prompt, response_len)
    masks = {"allowed": np.zeros((*per_token, mask_bytes), np.uint8)} if mask_bytes else {}
    return masks | {
        "tokens": np.full(rows, pad_id, np.int32),
        "positions": np.zeros(rows, np.int32),
        "segment_ids": np.full(rows, -1, np.int32),
        "predict_at": np.zeros(per_token, np.int32),
        "targets": np.full(per_token, pad_id, np.int32),
        "response_mask": np.zeros(per_token, np.float32),
        "logprobs": np.zeros(per_token, np.float32),
        "scores": np.zeros(per_token, np.float32),
    }


def build_batch(prompts: Sequence[Prompt], gen: sampling.GenerationResult, scores: np.ndarray,
                responses_per_prompt: int, pad_id: int) -> dict[str, np.ndarray]:
    """The `update.ppo_update` batch: each prompt once, followed by its responses, in one row (the responses
    attend to the prompt and to themselves only, so the prompt's tokens are computed once, not once per response).
    The row length is `sampling.bucket` of the longest row and the response width that of the longest response,
    so a run compiles the update for a few shapes only. Rollouts of the constrained policy (`gen.allowed`) carry
    each token's mask as "allowed"."""
    k = responses_per_prompt
    lengths = np.asarray(gen.lengths)
    row_len = sampling.bucket(max(len(p.tokens) + int(lengths[g * k:(g + 1) * k].sum()) for g, p in enumerate(prompts)))
    sources = {"targets": gen.tokens, "logprobs": gen.logprobs, "scores": scores}
    if gen.allowed is not None:
        sources["allowed"] = gen.allowed
    out = empty_batch(len(prompts), k, row_len, sampling.bucket(max(1, int(lengths.max()))), pad_id,
                      0 if gen.allowed is None else gen.allowed.shape[-1])
    for g, prompt in enumerate(prompts):
        start = len(prompt.tokens)
        out["tokens"][g, :start] = prompt.tokens
        out["positions"][g, :start] = np.arange(start)
        out["segment_ids"][g, :start] = 0
        for i in range(k):
            n = g * k + i
            length = int(lengths[n])
            row = slice(start, start + length)
            out["tokens"][g, row] = gen.tokens[n, :length]
            out["positions"][g, row] = len(prompt.tokens) + np.arange(length)
            out["segment_ids"][g, row] = i + 1
            # response token j is predicted by the state before it: the prompt's last token for j = 0
            out["predict_at"][g, i, :length] = np.r_[len(prompt.tokens) - 1, np.arange(row.start, row.stop - 1)]
            for key, source in sources.items():
                out[key][g, i, :length] = source[n, :length]
            out["response_mask"][g, i, :length] = 1
            start = row.stop
    return out
