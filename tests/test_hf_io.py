"""Hugging Face checkpoint and PEFT adapter import/export, checked against transformers' PyTorch Llama."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from reclm_jax.llm import hf_io, model
from reclm_jax.llm.config import PRESETS, LlamaConfig, LoraConfig
from reclm_jax.llm.hf_io import FormatError

forward = jax.jit(model.forward, static_argnames=("cfg", "lora_cfg", "last_only"))
UNTIED = PRESETS["tiny"]  # GQA: 4 query heads, 2 kv heads
TIED = UNTIED.replace(tie_embeddings=True, num_kv_heads=4)
TOKENS = np.array([[5, 17, 200, 3, 99, 42, 7, 1], [1, 2, 3, 4, 5, 6, 7, 8]], np.int32)
POSITIONS = np.broadcast_to(np.arange(TOKENS.shape[1], dtype=np.int32), TOKENS.shape)


def random_params(cfg: LlamaConfig, seed: int = 0) -> dict:
    """Random float32 parameters (numpy: no per-leaf compiles); norms near one but not equal to it, so that a
    norm stored in the wrong place shows."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        norm = "norm" in jax.tree_util.keystr(path)
        return ((1.0 if norm else 0.0) + (0.1 if norm else 0.02) * rng.standard_normal(shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, model.param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def torch_logits(hf_model, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("cfg", [UNTIED, TIED], ids=["untied-gqa", "tied-mha"])
def test_state_dict_round_trip_and_hf_names(cfg):
    params = random_params(cfg)
    state = hf_io.params_to_hf(params, cfg)
    assert ("lm_head.weight" in state) == (not cfg.tie_embeddings)
    q_out = cfg.num_heads * cfg.head_dim
    assert state["model.layers.1.self_attn.q_proj.weight"].shape == (q_out, cfg.hidden_size)  # HF [out, in]
    np.testing.assert_array_equal(state["model.layers.1.mlp.down_proj.weight"], params["layers"]["down"][1].T)
    np.testing.assert_array_equal(state["model.layers.0.input_layernorm.weight"], params["layers"]["attn_norm"][0])
    assert len(state) == 2 + 9 * cfg.num_layers + (not cfg.tie_embeddings)
    assert_trees_equal(hf_io.params_from_hf(state, cfg), params)


def test_export_loads_in_transformers_with_equal_logits(tmp_path):
    cfg = UNTIED
    params = random_params(cfg)
    out = hf_io.save_hf_dir(tmp_path / "hf", params, cfg)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    hf_model = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ours, _, _ = forward(params, cfg, TOKENS, POSITIONS)
    # float32 on both sides, same maths in a different order: differences are rounding only.
    np.testing.assert_allclose(np.asarray(ours), torch_logits(hf_model), atol=1e-4, rtol=0)
    loaded_cfg, loaded = hf_io.load_hf_dir(out)
    assert loaded_cfg == cfg
    assert_trees_equal(loaded, params)  # import(export(x)) == x


def test_bfloat16_export_and_tied_embeddings(tmp_path):
    cfg = TIED
    params = random_params(cfg)
    hf_io.save_hf_dir(tmp_path, params, cfg, dtype="bfloat16")
    state = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in state and str(state["model.embed_tokens.weight"].dtype) == "bfloat16"
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    ours, _, _ = forward(jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params), cfg,
                         TOKENS, POSITIONS)
    np.testing.assert_allclose(np.asarray(ours), torch_logits(hf_model), atol=1e-4, rtol=0)
    _, loaded = hf_io.load_hf_dir(tmp_path, param_dtype="bfloat16")
    assert loaded["embed"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(loaded["embed"], params["embed"].astype(jnp.bfloat16))


def test_sharded_checkpoint_directory(tmp_path):
    cfg = UNTIED
    params = random_params(cfg)
    state = hf_io.params_to_hf(params, cfg)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    loaded_cfg, loaded = hf_io.load_hf_dir(tmp_path)
    assert loaded_cfg == cfg
    assert_trees_equal(loaded, params)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FormatError, match="shard model-00002-of-00002.safetensors .* is missing"):
        hf_io.load_hf_dir(tmp_path)


def test_bad_checkpoints_fail_with_the_tensor_named(tmp_path):
    cfg = UNTIED
    state = hf_io.params_to_hf(random_params(cfg), cfg)
    with pytest.raises(FormatError, match="lacks tensor 'model.layers.1.mlp.up_proj.weight'"):
        hf_io.params_from_hf({k: v for k, v in state.items() if "layers.1.mlp.up" not in k}, cfg)
    with pytest.raises(FormatError, match=r"tensor embed has shape \(256, 64\), the config needs \(300, 64\)"):
        hf_io.params_from_hf(state, cfg.replace(vocab_size=300))
    with pytest.raises(FormatError, match="does not use: \\['model.layers.2"):
        hf_io.params_from_hf({**state, "model.layers.2.mlp.up_proj.weight": state["lm_head.weight"]}, cfg)
    with pytest.raises(FormatError, match="no config.json"):
        hf_io.load_hf_dir(tmp_path)
    with pytest.raises(FormatError, match="is not an embedded model"):
        hf_io.resolve_model_path("tiny")


LORA_CFG = LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=("q", "v", "down", "lm_head"))


def random_lora(cfg, lora_cfg, seed=1):
    """A trained-looking adapter (B not zero) in our layout: a [L, in, r], b [L, r, out]; lm_head unstacked."""
    rng = np.random.default_rng(seed)
    shapes = model.param_shapes(cfg)
    adapter = {}
    for target in lora_cfg.targets:
        *lead, fan_in, fan_out = shapes["lm_head"] if target == "lm_head" else shapes["layers"][target]
        ab = {"a": rng.standard_normal((*lead, fan_in, lora_cfg.rank)).astype(np.float32) * 0.1,
              "b": rng.standard_normal((*lead, lora_cfg.rank, fan_out)).astype(np.float32) * 0.05}
        if target == "lm_head":
            adapter["lm_head"] = ab
        else:
            adapter.setdefault("layers", {})[target] = ab
    return adapter


def test_peft_adapter_export(tmp_path):
    cfg = UNTIED
    params = random_params(cfg)
    adapter = random_lora(cfg, LORA_CFG)
    out = hf_io.save_peft_dir(tmp_path, adapter, cfg, LORA_CFG, base_model_name_or_path="base-dir")
    config = json.loads((out / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
                                   "base_model_name_or_path", "bias")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8.0, "lora_dropout": 0.1,
        "target_modules": ["q_proj", "v_proj", "down_proj", "lm_head"], "base_model_name_or_path": "base-dir",
        "bias": "none"}
    tensors = load_file(out / "adapter_model.safetensors")
    assert len(tensors) == 2 * (3 * cfg.num_layers + 1)
    d, f, r, v = cfg.hidden_size, cfg.intermediate_size, 4, cfg.vocab_size
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (r, d)
    assert tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (2 * 16, r)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (r, f)
    assert tensors["base_model.model.lm_head.lora_B.weight"].shape == (v, r)

    loaded_cfg, loaded = hf_io.load_peft_dir(out, cfg)
    assert loaded_cfg == LORA_CFG
    assert_trees_equal(loaded, adapter)

    # PEFT's maths applied by hand to the base model in transformers: W += (alpha / r) * B @ A.
    base_dir = hf_io.save_hf_dir(tmp_path / "base", params, cfg)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
    modules = dict(hf_model.named_modules())
    with torch.no_grad():
        for name in {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in tensors}:
            a = torch.from_numpy(tensors[f"base_model.model.{name}.lora_A.weight"])
            b = torch.from_numpy(tensors[f"base_model.model.{name}.lora_B.weight"])
            modules[name].weight += LORA_CFG.scale * b @ a
    ours, _, _ = forward(params, cfg, TOKENS, POSITIONS, lora=adapter, lora_cfg=LORA_CFG)
    np.testing.assert_allclose(np.asarray(ours), torch_logits(hf_model), atol=1e-4, rtol=0)


def test_bad_adapters(tmp_path):
    cfg = UNTIED
    adapter = random_lora(cfg, LORA_CFG)
    hf_io.save_peft_dir(tmp_path, adapter, cfg, LORA_CFG)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["qkv_proj"]}))
    with pytest.raises(FormatError, match="target_modules \\['qkv_proj'\\] must be a list of"):
        hf_io.load_peft_dir(tmp_path, cfg)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(FormatError, match="rank 4, config says r=8"):
        hf_io.load_peft_dir(tmp_path, cfg)
    with pytest.raises(FormatError, match="needs adapter_config.json and adapter_model.safetensors"):
        hf_io.load_peft_dir(tmp_path / "nothing", cfg)


@pytest.mark.network
def test_export_with_tokenizer_and_cli(tmp_path, capsys):
    """`reclm-jax export`: a merged directory with the tokenizer's files, and a PEFT adapter directory."""
    from reclm_jax import cli
    from reclm_jax.core.errors import UserError

    cfg = UNTIED.replace(vocab_size=32000)  # the Llama-2 tokenizer's vocabulary
    params = random_params(cfg)
    base = hf_io.save_hf_dir(tmp_path / "base", params, cfg)
    adapter_dir = hf_io.save_peft_dir(tmp_path / "adapter", random_lora(cfg, LORA_CFG), cfg, LORA_CFG)
    def run(*argv):
        args, handler = cli.parse(list(argv))
        return handler(args)

    run("export", "--model", str(base), "--lora", str(adapter_dir), "--out", str(tmp_path / "merged"),
        "--dtype", "float32", "--tokenizer", "llama2")
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tok.encode(" Hello world") == [1, 29871, 15043, 3186]
    _, merged = hf_io.load_hf_dir(tmp_path / "merged")
    scale = LORA_CFG.scale
    adapter = hf_io.load_peft_dir(adapter_dir, cfg)[1]
    expected_q = params["layers"]["q"] + scale * adapter["layers"]["q"]["a"] @ adapter["layers"]["q"]["b"]
    np.testing.assert_allclose(merged["layers"]["q"], expected_q, atol=1e-6)

    run("export", "--model", str(base), "--lora", str(adapter_dir / "adapter_model.safetensors"),
        "--out", str(tmp_path / "peft"), "--peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    with pytest.raises(UserError, match="--peft writes an adapter: give it with --lora"):
        run("export", "--model", str(base), "--out", str(tmp_path / "x"), "--peft")

    capsys.readouterr()
    run("model", "info", str(base))
    assert f"parameters: {cfg.num_params:,}" in capsys.readouterr().out
    with pytest.raises(UserError, match="unknown model 'tiny'"):
        run("model", "fetch", "tiny")



LOAD_PEAK = """
import re, sys
from pathlib import Path
from reclm_jax.llm import hf_io
status = Path("/proc/self/status")
rss = lambda key: int(re.search(key + r":\\s+(\\d+) kB", status.read_text()).group(1)) * 1024
Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current size (Linux)
before = rss("VmRSS")
cfg, params = hf_io.load_pretrained(sys.argv[1])
print(rss("VmHWM") - before)
"""


@pytest.mark.slow
def test_loading_a_checkpoint_holds_about_one_copy_of_it(tmp_path):
    """The peak memory of an HF import (a subprocess's resident size) grows by about the checkpoint's size: each
    tensor is read from the file when it is stacked."""
    cfg = PRESETS["tiny"].replace(vocab_size=32000, hidden_size=512, intermediate_size=2048, num_layers=4,
                                  num_heads=8, num_kv_heads=8, head_dim=64)
    hf_io.save_hf_dir(tmp_path, random_params(cfg), cfg)
    size = (tmp_path / "model.safetensors").stat().st_size
    proc = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = int(proc.stdout.split()[-1])
    largest = cfg.vocab_size * cfg.hidden_size * 4  # the embedding (and the head), float32
    # the parameters, plus the tensor being read and its converted copy; reading the whole state dict first
    # made it twice the checkpoint (measured: 264 MB against 396 MB for this 198 MB checkpoint)
    assert growth < size + 2 * largest < 2 * size, (growth, size, largest)
