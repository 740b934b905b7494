"""Read a llama.cpp GGUF file (Llama architecture) as a Hugging Face config dict and HF-named float32 tensors.

The `gguf` package parses the file and dequantises every tensor type it knows (F32, F16, BF16, Q4_0, Q4_1,
Q5_x, Q8_0, the K-quants, ...). llama.cpp's converter permutes the rows of the Q and K projections so that
each head's rotary pairs are interleaved (GPT-J style); Hugging Face and our model use the rotate-half layout
(pairs are the first and second halves of a head), so `unpermute_rows` undoes it here. Everything else is a
rename: `hf_io.params_from_hf` turns the result into model parameters.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from reclm_jax.core.errors import FormatError

# GGUF tensor name (per block `blk.{i}.`) -> Hugging Face name (per layer `model.layers.{i}.`).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head, rows [a0, b0, a1, b1, ...] -> [a0, a1, ..., b0, b1, ...].

    The converter (convert_hf_to_gguf.py `permute`) views each head's rows as [2, Dh/2] and transposes them to
    [Dh/2, 2]; the inverse views them as [Dh/2, 2] and transposes back.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise FormatError(f"cannot unpermute {rows} rows into {n_heads} heads of even size")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32(x: float) -> float:
    """GGUF stores floats as float32: read 9.999999747e-06 back as the 1e-05 it was written from."""
    return float(str(np.float32(x)))


def hf_config(reader: Any, tensor_names: set[str]) -> dict[str, Any]:
    """A Hugging Face Llama `config.json` dict from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise FormatError(f"GGUF architecture {arch!r} is not supported (only 'llama')")

    def get(key: str, default: Any = None) -> Any:
        value = _field(reader, f"llama.{key}", default)
        if value is None:
            raise FormatError(f"GGUF metadata lacks llama.{key}")
        return value

    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        raise FormatError(f"GGUF uses RoPE scaling ({scaling!r}); only plain RoPE is supported")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab is None:
        raise FormatError("GGUF metadata gives no vocabulary size (llama.vocab_size or tokenizer.ggml.tokens)")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
        "hidden_act": "silu",
    }


def _open(path: Path) -> Any:
    if not path.is_file():
        raise FormatError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise FormatError(f"{path}: not a readable GGUF file: {e}") from None


def read_config(path: str | Path) -> dict[str, Any]:
    """The HF config dict of a Llama GGUF file, without dequantising its tensors."""
    reader = _open(Path(path))
    return hf_config(reader, {t.name for t in reader.tensors})


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(HF config dict, HF-named float32 state dict in the rotate-half layout) of a Llama GGUF file."""
    path = Path(path)
    reader = _open(path)
    config = hf_config(reader, {t.name for t in reader.tensors})
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    state: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        if tensor.name in _GLOBAL_NAMES:
            hf_name, kind = _GLOBAL_NAMES[tensor.name], None
        elif (m := _BLOCK_RE.fullmatch(tensor.name)) and m.group(2) in _BLOCK_NAMES:
            hf_name, kind = f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.weight", m.group(2)
        else:
            raise FormatError(f"{path}: unexpected tensor {tensor.name!r} for a Llama model")
        try:
            w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise FormatError(f"{path}: tensor {tensor.name}: {e}") from None
        # GGUF lists dims fastest-first; numpy (and HF's [out, in]) is the reverse. np.array copies: an F32
        # tensor is a read-only view of the memory-mapped file.
        w = np.array(w, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))
        if kind in heads:
            w = unpermute_rows(w, heads[kind])
        state[hf_name] = w
    return config, state
