"""Scale-out without hardware: loop-aware FLOPs from compiled HLO, and on 8 fake CPU devices the SFT step,
validation/rollout sampling and the PPO update equal their single-device results while each device does 1/8
of the work (read from the compiled per-device programs, not assumed)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from reclm_jax import hlo_stats
from reclm_jax.llm import model
from reclm_jax.llm.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def test_hlo_flops_multiply_scanned_and_while_bodies_by_their_trip_counts():
    cfg = PRESETS["tiny"]
    params = model.init_params(jax.random.key(0), cfg)
    b, t = 3, 8
    fwd = jax.jit(lambda p, x: model.forward(p, cfg, x, jnp.broadcast_to(jnp.arange(t), (b, t)))[0])
    compiled = fwd.lower(params, jnp.zeros((b, t), jnp.int32)).compile()
    d, f, v, h, dh, kv = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_heads, cfg.head_dim,
                          cfg.num_kv_heads)
    # by hand: q, k, v, o, gate, up, down per layer; scores and values over t keys per head; the lm head
    per_token_layer = 2 * (d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * f) + 2 * 2 * t * h * dh
    expected = b * t * (cfg.num_layers * per_token_layer + 2 * d * v)
    stats = hlo_stats.analyse(compiled.as_text())
    assert stats.flops == expected
    assert stats.unknown_loops == 0
    # XLA's own count sees the 2-layer scan body once
    assert compiled.cost_analysis()["flops"] < expected - 0.9 * b * t * per_token_layer

    def loop(x, n):  # a data-dependent trip count: counted `unknown_trips` times
        return jax.lax.while_loop(lambda s: s[0] < n, lambda s: (s[0] + 1, s[1] @ x), (0, x))[1]

    stats = hlo_stats.analyse(jax.jit(loop).lower(jnp.ones((16, 16)), 5).compile().as_text(), unknown_trips=7)
    assert stats.flops == 7 * 2 * 16 ** 3 and stats.unknown_loops == 1


EIGHT_DEVICES = textwrap.dedent("""
    import dataclasses, functools, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, "tests")
    from reclm_jax import hlo_stats
    from reclm_jax.llm import lora as lora_lib, model, sampling, sharding
    from reclm_jax.llm.config import LoraConfig, PRESETS
    from reclm_jax.rl import update
    from reclm_jax.rl.trainer import ppo_mesh
    from reclm_jax.sft import step as step_lib
    from reclm_jax.sft.config import SFT_OPTIM
    from reclm_jax.tasks.batches import collate
    from reclm_jax.training import optim
    assert jax.device_count() == 8
    flops = lambda c: hlo_stats.analyse(c.as_text()).flops  # noqa: E731
    one = sharding.make_mesh(sharding.MeshConfig(fsdp=1), jax.devices()[:1])
    eight = sharding.make_mesh(sharding.MeshConfig(fsdp=8))

    # SFT step: FSDP weights, activations pinned to the batch: equal results, 1/8 of the FLOPs per device
    cfg = PRESETS["tiny"].replace(num_kv_heads=4)
    lcfg = LoraConfig(rank=4, alpha=8.0, dropout=0.1)
    params = model.init_params(jax.random.key(0), cfg)
    lora = jax.tree.map(lambda x: x + 0.01, lora_lib.init(jax.random.key(1), params, cfg, lcfg))
    tx = optim.optimizer(dataclasses.replace(SFT_OPTIM, lr=1e-2, warmup_ratio=0.0), 10)
    rng = np.random.default_rng(0)
    B, T = 16, 32
    pos = np.arange(T)
    host = collate([{"tokens": row, "loss_mask": pos >= 20} for row in rng.integers(3, 256, (B, T)).astype(np.int32)],
                   [[i] for i in range(B)], T, pad_id=0)
    out = {}
    for name, mesh in (("one", one), ("eight", eight)):
        state_sh, params_sh, batch_sh = step_lib.train_shardings(mesh, params, lora, tx)
        fn = step_lib.jit_train_step(cfg, lcfg, tx, 8, 12, (state_sh, params_sh, batch_sh), mesh=mesh)
        state = jax.device_put(step_lib.init_state(jax.tree.map(jnp.copy, lora), tx), state_sh)
        args = (state, jax.device_put(params, params_sh), jax.device_put(host, batch_sh), jax.random.key(0))
        compiled = fn.lower(*args).compile()
        new, metrics = fn(*args)
        out[name] = (flops(compiled), jax.device_get(metrics), jax.device_get(new.params),
                     hlo_stats.analyse(compiled.as_text()).collective_bytes)
    np.testing.assert_allclose(out["eight"][1]["loss"], out["one"][1]["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), out["eight"][2], out["one"][2])
    ratio = out["one"][0] / out["eight"][0]
    assert 7.5 < ratio <= 8.01, ratio
    print("sft flops ratio", ratio, "collective bytes per device", out["eight"][3])

    # validation sampling: FSDP weights resharded to the sampling layout, prompts and cache split
    prompts = [list(rng.integers(3, 256, n)) for n in (5, 9, 3, 7, 12, 4, 6, 8, 2, 10, 11, 5, 6, 3, 9, 7)]
    ref = sampling.generate(params, cfg, prompts, max_new_tokens=12, lora=lora, lora_cfg=lcfg)
    sp = sharding.for_sampling(sharding.shard_params(params, eight))
    sl = sharding.for_sampling(sharding.shard_params(lora, eight))
    assert sp["layers"]["q"].addressable_shards[0].data.shape == params["layers"]["q"].shape  # whole per device
    got = sampling.generate(sp, cfg, prompts, max_new_tokens=12, lora=sl, lora_cfg=lcfg)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-4)

    # LoRA merge of FSDP-sharded weights: sharded in, sharded out, equal values
    fsdp_params = sharding.shard_params(params, eight)
    merged8, merged1 = lora_lib.merge(fsdp_params, lora, lcfg), lora_lib.merge(params, lora, lcfg)
    assert merged8["layers"]["up"].sharding.is_equivalent_to(fsdp_params["layers"]["up"].sharding, 3)
    assert merged8["layers"]["up"].addressable_shards[0].data.size * 8 == merged8["layers"]["up"].size
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), jax.device_get(merged8),
                 jax.device_get(merged1))
    tokens = jax.device_put(np.zeros((16, 16), np.int32), sharding.batch_sharding(eight, 2))
    with jax.set_mesh(eight):
        c8 = sampling.prefill.lower(sp, sl, tokens, tokens > 0, cfg=cfg, lora_cfg=lcfg, cache_len=32).compile()
    c1 = sampling.prefill.lower(params, lora, np.zeros((16, 16), np.int32), np.ones((16, 16), bool), cfg=cfg,
                                lora_cfg=lcfg, cache_len=32).compile()
    ratio = flops(c1) / flops(c8)
    assert 7.5 < ratio <= 8.01, ratio
    cache_k = c8.output_shardings[1]["k"]
    assert cache_k.shard_shape((cfg.num_layers, 16, 4, 16, 32))[1] == 2, cache_k
    print("prefill flops ratio", ratio)

    # PPO: rollout on the replicated base and the data-parallel update (per-device shuffle, interleaved
    # minibatches) equal one device running the same 8-shard schedule
    from test_ppo import MODEL, make_case
    pcfg, base, state, batch, _ = make_case(["ppo.minibatches=2"])
    host_state = jax.device_get(state)  # the updates below donate their states
    mesh = ppo_mesh(sharding.MeshConfig(data=8, fsdp=1))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    kw = dict(model_cfg=MODEL, actor_cfg=pcfg.actor_lora, critic_cfg=pcfg.critic_lora, hyper=pcfg.ppo, optim=pcfg.optim,
              shards=8)
    key = jax.random.key(3)
    c1 = update.ppo_update.lower(base, state, batch, key, **kw).compile()
    s1, m1 = update.ppo_update(base, jax.tree.map(jnp.array, state), batch, key, **kw)

    def update_like_one_device(on, args):  # equal metrics and parameters, 1/8 of the FLOPs per device
        with jax.set_mesh(on):
            compiled = update.ppo_update.lower(*args, **kw).compile()
            new, metrics = update.ppo_update(*args, **kw)
        for k in m1:
            np.testing.assert_allclose(float(metrics[k]), float(m1[k]), rtol=1e-3, atol=1e-5, err_msg=k)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), jax.device_get(new.params),
                     jax.device_get(s1.params))
        ratio = flops(c1) / flops(compiled)
        assert 7.5 < ratio <= 8.01, ratio
        return compiled, ratio

    c8, ratio = update_like_one_device(mesh, (put(base, P()), put(state, P()), put(batch, P("data")), key))
    print("ppo flops ratio", ratio)
    # the same update with the base FSDP-sharded over 4 devices (mesh.fsdp=4): the batch over all 8 as before
    fsdp = ppo_mesh(sharding.MeshConfig(data=2, fsdp=4))
    sharded_base = sharding.shard_params(base, fsdp)
    assert sharded_base["layers"]["q"].addressable_shards[0].data.shape[1] * 4 == base["layers"]["q"].shape[1]
    c4, _ = update_like_one_device(fsdp, (sharded_base, jax.device_put(host_state, NamedSharding(fsdp, P())),
                                          jax.device_put(batch, NamedSharding(fsdp, P(("data", "fsdp")))), key))
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(base))
    saved = c8.memory_analysis().argument_size_in_bytes - c4.memory_analysis().argument_size_in_bytes
    assert saved > 0.7 * base_bytes, (saved, base_bytes)  # ~3/4 of the base no longer on every device
    rows = [[int(t) for t in rng.integers(3, 64, 5)] for _ in range(16)]
    actor = jax.device_get(s1.params["actor"])  # (the update donated `state`)
    kw = dict(max_new_tokens=8, temperature=0.7, rng=jax.random.key(5), lora=actor, lora_cfg=pcfg.actor_lora)
    ref = sampling.generate(base, MODEL, rows, **kw)
    kw["lora"] = put(actor, P())
    got = sampling.generate(put(base, P()), MODEL, rows, **kw)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-4)
    kw["lora"] = jax.device_put(actor, NamedSharding(fsdp, P()))
    got = sampling.generate(sharded_base, MODEL, rows, **kw)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-4)

    # constrained sampling on the data mesh: the per-row automaton tables (and so the state) split like the rows
    from reclm_jax.llm import automaton, constrain
    from reclm_jax.llm.tokenizer import load_tokenizer, stop_token_ids
    tok = load_tokenizer("smollm2-135m")
    ccfg = dataclasses.replace(PRESETS["tiny"], vocab_size=len(tok))
    cparams = model.init_params(jax.random.key(1), ccfg, std=0.3)
    allowed = automaton.catalogue_automaton([f"Film {i}" for i in range(40)], tok).rows(
        [3] * 16, [[i, i + 1] for i in range(16)])
    kw = dict(max_new_tokens=40, eos_ids=stop_token_ids(tok), constraint=allowed)
    ref = sampling.generate(cparams, ccfg, rows, **kw)
    got = sampling.generate(put(cparams, P()), ccfg, rows, **kw)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    assert all(n > 0 for n in got.lengths)
    tables = constrain.device_tables(allowed, 16, ccfg.vocab_size, mesh)
    assert tables["base"].addressable_shards[0].data.shape == (2, allowed.base.shape[1])
    assert tables["edge_token"].addressable_shards[0].data.shape == tables["edge_token"].shape

    # evaluation and recommend load the model onto every local device: each answers its share, as one would
    import tempfile
    from reclm_jax.eval import evaluate as E
    from reclm_jax.llm import hf_io
    chat = E.load_chat_model(str(hf_io.save_hf_dir(tempfile.mkdtemp(), jax.device_get(cparams), ccfg, tokenizer=tok)))
    assert len(chat.params["embed"].sharding.device_set) == 8
    asks = [chat.policy.prompt_ids([{"role": "user", "content": f"Name {i} films."}], 64) for i in range(12)]
    eight = chat.policy.answer(chat.params, chat.cfg, asks, max_new_tokens=12, batch_size=16)
    assert eight == chat.policy.answer(jax.device_get(chat.params), chat.cfg, asks, max_new_tokens=12, batch_size=16)
    print("EIGHT-OK")
""")


@pytest.mark.slow
@pytest.mark.network  # the SmolLM2 tokenizer, for constrained sampling
def test_on_8_devices_results_equal_one_device_and_each_device_does_an_eighth():
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "EIGHT-OK" in proc.stdout


MEASURE = textwrap.dedent("""
    import gc, json
    import jax, numpy as np
    from reclm_jax import plan
    from reclm_jax.config import load
    from reclm_jax.llm import lora as lora_lib, model
    from reclm_jax.sft import step as step_lib
    from reclm_jax.sft.config import SFTConfig
    from reclm_jax.tasks.batches import collate
    from reclm_jax.training import optim

    def status(field):  # kB -> bytes, from the kernel's view of this process
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    programs, _ = plan.plan("configs/sft/tiny.yaml", ["valid.every=0"])
    row = plan.measure(programs[0], plan.ACCELERATORS["a100-40gb"], 0.4, 0.7, 1)
    # the real step: the same compiled program on real arrays of the planned shapes
    cfg = load(SFTConfig, "configs/sft/tiny.yaml")
    model_cfg, _ = plan.model_config(cfg.model, None)
    params = model.init_params(jax.random.key(0), model_cfg)
    lora = lora_lib.init(jax.random.key(1), params, model_cfg, cfg.lora)
    state = step_lib.init_state(lora, optim.optimizer(cfg.optim, 1000))
    rows, length = cfg.train.global_batch, 448
    rng = np.random.default_rng(0)
    batch = collate([{"tokens": row, "loss_mask": np.arange(length) >= length - 128}
                     for row in rng.integers(3, model_cfg.vocab_size, (rows, length)).astype(np.int32)],
                    [[i] for i in range(rows)], length, pad_id=0)
    batch = jax.device_put(batch)
    compiled = programs[0].compiled
    state, _ = compiled(state, params, batch, jax.random.key(0))  # warm: first-run allocations
    jax.block_until_ready(state)
    gc.collect()
    args = sum(x.nbytes for x in jax.tree.leaves((state, params, batch)))
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak resident size
    before = status("VmRSS")
    state, metrics = compiled(state, params, batch, jax.random.key(0))
    jax.block_until_ready((state, metrics))
    measured = args + status("VmHWM") - before
    print(json.dumps({"planned": row.peak, "measured": measured}))
""")


@pytest.mark.slow
def test_planned_memory_of_the_tiny_preset_is_within_20_percent_of_a_real_step():
    # Large buffers mmapped (and so returned on free) to see the step's own peak in the resident size.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    env.pop("XLA_FLAGS", None)  # the compiler a user's step gets, not the suite's fast-compile flags
    proc = subprocess.run([sys.executable, "-c", MEASURE], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    got = json.loads(proc.stdout.strip().splitlines()[-1])
    print(got)
    assert abs(got["planned"] - got["measured"]) <= 0.2 * got["measured"], got
