import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reclm_jax.eval.controls import Control
from reclm_jax.eval.metrics import (
    METRICS,
    aggregate,
    c1_pa,
    correct_count,
    cpa,
    evaluate_batch,
    evaluate_sample,
    hit_at_k,
    in_history_at_k,
    ndcg_at_k,
    non_exist_at_k,
    repeat_item_at_k,
    tc1_not2_p_at_k,
    tcp_at_k,
)

# k = 5 list: 3, unknown, 7, 3 (repeat), 9 (history), 4 (past k)
IDS = [3, -1, 7, 3, 9, 4]
IN_C = [True, True, False, True, True, True]


def test_accuracy_by_hand():
    assert hit_at_k(IDS, 7, 5) == 1.0 and ndcg_at_k(IDS, 7, 5) == pytest.approx(1 / math.log2(4))
    assert hit_at_k(IDS, 3, 5) == 1.0 and ndcg_at_k(IDS, 3, 5) == 1.0  # first occurrence counts
    assert hit_at_k(IDS, 4, 5) == 0.0 and ndcg_at_k(IDS, 4, 5) == 0.0  # past k
    assert hit_at_k(IDS, 4, 6) == 1.0 and ndcg_at_k(IDS, 4, 6) == pytest.approx(1 / math.log2(7))
    assert hit_at_k(IDS, -1, 5) == 0.0 and ndcg_at_k(IDS, -1, 5) == 0.0  # no target: an unknown is no hit


def test_formatting_rates_by_hand():
    assert correct_count(IDS, 5) == 0.0 and correct_count(IDS, 6) == 100.0
    assert repeat_item_at_k(IDS, 5) == pytest.approx(20.0)  # one repeat among 5 slots
    assert non_exist_at_k(IDS, 5) == pytest.approx(20.0)
    assert in_history_at_k(IDS, [9, 8], 5) == pytest.approx(20.0)
    assert repeat_item_at_k([-1, -1], 2) == 0.0  # unknown titles are NonExist, not repeats


def test_tcp_eq7_by_hand():
    # first 5: 3 (in), unknown (flag ignored), 7 (out), 3 (in, repeat counts), 9 (in) -> 3 of 5
    assert tcp_at_k(IDS, IN_C, 5) == pytest.approx(60.0)
    assert tcp_at_k([3], [True], 10) == pytest.approx(10.0)  # missing slots count as not in C


@pytest.mark.parametrize("kind, m, in_flags, expected", [
    ("<=", 0.2, [True, False, False, False, False], 100.0),  # 1 <= 1
    ("<=", 0.2, [True, True, False, False, False], 0.0),  # 2 > 1
    (">=", 0.4, [True, True, False, False, False], 100.0),  # 2 >= 2
    (">=", 0.4, [True, False, False, False, False], 0.0),  # 1 < 2
    ("~", 0.6, [True, True, False, False, False], 100.0),  # |2 - 3| <= 1
    ("~", 0.6, [True, True, True, True, False], 100.0),  # |4 - 3| <= 1
    ("~", 0.6, [True, False, False, False, False], 0.0),  # |1 - 3| = 2
    ("~", 0.6, [True, True, True, True, True], 0.0),  # |5 - 3| = 2
])
def test_cpa_eq8_every_case_by_hand(kind, m, in_flags, expected):
    assert cpa([1, 2, 3, 4, 5], in_flags, 5, Control(kind, m)) == expected


def test_cpa_uses_exact_quota_and_fails_empty_outputs():
    flags = [True] * 3 + [False] * 7
    assert cpa(list(range(10)), flags, 10, Control(">=", 0.3)) == 100.0  # 3 >= 10 * 0.3
    assert cpa([], [], 10, Control("<=", 0.2)) == 0.0  # empty: fails though 0 <= 2
    assert cpa([-1, -1], [False, False], 10, Control("<=", 0.2)) == 0.0  # nothing real
    assert cpa([-1, 5], [False, False], 10, Control("<=", 0.2)) == 100.0
    with pytest.raises(ValueError, match="proportion"):
        cpa([1], [True], 1, Control("+c"))


def test_table7_metrics_by_hand():
    in_c1 = [True, True, False, True]
    in_c2 = [False, True, False, False]
    assert tc1_not2_p_at_k([1, 2, 3, 4], in_c1, in_c2, 4) == pytest.approx(50.0)  # items 1 and 4
    assert c1_pa([1, 2, 3, 4, 5], [True, False, False, False, False], 5) == 100.0  # 1 <= 20 % of 5
    assert c1_pa([1, 2, 3, 4, 5], [True, True, False, False, False], 5) == 0.0


def test_empty_output_is_a_failure_not_skipped():
    row = evaluate_sample([], 10, [1, 2], 7, [], Control("<=", 0.2))
    assert row == {"HR@K": 0.0, "NDCG@K": 0.0, "CorrectCount": 0.0, "RepeatItem@K": 0.0, "NonExist@K": 0.0,
                   "InHistory@K": 0.0, "TCP@K": 0.0, "CPA": 0.0}
    good = evaluate_sample([7], 1, [], 7, [True], Control("<=", 0.2))
    means = aggregate([row, good])
    assert means["HR@K"] == 0.5 and means["CorrectCount"] == 50.0 and means["CPA"] == 0.0


def test_evaluate_sample_keys_and_aggregate_checks():
    assert set(evaluate_sample([1], 1, [], 1)) == set(METRICS) - {"TCP@K", "CPA"}
    assert set(evaluate_sample([1], 1, [], 1, [True], Control("+c"))) == set(METRICS) - {"CPA"}
    with pytest.raises(ValueError, match="in_target"):
        evaluate_sample([1], 1, [], 1, None, Control("~", 0.5))
    with pytest.raises(ValueError, match="sample 1"):
        aggregate([evaluate_sample([1], 1, [], 1), evaluate_sample([1], 1, [], 1, [True])])
    with pytest.raises(ValueError, match="at least one"):
        aggregate([])
    with pytest.raises(ValueError, match="k="):
        hit_at_k([1], 1, 0)


@st.composite
def outputs(draw):
    n = draw(st.integers(0, 14))
    return dict(item_ids=draw(st.lists(st.integers(-1, 12), min_size=n, max_size=n)),
                k=draw(st.integers(1, 12)),
                history=draw(st.lists(st.integers(0, 12), max_size=5)),
                target=draw(st.integers(-1, 12)),
                in_target=draw(st.lists(st.booleans(), min_size=n, max_size=n)))


@settings(max_examples=200, deadline=None)
@given(st.lists(outputs(), min_size=1, max_size=8),
       st.one_of(st.none(), st.builds(Control, st.sampled_from(["<=", ">=", "~"]),
                                      st.sampled_from([0.1, 0.2, 0.3, 0.5, 0.9]))))
def test_batch_equals_per_sample(batch, control):
    cols = {key: [s[key] for s in batch] for key in batch[0]}
    controls = None if control is None else [control] * len(batch)
    arrays = evaluate_batch(cols["item_ids"], cols["k"], cols["history"], cols["target"], cols["in_target"], controls)
    rows = [evaluate_sample(**s, control=control) for s in batch]
    assert set(arrays) == set(rows[0])
    for name, values in arrays.items():
        np.testing.assert_allclose(values, [r[name] for r in rows], err_msg=name)
    means = aggregate(arrays)
    assert means == pytest.approx(aggregate(rows))
    assert all(0 <= means[n] <= 100 for n in means)


def test_batch_rejects_bad_rows_and_mixed_controls():
    with pytest.raises(ValueError, match="as long as its item_ids"):
        evaluate_batch([[1, 2], [3]], 5, [[], []], [1, 1], [[True], [True, False]])
    with pytest.raises(ValueError, match="mix"):
        evaluate_batch([[1], [3]], 5, [[], []], [1, 1], [[True], [True]], [Control("~", 0.5), Control("+c")])
