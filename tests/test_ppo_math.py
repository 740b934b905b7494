"""PPO math against plain numpy loops and hand computations."""

import math

import numpy as np
import pytest

from reclm_jax.rl import ppo_math as pm


def random_batch(seed, batch=5, time=12):
    rng = np.random.default_rng(seed)
    mask = np.zeros((batch, time), np.float32)
    for b in range(batch):  # a contiguous response after a prompt, then padding
        start = rng.integers(0, time - 1)
        end = rng.integers(start + 1, time + 1)
        mask[b, start:end] = 1
    rewards = rng.normal(size=(batch, time)).astype(np.float32) * mask
    values = rng.normal(size=(batch, time)).astype(np.float32)
    return rewards, values, mask


def gae_loop(rewards, values, mask, gamma, lam):
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = np.flatnonzero(mask[b])
        last = 0.0
        for j in reversed(range(len(idx))):
            t = idx[j]
            next_v = values[b, idx[j + 1]] if j + 1 < len(idx) else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


@pytest.mark.parametrize("seed", range(5))
def test_gae_equals_reverse_loop(seed):
    rewards, values, mask = random_batch(seed)
    adv, ret = pm.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    want_adv, want_ret = gae_loop(rewards, values, mask, 0.99, 0.95)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


def test_gae_by_hand():
    # three response tokens, rewards only at the end, gamma 0.5, lambda 1: A_t = G_t - V_t
    r = np.array([[0.0, 0.0, 0.0, 4.0, 0.0]], np.float32)
    v = np.array([[9.0, 1.0, 2.0, 3.0, 9.0]], np.float32)
    m = np.array([[0, 1, 1, 1, 0]], np.float32)
    adv, ret = pm.gae(r, v, m, gamma=0.5, lam=1.0)
    np.testing.assert_allclose(adv, [[0, 1.0 - 1.0, 2.0 - 2.0, 4.0 - 3.0, 0]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0, 1.0, 2.0, 4.0, 0]], atol=1e-6)


def test_group_advantages_by_hand():
    # one prompt, three answers of returns 3, 0 and 6 (rewards spread over their tokens; padding carries junk)
    r = np.array([[[1.0, 2.0, 7.0], [0.0, 0.0, 5.0], [6.0, 9.0, 9.0]]], np.float32)
    m = np.array([[[1, 1, 0], [1, 0, 0], [1, 0, 0]]], np.float32)
    # answer 0: 3 - (0 + 6) / 2 = 0; answer 1: 0 - (3 + 6) / 2 = -4.5; answer 2: 6 - (3 + 0) / 2 = 4.5
    np.testing.assert_allclose(pm.group_advantages(r, m), [[[0, 0, 0], [-4.5, 0, 0], [4.5, 0, 0]]], atol=1e-6)
    # two answers: each is judged against the other alone
    two = pm.group_advantages(np.array([[[2.0, 1.0], [1.0, 0.0]]], np.float32), np.ones((1, 2, 2), np.float32))
    np.testing.assert_allclose(two, [[[2.0, 2.0], [-2.0, -2.0]]], atol=1e-6)


def test_whiten():
    x = np.array([[1.0, 2.0, 3.0, 100.0]], np.float32)
    m = np.array([[1, 1, 1, 0]], np.float32)
    std = math.sqrt(1.0)  # unbiased variance of (1, 2, 3) is 1
    np.testing.assert_allclose(pm.masked_whiten(x, m), [[-1 / std, 0, 1 / std, 0]], atol=1e-4)
    np.testing.assert_allclose(pm.masked_whiten(x, m, shift_mean=False), [[1, 2, 3, 0]], atol=1e-4)


def test_token_rewards():
    scores = np.array([[0.0, 0.5, 0.0, 10.0]], np.float32)
    lp = np.array([[-1.0, -1.0, -2.0, -0.5]], np.float32)
    ref = np.array([[-3.0, -1.5, -1.0, -0.5]], np.float32)
    m = np.array([[0, 1, 1, 1]], np.float32)
    rewards, kl = pm.token_rewards(scores, lp, ref, m, kl_coef=0.3)
    np.testing.assert_allclose(kl, [[0, 0.5, -1.0, 0]], atol=1e-6)
    np.testing.assert_allclose(rewards, [[0, 0.5 - 0.15, 0.3, 10.0]], atol=1e-6)


def test_policy_loss_by_hand():
    old = np.log(np.array([[0.5, 0.5, 0.5]], np.float32))
    new = np.log(np.array([[0.75, 0.25, 0.55]], np.float32))  # ratios 1.5, 0.5, 1.1
    adv = np.array([[1.0, 1.0, -2.0]], np.float32)
    m = np.ones((1, 3), np.float32)
    loss, stats = pm.policy_loss(new, old, adv, m, clip_eps=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: max(2.2, 2.2) = 2.2
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 2.2) / 3, abs=1e-6)
    assert float(stats["clip_frac"]) == pytest.approx(1 / 3, abs=1e-6)
    want_kl = np.mean([r - 1 - math.log(r) for r in (1.5, 0.5, 1.1)])
    assert float(stats["approx_kl"]) == pytest.approx(want_kl, abs=1e-6)


def test_value_loss_by_hand():
    v = np.array([[1.0, 0.0]], np.float32)
    old = np.array([[0.0, 0.0]], np.float32)
    ret = np.array([[2.0, 1.0]], np.float32)
    loss, _ = pm.value_loss(v, old, ret, np.ones((1, 2), np.float32), clip=0.2)
    # token 0: max((1-2)^2, (0.2-2)^2) = 3.24; token 1: max(1, 1) = 1
    assert float(loss) == pytest.approx(0.5 * (3.24 + 1.0) / 2, abs=1e-6)


def test_entropy_and_explained_variance():
    logits = np.zeros((1, 2, 4), np.float32)
    assert float(pm.entropy(logits, np.ones((1, 2), np.float32))) == pytest.approx(math.log(4), abs=1e-6)
    ret = np.array([[1.0, 2.0, 3.0]], np.float32)
    m = np.ones((1, 3), np.float32)
    assert float(pm.explained_variance(ret, ret, m)) == pytest.approx(1.0)
    assert float(pm.explained_variance(np.full_like(ret, 2.0), ret, m)) == pytest.approx(0.0, abs=1e-6)
