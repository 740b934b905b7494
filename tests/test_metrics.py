import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_metrics import (
    c1_pa,
    correct_count,
    cpa,
    evaluate_sample,
    hit_at_k,
    in_history_at_k,
    ndcg_at_k,
    non_exist_at_k,
    repeat_item_at_k,
    tc1_not2_p_at_k,
    tcp_at_k,
)

from reclm_jax.core.controls import Control
from reclm_jax.eval.metrics import METRICS, Bootstrap, aggregate, estimate, evaluate_batch

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


# ---- bootstrap intervals -----------------------------------------------------------------------------
def exact_bootstrap_quantiles(values):
    """The exact bootstrap distribution of the mean, by enumerating all n^n equally likely resamples: the
    2.5 % and 97.5 % quantiles (smallest mean whose cdf reaches them) and the cdf's distances from them."""
    import itertools

    n = len(values)
    means = sorted(sum(values[i] for i in idx) / n for idx in itertools.product(range(n), repeat=n))
    cdf = {m: (i + 1) / len(means) for i, m in enumerate(means)}  # last index of each mean: its cdf
    quantile = {q: min(m for m in cdf if cdf[m] >= q) for q in (0.025, 0.975)}
    margin = min(abs(c - q) for c in cdf.values() for q in (0.025, 0.975))
    return quantile[0.025], quantile[0.975], margin


@pytest.mark.parametrize("value", [0.0, 25.0, 100.0, 100 / 3])
def test_constant_sample_has_a_degenerate_interval(value):
    e = estimate({"m": np.full(7, value)}, Bootstrap(resamples=200), "t")["m"]
    assert e["n"] == 7 and e["mean"] == pytest.approx(value)
    assert e["lo"] == pytest.approx(value, abs=1e-12) and e["hi"] == pytest.approx(value, abs=1e-12)


@pytest.mark.parametrize("values", [[1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 4.0, 4.0, 10.0]])
def test_interval_matches_the_exact_bootstrap_distribution(values):
    lo, hi, margin = exact_bootstrap_quantiles(values)
    # [1, 0, 0, 0, 0]: 5 x the mean is Binomial(5, 0.2): P(<= 2) = 0.942, P(<= 3) = 0.993, so hi = 3/5
    assert margin > 0.005  # 20000 resamples put the empirical cdf within ~0.001 of the exact one
    e = estimate({"m": np.array(values)}, Bootstrap(resamples=20000, seed=3), "t")["m"]
    assert (e["lo"], e["hi"]) == pytest.approx((lo, hi))
    assert e["mean"] == pytest.approx(sum(values) / len(values))
    if values[0] == 1.0:
        assert (lo, hi) == (0.0, 0.6)


def test_interval_of_a_proportion_matches_the_normal_approximation():
    values = np.array([1.0] * 100 + [0.0] * 300)  # p = 0.25, n = 400: p +- 1.96 sqrt(p (1 - p) / n)
    e = estimate({"HR": values}, Bootstrap(resamples=4000), "seqrec")["HR"]
    half = 1.96 * np.sqrt(0.25 * 0.75 / 400)
    assert e["lo"] == pytest.approx(0.25 - half, abs=0.006) and e["hi"] == pytest.approx(0.25 + half, abs=0.006)


def test_metrics_share_the_resampled_users_and_the_seed_fixes_them():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 50).astype(float)
    out = estimate({"a": a, "twice": 2 * a, "flipped": 1 - a}, Bootstrap(resamples=500, seed=1), "+c")
    assert out["twice"]["lo"] == pytest.approx(2 * out["a"]["lo"]) and out["twice"]["hi"] == pytest.approx(
        2 * out["a"]["hi"])
    assert out["flipped"]["lo"] == pytest.approx(1 - out["a"]["hi"])  # the same resamples, mirrored
    again = estimate({"a": a}, Bootstrap(resamples=500, seed=1), "+c")["a"]
    assert again == out["a"]
    others = [estimate({"a": a}, Bootstrap(resamples=500, seed=s), name)["a"] for s, name in ((2, "+c"), (1, "-c"))]
    assert all(o != out["a"] for o in others)  # another seed or task draws other users


def test_bootstrap_needs_resamples_and_samples():
    with pytest.raises(ValueError, match="resamples must be >= 1"):
        Bootstrap(resamples=0)
    with pytest.raises(ValueError, match="at least one"):
        estimate({"m": np.zeros(0)}, Bootstrap(), "t")
