"""SASRec teacher: model shape and causality, ranking math, query constraints, training and checkpoints."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reclm_jax import config as config_lib
from reclm_jax.data.schema import Dataset
from reclm_jax.teacher import checkpoint
from reclm_jax.teacher.config import EvalConfig, ModelConfig, TeacherConfig, TrainConfig
from reclm_jax.teacher.evaluate import FULL, evaluate_split, sampled_candidates, split_examples
from reclm_jax.teacher.metrics import hit_ndcg, ranks_among
from reclm_jax.teacher.query import Teacher, build_model, encode_histories
from reclm_jax.teacher.train import bce_loss, softmax_loss, train_teacher

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "teacher"
TINY = TeacherConfig(
    seed=3,
    model=ModelConfig(max_len=8, width=16, num_blocks=2, num_heads=2, ffn_dim=24, dropout=0.1, length_buckets=2),
    train=TrainConfig(loss="softmax", batch_size=32, max_epochs=2, patience=5),
    eval=EvalConfig(batch_size=16, num_negatives=10),
    optim=replace(TeacherConfig().optim, lr=1e-2),
)


def chain_dataset(num_items=30, users=200, seed=0) -> Dataset:
    """Users walk a fixed random permutation: the next item is a function of the current one."""
    rng = np.random.default_rng(seed)
    nxt = rng.permutation(num_items)
    seqs = []
    for _ in range(users):
        s = [int(rng.integers(num_items))]
        for _ in range(int(rng.integers(5, 12))):
            s.append(int(nxt[s[-1]]))
        seqs.append(np.array(s, np.int32))
    return Dataset("chain", [f"item {i}" for i in range(num_items)], [("c",)] * num_items, seqs,
                   [f"u{u}" for u in range(users)], [str(i) for i in range(num_items)])


def random_teacher(num_items=12, cfg=TINY) -> Teacher:
    _, state = nnx.split(build_model(cfg, num_items))
    return Teacher(cfg, num_items, nnx.to_pure_dict(state))


# ---- configs ---------------------------------------------------------------------------------------
def test_presets_hold_the_issue_settings():
    paper = config_lib.load(TeacherConfig, CONFIGS / "paper.yaml")
    m, t = paper.model, paper.train
    assert (m.num_blocks, m.num_heads, m.width, m.ffn_dim, m.dropout, m.max_len) == (2, 2, 128, 256, 0.5, 10)
    assert (m.activation, m.layer_norm_eps, t.loss, t.batch_size, t.patience) == ("gelu", 1e-12, "softmax", 1024, 10)
    assert (paper.optim.lr, paper.optim.b2) == (1e-3, 0.999)
    sas = config_lib.load(TeacherConfig, CONFIGS / "sasrec-ml1m.yaml")
    m, t = sas.model, sas.train
    assert (m.width, m.num_blocks, m.num_heads, m.max_len, m.dropout) == (50, 2, 1, 200, 0.2)
    assert (t.loss, t.batch_size, sas.optim.lr, sas.optim.b2) == ("bce", 128, 1e-3, 0.98)


def test_bad_config_values_name_the_field():
    with pytest.raises(config_lib.ConfigError, match="model.width"):
        config_lib.load(TeacherConfig, None, ["model.width=50", "model.num_heads=3"])
    with pytest.raises(config_lib.ConfigError, match="train.loss"):
        config_lib.load(TeacherConfig, None, ["train.loss=hinge"])


def test_padded_length_buckets():
    m = ModelConfig(max_len=200, length_buckets=4)
    assert [m.padded_length(n) for n in (0, 1, 50, 51, 150, 151, 200, 999)] == [50, 50, 50, 100, 150, 200, 200, 200]


# ---- model -----------------------------------------------------------------------------------------
@nnx.jit
def forward(model, tokens):
    return model(tokens)


def test_shapes_and_causality():
    model = build_model(TINY, 12)
    tokens = jnp.array([[0, 0, 3, 5, 7, 2, 9, 4], [1, 2, 3, 4, 5, 6, 7, 8]])
    hidden = forward(model, tokens)
    assert hidden.shape == (2, 8, 16) and model.item_scores(hidden).shape == (2, 8, 12)
    changed = forward(model, tokens.at[:, 5].set(11))
    np.testing.assert_array_equal(np.asarray(hidden[:, :5]), np.asarray(changed[:, :5]))
    assert not np.allclose(hidden[:, 5:], changed[:, 5:])


def test_dropout_only_in_training_mode():
    model = build_model(TINY, 12)
    tokens = jnp.array([[0, 0, 3, 5, 7, 2, 9, 4], [1, 2, 3, 4, 5, 6, 7, 8]])
    train_mode = nnx.jit(lambda m, t: m(t, deterministic=False, rngs=nnx.Rngs(dropout=0)))
    np.testing.assert_array_equal(forward(model, tokens), forward(model, tokens))
    assert not np.allclose(forward(model, tokens), train_mode(model, tokens))


def test_padding_to_a_shorter_bucket_gives_the_same_scores():
    model = build_model(TINY, 12)
    short, _ = encode_histories([[3, 1, 4], [5]], 4, 12)
    full, _ = encode_histories([[3, 1, 4], [5]], 8, 12)
    np.testing.assert_allclose(forward(model, short)[:, -1], forward(model, full)[:, -1], atol=1e-5)


def test_encode_histories_keeps_the_most_recent_items():
    tokens, seen = encode_histories([[0, 1, 2, 3, 4], []], 3, 6)
    np.testing.assert_array_equal(tokens, [[3, 4, 5], [0, 0, 0]])
    np.testing.assert_array_equal(seen[0], [1, 1, 1, 1, 1, 0])
    assert not seen[1].any()
    with pytest.raises(ValueError, match="outside 0..5"):
        encode_histories([[6]], 3, 6)


# ---- math ------------------------------------------------------------------------------------------
def test_ranks_among_by_hand():
    scores = jnp.array([[0.5, 0.9, 0.5, 0.1]])
    # order: 1 (0.9), 0 (0.5, lower id wins the tie), 2 (0.5), 3
    np.testing.assert_array_equal(ranks_among(scores, jnp.array([[1, 0, 2, 3]])), [[0, 1, 2, 3]])
    eligible = jnp.array([[True, False, True, True]])
    np.testing.assert_array_equal(ranks_among(scores, jnp.array([[2, 1]]), eligible), [[1, 0]])


def test_hit_ndcg_by_hand():
    m = hit_ndcg(np.array([0, 1, 4, 30]), ks=(1, 5))
    assert m["HR@1"] == 0.25 and m["HR@5"] == 0.75
    assert m["NDCG@1"] == pytest.approx(0.25)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(6)) / 4)


def test_losses_by_hand():
    mask = jnp.array([True, True, False])
    pos, neg = jnp.array([0.0, 2.0, 5.0]), jnp.array([0.0, -1.0, 5.0])
    expected = (2 * np.log(2) + np.log(1 + np.exp(-2)) + np.log(1 + np.exp(-1))) / 2
    assert float(bce_loss(pos, neg, mask)) == pytest.approx(expected, rel=1e-6)
    logits = jnp.array([[0.0, 0.0], [np.log(3.0), 0.0], [9.0, 0.0]])
    expected = (np.log(2) + np.log(4 / 3)) / 2
    assert float(softmax_loss(logits, jnp.array([1, 0, 1]), mask)) == pytest.approx(expected, rel=1e-6)


# ---- queries ---------------------------------------------------------------------------------------
def _brute_topk(scores, eligible, k):
    out = np.full(k, -1)
    ids = [int(i) for i in np.argsort(-scores, kind="stable") if eligible[i]][:k]
    out[: len(ids)] = ids
    return out


def test_topk_constraints_match_brute_force():
    teacher = random_teacher()
    rng = np.random.default_rng(0)
    # more histories than one batch (16) so padding and un-sorting are exercised; lengths differ
    histories = [list(rng.choice(12, rng.integers(0, 10), replace=False)) for _ in range(37)]
    scores = teacher.scores(histories)
    c = rng.random(12) < 0.4
    c_rows = rng.random((37, 12)) < 0.5
    for include, exclude in [(None, None), (c, None), (None, c), (c_rows, None), (c, c_rows)]:
        got = teacher.topk(histories, 6, include=include, exclude=exclude)
        assert got.dtype == np.int32 and got.shape == (37, 6)
        for b, h in enumerate(histories):
            eligible = np.ones(12, bool)
            eligible[h] = False
            if include is not None:
                eligible &= np.broadcast_to(include, (37, 12))[b]
            if exclude is not None:
                eligible &= ~np.broadcast_to(exclude, (37, 12))[b]
            np.testing.assert_array_equal(got[b], _brute_topk(scores[b], eligible, 6))
    filled = teacher.topk([[0, 1, 2]], 6, include=np.arange(12) < 5)
    np.testing.assert_array_equal(filled[0, 2:], -1)
    assert set(filled[0, :2]) == {3, 4}
    assert teacher.topk([[0]], 20).shape == (1, 20) and (teacher.topk([[0]], 20)[0, 11:] == -1).all()


def test_rank_is_consistent_with_topk():
    teacher = random_teacher()
    histories = [[0, 5, 7], [], [11, 10, 9, 8, 7, 6, 5, 4, 3, 2]]
    ranks = teacher.rank(histories, np.tile(np.arange(12), (3, 1)))
    for b, h in enumerate(histories):
        assert sorted(ranks[b]) == list(range(12))
        by_rank = [i for i in np.argsort(ranks[b]) if i not in h]
        np.testing.assert_array_equal(teacher.topk([h], 12)[0], by_rank + [-1] * len(h))


def test_query_input_errors():
    teacher = random_teacher()
    with pytest.raises(ValueError, match="include must be a bool array"):
        teacher.topk([[1]], 3, include=np.ones(5, bool))
    with pytest.raises(ValueError, match="items hold ids outside"):
        teacher.rank([[1]], np.array([[12]]))


# ---- evaluation, training, checkpoints ------------------------------------------------------------
def test_sampled_candidates_avoid_the_users_items():
    ds = chain_dataset()
    users, _, targets = split_examples(ds, "test")
    cand = sampled_candidates(ds, users, targets, 10, np.random.default_rng(0))
    for b, u in enumerate(users):
        negatives = set(np.flatnonzero(cand[b])) - {targets[b]}
        assert len(negatives) == 10 and not negatives & set(ds.sequences[u].tolist())


@pytest.mark.slow
def test_training_learns_the_chain_and_resumes_deterministically(tmp_path):
    ds = chain_dataset()
    cfg = replace(TINY, model=replace(TINY.model, length_buckets=1))  # one batch shape: fewer compiles
    untrained = evaluate_split(random_teacher(ds.num_items, cfg), ds, "test")[FULL]
    teacher = train_teacher(ds, cfg, tmp_path / "full", progress=False)
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    test = metrics["eval"][FULL]["test"]
    assert test["HR@5"] >= 0.9 and untrained["HR@5"] < 0.5
    assert set(metrics["eval"]) == {"full_ranking", "sampled_10"}
    # an interrupted run (1 epoch, then resumed to 2) ends exactly where the uninterrupted one did
    train_teacher(ds, replace(cfg, train=replace(cfg.train, max_epochs=1)), tmp_path / "resumed", progress=False)
    resumed = train_teacher(ds, cfg, tmp_path / "resumed", progress=False)
    log = json.loads((tmp_path / "resumed" / "metrics.json").read_text())["epochs"]
    assert [e["loss"] for e in log] == [e["loss"] for e in metrics["epochs"]]
    histories = [ds.test_example(u)[0] for u in range(10)]
    np.testing.assert_array_equal(resumed.scores(histories), teacher.scores(histories))


def test_checkpoint_round_trip_gives_identical_scores(tmp_path):
    teacher = random_teacher()
    checkpoint.write_info(tmp_path, TINY, teacher.num_items, "chain")
    checkpoint.save_best(tmp_path, 1, teacher._params)
    loaded = Teacher.load(tmp_path)
    histories = [[1, 2, 3], [4], []]
    np.testing.assert_array_equal(loaded.scores(histories), teacher.scores(histories))
    assert loaded.scores(histories).dtype == np.float32
    with pytest.raises(FileNotFoundError, match="not a trained teacher directory"):
        Teacher.load(tmp_path / "missing")
