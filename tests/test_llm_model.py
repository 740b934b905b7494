"""The Llama model: presets, config round trips, parity with transformers' PyTorch Llama, KV cache, remat."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from reclm_jax.llm import hf_io, model
from reclm_jax.llm.config import PRESETS, LlamaConfig
from reference_logprobs import token_logprobs

# Eager calls of a scanned model re-trace and re-compile the scan every time; jit caches per shape.
forward = jax.jit(model.forward, static_argnames=("cfg", "lora_cfg", "last_only"))
token_logprobs = jax.jit(token_logprobs, static_argnames=("cfg", "lora_cfg"))

# Random tiny configs: multi-head and grouped-query attention, tied and untied embeddings.
PARITY_CONFIGS = {
    "mha-untied": LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=4, head_dim=8, max_position_embeddings=128, tie_embeddings=False),
    "gqa-tied": LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_layers=3, num_heads=6,
                            num_kv_heads=2, head_dim=8, rope_theta=100000.0, rms_norm_eps=1e-6,
                            max_position_embeddings=128, tie_embeddings=True),
    "mqa-wide-head": LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2,
                                 num_kv_heads=1, head_dim=24, max_position_embeddings=128),
}


def torch_llama(cfg: LlamaConfig, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf())).eval()
    with torch.no_grad():  # HF's init leaves norms at one; randomise them so their layout is tested too
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hf


def params_from_torch(hf: transformers.LlamaForCausalLM, cfg: LlamaConfig) -> dict:
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    return jax.tree.map(jnp.asarray, hf_io.params_from_hf(state, cfg))


def test_llama2_7b_preset_matches_the_published_config():
    cfg = PRESETS["llama2-7b"]
    # meta-llama/Llama-2-7b-hf config.json
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (32000, 4096, 11008, 32)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 32, 128)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings) == (10000.0, 1e-5, 4096)
    assert not cfg.tie_embeddings and (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    assert cfg.num_params == 6_738_415_616  # the published parameter count of Llama-2-7B


def test_smollm2_preset_matches_the_published_config():
    cfg = PRESETS["smollm2-135m"]
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (49152, 576, 1536, 30)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.rope_theta, cfg.rms_norm_eps) == (100000.0, 1e-5)
    assert cfg.tie_embeddings and (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    assert round(cfg.num_params / 1e6, 1) == 134.5  # "134.5 M parameters" (notes/assets.md)


@pytest.mark.network
def test_smollm2_preset_equals_the_embedded_model_config():
    assert hf_io.read_model_config("smollm2-135m") == PRESETS["smollm2-135m"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_survive_a_transformers_config_round_trip(name):
    cfg = PRESETS[name]
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf())
    assert LlamaConfig.from_hf(hf_cfg.to_dict()) == cfg  # transformers 5 moves rope_theta into rope_parameters
    assert LlamaConfig.from_hf(cfg.to_hf()) == cfg
    assert sum(np.prod(s) for s in jax.tree.leaves(model.param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))
               ) == cfg.num_params


def test_from_hf_defaults_overrides_and_errors():
    hf = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
          "num_hidden_layers": 1, "num_attention_heads": 2, "eos_token_id": [7, 9]}
    cfg = LlamaConfig.from_hf(hf, compute_dtype="bfloat16", remat="full")
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.eos_token_id, cfg.compute_dtype, cfg.remat) == (2, 4, 7, "bfloat16",
                                                                                                "full")
    with pytest.raises(ValueError, match="model_type"):
        LlamaConfig.from_hf({**hf, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope scaling"):
        LlamaConfig.from_hf({**hf, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="num_kv_heads"):
        LlamaConfig.from_hf({**hf, "num_key_value_heads": 3, "num_attention_heads": 4})
    with pytest.raises(ValueError, match="remat"):
        PRESETS["tiny"].replace(remat="sometimes")


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_logits_equal_transformers(name):
    cfg = PARITY_CONFIGS[name]
    hf = torch_llama(cfg)
    params = params_from_torch(hf, cfg)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 17))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    positions = jnp.broadcast_to(jnp.arange(17), tokens.shape)
    logits, hidden, _ = forward(params, cfg, jnp.asarray(tokens), positions)
    assert logits.dtype == jnp.float32 and hidden.shape == (3, 17, cfg.hidden_size)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)


def test_left_padded_logits_equal_transformers_on_real_tokens():
    cfg = PARITY_CONFIGS["gqa-tied"]
    hf = torch_llama(cfg, seed=3)
    params = params_from_torch(hf, cfg)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, cfg.vocab_size, (3, 12))
    mask = np.ones((3, 12), bool)
    mask[1, :5] = False
    mask[2, :11] = False
    positions = np.asarray(model.positions_from_mask(jnp.asarray(mask)))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                 position_ids=torch.tensor(positions)).logits.numpy()
    logits, _, _ = forward(params, cfg, jnp.asarray(tokens), jnp.asarray(positions),
                                 attention_mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(logits)[mask], ref[mask], atol=1e-4, rtol=0)
    # A padded row equals the same tokens alone.
    alone, _, _ = forward(params, cfg, jnp.asarray(tokens[1:2, 5:]), jnp.arange(7)[None])
    np.testing.assert_allclose(np.asarray(logits)[1, 5:], np.asarray(alone)[0], atol=1e-5)


def test_kv_cache_decoding_equals_the_full_forward_with_left_padding():
    cfg = PRESETS["tiny"]
    params = model.init_params(jax.random.key(0), cfg, std=0.1)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 14)))
    mask = jnp.ones((2, 14), bool).at[1, :4].set(False)
    positions = model.positions_from_mask(mask)
    full, full_hidden, _ = forward(params, cfg, tokens, positions, attention_mask=mask)

    # Prefill 8 tokens (one with left padding), then a chunk of 2, then one token at a time.
    cache = model.init_cache(cfg, 2, 20)
    pieces, hiddens = [], []
    for lo, hi in [(0, 8), (8, 10)] + [(t, t + 1) for t in range(10, 14)]:
        logits, hidden, cache = forward(params, cfg, tokens[:, lo:hi], positions[:, lo:hi],
                                              attention_mask=mask[:, lo:hi], cache=cache)
        pieces.append(logits)
        hiddens.append(hidden)
    assert int(cache["index"]) == 14
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, 1))[real], np.asarray(full)[real], atol=1e-5)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(hiddens, 1))[real], np.asarray(full_hidden)[real],
                               atol=1e-5)
    last, _, _ = forward(params, cfg, tokens, positions, attention_mask=mask, last_only=True)
    np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(full[:, -1]), atol=1e-6)


def test_token_logprobs_score_left_and_right_padded_batches_alike():
    cfg = PRESETS["tiny"]
    params = model.init_params(jax.random.key(1), cfg, std=0.1)
    seq = np.random.default_rng(5).integers(3, cfg.vocab_size, 9)
    left = jnp.asarray(np.concatenate([[0, 0, 0], seq])[None])
    right = jnp.asarray(np.concatenate([seq, [0, 0, 0]])[None])
    left_mask, right_mask = left != 0, right != 0
    lp_left, _ = token_logprobs(params, cfg, left, left_mask)
    lp_right, hidden = token_logprobs(params, cfg, right, right_mask)
    lp_alone, _ = token_logprobs(params, cfg, jnp.asarray(seq[None]))
    np.testing.assert_allclose(np.asarray(lp_left)[0, 3:], np.asarray(lp_alone)[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(lp_right)[0, :8], np.asarray(lp_alone)[0], atol=1e-5)
    # By hand: log-softmax of the logits at t, read at token t+1.
    logits, _, _ = forward(params, cfg, jnp.asarray(seq[None]), jnp.arange(9)[None])
    by_hand = [float(jax.nn.log_softmax(logits[0, t])[seq[t + 1]]) for t in range(8)]
    np.testing.assert_allclose(np.asarray(lp_alone)[0], by_hand, atol=1e-6)
    assert hidden.shape == (1, 12, cfg.hidden_size)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_leave_loss_and_gradients_unchanged(remat):
    cfg = PRESETS["tiny"]
    params = model.init_params(jax.random.key(2), cfg, std=0.1)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 10)))

    def loss(p, c):
        return -jnp.mean(token_logprobs(p, c, tokens)[0])

    ref_loss, ref_grads = jax.value_and_grad(loss)(params, cfg)
    got_loss, got_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, cfg.replace(remat=remat))
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bfloat16_params_and_compute_stay_close_to_float32():
    cfg = PRESETS["tiny"]
    params = model.init_params(jax.random.key(3), cfg, std=0.1)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 10)))
    positions = jnp.broadcast_to(jnp.arange(10), tokens.shape)
    ref, _, _ = forward(params, cfg, tokens, positions)
    bf16 = cfg.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    logits, hidden, _ = forward(params16, bf16, tokens, positions)
    assert logits.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16
    # bf16 keeps 8 mantissa bits: relative error ~2^-8 per op, logits here are O(1).
    assert float(jnp.max(jnp.abs(logits - ref))) < 0.1
    assert model.init_params(jax.random.key(0), bf16)["layers"]["q"].dtype == jnp.bfloat16
    assert model.init_cache(bf16, 1, 4)["k"].dtype == jnp.bfloat16


def test_param_shapes_and_init_agree():
    for cfg in (PRESETS["tiny"], dataclasses.replace(PRESETS["tiny"], tie_embeddings=True)):
        params = model.init_params(jax.random.key(0), cfg)
        shapes = jax.tree.map(lambda x: x.shape, params)
        assert shapes == model.param_shapes(cfg)
        assert ("lm_head" in params) == (not cfg.tie_embeddings)
        assert np.all(np.asarray(params["layers"]["attn_norm"]) == 1.0)
