import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reclm_jax.core.controls import Control, quota
from reference_rewards import (
    control_scores,
    discounted_scores,
    illegal_items,
    list_control_score,
    preference_scores,
    sample_rewards,
)

from reclm_jax.eval.rewards import RewardOptions, batch_rewards, ideal_dcg, item_rewards, list_reward

L3, L4, L5 = math.log2(3), math.log2(4), math.log2(5)


def test_illegal_covers_each_case_of_eq1():
    # unknown, fine, repeat of 5, in history (9), fine, beyond k = 5 (position 6)
    assert illegal_items([-1, 5, 5, 9, 7, 8], k=5, history=[9, 1]).tolist() == [True, False, True, True, False, True]
    # a repeat of an illegal (history) item is still illegal; the first of a repeated pair is not
    assert illegal_items([9, 9, 3, 3], k=10, history=[9]).tolist() == [True, True, False, True]


def test_eq1_scores_and_eq3_discount_by_hand():
    ids = [5, 7, -1, 5, 9, 3, 8]
    illegal = illegal_items(ids, k=6, history=[9])
    scores = preference_scores(ids, illegal, target=7, ranks=[0, 12, -1, 0, 1, 2, 4])
    np.testing.assert_allclose(scores, [1 / L3, 1.0, -1, -1, -1, 1 / L5, -1])
    star = discounted_scores(scores, illegal)
    np.testing.assert_allclose(star, [1 / L3 / 1.0, 1.0 / L3, -1, -1, -1, 1 / L5 / math.log2(7), -1])
    np.testing.assert_allclose(item_rewards(scores, [0.0, 1.0, -1, -1, -1, 0.5, -1]),
                               [0.5 / L3, 1.0, -1, -1, -1, 0.5 / L5 + 0.25, -1])


def ctl(flags, kind, m=0.0, k=5, illegal=None, scores=None):
    illegal = [False] * len(flags) if illegal is None else illegal
    scores = [0.0] * len(flags) if scores is None else scores
    return control_scores(np.array(scores), illegal, flags, k, Control(kind, m)).tolist()


IN, OUT = True, False


def test_algorithm1_illegal_items_score_minus_one_and_are_not_counted():
    # "<=" with k=5, m=0.4 (k*m = 2): the illegal in-items do not use up the quota
    assert ctl([IN, IN, IN, IN], "<=", 0.4, illegal=[True, False, True, False]) == [-1.0, 0.5, -1.0, 0.0]


def test_algorithm1_seq_and_category_lines_8_to_10():
    assert ctl([IN, OUT], "seq", scores=[0.7, 0.2]) == [0.7, 0.2]
    assert ctl([IN, OUT], "+c") == [1.0, 0.0]
    assert ctl([IN, OUT], "-c") == [0.0, 1.0]


def test_algorithm1_at_most_lines_11_to_15():
    # k=5, m=0.4: k*m = 2, k - k*m = 3
    # in, Count_in=1 < 2 -> 0.5 (line 14); in, Count_in=2 -> 0 (line 15); in -> 0; out -> 1 (line 13) twice
    assert ctl([IN, IN, IN, OUT, OUT], "<=", 0.4) == [0.5, 0.0, 0.0, 1.0, 1.0]
    # out x3 -> 1 (Count_out 1..3 not > 3); then Count_out = 4 > 3 -> 0.5 (line 12), also for an in item
    assert ctl([OUT, OUT, OUT, OUT, IN], "<=", 0.4) == [1.0, 1.0, 1.0, 0.5, 0.5]


def test_algorithm1_at_least_lines_16_to_20():
    # in, Count_in=1,2 -> 1 (line 18); Count_in = 3 > 2 -> 0.5 (line 17) for the rest
    assert ctl([IN, IN, IN, OUT, OUT], ">=", 0.4) == [1.0, 1.0, 0.5, 0.5, 0.5]
    # out, Count_out=1,2 < 3 -> 0.5 (line 19); Count_out=3,4 -> 0 (line 20); in -> 1 (line 18)
    assert ctl([OUT, OUT, OUT, OUT, IN], ">=", 0.4) == [0.5, 0.5, 0.0, 0.0, 1.0]


def test_algorithm1_about_lines_21_to_27():
    # in, Count_in=1,2 <= 2 -> 1 (line 23); Count_in=3 -> 0 (line 24); out with Count_in >= 2 -> 1 (line 25)
    assert ctl([IN, IN, IN, OUT, OUT], "~", 0.4) == [1.0, 1.0, 0.0, 1.0, 1.0]
    # out, Count_in=0 < 2, Count_out=1..3 <= 3 -> 0.5 (line 26); Count_out=4 -> 0 (line 27); in -> 1
    assert ctl([OUT, OUT, OUT, OUT, IN], "~", 0.4) == [0.5, 0.5, 0.5, 0.0, 1.0]


def test_algorithm1_quota_is_exact_for_10_times_0_3():
    # 10 * 0.3 is 3.0000000000000004 in floats: without rounding "Count_in >= k*m" fails at 3 in-items
    assert quota(10, 0.3) == 3.0
    assert ctl([IN, IN, IN, OUT], "~", 0.3, k=10)[-1] == 1.0
    assert ctl([IN, IN, IN], ">=", 0.3, k=10) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("kind, m, count_in, count_out, expected", [
    ("+c", 0.0, 3, 2, 1 / math.log2(5 - 3 + 2)),
    ("+c", 0.0, 5, 0, 1.0),
    ("-c", 0.0, 0, 5, 1.0),
    ("-c", 0.0, 1, 2, 1 / math.log2(5 - 2 + 2)),
    ("<=", 0.4, 3, 2, 1 / L3),
    ("<=", 0.4, 1, 4, 1.0),
    (">=", 0.4, 1, 4, 1 / L3),
    (">=", 0.4, 4, 1, 1.0),
    ("~", 0.4, 0, 5, 1 / L4),
    ("~", 0.4, 2, 3, 1.0),
    ("~", 0.4, 5, 0, 1 / L5),
])
def test_eq4_control_cases_by_hand(kind, m, count_in, count_out, expected):
    assert list_control_score(-3.0, count_in, count_out, 5, Control(kind, m)) == pytest.approx(expected)


def test_eq4_seq_is_the_discounted_sum():
    assert list_control_score(-2.5, 3, 2, 5, Control()) == -2.5


def test_eq5_scale_defaults_to_ten():
    assert list_reward(0.4, 1.0) == pytest.approx(10 * (0.2 + 0.5))
    assert list_reward(0.4, 1.0, scale=1.0) == pytest.approx(0.7)


def test_sample_rewards_seq_by_hand():
    ids, hist, target, ranks = [5, 7, -1, 5, 9, 3, 8], [9], 7, [0, 12, 0, 0, 1, 2, 4]
    r_item, r_list = sample_rewards(ids, 6, hist, target, ranks, [False] * 7, Control())
    # I_0: Scores^ctl = Scores, so R_item = Scores; Score_list^ctl = sum(Scores*), R_list = sum(Scores*)
    np.testing.assert_allclose(r_item, [1 / L3, 1.0, -1, -1, -1, 1 / L5, -1])
    total = 1 / L3 + 1 / L3 - 4 + 1 / L5 / math.log2(7)
    assert r_list == pytest.approx(10 * total)
    _, r_idcg = sample_rewards(ids, 6, hist, target, ranks, [False] * 7, Control(), RewardOptions(list_sum="idcg"))
    assert r_idcg == pytest.approx(10 * total / sum(1 / math.log2(i + 2) ** 2 for i in range(6)))


def test_sample_rewards_plus_c_by_hand():
    # k=3: target in C, item 4 (rank 1) not in C, item 6 (rank 0) in C
    r_item, r_list = sample_rewards([2, 4, 6], 3, [], 2, [5, 1, 0], [True, False, True], Control("+c"))
    np.testing.assert_allclose(r_item, [0.5 * 1 + 0.5, 0.5 / L4 + 0.0, 0.5 / L3 + 0.5])
    star = 1.0 + 1 / L4 / L3 + 1 / L3 / L4
    assert r_list == pytest.approx(10 * (0.5 * star + 0.5 / math.log2(3 - 2 + 2)))


def test_control_weight_one_rewards_only_the_instruction():
    """-C, k = 10, ten legal items at teacher rank 50 (target not listed). With w = 1, R_item is Scores^ctl
    (+1 out of C, 0 in C, -1 illegal) and R_list is 10 * 1/log2(miss + 2), miss = 10 - Count_out."""
    def reward(ids, n_in, w):
        r_item, r_list = sample_rewards(ids, 10, [1, 2], 999, [50] * 10, [i < n_in for i in range(10)],
                                        Control("-c"), RewardOptions(control_weight=w))
        return r_item.sum() + r_list
    legal = list(range(100, 110))
    assert reward(legal, 0, 1.0) == pytest.approx(10 + 10)
    assert reward(legal, 4, 1.0) == pytest.approx(6 + 10 / math.log2(6))
    assert reward(legal, 3, 1.0) == pytest.approx(7 + 10 / math.log2(5))
    assert reward(legal[:9] + [-1], 0, 1.0) == pytest.approx(9 - 1 + 10 / math.log2(3))
    # the paper's weights: one C item fewer is worth 0.72, one invented title fewer 8.69
    assert reward(legal, 3, 0.5) - reward(legal, 4, 0.5) == pytest.approx(0.72, abs=0.01)
    assert reward(legal, 0, 0.5) - reward(legal[:9] + [-1], 0, 0.5) == pytest.approx(8.69, abs=0.01)


def test_control_weight_does_not_change_i0():
    args = ([5, 7, -1, 5, 9, 3, 8], 6, [9], 7, [0, 12, 0, 0, 1, 2, 4], [False] * 7, Control())
    paper_item, paper_list = sample_rewards(*args)
    for w in (0.0, 1.0):
        r_item, r_list = sample_rewards(*args, RewardOptions(control_weight=w))
        np.testing.assert_allclose(r_item, paper_item)
        assert r_list == pytest.approx(paper_list)


def test_v3_switch_drops_item_rewards_only():
    args = ([2, 4, 6], 3, [], 2, [5, 1, 0], [True, False, True], Control("+c"))
    full_item, full_list = sample_rewards(*args)
    r_item, r_list = sample_rewards(*args, RewardOptions(item_level=False))
    assert r_item.tolist() == [0.0, 0.0, 0.0] and r_list == full_list and full_item.any()


def test_empty_output_gets_only_the_list_reward():
    r_item, r_list = sample_rewards([], 4, [1], 2, [], [], Control("-c"))
    assert r_item.shape == (0,)
    assert r_list == pytest.approx(10 * 0.5 / math.log2(4 + 2))  # sum(Scores*) = 0, Count_out = 0


def test_ideal_dcg():
    np.testing.assert_allclose(ideal_dcg(np.array([1, 2, 0])), [1.0, 1 + 1 / L3**2, 0.0])


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="k="):
        sample_rewards([1], 0, [], 1, [0], [True], Control())
    with pytest.raises(ValueError, match="in_target"):
        sample_rewards([1, 2], 3, [], 1, [0, 1], [True], Control())
    with pytest.raises(ValueError, match="ranks"):
        sample_rewards([1, 2], 3, [], 1, [0], [True, False], Control())
    with pytest.raises(ValueError, match="ranks"):
        sample_rewards([1, 2], 3, [], 1, [0, -1], [True, False], Control())
    with pytest.raises(ValueError, match="list_sum"):
        RewardOptions(list_sum="dcg")
    with pytest.raises(ValueError, match="control_weight"):
        RewardOptions(control_weight=1.5)
    with pytest.raises(ValueError, match="kind"):
        Control("+C")
    with pytest.raises(ValueError, match="fraction"):
        Control("<=", 30)
    with pytest.raises(ValueError, match="no proportion"):
        Control("+c", 0.3)


# ---- properties ------------------------------------------------------------------------------------

CONTROLS = st.one_of(
    st.sampled_from([Control("seq"), Control("+c"), Control("-c")]),
    st.builds(Control, st.sampled_from(["<=", ">=", "~"]), st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0])),
)


@st.composite
def samples(draw):
    n = draw(st.integers(0, 14))
    return dict(
        item_ids=draw(st.lists(st.integers(-1, 12), min_size=n, max_size=n)),
        k=draw(st.integers(1, 12)),
        history=draw(st.lists(st.integers(0, 12), max_size=5)),
        target=draw(st.integers(0, 12)),
        ranks=draw(st.lists(st.integers(0, 3000), min_size=n, max_size=n)),
        in_target=draw(st.lists(st.booleans(), min_size=n, max_size=n)),
        control=draw(CONTROLS),
    )


@settings(max_examples=300, deadline=None)
@given(samples(), st.sampled_from(["paper", "idcg"]))
def test_rewards_stay_within_their_derived_bounds(s, list_sum):
    opts = RewardOptions(list_scale=1.0, list_sum=list_sum)
    r_item, r_list = sample_rewards(**s, options=opts)
    n, k = len(s["item_ids"]), s["k"]
    assert np.all((r_item >= -1) & (r_item <= 1))
    d_k = sum(1 / math.log2(p + 1) for p in range(1, k + 1))
    norm = ideal_dcg(k) if list_sum == "idcg" else 1.0
    lo_sum, hi_sum = -n / norm, d_k / norm
    if s["control"].kind == "seq":
        lo, hi = lo_sum, hi_sum
    else:
        lo, hi = 0.5 * lo_sum + 0.5 / math.log2(k + 2), 0.5 * hi_sum + 0.5
    assert lo - 1e-9 <= r_list <= hi + 1e-9


@settings(max_examples=200, deadline=None)
@given(st.lists(samples(), min_size=1, max_size=8), st.booleans(), st.sampled_from(["paper", "idcg"]),
       st.sampled_from([0.5, 0.0, 0.8, 1.0]))
def test_batch_equals_per_sample(batch, item_level, list_sum, control_weight):
    opts = RewardOptions(item_level=item_level, list_sum=list_sum, control_weight=control_weight)
    cols = {key: [s[key] for s in batch] for key in batch[0]}
    r_item, r_list = batch_rewards(cols["item_ids"], cols["k"], cols["history"], cols["target"], cols["ranks"],
                                   cols["in_target"], cols["control"], opts)
    for b, s in enumerate(batch):
        one_item, one_list = sample_rewards(**s, options=opts)
        n = len(s["item_ids"])
        np.testing.assert_allclose(r_item[b, :n], one_item)
        assert not r_item[b, n:].any()
        assert r_list[b] == pytest.approx(one_list)


def satisfies(control, count_in, k):
    q = quota(k, control.m)
    return {"+c": count_in == k, "-c": count_in == 0, "<=": count_in <= q, ">=": count_in >= q,
            "~": abs(count_in - q) <= 1}[control.kind]


@settings(max_examples=200, deadline=None)
@given(CONTROLS.filter(lambda c: c.kind != "seq"), st.integers(1, 12), st.permutations(range(12)))
def test_a_list_that_satisfies_its_control_never_scores_lower_on_control(control, k, order):
    """Every count of in-C items among k legal, distinct items (in a random order); "satisfies" is the
    metric's rule (all / none in C, or CPA = 100). All items have the same Scores, so R_list differs only
    by 0.5 * Score_list^ctl."""
    positions = [p for p in order if p < k]
    rewards = {True: [], False: []}
    for n_in in range(k + 1):
        flags = [p in positions[:n_in] for p in range(k)]
        _, r_list = sample_rewards(list(range(k)), k, [], -1, [0] * k, flags, control, RewardOptions(list_scale=1.0))
        rewards[satisfies(control, n_in, k)].append(r_list)
    assert rewards[True]  # some list can satisfy every control
    assert min(rewards[True]) >= max(rewards[False], default=-np.inf)
    if float(quota(k, control.m)).is_integer():  # then some list meets the control exactly: Score_list^ctl = 1
        assert max(rewards[True]) == pytest.approx(0.5 * sum(1 / L3 / math.log2(p + 2) for p in range(k)) + 0.5)


def test_batch_rejects_ragged_mismatches():
    with pytest.raises(ValueError, match="as long as its item_ids"):
        batch_rewards([[1, 2], [3]], 5, [[], []], [1, 1], [[0, 1], [0, 0]], [[True, False], [True]],
                      [Control(), Control()])
    with pytest.raises(ValueError, match="as long as its item_ids"):
        batch_rewards([[1, 2]], 5, [[]], [1], [[0, 1]], [[True, False]], [Control(), Control()])
