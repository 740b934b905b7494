"""The paper's reward rules (section 2.3 and Algorithm 1), as pure functions of item ids.

Inputs of one sample (the caller parses the output and asks the teacher for ranks):
- `item_ids` int [N]: the parsed items in order, -1 for an unknown title;
- `k`: the number of items the instruction asks for;
- `history` int [H]: the user's history item ids;
- `target`: the ground-truth item id;
- `ranks` int [N]: the teacher's 0-based rank of each item among all items (ignored where illegal);
- `in_target` bool [N]: the item belongs to the instruction's category C (ignored where illegal, and
  for I_0, which has no C);
- `control`: the instruction's kind and proportion m (`reclm_jax.core.controls.Control`).

Positions: the paper numbers items p = 1..N. Eq. 3's discount 1/log2(i + 2) is read with i the 0-based
index (= 1/log2(p + 1), the usual DCG discount and what the official code computes), so the first item is
not discounted; the same discount as the NDCG@K metric.

Derived bounds (tested): Scores_i and Scores_i^ctl are -1 or in [0, 1]; R_item in [-1, 1];
-N <= sum(Scores*) <= D_k := sum_{p=1..k} 1/log2(p + 1) (only legal items, at most k of them, are
positive); Score_list^ctl is sum(Scores*) for I_0 and in [1/log2(k + 2), 1] otherwise; so with scale s
(`RewardOptions.list_scale`), s * R_list is in s * [-N, D_k] for I_0 and in
s * [-N/2 + 1/(2 log2(k + 2)), D_k/2 + 1/2] otherwise, under the paper's weights (divide the sum's bounds by
`ideal_dcg(k)` under list_sum="idcg"). The RL stage adds the KL penalty of Eq. 6 itself.

`batch_rewards` computes them for a batch with numpy; tests/reference_rewards.py holds Algorithm 1 as the
per-sample loop the paper prints, which it is tested equal to. `teacher_ranks` asks a teacher for the ranks
they need, and `answer_rewards` puts the two together: the reward PPO gives a parsed answer (on the RL prompts)
and evaluation reports (on the test prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Sequence

import numpy as np

from reclm_jax.config import Rule, Section
from reclm_jax.core.controls import KIND_CODE, Control, quota
from reclm_jax.eval.lists import in_history_mask, pad, repeat_mask, valid_mask
from reclm_jax.llm.sampling import bucket


@dataclass(frozen=True)
class RewardOptions(Section):
    # R_list is multiplied by this before it goes on the last token (paper section 2.3.3: "we amplify
    # R_list by a factor of 10"; the official code also multiplies by 10).
    list_scale: float = 10.0
    # False drops the item-level reward (all item rewards 0): the paper's Ours_v3 ablation.
    item_level: bool = True
    # "paper": sum(Scores*) as in Eq. 4 and 5. "idcg": divide sum(Scores*) by the ideal DCG of k items
    # (`ideal_dcg`) wherever it appears (Eq. 5, and Eq. 4's I_0 case), as the official code does and the
    # paper does not.
    list_sum: Literal["paper", "idcg"] = "paper"
    # w, the weight of the control terms against the preference terms: R_item = (1 - w) Scores + w Scores^ctl
    # and R_list = (1 - w) sum(Scores*) + w Score_list^ctl. The paper's Eq. 2 and 5 weigh both 0.5, under which a
    # -C item in C costs ~0.7 and an invented title ~8.7; w = 1 rewards only obeying the instruction (with real,
    # new titles): REPRODUCTION.md, experiments 4 and 5. I_0 does not depend on w (its control terms are its
    # preference terms).
    control_weight: Annotated[float, Rule(lambda v: 0 <= v <= 1, "must be in [0, 1]")] = 0.5


def item_rewards(scores, ctl_scores, control_weight: float = 0.5) -> np.ndarray:
    """R_item (Eq. 2) = 0.5 * Scores + 0.5 * Scores^ctl, in [-1, 1] (0.5 is the default `control_weight`, the
    weight of Scores^ctl). For I_0 it equals Scores."""
    return (1.0 - control_weight) * np.asarray(scores) + control_weight * np.asarray(ctl_scores)


def ideal_dcg(k) -> np.ndarray:
    """sum_{i<k} 1/log2(i + 2)^2: sum(Scores*) of the target first, then teacher ranks 0, 1, ... (the
    official code's normaliser; only used with RewardOptions(list_sum="idcg"))."""
    k = np.asarray(k)
    terms = 1.0 / np.log2(np.arange(int(k.max(initial=1))) + 2.0) ** 2
    return np.concatenate([[0.0], np.cumsum(terms)])[k]


def list_reward(score_sum, list_ctl, scale: float = 10.0, control_weight: float = 0.5) -> float:
    """scale * R_list, with R_list (Eq. 5) = 0.5 * sum(Scores*) + 0.5 * Score_list^ctl (0.5: the default
    `control_weight`, the weight of Score_list^ctl).

    The default scale 10 is the paper's amplification (section 2.3.3); scale=1 gives Eq. 5 itself.
    """
    return scale * ((1.0 - control_weight) * score_sum + control_weight * list_ctl)


def batch_rewards(item_ids: Sequence[Sequence[int]], k, history: Sequence[Sequence[int]], target,
                  ranks: Sequence[Sequence[int]], in_target: Sequence[Sequence[bool]],
                  controls: Sequence[Control], options: RewardOptions = RewardOptions(),
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The rewards of B outputs: (R_item [B, N] with 0 past each list's end, scale * R_list [B]).

    Ragged per-sample lists go in; N is the longest list (at least 1). Algorithm 1's running counts are
    cumulative sums, and its branches become `np.where`s, so there is no Python loop over items.
    """
    ids, lengths = pad(item_ids, -1, np.int64)
    b, n = ids.shape
    ranks_arr, rank_lengths = pad(ranks, 0, np.float64)
    in_arr, in_lengths = pad(in_target, False, bool)
    hist, _ = pad(history, -1, np.int64)
    k = np.broadcast_to(np.asarray(k, dtype=np.int64), (b,))
    target = np.broadcast_to(np.asarray(target, dtype=np.int64), (b,))
    if (k < 1).any():
        raise ValueError(f"every k must be >= 1, got {k.min()}")
    if len(controls) != b or rank_lengths.shape != lengths.shape or in_lengths.shape != lengths.shape \
            or (rank_lengths != lengths).any() or (in_lengths != lengths).any():
        raise ValueError("ranks, in_target and controls must hold one row per output, as long as its item_ids")
    kind = np.array([c.code for c in controls], dtype=np.int64)[:, None]
    m = np.array([c.m for c in controls])

    valid = valid_mask(lengths, n)
    positions = np.arange(n)[None, :]
    illegal = valid & ((ids < 0) | repeat_mask(ids, valid) | in_history_mask(ids, valid, hist)
                       | (positions >= k[:, None]))
    legal = valid & ~illegal
    if (ranks_arr[legal] < 0).any():
        raise ValueError("ranks of legal items must be >= 0 (0-based teacher ranks)")

    # Eq. 1, Eq. 3
    teacher = 1.0 / np.log2(np.maximum(ranks_arr, 0.0) + 3.0)
    scores = np.where(ids == target[:, None], 1.0, teacher)
    scores = np.where(illegal, -1.0, np.where(valid, scores, 0.0))
    discounted = np.where(legal, scores / np.log2(positions + 2.0), scores)
    score_sum = discounted.sum(1)
    if options.list_sum == "idcg":
        score_sum = score_sum / ideal_dcg(k)

    # Algorithm 1: running counts of legal in / out items, this one included.
    is_in = legal & in_arr
    is_out = legal & ~in_arr
    count_in = np.cumsum(is_in, 1)
    count_out = np.cumsum(is_out, 1)
    q = quota(k, m)[:, None]
    out_quota = k[:, None] - q
    ctl = np.select(
        [kind == KIND_CODE["seq"], kind == KIND_CODE["+c"], kind == KIND_CODE["-c"],
         kind == KIND_CODE["<="], kind == KIND_CODE[">="]],
        [scores, is_in, is_out,
         np.where(count_out > out_quota, 0.5, np.where(is_out, 1.0, np.where(count_in < q, 0.5, 0.0))),
         np.where(count_in > q, 0.5, np.where(is_in, 1.0, np.where(count_out < out_quota, 0.5, 0.0)))],
        # "~"
        np.where(is_in, np.where(count_in <= q, 1.0, 0.0),
                 np.where(count_in >= q, 1.0, np.where(count_out <= out_quota, 0.5, 0.0))),
    ).astype(np.float64)
    ctl = np.where(illegal, -1.0, np.where(valid, ctl, 0.0))

    # Eq. 4, Eq. 5
    cin, cout = count_in[:, -1], count_out[:, -1]
    q = q[:, 0]
    miss = np.select([kind[:, 0] == KIND_CODE[c] for c in ("+c", "-c", "<=", ">=")],
                     [k - cin, k - cout, np.maximum(cin - q, 0.0), np.maximum(q - cin, 0.0)],
                     np.abs(cin - q))
    list_ctl = np.where(kind[:, 0] == KIND_CODE["seq"], score_sum, 1.0 / np.log2(miss + 2.0))
    w = options.control_weight
    r_item = item_rewards(scores, ctl, w) if options.item_level else np.zeros_like(scores)
    return r_item, list_reward(score_sum, list_ctl, options.list_scale, w)


def teacher_ranks(teacher: Any, item_ids: Sequence[Sequence[int]], k: Sequence[int],
                  history: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """The teacher's 0-based rank of each list's items (`batch_rewards`' `ranks`), in one batched call.

    Only the first k items of a list can be legal, so only theirs are asked (an unknown item as item 0; the
    rewards ignore the rank of an illegal item) and the rest are 0; the width is bucketed so that the
    teacher's jitted query compiles for a few shapes only."""
    asked_len = [min(len(ids), kk) for ids, kk in zip(item_ids, k)]
    asked = np.zeros((len(item_ids), bucket(max([1, *asked_len]))), np.int64)
    for i, ids in enumerate(item_ids):
        asked[i, : asked_len[i]] = np.maximum(ids[: asked_len[i]], 0)
    ranks = teacher.rank([list(h) for h in history], asked)
    return [np.pad(ranks[i, : asked_len[i]], (0, len(ids) - asked_len[i])) for i, ids in enumerate(item_ids)]


def answer_rewards(teacher: Any, item_ids: Sequence[Sequence[int]], k: Sequence[int],
                   history: Sequence[Sequence[int]], target: Sequence[int], in_target: Sequence[Sequence[bool]],
                   controls: Sequence[Control], options: RewardOptions = RewardOptions()) -> np.ndarray:
    """float [B]: each answer's whole rule reward, sum(R_item) + scale * R_list (what PPO's rollout reward sums
    over an answer's tokens, before the KL penalty), with the teacher's ranks (`teacher_ranks`)."""
    ranks = teacher_ranks(teacher, item_ids, k, history)
    r_item, r_list = batch_rewards(item_ids, k, history, target, ranks, in_target, controls, options)
    return r_item.sum(1) + r_list
