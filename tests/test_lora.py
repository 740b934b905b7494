"""LoRA adapters: exact no-op when fresh, merge equals un-merged, hand-computed layer, dropout, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reclm_jax.llm import lora as lora_lib
from reclm_jax.llm import model
from reclm_jax.llm.config import LORA_TARGETS, PRESETS, LoraConfig
from reference_logprobs import token_logprobs

# Eager calls of a scanned model re-trace and re-compile the scan every time; jit caches per shape.
forward = jax.jit(model.forward, static_argnames=("cfg", "lora_cfg", "last_only"))
token_logprobs = jax.jit(token_logprobs, static_argnames=("cfg", "lora_cfg"))

CFG = PRESETS["tiny"]
ALL = LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=LORA_TARGETS)


@pytest.fixture(scope="module")
def params():
    return model.init_params(jax.random.key(0), CFG, std=0.1)


@pytest.fixture(scope="module")
def batch():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 9)))
    mask = jnp.ones(tokens.shape, bool).at[0, :3].set(False)
    return tokens, model.positions_from_mask(mask), mask


def trained(adapter, seed=1):
    """Give every `b` random values, as training would."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [
        0.05 * jax.random.normal(k, x.shape) if jax.tree_util.keystr(path).endswith("['b']") else x
        for (path, x), k in zip(leaves, keys)])


def test_linear_matches_the_formula_by_hand():
    x = jnp.array([[1.0, 2.0]])
    w = jnp.array([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])
    adapter = {"a": jnp.array([[1.0], [1.0]]), "b": jnp.array([[0.5, 0.0, 1.0]])}
    cfg = LoraConfig(rank=1, alpha=2.0, dropout=0.0, targets=("q",))
    # x @ w = [1, 2, 0]; x @ a = [3]; scale 2 * 3 * b = [3, 0, 6]
    np.testing.assert_allclose(lora_lib.linear(x, w, adapter, cfg, None), [[4.0, 2.0, 6.0]])
    np.testing.assert_allclose(lora_lib.linear(x, w, None, None, None), [[1.0, 2.0, 0.0]])


def test_init_shapes_and_values(params):
    adapter = lora_lib.init(jax.random.key(0), params, CFG, ALL)
    d, L, r = CFG.hidden_size, CFG.num_layers, 4
    kv = CFG.num_kv_heads * CFG.head_dim
    assert adapter["layers"]["k"]["a"].shape == (L, d, r) and adapter["layers"]["k"]["b"].shape == (L, r, kv)
    assert adapter["layers"]["down"]["a"].shape == (L, CFG.intermediate_size, r)
    assert adapter["lm_head"]["b"].shape == (r, CFG.vocab_size)
    assert all(float(jnp.abs(t["b"]).max()) == 0 for t in [*adapter["layers"].values(), adapter["lm_head"]])
    a = np.asarray(adapter["layers"]["q"]["a"])
    assert np.abs(a).max() <= d ** -0.5 and a.std() > 0.4 * d ** -0.5  # uniform in +-1/sqrt(in)
    only_qv = lora_lib.init(jax.random.key(0), params, CFG, LoraConfig(targets=("q", "v")))
    assert set(only_qv) == {"layers"} and set(only_qv["layers"]) == {"q", "v"}
    again = lora_lib.init(jax.random.key(0), params, CFG, ALL)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(adapter), jax.tree.leaves(again)))


def test_fresh_adapter_is_an_exact_no_op(params, batch):
    tokens, positions, mask = batch
    adapter = lora_lib.init(jax.random.key(3), params, CFG, ALL)
    base, _, _ = forward(params, CFG, tokens, positions, attention_mask=mask)
    with_lora, _, _ = forward(params, CFG, tokens, positions, attention_mask=mask, lora=adapter,
                                    lora_cfg=ALL, dropout_rng=jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(with_lora), np.asarray(base))


def test_merged_equals_unmerged(params, batch):
    tokens, positions, mask = batch
    adapter = trained(lora_lib.init(jax.random.key(3), params, CFG, ALL))
    unmerged, _, _ = forward(params, CFG, tokens, positions, attention_mask=mask, lora=adapter,
                                   lora_cfg=ALL)
    merged_params = lora_lib.merge(params, adapter, ALL)
    merged, _, _ = forward(merged_params, CFG, tokens, positions, attention_mask=mask)
    base, _, _ = forward(params, CFG, tokens, positions, attention_mask=mask)
    assert float(jnp.abs(unmerged - base).max()) > 1e-2  # the adapter does something
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=1e-5)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), merged_params) == jax.tree.map(
        lambda x: (x.shape, x.dtype), params)


def test_merge_folds_one_layer_at_a_time():
    """The programs `merge` runs per layer (XLA's memory analysis): the fold's temporaries are one layer's float32
    matrix, and writing the layer into the stack copy is in place (no temporaries, output aliased)."""
    cfg = PRESETS["tiny"].replace(num_layers=16, intermediate_size=512, param_dtype="bfloat16")
    stack = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg))["layers"]["up"]
    layer = jax.ShapeDtypeStruct(stack.shape[1:], stack.dtype)
    a, b = jax.ShapeDtypeStruct((64, 2), jnp.float32), jax.ShapeDtypeStruct((2, 512), jnp.float32)
    fold = lora_lib._fold.lower(layer, {"a": a, "b": b}, LoraConfig(rank=2)).compile().memory_analysis()
    assert fold.temp_size_in_bytes <= 64 * 512 * 4  # one layer in float32 (the stack's would be 16x that)
    put = lora_lib._set_layer.lower(stack, jnp.int32(3), layer).compile().memory_analysis()
    assert put.temp_size_in_bytes == 0 and put.alias_size_in_bytes == stack.size * 2


def test_two_adapters_share_one_base(params, batch):
    tokens, positions, mask = batch
    cfg_a, cfg_b = LoraConfig(rank=2, targets=("q", "v")), LoraConfig(rank=8, alpha=16.0, targets=("up", "down"))
    a = trained(lora_lib.init(jax.random.key(1), params, CFG, cfg_a), seed=1)
    b = trained(lora_lib.init(jax.random.key(2), params, CFG, cfg_b), seed=2)
    out_a, _, _ = forward(params, CFG, tokens, positions, attention_mask=mask, lora=a, lora_cfg=cfg_a)
    out_b, _, _ = forward(params, CFG, tokens, positions, attention_mask=mask, lora=b, lora_cfg=cfg_b)
    merged_b, _, _ = forward(lora_lib.merge(params, b, cfg_b), CFG, tokens, positions, attention_mask=mask)
    assert float(jnp.abs(out_a - out_b).max()) > 1e-2
    np.testing.assert_allclose(np.asarray(out_b), np.asarray(merged_b), atol=1e-5)


def test_dropout_only_in_training_and_gradients_reach_the_adapter(params, batch):
    tokens, positions, mask = batch
    adapter = trained(lora_lib.init(jax.random.key(3), params, CFG, ALL))
    run = lambda rng, cfg=ALL: forward(params, CFG, tokens, positions, attention_mask=mask, lora=adapter,
                                             lora_cfg=cfg, dropout_rng=rng)[0]
    assert float(jnp.abs(run(jax.random.key(0)) - run(None)).max()) > 1e-3
    np.testing.assert_array_equal(run(jax.random.key(0)), run(jax.random.key(0)))
    no_dropout = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=LORA_TARGETS)
    np.testing.assert_array_equal(run(jax.random.key(0), no_dropout), run(None))

    fresh = lora_lib.init(jax.random.key(3), params, CFG, ALL)

    def loss(ad):
        return -jnp.mean(token_logprobs(params, CFG, tokens, mask, lora=ad, lora_cfg=ALL)[0])

    grads = jax.grad(loss)(fresh)
    # With b = 0 the gradient reaches b but not yet a.
    assert float(jnp.abs(grads["layers"]["q"]["b"]).max()) > 0
    assert float(jnp.abs(grads["layers"]["q"]["a"]).max()) == 0


def test_lm_head_adapter_on_tied_embeddings_runs_but_does_not_merge(batch):
    tied = PRESETS["tiny"].replace(tie_embeddings=True)
    params = model.init_params(jax.random.key(0), tied, std=0.1)
    cfg = LoraConfig(rank=2, targets=("lm_head",))
    adapter = lora_lib.init(jax.random.key(1), params, tied, cfg)
    assert adapter["lm_head"]["b"].shape == (2, tied.vocab_size)
    tokens, positions, _ = batch
    forward(params, tied, tokens, positions, lora=adapter, lora_cfg=cfg)
    with pytest.raises(ValueError, match="tied embeddings"):
        lora_lib.merge(params, adapter, cfg)


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "rank"), ({"dropout": 1.0}, "dropout"), ({"targets": ("q", "attn")}, "targets"),
    ({"targets": ()}, "targets"), ({"targets": ("q", "q")}, "duplicates"),
])
def test_lora_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)
    assert LoraConfig(rank=16, alpha=8.0).scale == 0.5


def _bf16(a):
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


def test_mixed_dot_forward_and_backward_use_bf16_inputs_by_hand():
    kx, kw, kg = jax.random.split(jax.random.key(3), 3)
    x, w = jax.random.normal(kx, (2, 5, 8)), jax.random.normal(kw, (8, 6))
    g = jax.random.normal(kg, (2, 5, 6))
    y, vjp = jax.vjp(lambda x, w: lora_lib.mixed_dot(x, w, jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)), x, w)
    dx, dw = vjp(g)
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32
    np.testing.assert_allclose(y, _bf16(x) @ _bf16(w), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, _bf16(g) @ _bf16(w).T, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dw, np.einsum("btk,btn->kn", _bf16(x), _bf16(g)), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_bf16_matmul_dtype_stays_close_to_float32_and_trains_the_float32_adapter(params, batch):
    tokens, positions, mask = batch
    lora_cfg = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=LORA_TARGETS)
    lora = lora_lib.init(jax.random.key(1), params, CFG, lora_cfg)
    lora = jax.tree.map(lambda a: a + 0.05, lora)  # non-zero b: the adapter changes the output

    def loss(lora, cfg):
        logits, _, _ = forward(params, cfg, tokens, positions, attention_mask=mask, lora=lora, lora_cfg=lora_cfg)
        return jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0).mean()

    mixed = CFG.replace(matmul_dtype="bfloat16")
    (l32, g32), (l16, g16) = (jax.value_and_grad(loss)(lora, c) for c in (CFG, mixed))
    assert abs(float(l16 - l32)) < 1e-2 * abs(float(l32))
    for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16)):
        assert b.dtype == jnp.float32
        assert float(jnp.linalg.norm(a - b)) < 0.05 * float(jnp.linalg.norm(a)) + 1e-6


def test_low_rank_gradients_match_the_formulas_by_hand():
    kx, ka, kb, kg = jax.random.split(jax.random.key(4), 4)
    x, a, b = jax.random.normal(kx, (2, 5, 8)), jax.random.normal(ka, (8, 3)), jax.random.normal(kb, (3, 6))
    g = jax.random.normal(kg, (2, 5, 6))
    y, vjp = jax.vjp(lambda x, a, b: lora_lib.low_rank(x, a, b, 0.5, jnp.dtype(jnp.float32)), x, a, b)
    dx, da, db = vjp(g)
    x, a, b, g = (np.asarray(v, np.float64) for v in (x, a, b, g))
    np.testing.assert_allclose(y, 0.5 * x @ a @ b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, 0.5 * g @ b.T @ a.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(da, 0.5 * np.einsum("btk,btr->kr", x, g @ b.T), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, 0.5 * np.einsum("btr,btn->rn", x @ a, g), rtol=1e-5, atol=1e-5)
