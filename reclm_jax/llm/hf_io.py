"""Hugging Face formats: Llama checkpoint directories (import and merged export) and PEFT LoRA adapters.

Our parameters (see `model.py`) keep kernels `[in, out]` with layers stacked on a leading axis, and rotary
embeddings in Hugging Face's rotate-half layout, so the conversion is renames, transposes and (un)stacking:

    embed        <-> model.embed_tokens.weight            [V, D] (not transposed)
    layers.X[i]  <-> model.layers.{i}.<HF_LAYER_NAMES[X]>.weight   (kernels transposed, norms as they are)
    final_norm   <-> model.norm.weight
    lm_head      <-> lm_head.weight                        (absent when the embeddings are tied)

A PEFT adapter stores, per target module, `lora_A.weight` [r, in] (= our `a.T`) and `lora_B.weight`
[out, r] (= our `b.T`) under `base_model.model.<module name>`; `adapter_config.json` holds r, lora_alpha,
lora_dropout and the target module names. `load_pretrained` is the one entry point for base weights: a
preset name with an embedded asset, a `.gguf` file, or a Hugging Face directory.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from reclm_jax import assets
from reclm_jax.core.errors import FormatError
from reclm_jax.llm import lora as lora_lib, model
from reclm_jax.llm.config import LAYER_TARGETS, PRESETS, LlamaConfig, LoraConfig, ModelConfig
from reclm_jax.llm.gguf_io import read_config, read_gguf
from reclm_jax.llm.tokenizer import stop_token_ids

Params = dict[str, Any]

HF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_NORMS = ("attn_norm", "mlp_norm")
# Presets whose weights ship as an asset (`reclm_jax.assets`): preset name -> (asset name, GGUF file name).
EMBEDDED_MODELS = {"smollm2-135m": ("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf")}
PEFT_PREFIX = "base_model.model."
SAFETENSORS_INDEX = "model.safetensors.index.json"


def _layer_name(i: int, name: str) -> str:
    return f"model.layers.{i}.{HF_LAYER_NAMES[name]}.weight"


def params_from_hf(state_dict: Mapping[str, np.ndarray], cfg: LlamaConfig) -> Params:
    """Model parameters (host numpy arrays in cfg.param_dtype) from an HF Llama state dict."""
    dtype = np.dtype(_jnp_dtype(cfg.param_dtype))
    used: set[str] = set()

    def take(name: str, transpose: bool) -> np.ndarray:
        if name not in state_dict:
            raise FormatError(f"checkpoint lacks tensor {name!r}")
        used.add(name)
        w = np.asarray(state_dict[name])
        return (w.T if transpose else w).astype(dtype)

    def stack(name: str) -> np.ndarray:  # filled layer by layer: the stack plus one tensor in memory
        first = take(_layer_name(0, name), name not in _NORMS)
        out = np.empty((cfg.num_layers, *first.shape), dtype)
        out[0] = first
        for i in range(1, cfg.num_layers):
            out[i] = take(_layer_name(i, name), name not in _NORMS)
        return out

    params: Params = {
        "embed": take("model.embed_tokens.weight", False),
        "layers": {name: stack(name) for name in HF_LAYER_NAMES},
        "final_norm": take("model.norm.weight", False),
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = take("lm_head.weight", True)
    elif "lm_head.weight" in state_dict:  # some tied checkpoints store the copy anyway
        used.add("lm_head.weight")
    # Precomputed rotary tables that some exporters save are recomputed by the model.
    unused = {k for k in set(state_dict) - used if not k.endswith("rotary_emb.inv_freq")}
    if unexpected := sorted(unused):
        raise FormatError(f"checkpoint has tensors a Llama model does not use: {unexpected[:5]}")
    _check_shapes(params, model.param_shapes(cfg))
    return params


def _check_shapes(params: Params, shapes: Params, path: str = "") -> None:
    for key, want in shapes.items():
        got = params[key]
        if isinstance(want, dict):
            _check_shapes(got, want, f"{path}{key}.")
        elif tuple(got.shape) != tuple(want):
            raise FormatError(f"tensor {path}{key} has shape {tuple(got.shape)}, the config needs {tuple(want)}")


def params_to_hf(params: Params, cfg: LlamaConfig, dtype: Any = None) -> dict[str, np.ndarray]:
    """An HF Llama state dict (numpy, kernels [out, in]) from model parameters, in `dtype` (default: as stored)."""

    def host(x: Any, transpose: bool = False) -> np.ndarray:
        x = np.asarray(x)
        x = x.T if transpose else x
        return np.ascontiguousarray(x.astype(dtype) if dtype is not None else x)

    state = {"model.embed_tokens.weight": host(params["embed"]), "model.norm.weight": host(params["final_norm"])}
    for name in HF_LAYER_NAMES:
        stacked = np.asarray(params["layers"][name])  # one device-to-host copy, then host slices
        for i in range(cfg.num_layers):
            state[_layer_name(i, name)] = host(stacked[i], transpose=name not in _NORMS)
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = host(params["lm_head"], transpose=True)
    return state


def _jnp_dtype(name: str) -> Any:
    return jnp.dtype(name)


# ---------------------------------------------------------------------------------------------- directories


def read_hf_dir(path: str | Path) -> tuple[dict[str, Any], Mapping[str, np.ndarray]]:
    """(config.json dict, state dict) of an HF checkpoint directory: model.safetensors or a sharded index. The
    state dict reads each tensor when it is asked for (`SafetensorsDict`)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FormatError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    config = json.loads(config_file.read_text())
    if (path / SAFETENSORS_INDEX).is_file():
        weight_map = json.loads((path / SAFETENSORS_INDEX).read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise FormatError(f"{path / SAFETENSORS_INDEX}: no 'weight_map'")
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FormatError(f"{path}: no model.safetensors or {SAFETENSORS_INDEX} (only safetensors are read)")
    for name in files:
        if not (path / name).is_file():
            raise FormatError(f"{path}: shard {name} named in {SAFETENSORS_INDEX} is missing")
    return config, SafetensorsDict([path / name for name in files])


class SafetensorsDict(Mapping[str, np.ndarray]):
    """The tensors of safetensors files, each read from its file when asked for: loading a model then holds its
    parameters and one tensor, not also a whole copy of the checkpoint (13.5 GB for Llama-2-7B in bfloat16)."""

    def __init__(self, files: Sequence[Path]):
        self._file: dict[str, Path] = {}
        for file in files:
            with self._open(file) as f:
                self._file.update(dict.fromkeys(f.keys(), file))

    @staticmethod
    @contextlib.contextmanager
    def _open(file: Path) -> Iterator[Any]:
        try:
            with safe_open(file, framework="numpy") as f:
                yield f
        except SafetensorError as e:  # a truncated or corrupt file
            raise FormatError(f"{file}: not a readable safetensors file ({e})") from None

    def __getitem__(self, name: str) -> np.ndarray:
        with self._open(self._file[name]) as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file)

    def __len__(self) -> int:
        return len(self._file)


def load_hf_dir(path: str | Path, **overrides: Any) -> tuple[LlamaConfig, Params]:
    """Config and parameters of an HF Llama checkpoint directory; `overrides` set dtypes / remat."""
    hf, state = read_hf_dir(path)
    try:
        cfg = LlamaConfig.from_hf(hf, **overrides)
    except (KeyError, ValueError) as e:
        raise FormatError(f"{path}/config.json: {e}") from None
    return cfg, params_from_hf(state, cfg)


def load_pretrained(name_or_path: str | Path, **overrides: Any) -> tuple[LlamaConfig, Params]:
    """Base model config and parameters from a preset with embedded weights (e.g. "smollm2-135m", fetched
    into the cache on first use), a `.gguf` file, or an HF checkpoint directory. Parameters are host numpy
    arrays in `param_dtype`; place them with `sharding.shard_params` or `jax.device_put`."""
    path = resolve_model_path(name_or_path)
    hf, state = read_gguf(path) if path.suffix == ".gguf" else read_hf_dir(path)
    try:
        cfg = LlamaConfig.from_hf(hf, **overrides)
    except (KeyError, ValueError) as e:
        raise FormatError(f"{path}: {e}") from None
    return cfg, params_from_hf(state, cfg)


def load_model(section: ModelConfig, tokenizer: Any, seed: int) -> tuple[LlamaConfig, Params]:
    """The base of a `model` config section: its weights (`load_pretrained`), or with `random_init` the preset
    shaped to the tokenizer (vocabulary, BOS, EOS) with random weights (smoke runs, tests): stream 1 of `seed`,
    so SFT and PPO with one seed draw the same base, and no stage's own draws from the seed repeat it."""
    dtypes = {"param_dtype": section.param_dtype, "compute_dtype": section.compute_dtype, "remat": section.remat}
    if not section.random_init:
        return load_pretrained(section.base, **dtypes)
    cfg = PRESETS[section.base].replace(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id or 0,
                                        eos_token_id=tokenizer.eos_token_id, **dtypes)
    return cfg, jax.jit(model.init_params, static_argnums=1)(jax.random.fold_in(jax.random.key(seed), 1), cfg)


def load_merged(name_or_path: str | Path, adapters: Sequence[str | Path] = (), **overrides: Any
                ) -> tuple[LlamaConfig, Params]:
    """`load_pretrained`, then PEFT LoRA adapters merged in in the given order (e.g. the SFT adapter, then
    the PPO actor trained on top of it)."""
    cfg, params = load_pretrained(name_or_path, **overrides)
    for path in adapters:
        lora_cfg, adapter = load_peft_dir(path, cfg)
        try:
            params = lora_lib.merge(params, adapter, lora_cfg)
        except ValueError as e:  # an adapter that cannot be folded into this model
            raise FormatError(f"{path}: {e}") from None
    return cfg, params


def read_model_config(name_or_path: str | Path) -> LlamaConfig:
    """The config of `name_or_path` (as for `load_pretrained`) without reading its weights."""
    path = resolve_model_path(name_or_path)
    if path.suffix == ".gguf":
        hf = read_config(path)
    else:
        config_file = path / "config.json"
        try:
            hf = json.loads(config_file.read_text())
        except (OSError, ValueError) as e:
            raise FormatError(f"{config_file}: {e}") from None
    try:
        return LlamaConfig.from_hf(hf)
    except (KeyError, ValueError) as e:
        raise FormatError(f"{path}: {e}") from None


def resolve_model_path(name_or_path: str | Path) -> Path:
    """The GGUF file or HF directory that `name_or_path` names (fetching an embedded model if needed)."""
    if str(name_or_path) in EMBEDDED_MODELS:
        asset, file = EMBEDDED_MODELS[str(name_or_path)]
        return assets.fetch(asset) / file
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir() and len(ggufs := sorted(path.glob("*.gguf"))) == 1:
        return ggufs[0]
    known = ", ".join(sorted(EMBEDDED_MODELS))
    hint = " (random-weight presets have no checkpoint)" if str(name_or_path) in PRESETS else ""
    raise FormatError(f"model {str(name_or_path)!r} is not an embedded model ({known}), a .gguf file, or a "
                      f"directory with config.json{hint}")


def save_hf_dir(out: str | Path, params: Params, cfg: LlamaConfig, *, tokenizer: Any = None,
                dtype: str | None = None) -> Path:
    """Write a merged HF checkpoint (config.json, model.safetensors, generation_config.json and, if given, the
    tokenizer's files) that `transformers.LlamaForCausalLM.from_pretrained` and vLLM load.
    `dtype` ("float32", "bfloat16", "float16") defaults to cfg.param_dtype."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or cfg.param_dtype
    config = cfg.replace(param_dtype=dtype).to_hf()
    eos = [cfg.eos_token_id]
    if tokenizer is not None:
        eos += [i for i in stop_token_ids(tokenizer) if i not in eos]
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(params_to_hf(params, cfg, _jnp_dtype(dtype)), out / "model.safetensors", metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------- PEFT adapters

_PEFT_MODULES = {**{t: HF_LAYER_NAMES[t] for t in LAYER_TARGETS}, "lm_head": "lm_head"}


def lora_to_peft(lora: Params, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """PEFT adapter tensors (float32) from our LoRA pytree."""
    state = {}
    for target, adapter in lora.get("layers", {}).items():
        a, b = np.asarray(adapter["a"], np.float32), np.asarray(adapter["b"], np.float32)
        for i in range(cfg.num_layers):
            module = f"{PEFT_PREFIX}model.layers.{i}.{_PEFT_MODULES[target]}"
            state[f"{module}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            state[f"{module}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    if "lm_head" in lora:
        for ab in ("a", "b"):
            w = np.asarray(lora["lm_head"][ab], np.float32).T
            state[f"{PEFT_PREFIX}lm_head.lora_{ab.upper()}.weight"] = np.ascontiguousarray(w)
    return state


def lora_from_peft(state: Mapping[str, np.ndarray], cfg: LlamaConfig, lora_cfg: LoraConfig) -> Params:
    """Our LoRA pytree (float32) from PEFT adapter tensors for `lora_cfg.targets`."""

    def get(name: str) -> np.ndarray:
        if name not in state:
            raise FormatError(f"adapter lacks tensor {name!r}")
        return np.asarray(state[name], np.float32).T

    lora: Params = {}
    for target in lora_cfg.targets:
        if target == "lm_head":
            lora["lm_head"] = {ab: get(f"{PEFT_PREFIX}lm_head.lora_{ab.upper()}.weight") for ab in ("a", "b")}
            continue
        modules = [f"{PEFT_PREFIX}model.layers.{i}.{_PEFT_MODULES[target]}" for i in range(cfg.num_layers)]
        lora.setdefault("layers", {})[target] = {
            ab: np.stack([get(f"{m}.lora_{ab.upper()}.weight") for m in modules]) for ab in ("a", "b")
        }
    for adapter in [*lora.get("layers", {}).values(), *([lora["lm_head"]] if "lm_head" in lora else [])]:
        if adapter["a"].shape[-1] != lora_cfg.rank or adapter["b"].shape[-2] != lora_cfg.rank:
            raise FormatError(f"adapter tensors have rank {adapter['a'].shape[-1]}, config says r={lora_cfg.rank}")
    return lora


def save_peft_dir(out: str | Path, lora: Params, cfg: LlamaConfig, lora_cfg: LoraConfig, *,
                  base_model_name_or_path: str | None = None) -> Path:
    """Write a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_cfg.rank,
        "lora_alpha": lora_cfg.alpha,
        "lora_dropout": lora_cfg.dropout,
        "target_modules": [_PEFT_MODULES[t].rsplit(".", 1)[-1] for t in lora_cfg.targets],
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(lora_to_peft(lora, cfg), out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def load_peft_dir(path: str | Path, cfg: LlamaConfig) -> tuple[LoraConfig, Params]:
    """LoRA config and adapter pytree from a PEFT adapter directory."""
    path = Path(path)
    config_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise FormatError(f"{path}: a PEFT adapter needs adapter_config.json and adapter_model.safetensors")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise FormatError(f"{config_file}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora") or config.get("use_rslora") or config.get("bias", "none") != "none":
        raise FormatError(f"{config_file}: DoRA, rsLoRA and LoRA biases are not supported")
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("layers_to_transform"):
        raise FormatError(f"{config_file}: per-module ranks/alphas and layer subsets are not supported")
    module_to_target = {m.rsplit(".", 1)[-1]: t for t, m in _PEFT_MODULES.items()}
    modules = config.get("target_modules") or []
    if isinstance(modules, str) or any(m not in module_to_target for m in modules):
        raise FormatError(f"{config_file}: target_modules {modules!r} must be a list of "
                          f"{sorted(module_to_target)}")
    try:
        lora_cfg = LoraConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                              dropout=float(config.get("lora_dropout", 0.0)),
                              targets=tuple(module_to_target[m] for m in modules))
    except (KeyError, ValueError) as e:
        raise FormatError(f"{config_file}: {e}") from None
    return lora_cfg, lora_from_peft(SafetensorsDict([weights]), cfg, lora_cfg)
