"""Configs of the Llama-2 family and of LoRA adapters, with the presets validated in tests.

`LlamaConfig` holds the architecture (read from / written to a Hugging Face `config.json` with `from_hf` /
`to_hf`) plus three execution switches that do not change the maths: `param_dtype` (storage of the weights),
`compute_dtype` (activations and matrix products; logits are always float32), `matmul_dtype` (None = the
compute dtype; "bfloat16" feeds the weight matrix products bfloat16 inputs with float32 accumulation and
outputs in the compute dtype, forward and backward, while norms, attention and LoRA stay in the compute dtype)
and `remat` (gradient checkpointing of the scanned decoder layer: "none", "full" or "dots" = keep
matrix-product outputs).
Both configs are frozen (hashable), so they are passed to jitted functions as static arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from reclm_jax.config import Count, Fraction, Section

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")
LAYER_TARGETS = LORA_TARGETS[:-1]
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    remat: Literal["none", "full", "dots"] = "none"
    matmul_dtype: Literal["float32", "bfloat16", "float16"] | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"LlamaConfig.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.matmul_dtype is not None and self.matmul_dtype not in DTYPES:
            raise ValueError(f"LlamaConfig.matmul_dtype must be None or one of {DTYPES}, got {self.matmul_dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"LlamaConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * d * f + 2 * d
        return v * d * (1 if self.tie_embeddings else 2) + self.num_layers * layer + d

    def train_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x parameters (forward 2, backward 4) plus causal attention's score and
        value products, 6 x 2 x layers x heads x head_dim x seq_len (the PaLM/MaxText convention, not halved
        for the causal mask). With LoRA the backward skips the frozen weights' gradients (about 2 x parameters
        fewer), so this is the full fine-tuning cost, comparable across projects."""
        return 6 * self.num_params + 12 * self.num_layers * self.num_heads * self.head_dim * seq_len

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> LlamaConfig:
        """From a Hugging Face Llama `config.json` dict; `overrides` set the execution switches (dtypes, remat)."""
        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"config.json: model_type {model_type!r} is not a Llama model")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} unsupported (Llama uses 'silu')")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"config.json: {flag}=true is not supported")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"config.json: rope scaling {rope!r} is not supported (only plain RoPE)")
        if "rope_theta" in hf:
            theta = hf["rope_theta"]
        else:
            theta = rope.get("rope_theta", 10000.0)
        heads = hf["num_attention_heads"]
        bos, eos = hf.get("bos_token_id"), hf.get("eos_token_id")
        if isinstance(eos, list):  # several stop ids: the first is the model's own; sampling takes a set
            eos = eos[0]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=1 if bos is None else bos,
            eos_token_id=2 if eos is None else eos,
            **overrides,
        )

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' `LlamaConfig` (4.x and 5.x) and vLLM read."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": self.param_dtype,
        }


PRESETS: dict[str, LlamaConfig] = {
    # meta-llama/Llama-2-7b-hf and -chat-hf config.json (the paper's base model).
    "llama2-7b": LlamaConfig(),
    # HuggingFaceTB/SmolLM2-135M-Instruct (the embedded real model, see notes/assets.md).
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
        tie_embeddings=True, bos_token_id=1, eos_token_id=2,
    ),
    # For tests and smoke runs.
    "tiny": LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=512,
        tie_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
}


@dataclass(frozen=True)
class LoraConfig(Section):
    """A LoRA adapter: `W x + (alpha / rank) * B A dropout(x)` on each target linear layer."""

    rank: Count = 16
    alpha: float = 8.0
    dropout: Fraction = 0.1
    targets: tuple[str, ...] = LAYER_TARGETS

    def check(self) -> None:
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"targets must be a non-empty subset of {LORA_TARGETS}, got "
                             f"{tuple(self.targets)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets has duplicates: {tuple(self.targets)}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class ModelConfig(Section):
    # A model with weights (a preset with embedded weights such as "smollm2-135m", a .gguf file or a Hugging
    # Face directory), or with random_init a `reclm_jax.llm.config.PRESETS` name (smoke runs and tests).
    base: str = "smollm2-135m"
    random_init: bool = False  # random base weights from the stage's seed; vocab_size becomes the tokenizer's
    tokenizer: str = "smollm2-135m"  # see `reclm_jax.llm.tokenizer.load_tokenizer`
    param_dtype: Dtype = "float32"  # storage of the frozen base ("bfloat16" halves its memory)
    compute_dtype: Dtype = "float32"  # "bfloat16" on accelerators; the loss and the adapter stay float32
    remat: Literal["none", "full", "dots"] = "none"  # gradient checkpointing of each decoder layer

    def check(self) -> None:
        if self.random_init and self.base not in PRESETS:
            raise ValueError(f"base {self.base!r} must be one of {sorted(PRESETS)} with random_init")
