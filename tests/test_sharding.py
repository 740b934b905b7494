"""Mesh construction, the logical-axis table, and sharded forward/gradients equal to a single device.

The multi-device part runs in a subprocess with 8 fake CPU devices, so the device count of the test process
(and of every other test) stays as it is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from reclm_jax.llm import sharding
from reclm_jax.llm.sharding import MeshConfig


def test_mesh_shape_resolves_the_rest():
    assert sharding.mesh_shape(MeshConfig(), 8) == (1, 8, 1)
    assert sharding.mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    assert sharding.mesh_shape(MeshConfig(data=-1, fsdp=4, tensor=2), 16) == (2, 4, 2)
    with pytest.raises(ValueError, match=r"needs 8 devices, 4 are available"):
        sharding.mesh_shape(MeshConfig(data=2, fsdp=2, tensor=2), 4)
    with pytest.raises(ValueError, match="6 devices are not divisible by 4"):
        sharding.mesh_shape(MeshConfig(fsdp=-1, tensor=4), 6)
    with pytest.raises(ValueError, match="at most one"):
        MeshConfig(data=-1, fsdp=-1)


def test_logical_axes_of_params_and_lora_factors():
    key = lambda *names: tuple(jax.tree_util.DictKey(n) for n in names)  # noqa: E731
    assert sharding.logical_axes(key("layers", "q"), 3) == ("layers", "embed", "heads")
    assert sharding.logical_axes(key("layers", "down", "a"), 3) == ("layers", "mlp", "lora_rank")
    assert sharding.logical_axes(key("layers", "down", "b"), 3) == ("layers", "lora_rank", "embed")
    assert sharding.logical_axes(key("lm_head", "b"), 2) == ("lora_rank", "vocab")
    with pytest.raises(ValueError, match="no logical axes for parameter 'layers.qkv'"):
        sharding.logical_axes(key("layers", "qkv"), 3)


SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from reclm_jax.llm import model, sharding
    from reclm_jax.llm.config import PRESETS, LoraConfig
    from reclm_jax.llm.sharding import MeshConfig

    assert jax.device_count() == 8
    cfg = PRESETS["tiny"].replace(num_kv_heads=4)  # D 64, 4 heads x 16, F 128, V 256, untied
    lora_cfg = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q", "v", "down", "lm_head"))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s)).astype(np.float32) + (1 if len(s) < 3 else 0),
                          model.param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))
    adapter = {"layers": {t: {"a": 0.1 * rng.standard_normal((2, d_in, 4)).astype(np.float32),
                              "b": 0.1 * rng.standard_normal((2, 4, d_out)).astype(np.float32)}
                          for t, d_in, d_out in (("q", 64, 64), ("v", 64, 64), ("down", 128, 64))},
               "lm_head": {"a": 0.1 * rng.standard_normal((64, 4)).astype(np.float32),
                           "b": 0.1 * rng.standard_normal((4, 256)).astype(np.float32)}}
    tokens = rng.integers(0, 256, (8, 12)).astype(np.int32)
    mask = np.ones((8, 12), bool)
    mask[1, :5] = mask[6, :3] = False  # left padding

    def loss(params, adapter, tokens, mask):
        logp = jax.nn.log_softmax(logits(params, adapter, tokens, mask)[:, :-1])
        logp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        weights = mask[:, 1:]
        return -(logp * weights).sum() / weights.sum()

    def logits(params, adapter, tokens, mask):
        return model.forward(params, cfg, tokens, model.positions_from_mask(mask), attention_mask=mask,
                             lora=adapter, lora_cfg=lora_cfg)[0]

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    fwd = jax.jit(logits)
    value, grads = grad(params, adapter, tokens, mask)
    reference_logits = fwd(params, adapter, tokens, mask)

    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    for rules in (sharding.TRAIN_RULES, sharding.SAMPLE_RULES):
        sp, sa = sharding.shard_params(params, mesh, rules), sharding.shard_params(adapter, mesh, rules)
        batch = sharding.shard_batch({"tokens": tokens, "mask": mask}, mesh, rules)
        fsdp = "fsdp" if rules is sharding.TRAIN_RULES else None
        assert sp["layers"]["q"].sharding.spec == P(None, fsdp, "tensor")
        assert sp["layers"]["down"].sharding.spec == P(None, "tensor", fsdp)
        assert sp["embed"].sharding.spec == P("tensor", fsdp)
        assert sp["layers"]["attn_norm"].sharding.spec == P(None, None)
        assert sa["layers"]["q"]["a"].sharding.spec == P(None, fsdp, None)
        assert sa["layers"]["q"]["b"].sharding.spec == P(None, None, "tensor")
        assert batch["tokens"].sharding.spec == P(("data", "fsdp"), None)
        assert len(sp["layers"]["q"].addressable_shards) == 8
        if fsdp:
            assert sp["layers"]["q"].addressable_shards[0].data.shape == (2, 16, 32)
        if fsdp:  # training: loss and gradients (sampling only runs the forward)
            s_value, s_grads = grad(sp, sa, batch["tokens"], batch["mask"])
            np.testing.assert_allclose(s_value, value, rtol=1e-5)
            for x, y in zip(jax.tree.leaves(s_grads), jax.tree.leaves(grads)):
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(fwd(sp, sa, batch["tokens"], batch["mask"])),
                                   np.asarray(reference_logits), rtol=1e-5, atol=1e-5)
    # A dimension the mesh does not divide stays replicated (49 vocab entries over tensor=2).
    spec = sharding.partition_spec(("vocab", "embed"), (49, 64), mesh, sharding.TRAIN_RULES)
    assert spec == P(None, "fsdp"), spec
    print("SHARDING-OK")
    """
)


@pytest.mark.slow
def test_sharded_forward_and_gradients_equal_single_device():
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "SHARDING-OK" in proc.stdout
