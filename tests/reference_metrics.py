"""The paper's metrics one list at a time, as written in section 3: the reference that
`eval.metrics.evaluate_batch` (what evaluation runs) is tested equal to, and that the hand-computed tests check."""

from __future__ import annotations

import numpy as np

from reclm_jax.core.controls import PROPORTION_KINDS, Control, quota


def _first_k(item_ids, k: int) -> list[int]:
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    return np.asarray(item_ids, dtype=np.int64)[:k].tolist()


def hit_at_k(item_ids, target: int, k: int) -> float:
    """HR@K: 1.0 if the target is among the first k items, else 0.0."""
    return float(target >= 0 and target in _first_k(item_ids, k))


def ndcg_at_k(item_ids, target: int, k: int) -> float:
    """NDCG@K: 1/log2(p + 2), p the target's first 0-based position among the first k items; else 0."""
    items = _first_k(item_ids, k)
    return float(1.0 / np.log2(items.index(target) + 2.0)) if target >= 0 and target in items else 0.0


def count_in(item_ids, in_target, k: int) -> int:
    """#{i <= k : item_i exists and is in C}."""
    if len(in_target) != len(item_ids):
        raise ValueError(f"in_target has {len(in_target)} entries for {len(item_ids)} items")
    items = _first_k(item_ids, k)
    return sum(1 for item, inside in zip(items, in_target) if item >= 0 and inside)


def tcp_at_k(item_ids, in_target, k: int) -> float:
    """TCP@K (Eq. 7) in percent: 100/k * #{i <= k : item_i exists and is in C}."""
    return 100.0 * count_in(item_ids, in_target, k) / k


def cpa(item_ids, in_target, k: int, control: Control) -> float:
    """CPA (Eq. 8) in percent (100 or 0) for a proportion control; 0 if no existing item in the first k."""
    if control.kind not in PROPORTION_KINDS:
        raise ValueError(f"CPA needs a proportion control ({', '.join(PROPORTION_KINDS)}), got {control.kind!r}")
    if not any(item >= 0 for item in _first_k(item_ids, k)):
        return 0.0
    n_in, q = count_in(item_ids, in_target, k), quota(k, control.m)
    ok = {"<=": n_in <= q, ">=": n_in >= q, "~": abs(n_in - q) <= 1}[control.kind]
    return 100.0 * ok


def correct_count(item_ids, k: int) -> float:
    """CorrectCount in percent (100 or 0): the list holds exactly k items."""
    return 100.0 * (len(item_ids) == k)


def repeat_item_at_k(item_ids, k: int) -> float:
    """RepeatItem@K in percent: 100/k * #{i <= k : item_i is known and appeared earlier}."""
    items = _first_k(item_ids, k)
    return 100.0 * sum(1 for i, item in enumerate(items) if item >= 0 and item in items[:i]) / k


def non_exist_at_k(item_ids, k: int) -> float:
    """NonExist@K in percent: 100/k * #{i <= k : item_i is unknown}."""
    return 100.0 * sum(1 for item in _first_k(item_ids, k) if item < 0) / k


def in_history_at_k(item_ids, history, k: int) -> float:
    """InHistory@K in percent: 100/k * #{i <= k : item_i is known and in the history}."""
    history = set(np.asarray(history).tolist())
    return 100.0 * sum(1 for item in _first_k(item_ids, k) if item >= 0 and item in history) / k


def tc1_not2_p_at_k(item_ids, in_c1, in_c2, k: int) -> float:
    """TC1¬2P@K (Table 7) in percent: TCP@K for items in C1 and not in C2."""
    return tcp_at_k(item_ids, np.asarray(in_c1, bool) & ~np.asarray(in_c2, bool), k)


def c1_pa(item_ids, in_c1, k: int, m: float = 0.2) -> float:
    """C1 PA (Table 7) in percent: CPA of the "C1 <= m" part of "C1 <= m & -C2"."""
    return cpa(item_ids, in_c1, k, Control("<=", m))


def evaluate_sample(item_ids, k: int, history, target: int, in_target=None,
                    control: Control | None = None) -> dict[str, float]:
    """All metrics that apply to one output: TCP@K when `in_target` is given, CPA when `control` is a
    proportion control too (it then needs `in_target`)."""
    out = {
        "HR@K": hit_at_k(item_ids, target, k),
        "NDCG@K": ndcg_at_k(item_ids, target, k),
        "CorrectCount": correct_count(item_ids, k),
        "RepeatItem@K": repeat_item_at_k(item_ids, k),
        "NonExist@K": non_exist_at_k(item_ids, k),
        "InHistory@K": in_history_at_k(item_ids, history, k),
    }
    if in_target is not None:
        out["TCP@K"] = tcp_at_k(item_ids, in_target, k)
        if control is not None and control.kind in PROPORTION_KINDS:
            out["CPA"] = cpa(item_ids, in_target, k, control)
    elif control is not None and control.kind in PROPORTION_KINDS:
        raise ValueError("CPA needs in_target")
    return out
