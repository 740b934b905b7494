"""The paper's reward rules (section 2.3 and Algorithm 1), as pure functions of item ids.

Inputs of one sample (the caller parses the output and asks the teacher for ranks):
- `item_ids` int [N]: the parsed items in order, -1 for an unknown title;
- `k`: the number of items the instruction asks for;
- `history` int [H]: the user's history item ids;
- `target`: the ground-truth item id;
- `ranks` int [N]: the teacher's 0-based rank of each item among all items (ignored where illegal);
- `in_target` bool [N]: the item belongs to the instruction's category C (ignored where illegal, and
  for I_0, which has no C);
- `control`: the instruction's kind and proportion m (`reclm_jax.eval.controls.Control`).

Positions: the paper numbers items p = 1..N. Eq. 3's discount 1/log2(i + 2) is read with i the 0-based
index (= 1/log2(p + 1), the usual DCG discount and what the official code computes), so the first item is
not discounted; the same discount as the NDCG@K metric.

Derived bounds (tested): Scores_i and Scores_i^ctl are -1 or in [0, 1]; R_item in [-1, 1];
-N <= sum(Scores*) <= D_k := sum_{p=1..k} 1/log2(p + 1) (only legal items, at most k of them, are
positive); Score_list^ctl is sum(Scores*) for I_0 and in [1/log2(k + 2), 1] otherwise; so with scale s
(`RewardOptions.list_scale`), s * R_list is in s * [-N, D_k] for I_0 and in
s * [-N/2 + 1/(2 log2(k + 2)), D_k/2 + 1/2] otherwise (divide the sum's bounds by `ideal_dcg(k)` under
list_sum="idcg"). The RL stage adds the KL penalty of Eq. 6 itself.

`sample_rewards` is the readable per-sample version (Algorithm 1 as the loop the paper prints);
`batch_rewards` computes the same numbers for a batch with numpy (tested equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from reclm_jax.eval.controls import KIND_CODE, Control, quota
from reclm_jax.eval.lists import in_history_mask, pad, repeat_mask, valid_mask


@dataclass(frozen=True)
class RewardOptions:
    # R_list is multiplied by this before it goes on the last token (paper section 2.3.3: "we amplify
    # R_list by a factor of 10"; the official code also multiplies by 10).
    list_scale: float = 10.0
    # False drops the item-level reward (all item rewards 0): the paper's Ours_v3 ablation.
    item_level: bool = True
    # "paper": sum(Scores*) as in Eq. 4 and 5. "idcg": divide sum(Scores*) by the ideal DCG of k items
    # (`ideal_dcg`) wherever it appears (Eq. 5, and Eq. 4's I_0 case), as the official code does and the
    # paper does not.
    list_sum: Literal["paper", "idcg"] = "paper"

    def __post_init__(self):
        if self.list_sum not in ("paper", "idcg"):
            raise ValueError(f"RewardOptions.list_sum={self.list_sum!r} must be 'paper' or 'idcg'")


def illegal_items(item_ids, k: int, history) -> np.ndarray:
    """bool [N]: item i is illegal as Eq. 1 defines it.

    Illegal: it does not exist (id -1), it repeats an item earlier in the list, it is in the user's
    history, or its 1-based position exceeds k.
    """
    seen, history = set(), set(np.asarray(history).tolist())
    illegal = []
    for i, item in enumerate(np.asarray(item_ids).tolist()):
        illegal.append(item < 0 or item in seen or item in history or i >= k)
        seen.add(item)
    return np.array(illegal, dtype=bool)


def preference_scores(item_ids, illegal, target: int, ranks) -> np.ndarray:
    """Scores (Eq. 1): -1 if illegal, +1 for the target, else 1 / log2(Rank_i + 3) (0-based teacher rank)."""
    item_ids, ranks = np.asarray(item_ids), np.asarray(ranks, dtype=np.float64)
    if item_ids.shape != ranks.shape:
        raise ValueError(f"ranks {ranks.shape} and item_ids {item_ids.shape} differ in shape")
    if (ranks[~np.asarray(illegal, dtype=bool)] < 0).any():
        raise ValueError("ranks of legal items must be >= 0 (0-based teacher ranks)")
    teacher = 1.0 / np.log2(np.maximum(ranks, 0.0) + 3.0)  # illegal items may carry any rank
    return np.where(illegal, -1.0, np.where(item_ids == target, 1.0, teacher))


def control_scores(scores, illegal, in_target, k: int, control: Control) -> np.ndarray:
    """Scores^ctl (Algorithm 1, appendix), one line of the algorithm per commented line.

    How each line is read (the paper's text extraction is garbled in places):
    - lines 2-4: an illegal item scores -1 and is not counted.
    - lines 5-7: in = item in C, out = not in; Count_in / Count_out count the legal items so far,
      this one included.
    - line 8 (I_0): s = Scores_i.  Line 9 (+C): s = in.  Line 10 (-C): s = out.
    - lines 11-15 (CP <= m): once Count_out > k - k*m the list can no longer hold more than k*m in-C
      items, so every further item is neutral (0.5); otherwise an out item scores 1, an in item 0.5 while
      Count_in < k*m and 0 once it reaches the quota (strict "<", as printed and in the official code).
    - lines 16-20 (CP >= m): the mirror image. Line 17 prints "Count_in > k", which no legal list can
      reach (at most k legal items); it is read as "Count_in > k*m", the mirror of line 12 and what the
      official code computes. Then an in item scores 1, an out item 0.5 while Count_out < k - k*m, else 0.
    - lines 21-27 (CP ~ m): an in item scores 1 while Count_in <= k*m, else 0; an out item scores 1 once
      Count_in >= k*m, else 0.5 while Count_out <= k - k*m, else 0.
    k*m is `controls.quota(k, m)` (rounded so that 10 * 0.3 == 3).
    """
    q = quota(k, control.m)
    out_quota = k - q
    ctl = np.zeros(len(scores))
    count_in = count_out = 0
    for i in range(len(scores)):
        if illegal[i]:  # lines 2-4
            ctl[i] = -1.0
            continue
        is_in = bool(in_target[i])  # lines 5-6
        is_out = not is_in
        count_in += is_in  # line 7
        count_out += is_out
        if control.kind == "seq":  # line 8
            s = scores[i]
        elif control.kind == "+c":  # line 9
            s = float(is_in)
        elif control.kind == "-c":  # line 10
            s = float(is_out)
        elif control.kind == "<=":  # lines 11-15
            s = 0.5 if count_out > out_quota else 1.0 if is_out else 0.5 if count_in < q else 0.0
        elif control.kind == ">=":  # lines 16-20
            s = 0.5 if count_in > q else 1.0 if is_in else 0.5 if count_out < out_quota else 0.0
        elif is_in:  # "~", lines 21-24
            s = 1.0 if count_in <= q else 0.0
        else:  # "~", lines 25-27
            s = 1.0 if count_in >= q else 0.5 if count_out <= out_quota else 0.0
        ctl[i] = s  # line 28
    return ctl


def item_rewards(scores, ctl_scores) -> np.ndarray:
    """R_item (Eq. 2) = 0.5 * Scores + 0.5 * Scores^ctl, in [-1, 1]. For I_0 it equals Scores."""
    return 0.5 * np.asarray(scores) + 0.5 * np.asarray(ctl_scores)


def discounted_scores(scores, illegal) -> np.ndarray:
    """Scores* (Eq. 3): -1 if illegal, else Scores_i / log2(i + 2) with i the 0-based position."""
    scores = np.asarray(scores, dtype=np.float64)
    discount = np.log2(np.arange(scores.shape[-1]) + 2.0)
    return np.where(illegal, -1.0, scores / discount)


def ideal_dcg(k) -> np.ndarray:
    """sum_{i<k} 1/log2(i + 2)^2: sum(Scores*) of the target first, then teacher ranks 0, 1, ... (the
    official code's normaliser; only used with RewardOptions(list_sum="idcg"))."""
    k = np.asarray(k)
    terms = 1.0 / np.log2(np.arange(int(k.max(initial=1))) + 2.0) ** 2
    return np.concatenate([[0.0], np.cumsum(terms)])[k]


def list_control_score(score_sum, count_in, count_out, k, control: Control) -> float:
    """Score_list^ctl (Eq. 4); Count_in / Count_out count the legal items in / not in C.

    I_0: sum(Scores*). +C: 1/log2(k - Count_in + 2). -C: 1/log2(k - Count_out + 2).
    CP <= m: 1/log2(max(Count_in - k*m, 0) + 2). CP >= m: 1/log2(max(k*m - Count_in, 0) + 2).
    CP ~ m: 1/log2(|Count_in - k*m| + 2). Each control case is 1 when the list obeys the instruction.
    """
    q = quota(k, control.m)
    miss = {"+c": k - count_in, "-c": k - count_out, "<=": max(count_in - q, 0.0),
            ">=": max(q - count_in, 0.0), "~": abs(count_in - q)}
    if control.kind == "seq":
        return float(score_sum)
    return float(1.0 / np.log2(miss[control.kind] + 2.0))


def list_reward(score_sum, list_ctl, scale: float = 10.0) -> float:
    """scale * R_list, with R_list (Eq. 5) = 0.5 * sum(Scores*) + 0.5 * Score_list^ctl.

    The default scale 10 is the paper's amplification (section 2.3.3); scale=1 gives Eq. 5 itself.
    """
    return scale * (0.5 * score_sum + 0.5 * list_ctl)


def sample_rewards(item_ids, k: int, history, target: int, ranks, in_target, control: Control,
                   options: RewardOptions = RewardOptions()) -> tuple[np.ndarray, float]:
    """(R_item per item [N], scale * R_list) for one output: the rewards the RL stage places on the last
    token of each item's title and on the output's last token. N = 0 (nothing parsed) is allowed."""
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    item_ids = np.asarray(item_ids, dtype=np.int64)
    in_target = np.asarray(in_target, dtype=bool)
    if in_target.shape != item_ids.shape:
        raise ValueError(f"in_target {in_target.shape} and item_ids {item_ids.shape} differ in shape")
    illegal = illegal_items(item_ids, k, history)
    scores = preference_scores(item_ids, illegal, target, ranks)
    ctl = control_scores(scores, illegal, in_target, k, control)
    score_sum = discounted_scores(scores, illegal).sum()
    if options.list_sum == "idcg":
        score_sum = score_sum / ideal_dcg(k)
    legal = ~illegal
    count_in = int((legal & in_target).sum())
    list_ctl = list_control_score(score_sum, count_in, int(legal.sum()) - count_in, k, control)
    r_item = item_rewards(scores, ctl) if options.item_level else np.zeros(len(item_ids))
    return r_item, float(list_reward(score_sum, list_ctl, options.list_scale))


def batch_rewards(item_ids: Sequence[Sequence[int]], k, history: Sequence[Sequence[int]], target,
                  ranks: Sequence[Sequence[int]], in_target: Sequence[Sequence[bool]],
                  controls: Sequence[Control], options: RewardOptions = RewardOptions(),
                  ) -> tuple[np.ndarray, np.ndarray]:
    """`sample_rewards` for B outputs at once: (R_item [B, N] with 0 past each list's end, scale * R_list [B]).

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
    r_item = item_rewards(scores, ctl) if options.item_level else np.zeros_like(scores)
    return r_item, list_reward(score_sum, list_ctl, options.list_scale)
