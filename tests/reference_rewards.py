"""Algorithm 1 as the per-sample loop the paper prints: the readable reference that `eval.rewards.batch_rewards`
(the vectorised version the RL stage runs) is tested equal to, and that the hand-computed tests check."""

from __future__ import annotations

import numpy as np

from reclm_jax.core.controls import Control, quota
from reclm_jax.eval.rewards import RewardOptions, ideal_dcg, item_rewards, list_reward


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


def discounted_scores(scores, illegal) -> np.ndarray:
    """Scores* (Eq. 3): -1 if illegal, else Scores_i / log2(i + 2) with i the 0-based position."""
    scores = np.asarray(scores, dtype=np.float64)
    discount = np.log2(np.arange(scores.shape[-1]) + 2.0)
    return np.where(illegal, -1.0, scores / discount)


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
    w = options.control_weight
    r_item = item_rewards(scores, ctl, w) if options.item_level else np.zeros(len(item_ids))
    return r_item, float(list_reward(score_sum, list_ctl, options.list_scale, w))
