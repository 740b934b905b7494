"""Instruction data: label construction (hand-computed cases), every sample obeys its own instruction,
determinism, the fixed valid/test sets, templates and the config."""

from __future__ import annotations

import numpy as np
import pytest
from reference_metrics import cpa
from tasks_helpers import tiny_dataset, tiny_teacher

from reclm_jax.core.controls import Control
from reclm_jax.tasks import labels as L
from reclm_jax.tasks.config import TaskConfig
from reclm_jax.tasks.evaluation import TEST_TASKS, VALID_TASKS, build_eval_set
from reclm_jax.tasks.preview import PREVIEW_TASKS, preview
from reclm_jax.tasks.samples import TaskContext, train_examples
from reclm_jax.tasks.templates import load_templates
from reclm_jax.tasks.training import rl_prompts, training_samples


@pytest.fixture(scope="module")
def data():
    ds = tiny_dataset()
    return ds, tiny_teacher(ds)


def ctx_for(data, **overrides) -> TaskContext:
    ds, teacher = data
    return TaskContext(ds, teacher, TaskConfig(**{"sharegpt_ratio": 0.0, **overrides}))


# ---- pure label functions ---------------------------------------------------------------------------
def test_fill_skips_missing_banned_and_repeats():
    assert L.fill([5], [5, -1, 3, 7, 3, 9], 3, banned=[7]) == [5, 3, 9]
    assert L.fill([], [-1, -1], 4, banned=[]) == []


def test_seqrec_label_target_first_then_teacher():
    assert L.seqrec_label(4, [9, 4, 2, 8], 3, history=[2]) == [4, 9, 8]


def test_control_label_target_leads_only_when_it_satisfies():
    assert L.control_label(4, True, [9, 7, 4], 2, history=[]) == [4, 9]
    assert L.control_label(4, False, [9, 7, 6], 2, history=[]) == [9, 7]


@pytest.mark.parametrize(
    "kind,k,m,lo,hi,allowed",
    [
        ("<=", 10, 0.2, 0, 10, {0, 1, 2}),
        (">=", 10, 0.3, 0, 10, set(range(3, 11))),
        ("~", 10, 0.3, 0, 10, {2, 3, 4}),
        ("~", 5, 0.5, 0, 5, {2, 3}),  # k*m = 2.5: |n - 2.5| <= 1
        (">=", 10, 0.3, 0, 2, set()),  # the data has only 2 items of C left
        ("<=", 4, 0.1, 1, 4, set()),  # at least one item must be in C but <= 10 % of 4 allows none
    ],
)
def test_proportion_count_matches_the_cpa_definition(kind, k, m, lo, hi, allowed):
    rng = np.random.default_rng(0)
    seen = {L.proportion_count(kind, k, m, lo, hi, rng) for _ in range(200)}
    assert seen == (allowed or {None})


def test_proportion_label_counts_and_target_first():
    rng = np.random.default_rng(0)
    label = L.proportion_label(1, True, [1, 2, 3, 4], [10, 11, 12, 13], n=2, k=5, history=[3], rng=rng)
    assert label[0] == 1 and sorted(label) == [1, 2, 10, 11, 12]
    # target outside C, no room outside C: no target, all items from C
    label = L.proportion_label(10, False, [1, 2, 3], [10, 11], n=3, k=3, history=[], rng=rng)
    assert sorted(label) == [1, 2, 3]


def test_negative_category_most_frequent_not_the_targets():
    cats = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1]], bool)  # items x categories
    rng = np.random.default_rng(0)
    # top list: items 1, 2, 3 -> counts (1, 3, 1); the target (item 0) is in category 0
    assert L.negative_category([1, 2, 3, -1], 0, cats, rng) == 1
    # target item 2 is in category 1, so the best left is a tie of 0 and 2 (1 each) -> either
    assert {L.negative_category([1, 3], 2, cats, np.random.default_rng(s)) for s in range(20)} == {0, 2}
    assert L.negative_category([1, 2, 3], 0, cats, rng, skip=(1,)) == 2


def test_candidates_hold_the_label_and_avoid_banned():
    rng = np.random.default_rng(0)
    c = L.candidates([3, 4], num_items=20, size=10, banned=[5, 6], rng=rng)
    assert len(c) == 10 and len(set(c)) == 10 and {3, 4} <= set(c) and not {5, 6} & set(c)


# ---- training samples obey their instructions ------------------------------------------------------
def in_c(ds, items, c):
    return ds.category_matrix[np.asarray(items, dtype=np.int64), c]


def check_common(ds, s):
    assert len(s.label) == s.k and len(set(s.label)) == s.k
    assert not set(s.label) & set(s.history)
    assert len(s.history) <= 10
    lines = s.response.split("\n")
    assert lines == [f"{i + 1}. {ds.titles[j]}" for i, j in enumerate(s.label)]
    assert f"with {s.k} different items" in s.prompt


def test_training_samples_satisfy_their_instructions(data):
    ds, _ = data
    ctx = ctx_for(data)
    samples = training_samples(ctx, epoch=0)
    tasks = {s.task for s in samples}
    assert tasks == {"seqrec", "control", "proportion", "search", "category"}
    for s in samples:
        if s.task == "category":
            assert s.response.split("\n") == [f"{i + 1}. {c}" for i, c in enumerate(ds.item_categories[s.target])]
            continue
        check_common(ds, s)
        control, c = s.controls[0]
        if s.task != "search":
            assert s.prompt.count("'Movie ") >= len(s.history)
        if control.kind == "seq":
            assert s.label[0] == s.target and 1 <= s.k <= 10
        elif control.kind == "+c":
            assert in_c(ds, s.label, c).all()  # k never exceeds the items of C outside the history
            assert (s.label[0] == s.target) == bool(ds.category_matrix[s.target, c])
            assert f"'{ds.categories[c]}'" in s.prompt
        elif control.kind == "-c":
            assert not in_c(ds, s.label, c).any()
            assert s.label[0] == s.target  # -C never takes a category of the target
        else:
            assert cpa(list(s.label), in_c(ds, s.label, c), s.k, control) == 100.0
            assert f"{100 * control.m:g}%" in s.prompt
            if s.target in s.label:
                assert s.label[0] == s.target


def test_search_labels_are_in_the_category_with_the_item_first(data):
    ds, _ = data
    searches = [s for s in training_samples(ctx_for(data, search_max_k=4), 0) if s.task == "search"]
    assert searches and max(s.k for s in searches) > 1
    for s in searches:
        assert s.label[0] == s.target and in_c(ds, s.label, s.category).all() and len(set(s.label)) == s.k


def test_epoch_counts_follow_table_8_and_sharegpt_ratio(data, tmp_path):
    from reclm_jax.tasks.sharegpt import read_sharegpt

    path = tmp_path / "sg.json"
    path.write_text('[{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]')
    ds, _ = data
    ctx = ctx_for(data, sharegpt_ratio=0.5, sharegpt_path=str(path))
    samples = training_samples(ctx, 0, read_sharegpt(path, cache_dir=tmp_path / "cache"))
    count = {t: sum(s.task == t for s in samples) for t in ("seqrec", "control", "proportion", "sharegpt")}
    users = sum(len(ds.train_sequence(u)) >= 2 for u in range(ds.num_users))
    assert count["seqrec"] == users and count["control"] >= users - 2 and count["proportion"] >= users - 2
    items = sum(s.task in ("search", "category") for s in samples)
    assert items == sum(bool(c) for c in ds.item_categories)
    assert count["sharegpt"] == round(0.5 * (len(samples) - count["sharegpt"]))


def test_same_seed_same_samples_other_seed_or_epoch_differs(data):
    a = training_samples(ctx_for(data, seed=3), 1)
    assert a == training_samples(ctx_for(data, seed=3), 1)
    assert a != training_samples(ctx_for(data, seed=4), 1)
    assert a != training_samples(ctx_for(data, seed=3), 2)


def test_v1_is_seqrec_only_and_palr_labels_are_true_next_items(data):
    ds, _ = data
    v1 = training_samples(ctx_for(data, task_set="v1"), 0)
    assert {s.task for s in v1} == {"seqrec"}
    palr = training_samples(TaskContext(ds, None, TaskConfig(task_set="v1", labels="history", sharegpt_ratio=0)), 0)
    for s in palr:
        seq = ds.train_sequence(s.user).tolist()
        t = seq.index(s.target)
        assert list(s.label) == seq[t: t + s.k]  # the target, then what the user really took next
        assert list(s.history) == seq[t - len(s.history): t]


def test_train_examples_window_the_train_part(data):
    ds, _ = data
    for ex in train_examples(ds, 10, np.random.default_rng(0)):
        seq = ds.train_sequence(ex.user).tolist()
        t = seq.index(ex.target)
        assert 1 <= len(ex.history) <= 10 and list(ex.history) == seq[t - len(ex.history): t]


def test_rl_prompts_cover_every_kind_with_k_in_range(data):
    prompts = rl_prompts(ctx_for(data), 0)
    assert {s.control.kind for s in prompts} == {"seq", "+c", "-c", "<=", ">=", "~"}
    assert all(6 <= s.k <= 10 and s.response == "" and s.target >= 0 for s in prompts)
    assert prompts == rl_prompts(ctx_for(data), 0)
    only = rl_prompts(ctx_for(data, rl_kinds=("-c", "~")), 0)
    assert {s.control.kind for s in only} == {"-c", "~"} and len(only) == len(prompts)


# ---- fixed valid / test sets ------------------------------------------------------------------------
def test_test_set_targets_come_from_the_data_and_teacher(data):
    ds, teacher = data
    ctx = ctx_for(data)
    ev = build_eval_set(ctx, "test")
    assert set(ev.tasks) == set(TEST_TASKS)
    top = teacher.topk([ds.test_example(u)[0][-10:] for u in range(ds.num_users)], 10)
    for name, samples in ev.tasks.items():
        assert len(samples) + ev.skipped[name] == ds.num_users
        for s in samples:
            history, target = ds.test_example(s.user)
            assert s.target == target and list(s.history) == history[-10:].tolist()
            assert s.k == 10 or (name == "item_count" and 11 <= s.k <= 15)
            kinds = [c.kind for c, _ in s.controls]
            for (kind, m), (control, c) in zip(TEST_TASKS[name], s.controls):
                assert control.kind == kind and control.m == m
                if kind in ("+c", "~", ">="):  # flat genres: the target's rarest one
                    assert ds.category_matrix[target, c]
                    sizes = ds.category_matrix.sum(0)
                    assert sizes[c] == sizes[ds.category_matrix[target]].min()
                elif kind in ("-c", "<="):
                    assert not ds.category_matrix[target, c]
                    counts = ds.category_matrix[top[s.user]].sum(0)
                    counts[ds.category_matrix[target]] = -1
                    if kinds == ["<=", "-c"] and control.kind == "-c":
                        counts[s.controls[0][1]] = -1  # C2 is the runner-up after C1
                    assert counts[c] == counts.max()
    # +C, ~ and >= share the category; -C and <= share theirs
    for a, b in (("+c", "~30%"), ("+c", ">=30%"), ("-c", "<=20%"), ("-c", "c1<=20%&-c2")):
        assert [s.category for s in ev.tasks[a]] == [s.category for s in ev.tasks[b]]
    assert ev.tasks == build_eval_set(ctx, "test").tasks  # fixed by the seed


def test_most_specific_category_by_hand():
    # items x categories: 0 holds every item, 1 items 0-2, 2 items 0-1, 3 and 4 item 3 only
    m = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 1, 1]], bool)
    rng = np.random.default_rng(0)
    names = ["All", "B", "C", "Dd", "Ee"]
    assert L.most_specific_category(0, m, names, rng) == 2 and L.most_specific_category(2, m, names, rng) == 1
    assert {L.most_specific_category(3, m, names, rng) for _ in range(40)} == {3, 4}  # a tie is drawn at random
    assert L.most_specific_category(3, m, ["All", "B", "C", "D", "D, E"], rng) == 4  # then the longer name
    assert L.most_specific_category(0, np.zeros((4, 2), bool), ["x", "y"], rng) is None


def test_plus_c_test_category_is_the_deepest_of_a_hierarchy():
    """Amazon-style categories: every prefix of the path is a category, so a broad ancestor ("Genre")
    holds most items; +C, ~ and >= must ask for the target's deepest category, as the official code."""
    from reclm_jax.data.amazon import category_prefixes
    from reclm_jax.data.schema import Dataset

    paths = [["Movies & TV", "Genre", "Comedy"], ["Movies & TV", "Genre", "Comedy", "Slapstick"],
             ["Movies & TV", "Genre", "Drama"], ["Movies & TV", "Genre", "Drama", "Legal"],
             ["Movies & TV", "Studio", "Pixar"]]
    flat = tiny_dataset()
    item_categories = [category_prefixes(paths[i % len(paths)]) for i in range(flat.num_items)]
    assert item_categories[1] == ("Genre", "Genre, Comedy", "Genre, Comedy, Slapstick")
    ds = Dataset("hierarchy", flat.titles, item_categories, flat.sequences, flat.user_names, flat.item_names)
    ev = build_eval_set(TaskContext(ds, tiny_teacher(ds), TaskConfig(sharegpt_ratio=0.0)), "test")
    for name in ("+c", "~30%", ">=30%", "+c1&-c2"):
        assert len(ev.tasks[name]) == ds.num_users
        for s in ev.tasks[name]:
            assert ds.categories[s.controls[0][1]] == ", ".join(paths[s.target % len(paths)][1:])


def test_valid_set_has_the_papers_four_tasks_for_a_seeded_user_subset(data):
    ds, _ = data
    ev = build_eval_set(ctx_for(data, valid_users=16), "valid")
    assert set(ev.tasks) == set(VALID_TASKS)
    users = [s.user for s in ev.tasks["seqrec"]]
    assert len(users) == 16 and users == sorted(set(users))
    for s in ev.tasks["~50%"]:
        assert s.control == Control("~", 0.5) and "approximately 50%" in s.prompt
        assert s.target == ds.valid_example(s.user)[1]


# ---- templates, config, preview ---------------------------------------------------------------------
def test_templates_are_the_papers_listings():
    t = load_templates()
    assert t.prompt("seqrec", "generate", history="'A', 'B'", item_count=3, candidate_titles="") == (
        "You are an expert recommender engine. You need to generate a recommendation list considering user's "
        "preference from historical interactions. The historical interactions are provided as follows: 'A', 'B'. "
        "You need to generate a recommendation list with 3 different items.")
    assert t.proportion_intention("<=", "Drama", 0.2) == (
        "In the recommendation list, the proportion of 'Drama' items should be less than or equal to 20%")
    assert len(t.intentions("positive")) == 6 and len(t.intentions("negative")) == 6
    assert t.response(["A", "B"]) == "1. A\n2. B"
    assert t.category_question("Heat") == 'What is the category of "Heat"?'


def test_templates_with_unknown_placeholders_are_rejected(tmp_path):
    import yaml

    from reclm_jax.tasks.templates import TEMPLATES_FILE

    raw = yaml.safe_load(TEMPLATES_FILE.read_text())
    raw["seqrec"]["generate"] += " {histroy}"
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="seqrec.*histroy"):
        load_templates(path)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"task_set": "v2", "labels": "history", "sharegpt_ratio": 0}, "task_set=v1"),
        ({"buckets": (128, 256)}, "buckets"),
        ({"proportions": (0.0, 0.5)}, "proportions"),
        ({"rl_k": (7, 6)}, "rl_k"),
        ({"rl_kinds": ("-c", "nope")}, "rl_kinds"),
        ({"rl_kinds": ()}, "rl_kinds"),
        ({"max_length": 512, "pack_length": 256}, "pack_length"),
        ({"seed": -1}, "seed"),
        ({"min_k": 6, "max_k": 5}, "min_k"),
        ({"task_set": "v1", "train_tasks": ("seqrec", "control")}, "train_tasks"),
        ({"train_tasks": ()}, "train_tasks"),
    ],
)
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        TaskConfig(**overrides)


def test_narrowed_training_data_keeps_to_its_tasks_forms_and_k(data):
    ctx = ctx_for(data, train_tasks=("seqrec", "control"), select_form=False, min_k=3, max_k=4)
    samples = training_samples(ctx, 0)
    assert {s.task for s in samples} == {"seqrec", "control"}
    assert {s.k for s in samples} == {3, 4}
    assert all(len(s.label) == s.k for s in samples)
    assert not any("candidate items" in s.prompt for s in samples)
    assert any("candidate items" in s.prompt for s in training_samples(ctx_for(data), 0))  # the default has them


def test_training_with_sharegpt_needs_its_file():
    assert TaskConfig().task_set == "v2"  # the defaults are valid: evaluation and RL need no ShareGPT file
    with pytest.raises(ValueError, match="sharegpt_path"):
        TaskConfig().check_training()
    TaskConfig(sharegpt_ratio=0).check_training()
    TaskConfig(task_set="v1").check_training()


def test_preview_renders_each_task(data):
    ds, teacher = data
    for task in PREVIEW_TASKS:
        text = preview(ds, teacher, task, 2, seed=0)
        assert text.count("--- user ---") == 2, task
        assert "You are an expert recommender engine" in text or "What is the category of" in text
    with pytest.raises(ValueError, match="unknown task"):
        preview(ds, teacher, "nope", 2, seed=0)
