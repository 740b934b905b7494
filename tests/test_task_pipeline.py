"""Tokenisation (chat templates, loss mask, left truncation, title cuts) and the grain SL pipeline
(determinism, per-epoch regeneration, resume from iterator state, sharding, buckets)."""

from __future__ import annotations

import numpy as np
import pytest
from tasks_helpers import LLAMA2, tiny_dataset, tiny_teacher, tiny_tokenizer

from reclm_jax.tasks.config import TaskConfig
from reclm_jax.llm.chat import ChatPolicy
from reclm_jax.tasks.batches import bucket_length, collate, pack, sft_batches
from reclm_jax.tasks.encode import cut_shares, display_titles, encode_samples
from reclm_jax.tasks.samples import Sample, TaskContext
from reclm_jax.tasks.sharegpt import read_sharegpt
from reclm_jax.tasks.training import training_samples

def encode_sample(sample: Sample, tokenizer, max_length: int, max_response_tokens: int) -> dict[str, np.ndarray]:
    return encode_samples([sample], ChatPolicy.of(tokenizer), max_length, max_response_tokens)[0]


CORPUS = ["You are an expert recommender engine. The historical interactions: 'Movie 12 (1962)'.\n1. Movie 3 (1953)"] * 5


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def ctx():
    ds = tiny_dataset(num_users=24)
    return TaskContext(ds, tiny_teacher(ds), TaskConfig(task_set="v1", sharegpt_ratio=0))


SAMPLE = Sample("seqrec", (("user", "Recommend 2 items after 'Movie 12 (1962)'."),), "1. Movie 3 (1953)\n2. Movie 4 (1954)")


@pytest.mark.parametrize("template,eos", [(None, "<|im_end|>"), (LLAMA2, "</s>")])
def test_loss_mask_covers_exactly_the_response_and_eos(template, eos):
    tok = tiny_tokenizer(CORPUS, **({"chat_template": template, "eos": eos} if template else {}))
    enc = encode_sample(SAMPLE, tok, max_length=1024, max_response_tokens=512)
    tokens, mask = enc["tokens"], enc["loss_mask"]
    n_prompt = len(ChatPolicy.of(tok).prompt_ids(SAMPLE.messages, 1024))
    assert not mask[:n_prompt].any() and mask[n_prompt:].all()
    assert tokens[-1] == tok.eos_token_id
    answer = tok.decode(tokens[mask]).strip()
    assert answer.startswith(SAMPLE.response) and answer.endswith(eos)
    assert answer[len(SAMPLE.response):-len(eos)].strip() == ""  # only the template's spacing before EOS
    # the prompt is the chat template's, with its generation prompt
    prompt_text = tok.decode(tokens[:n_prompt])
    assert prompt_text.endswith("<|im_start|>assistant\n" if template is None else "[/INST]")


def test_prompts_are_cut_from_the_left_and_responses_kept(tokenizer):
    full = encode_sample(SAMPLE, tokenizer, 1024, 512)
    n_resp = int(full["loss_mask"].sum())
    cut = encode_sample(SAMPLE, tokenizer, max_length=n_resp + 5, max_response_tokens=512)
    assert len(cut["tokens"]) == n_resp + 5
    np.testing.assert_array_equal(cut["tokens"], full["tokens"][-(n_resp + 5):])
    assert cut["loss_mask"].sum() == n_resp
    short = encode_sample(SAMPLE, tokenizer, 1024, max_response_tokens=3)
    assert short["loss_mask"].sum() == 3


def test_display_titles_cut_to_max_tokens_and_stay_unique(tokenizer):
    titles = ["Movie 3 (1953) and a very long subtitle", "Movie 3 (1953) and another long subtitle", "Short"]
    out = display_titles(titles, ChatPolicy.of(tokenizer), max_tokens=4)
    assert len(set(out)) == 3 and out[2] == "Short"
    assert all(len(tokenizer.encode(t.rsplit(" (2)", 1)[0], add_special_tokens=False)) <= 4 for t in out)
    assert out[1] == out[0] + " (2)"


def test_cut_shares_count_the_samples_encode_cuts(ctx, tokenizer):
    samples = training_samples(ctx, 0)[:40]
    policy = ChatPolicy.of(tokenizer)
    whole = encode_samples(samples, policy, 10_000, 10_000)
    responses = sorted(int(r["loss_mask"].sum()) for r in whole)
    max_response, max_length = responses[len(responses) // 2], int(np.median([len(r["tokens"]) for r in whole]))
    cut = encode_samples(samples, policy, max_length, max_response)
    expected_response = np.mean([c["loss_mask"].sum() < w["loss_mask"].sum() for c, w in zip(cut, whole)])
    expected_length = np.mean([(~c["loss_mask"]).sum() < (~w["loss_mask"]).sum() for c, w in zip(cut, whole)])
    assert 0 < expected_response < 1 and 0 < expected_length < 1
    assert cut_shares(samples, policy, max_length, max_response) == pytest.approx((expected_response, expected_length))
    assert cut_shares(samples, policy, 10_000, 10_000) == (0.0, 0.0)


SAMPLES = [{"tokens": np.arange(1, 4, dtype=np.int32), "loss_mask": np.array([0, 1, 1], bool)},
           {"tokens": np.arange(1, 6, dtype=np.int32), "loss_mask": np.array([0, 0, 0, 1, 1], bool)},
           {"tokens": np.arange(7, 9, dtype=np.int32), "loss_mask": np.array([0, 1], bool)}]


def test_collate_pads_to_the_smallest_fitting_bucket():
    b = collate(SAMPLES, [[0], [1], [2]], bucket_length(5, (4, 8, 16)), pad_id=0)
    assert b["tokens"].shape == (3, 8)
    np.testing.assert_array_equal(b["tokens"][0], [1, 2, 3, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(b["positions"][1], [0, 1, 2, 3, 4, 0, 0, 0])
    np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 0, 0, 0, 0, 0])
    # each sample's answer tokens weigh 1 / (its answer tokens x 3 samples)
    np.testing.assert_allclose(b["loss_weight"][1], [0, 0, 0, 1 / 6, 1 / 6, 0, 0, 0])
    np.testing.assert_allclose(b["loss_weight"][2], [0, 1 / 3, 0, 0, 0, 0, 0, 0])
    assert bucket_length(9, (4, 8, 16)) == 16
    with pytest.raises(ValueError, match="largest bucket"):
        bucket_length(17, (4, 8, 16))


def test_pack_fills_rows_first_fit_longest_first():
    # lengths 3, 5, 2 into rows of 8 tokens with at most 3 answer tokens: 5 first; 3 would fit beside it, but its
    # answer would make 4, so it opens a row; 2 fits beside 5; rounded up to 4 rows
    assert pack([3, 5, 2], [2, 2, 1], 8, 3, row_multiple=4) == [[1, 2], [0], [], []]
    assert pack([3, 5, 2], [2, 2, 1], 10, 5) == [[1, 0, 2]]
    with pytest.raises(ValueError, match="does not fit a packed row of 4 tokens"):
        pack([3, 5], [1, 1], 4, 4)
    b = collate(SAMPLES, [[1, 2], [0]], 8, pad_id=0)
    np.testing.assert_array_equal(b["tokens"][0], [1, 2, 3, 4, 5, 7, 8, 0])
    np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 3, 4, 0, 1, 0])
    np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 1, 1, 2, 2, 0])
    np.testing.assert_allclose(b["loss_weight"][0], [0, 0, 0, 1 / 6, 1 / 6, 0, 1 / 3, 0])


def make_batches(ctx, tokenizer, shard=(0, 1), row_multiple=1, **cfg):
    cfg = TaskConfig(**{"task_set": "v1", "sharegpt_ratio": 0, "batch_size": 4, "num_epochs": 2, "max_length": 256,
                        "max_response_tokens": 128, "buckets": (64, 128, 256), **cfg})
    return sft_batches(lambda e: training_samples(ctx, e), ChatPolicy.of(tokenizer), cfg, *shard,
                       row_multiple=row_multiple)


def segments(batch):
    """The (tokens, answer mask) of every sample in a batch, sorted."""
    out = []
    for tokens, seg, weight in zip(batch["tokens"], batch["segment_ids"], batch["loss_weight"]):
        for s in np.unique(seg[seg > 0]):
            out.append((tokens[seg == s].tolist(), (weight[seg == s] > 0).tolist()))
    return sorted(out)


def as_list(batches):
    return [{k: v.copy() for k, v in b.items()} for b in batches]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_pipeline_is_deterministic_bucketed_and_regenerates_each_epoch(ctx, tokenizer):
    a = as_list(make_batches(ctx, tokenizer))
    assert_same(a, as_list(make_batches(ctx, tokenizer)))
    per_epoch = len(training_samples(ctx, 0)) // 4
    assert len(a) == per_epoch + len(training_samples(ctx, 1)) // 4
    for b in a:
        assert b["tokens"].shape[0] == 4 and b["tokens"].shape[1] in (64, 128, 256)
        assert (b["loss_weight"] > 0).any(axis=1).all()
        assert not ((b["loss_weight"] > 0) & (b["segment_ids"] == 0)).any()
        np.testing.assert_allclose(b["loss_weight"].sum(), 1.0, rtol=1e-6)
    # epoch 1 holds new samples, not epoch 0 again
    assert training_samples(ctx, 0) != training_samples(ctx, 1)


def test_pipeline_resumes_from_its_state(ctx, tokenizer):
    ds = make_batches(ctx, tokenizer)
    it = iter(ds)
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    rest = as_list(it)
    resumed = iter(make_batches(ctx, tokenizer))
    resumed.set_state(state)
    assert_same(as_list(resumed), rest)
    assert_same(first + rest, as_list(make_batches(ctx, tokenizer)))


def test_process_shards_side_by_side_are_the_single_process_batches(ctx, tokenizer):
    """Each of 3 processes reads its rows of every global batch, padded to the global batch's bucket (their
    batches must form one global array), and together they read exactly what one process with 3x the batch
    size reads."""
    buckets = tuple(range(64, 1025, 64))
    shards = [as_list(make_batches(ctx, tokenizer, shard=(i, 3), max_length=1024, buckets=buckets)) for i in range(3)]
    whole = as_list(make_batches(ctx, tokenizer, batch_size=12, max_length=1024, buckets=buckets))
    assert len(whole) > 2 and all(len(s) == len(whole) for s in shards)
    glued = [{k: np.concatenate([s[i][k] for s in shards]) for k in whole[i]} for i in range(len(whole))]
    assert_same(glued, whole)
    assert len({b["tokens"].shape[1] for b in whole}) > 1  # the buckets vary between batches, not between shards
    with pytest.raises(ValueError, match="shard_index"):
        make_batches(ctx, tokenizer, shard=(3, 3))


def test_packed_batches_hold_the_bucketed_batches_samples(ctx, tokenizer):
    """Packing changes the layout only: each global batch holds the same samples with the same loss weights
    in whole rows of pack_length (a multiple of row_multiple x processes); 3 processes' packed rows put side
    by side are the single-process batch."""
    bucketed = as_list(make_batches(ctx, tokenizer, batch_size=12))
    packed = as_list(make_batches(ctx, tokenizer, batch_size=12, pack_length=512, row_multiple=3))
    assert len(packed) == len(bucketed) > 2
    for b, p in zip(bucketed, packed):
        assert segments(p) == segments(b)
        assert p["tokens"].shape[1] == 512 and p["tokens"].shape[0] % 3 == 0
        np.testing.assert_allclose(np.sort(p["loss_weight"][p["loss_weight"] > 0]),
                                   np.sort(b["loss_weight"][b["loss_weight"] > 0]))
    shards = [as_list(make_batches(ctx, tokenizer, shard=(i, 3), pack_length=512)) for i in range(3)]
    glued = [{k: np.concatenate([s[i][k] for s in shards]) for k in packed[i]} for i in range(len(packed))]
    assert_same(glued, packed)


@pytest.mark.network
@pytest.mark.parametrize("name,answer_end", [("smollm2-135m", "<|im_end|>"), ("llama2", " </s>")])
def test_real_chat_templates_mask_exactly_the_answer(name, answer_end):
    from reclm_jax.llm.tokenizer import load_tokenizer

    tok = load_tokenizer(name)
    enc = encode_sample(SAMPLE, tok, 1024, 512)
    answer = tok.decode(enc["tokens"][enc["loss_mask"]])
    assert answer == SAMPLE.response + answer_end
    prompt = tok.decode(enc["tokens"][~enc["loss_mask"]])
    assert SAMPLE.prompt in prompt and prompt.rstrip().endswith("assistant" if name == "smollm2-135m" else "[/INST]")


def test_sl_batches_mix_in_sharegpt_and_cut_titles(ctx, tokenizer, tmp_path):
    path = tmp_path / "sg.json"
    path.write_text('[{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]')
    cfg = TaskConfig(sharegpt_path=str(path), batch_size=8, num_epochs=1, max_length=256, max_response_tokens=128,
                     buckets=(64, 128, 256), max_title_tokens=3)
    policy = ChatPolicy.of(tokenizer)
    titles = display_titles(ctx.dataset.titles, policy, cfg.max_title_tokens)
    sl_ctx = TaskContext(ctx.dataset, ctx.teacher, cfg, titles=titles)
    conversations = read_sharegpt(cfg.sharegpt_path)
    batches = list(sft_batches(lambda epoch: training_samples(sl_ctx, epoch, conversations), policy, cfg, 0, 1))
    assert batches and all(b["tokens"].shape[0] == 8 for b in batches)
    answers = [tokenizer.decode(b["tokens"][i][b["loss_weight"][i] > 0]) for b in batches for i in range(8)]
    assert sum(a == "yo<|im_end|>" for a in answers) > len(answers) / 4  # ShareGPT: 1/3 of the samples
    assert all(len(tokenizer.encode(t.split(" (")[0], add_special_tokens=False)) <= 3 for t in titles)
    assert len(set(titles)) == len(titles)
    assert any(t in a for a in answers for t in titles if t not in ctx.dataset.titles)  # cut titles are shown
