"""KV-cache sampling: greedy equals repeated full forwards, EOS and lengths, filters, bucketing, LoRA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reclm_jax.llm import lora as lora_lib
from reclm_jax.llm import model, sampling
from reclm_jax.llm.config import PRESETS, LoraConfig
from reference_logprobs import token_logprobs

CFG = PRESETS["tiny"]
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 3, 4, 3, 4, 3, 4, 3]]
forward = jax.jit(model.forward, static_argnames=("cfg", "lora_cfg", "last_only"))


@pytest.fixture(scope="module")
def params():
    # A larger init than HF's 0.02 so that logits are peaked and argmax ties are impossible.
    return model.init_params(jax.random.key(0), CFG, std=0.3)


@pytest.fixture(scope="module")
def greedy(params):
    return sampling.generate(params, CFG, PROMPTS, max_new_tokens=10, eos_ids=[])


def test_greedy_equals_argmax_of_repeated_full_forwards(params, greedy):
    assert greedy.tokens.shape == (3, 10) and list(greedy.lengths) == [10, 10, 10]
    # Right-padded rows of one fixed width (causal attention ignores what follows), so one compile serves all.
    seqs = [list(p) for p in PROMPTS]
    for step in range(10):
        tokens = np.zeros((3, 20), np.int32)
        for row, seq in enumerate(seqs):
            tokens[row, :len(seq)] = seq
        logits, _, _ = forward(params, CFG, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(20), (3, 20)))
        for row, seq in enumerate(seqs):
            logp = jax.nn.log_softmax(logits[row, len(seq) - 1])
            token = int(jnp.argmax(logp))
            assert greedy.tokens[row, step] == token
            np.testing.assert_allclose(greedy.logprobs[row, step], float(logp[token]), atol=1e-5)
            seq.append(token)


def test_rollout_logprobs_equal_scoring_the_finished_sequences(params):
    # What PPO relies on: log-probs returned by sampling equal re-scoring prompt + response with the model.
    out = sampling.generate(params, CFG, PROMPTS, max_new_tokens=10, temperature=1.0, rng=jax.random.key(3),
                            eos_ids=[])
    tokens, mask = sampling.left_pad([p + list(r) for p, r in zip(PROMPTS, out.tokens)], 19, 0)
    scores, _ = jax.jit(token_logprobs, static_argnames=("cfg",))(params, CFG, tokens, mask)
    np.testing.assert_allclose(np.asarray(scores)[:, -10:], out.logprobs, atol=1e-5)


def test_eos_stops_each_row_and_sets_lengths(params, greedy):
    stop = {int(greedy.tokens[0, 3]), int(greedy.tokens[2, 6])}
    out = sampling.generate(params, CFG, PROMPTS, max_new_tokens=10, eos_ids=stop, pad_id=255)
    for row in range(3):
        hits = [i for i, t in enumerate(greedy.tokens[row]) if t in stop]
        length = hits[0] + 1 if hits else 10
        assert out.lengths[row] == length
        np.testing.assert_array_equal(out.tokens[row, :length], greedy.tokens[row, :length])
        assert np.all(out.tokens[row, length:] == 255) and np.all(out.logprobs[row, length:] == 0)
    assert out.lengths[0] <= 4 and out.lengths[2] <= 7
    short = sampling.generate(params, CFG, PROMPTS, max_new_tokens=7, eos_ids=[])
    np.testing.assert_array_equal(short.tokens, greedy.tokens[:, :7])
    assert list(short.lengths) == [7, 7, 7]


def test_top_k_one_equals_greedy_and_sampling_follows_the_key(params, greedy):
    top1 = sampling.generate(params, CFG, PROMPTS, max_new_tokens=10, eos_ids=[], temperature=0.7, top_k=1,
                             rng=jax.random.key(5))
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    np.testing.assert_allclose(top1.logprobs, greedy.logprobs, atol=1e-6)
    draw = lambda seed: sampling.generate(params, CFG, PROMPTS, max_new_tokens=10, eos_ids=[], temperature=1.5,
                                          top_p=0.95, rng=jax.random.key(seed))
    a, b, c = draw(1), draw(1), draw(2)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_sample_token_distributions_by_hand():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(np.tile(probs, (20000, 1))), jnp.float32)
    key = jax.random.key(0)
    sample_token = jax.jit(sampling.sample_token, static_argnums=5)

    def draw(temperature=1.0, k=0, p=1.0):
        mode = sampling.SamplingMode(greedy=False, top_k=k > 0, top_p=p < 1.0)
        tokens, raw = sample_token(logits, key, jnp.float32(temperature), jnp.int32(k),
                                                 jnp.float32(p), mode)
        tokens = np.asarray(tokens)
        np.testing.assert_allclose(np.asarray(raw), np.log(probs[tokens]), rtol=1e-5)
        return np.bincount(tokens, minlength=4) / len(tokens)

    # Tolerances: 4 standard errors of a frequency from 20000 draws (sqrt(0.25 / 20000) = 0.0035).
    freq = draw()
    np.testing.assert_allclose(freq, probs, atol=0.015)
    freq = draw(temperature=0.5)  # p^2 renormalised
    np.testing.assert_allclose(freq, probs ** 2 / np.sum(probs ** 2), atol=0.015)
    freq = draw(k=3)  # the three best, renormalised
    np.testing.assert_allclose(freq, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=0.015)
    freq = draw(p=0.7)  # nucleus {0.5, 0.3}: 0.5 < 0.7 needs the second token, 0.8 >= 0.7 stops
    np.testing.assert_allclose(freq, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.015)
    freq = draw(k=1, p=0.9)
    np.testing.assert_array_equal(freq, [1, 0, 0, 0])


def test_fresh_lora_generates_like_the_base(params, greedy):
    lora_cfg = LoraConfig(rank=2, targets=("q", "v", "down", "lm_head"))
    adapter = lora_lib.init(jax.random.key(1), params, CFG, lora_cfg)
    out = sampling.generate(params, CFG, PROMPTS, max_new_tokens=10, eos_ids=[], lora=adapter, lora_cfg=lora_cfg)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)


def test_shapes_are_bucketed_so_similar_calls_reuse_programs(params):
    assert [sampling.bucket(n) for n in (1, 3, 8, 9, 64, 65, 200)] == [1, 4, 8, 16, 64, 128, 256]
    sampling.generate(params, CFG, PROMPTS, max_new_tokens=10, eos_ids=[])  # batch 4, prompt 16, output 16
    compiled = sampling.prefill._cache_size(), sampling.decode._cache_size()
    # Other batch size, prompt lengths, output budget and stop ids within the same buckets: the same programs.
    prompts = [list(range(1, 13)), list(range(3, 19)), [7] * 11, [9] * 14]
    sampling.generate(params, CFG, prompts, max_new_tokens=13, eos_ids=[2, 3, 5])
    assert (sampling.prefill._cache_size(), sampling.decode._cache_size()) == compiled


def test_bad_arguments_name_the_option(params):
    with pytest.raises(ValueError, match="prompts"):
        sampling.generate(params, CFG, [], max_new_tokens=4)
    with pytest.raises(ValueError, match="at least one token"):
        sampling.generate(params, CFG, [[1], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="rng"):
        sampling.generate(params, CFG, [[1]], max_new_tokens=4, temperature=1.0)
    with pytest.raises(ValueError, match="top_p"):
        sampling.generate(params, CFG, [[1]], max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        sampling.generate(params, CFG, [[1]], max_new_tokens=CFG.max_position_embeddings)
