"""GGUF import: llama.cpp's Q/K permutation undone, quantised tensors dequantised, metadata -> HF config."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from reclm_jax import assets
from reclm_jax.llm import gguf_io, hf_io
from reclm_jax.llm.config import PRESETS, LlamaConfig
from reclm_jax.llm.hf_io import FormatError

Q = gguf.GGMLQuantizationType


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The row permutation convert_hf_to_gguf.py applies to Q and K (written from its formula)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_rows_hand_example():
    # Two heads of size 4: HF rows per head are [x0, x1 | y0, y1] (rotary pairs (x0, y0), (x1, y1));
    # llama.cpp interleaves them as [x0, y0, x1, y1].
    gguf_rows = np.array([0, 2, 1, 3, 4, 6, 5, 7])[:, None] * np.ones((1, 3))
    np.testing.assert_array_equal(gguf_io.unpermute_rows(gguf_rows, 2)[:, 0], np.arange(8))


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).normal(size=(48, 5))
    for heads in (1, 2, 3, 6):
        np.testing.assert_array_equal(gguf_io.unpermute_rows(llama_cpp_permute(w, heads), heads), w)
    with pytest.raises(FormatError, match="cannot unpermute 48 rows into 5 heads"):
        gguf_io.unpermute_rows(w, 5)


# Each tensor kind in its own format, so every supported quantisation is read.
FORMATS = {"token_embd": Q.Q8_0, "attn_q": Q.Q8_0, "attn_k": Q.F16, "attn_v": Q.Q4_0, "attn_output": Q.Q4_1,
           "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_0, "ffn_down": Q.F16, "output": Q.Q8_0, "norm": Q.F32}


def tolerance(qtype: Q, w: np.ndarray) -> float:
    """Worst-case absolute rounding error of a format (blocks of 32 share one scale)."""
    top = float(np.abs(w).max())
    return {Q.F32: 0.0, Q.F16: top * 2**-10, Q.Q8_0: top / 127, Q.Q4_0: top / 7, Q.Q4_1: 2 * top / 15}[qtype]


def write_llama_gguf(path, cfg: LlamaConfig, state: dict[str, np.ndarray]) -> dict[str, Q]:
    """Write an HF state dict as llama.cpp would: renamed, Q/K permuted, quantised per FORMATS."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    hf_to_gguf = {hf: g for g, hf in gguf_io._GLOBAL_NAMES.items()}
    block = {f".{hf}.weight": g for g, hf in gguf_io._BLOCK_NAMES.items()}
    used = {}
    for name, w in state.items():
        if name in hf_to_gguf:
            gname = hf_to_gguf[name]
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{i}.{block['.' + rest]}.weight"
        kind = gname.split(".")[-2]
        if kind == "attn_q":
            w = llama_cpp_permute(w, cfg.num_heads)
        elif kind == "attn_k":
            w = llama_cpp_permute(w, cfg.num_kv_heads)
        qtype = Q.F32 if w.ndim == 1 else FORMATS[kind]
        used[name] = qtype
        if qtype == Q.F32:
            writer.add_tensor(gname, w.astype(np.float32))
        elif qtype == Q.F16:
            writer.add_tensor(gname, w.astype(np.float16))
        else:
            writer.add_tensor(gname, gguf.quants.quantize(w.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return used


def random_hf_state(cfg: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    from reclm_jax.llm.model import param_shapes

    rng = np.random.default_rng(seed)
    shapes = param_shapes(cfg)
    params = {
        "embed": rng.normal(size=shapes["embed"]),
        "layers": {k: rng.normal(size=s) for k, s in shapes["layers"].items()},
        "final_norm": rng.normal(size=shapes["final_norm"]),
    }
    if "lm_head" in shapes:
        params["lm_head"] = rng.normal(size=shapes["lm_head"])
    return hf_io.params_to_hf(params, cfg, np.float32)


def test_read_quantised_gguf_recovers_hf_weights(tmp_path):
    cfg = PRESETS["tiny"]  # GQA (4 query heads, 2 kv heads), untied
    state = random_hf_state(cfg)
    used = write_llama_gguf(tmp_path / "m.gguf", cfg, state)
    assert {Q.F32, Q.F16, Q.Q4_0, Q.Q4_1, Q.Q8_0} <= set(used.values())
    config, loaded = gguf_io.read_gguf(tmp_path / "m.gguf")
    assert LlamaConfig.from_hf(config) == cfg
    assert set(loaded) == set(state)
    for name, w in state.items():
        assert loaded[name].dtype == np.float32 and loaded[name].shape == w.shape, name
        # Within rounding only if the rows are back in HF order (a wrong order is off by O(|w|)).
        np.testing.assert_allclose(loaded[name], w, rtol=0, atol=tolerance(used[name], w), err_msg=name)


def test_tied_embeddings_and_non_llama_files(tmp_path):
    cfg = PRESETS["tiny"].replace(tie_embeddings=True)
    write_llama_gguf(tmp_path / "tied.gguf", cfg, random_hf_state(cfg))
    config, loaded = gguf_io.read_gguf(tmp_path / "tied.gguf")
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in loaded

    writer = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(FormatError, match="architecture 'gpt2' is not supported"):
        gguf_io.read_gguf(tmp_path / "gpt2.gguf")
    with pytest.raises(FormatError, match="GGUF file not found"):
        gguf_io.read_gguf(tmp_path / "missing.gguf")


@pytest.mark.network
def test_tiny_llama_vocab_gguf_matches_transformers_loader():
    """The real F16 file (Llama-2 vocabulary, random weights): same config and exactly the same tensors as
    transformers' own GGUF loader, and it becomes model parameters."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = assets.fetch("tiny-llama-vocab") / "tiny.gguf"
    config, state = gguf_io.read_gguf(path)
    cfg = LlamaConfig.from_hf(config)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        32000, 16, 2, 4, 4, 4)
    assert (cfg.intermediate_size, cfg.rms_norm_eps, cfg.tie_embeddings) == (64, 1e-6, False)

    hf_config = HFLlamaConfig.from_pretrained(path.parent, gguf_file=path.name)
    reference = load_gguf_checkpoint(path, return_tensors=True, model_to_load=LlamaForCausalLM(hf_config))
    ref = reference["tensors"]
    assert set(ref) == set(state)
    for name, w in state.items():
        np.testing.assert_array_equal(w, ref[name].float().numpy(), err_msg=name)

    params = hf_io.params_from_hf(state, cfg)
    assert params["layers"]["q"].shape == (2, 16, 16) and params["lm_head"].shape == (16, 32000)
