"""`reclm-jax plan --config <preset> --devices N [--accelerator a100-40gb]`: will a run fit, and how fast is it?

Compiles the preset's real programs ahead of time on a fake mesh of N CPU devices, with abstract parameters
(`jax.eval_shape`: no weight is allocated) placed by the stage's own shardings, and reports per program:

- per-device memory from XLA's buffer assignment (`memory_analysis`): arguments, outputs, temporaries, the KV
  cache, the CPU peak (arguments + outputs - donated + temporaries) and the accelerator estimate, which drops
  the float32 copies of bfloat16 arguments that only XLA's CPU backend makes (`hlo_stats`);
- per-device matrix-product FLOPs with every loop multiplied by its trip count (`hlo_stats`; XLA's own
  `cost_analysis` counts a scanned layer once), collective bytes, and from them the time and tokens/s at a
  stated MFU on the accelerator (decoding: the larger of that and reading the weights and cache every token
  at a stated fraction of the HBM bandwidth);
- whether it fits under the accelerator's usable memory, and if not, the config knob that shrinks it.

Programs: SFT -> train step, validation prefill and decode (the sampling layout); PPO -> update, rollout
prefill and decode; a pipeline config -> both stages. Teacher configs have nothing to shard (one device).

The fake devices must exist before JAX starts its backend: the command sets `jax_platforms=cpu` and
`jax_num_cpu_devices=N` first (importing JAX starts nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import yaml

from reclm_jax import config as config_lib, hlo_stats
from reclm_jax.accelerators import ACCELERATORS, Accelerator
from reclm_jax.core.errors import UserError
from reclm_jax.llm import hf_io, lora as lora_lib, model, sampling, sharding
from reclm_jax.llm.config import PRESETS
from reclm_jax.llm.tokenizer import load_tokenizer
from reclm_jax.pipeline import PipelineConfig, stage_configs
from reclm_jax.rl.config import PPOConfig
from reclm_jax.rl import rollout
from reclm_jax.rl.trainer import ppo_mesh
from reclm_jax.rl.update import init_state, ppo_update
from reclm_jax.sft import step as step_lib
from reclm_jax.sft.config import SFTConfig
from reclm_jax.tasks.batches import collate
from reclm_jax.training import optim

@dataclass
class Program:
    """One compiled program and what the report needs to know about it."""

    name: str
    compiled: Any
    tokens: int  # tokens one call processes, over all devices
    knob: str  # the config setting that shrinks its memory
    cache_bytes: float = 0.0  # KV cache per device
    decode_steps: int = 0  # > 0: a decode loop of (at most) this many steps, bounded by HBM bandwidth too
    bf16_weights: bool = False


@dataclass
class Row:
    program: str
    arguments: float
    outputs: float
    donated: float
    temporaries: float
    cache: float
    cpu_peak: float
    cpu_only: float
    peak: float  # accelerator estimate
    fits: bool
    knob: str
    flops: float  # per device
    collective_bytes: float
    unknown_loops: int
    seconds: float
    tokens_per_s: float
    flops_per_token: float  # over all devices


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def model_config(m: Any, preset: str | None) -> tuple[Any, str]:
    """The LlamaConfig a config's `model` section runs (with its dtypes and remat), and a note on its source.
    Weights are never read: a checkpoint's config.json or GGUF header is, or the preset's shape."""
    switches = {"param_dtype": m.param_dtype, "compute_dtype": m.compute_dtype, "remat": m.remat}
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"--model {preset!r} is not one of {sorted(PRESETS)}")
        return PRESETS[preset].replace(**switches), f"shape of the {preset} preset (--model)"
    if m.random_init:
        vocab = len(load_tokenizer(m.tokenizer))
        return PRESETS[m.base].replace(vocab_size=vocab, **switches), f"{m.base} preset, vocabulary {vocab}"
    try:
        return hf_io.read_model_config(m.base).replace(**switches), f"{m.base} (its config)"
    except (hf_io.FormatError, OSError) as e:
        if m.tokenizer == "llama2":
            return PRESETS["llama2-7b"].replace(**switches), f"model.base {m.base!r} is not here: Llama-2-7B's shape"
        raise UserError(f"model.base: {e}; plan with a preset's shape instead: --model <preset>") from None


def sampling_programs(stage: str, mesh: Any, model_cfg: Any, params: Any, params_sh: Any, lora: Any, lora_sh: Any,
                      lora_cfg: Any, batch: int, prompt_len: int, new_tokens: int, mode: Any,
                      knob: str) -> list[Program]:
    """Prefill and decode of `batch` prompts of `prompt_len` tokens and `new_tokens` new ones on `mesh`, with
    the weights in the given layout and prompts and cache split over the batch axes (`sampling.generate`)."""
    shards = sharding.batch_shards(mesh)
    batch = -(-sampling.bucket(batch, step=1 << 30) // shards) * shards
    prompt_len, out_len = sampling.bucket(prompt_len), sampling.bucket(new_tokens)
    split = lambda ndim: sharding.batch_sharding(mesh, ndim)  # noqa: E731
    replicated = jax.NamedSharding(mesh, jax.P())
    p, a = _abstract(params, params_sh), _abstract(lora, lora_sh)
    tokens = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=split(2))
    mask = jax.ShapeDtypeStruct((batch, prompt_len), bool, sharding=split(2))
    static = {"cfg": model_cfg, "lora_cfg": lora_cfg}
    with jax.set_mesh(mesh):
        prefill = sampling.prefill.lower(p, a, tokens, mask, cache_len=prompt_len + out_len, **static).compile()
        logits, cache = jax.eval_shape(lambda *xs: sampling.prefill(*xs, cache_len=prompt_len + out_len, **static),
                                       p, a, tokens, mask)
        logits_sh, cache_sh = prefill.output_shardings  # decode takes what prefill hands it
        scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=replicated)  # noqa: E731
        key = jax.eval_shape(lambda: jax.random.key(0))
        decode = sampling.decode.lower(
            p, a, _abstract(cache, cache_sh), jax.ShapeDtypeStruct(logits.shape, logits.dtype, sharding=logits_sh),
            jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=split(1)),
            jax.ShapeDtypeStruct((batch,), bool, sharding=split(1)),
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated), scalar(jnp.float32), scalar(jnp.int32),
            scalar(jnp.float32), jax.ShapeDtypeStruct((8,), jnp.int32, sharding=replicated), scalar(jnp.int32),
            scalar(jnp.int32), mode=mode, out_len=out_len, **static).compile()
    k = cache["k"]
    cache_bytes = 2 * math.prod(cache_sh["k"].shard_shape(k.shape)) * k.dtype.itemsize
    return [Program(f"{stage} prefill ({batch} x {prompt_len})", prefill, batch * prompt_len, knob, cache_bytes),
            Program(f"{stage} decode ({batch} x {out_len} new)", decode, batch * out_len, knob, cache_bytes, out_len)]


def sft_programs(cfg: Any, model_override: str | None) -> tuple[list[Program], list[str]]:
    model_cfg, source = model_config(cfg.model, model_override)
    mesh = sharding.make_mesh(cfg.mesh)
    lora_cfg = cfg.lora
    params = jax.eval_shape(lambda: model.init_params(jax.random.key(0), model_cfg))
    lora = jax.eval_shape(lambda p: lora_lib.init(jax.random.key(0), p, model_cfg, lora_cfg), params)
    tx = optim.optimizer(cfg.optim, 1000)
    state_sh, params_sh, batch_sh = step_lib.train_shardings(mesh, params, lora, tx)
    state = jax.eval_shape(functools.partial(step_lib.init_state, tx=tx), lora)
    micro, tasks = cfg.train.micro_batch, cfg.tasks
    if tasks.pack_length is None:
        if cfg.train.global_batch % micro:
            raise UserError(f"train.global_batch ({cfg.train.global_batch}) must be a multiple of train.micro_batch "
                            f"({micro})")
        length, rows = min(b for b in tasks.buckets if b >= tasks.max_length), cfg.train.global_batch
    else:  # the most rows: every sample max_length tokens long
        length, per_row = tasks.pack_length, tasks.pack_length // tasks.max_length
        rows = -(-cfg.train.global_batch // per_row // micro) * micro
    accum = rows // micro
    empty = collate([], [[] for _ in range(rows)], length, pad_id=0)  # the batch layout, from its one owner
    batch = {k: jax.ShapeDtypeStruct(empty[k].shape, empty[k].dtype, sharding=batch_sh[k]) for k in step_lib.BATCH_KEYS}
    fn = step_lib.jit_train_step(model_cfg, lora_cfg, tx, micro, tasks.answer_tokens_per_row,
                                 (state_sh, params_sh, batch_sh), mesh=mesh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    train = fn.lower(_abstract(state, state_sh), _abstract(params, params_sh), batch, key).compile()
    programs = [Program(f"sft train step ({rows} x {length}, {accum} micro-batches)", train, rows * length,
                        "train.micro_batch (fewer rows per pass), model.remat=full, more fsdp devices")]
    if cfg.valid.every:
        max_prompt = min(cfg.tasks.max_length, model_cfg.max_position_embeddings) - cfg.valid.max_new_tokens
        programs += sampling_programs(
            "validation", mesh, model_cfg, params, sharding.param_shardings(params, mesh, sharding.SAMPLE_RULES),
            lora, sharding.param_shardings(lora, mesh, sharding.SAMPLE_RULES), lora_cfg, cfg.valid.batch_size,
            max_prompt, cfg.valid.max_new_tokens, sampling.SamplingMode(True, False, False),
            "valid.batch_size, valid.max_new_tokens")
    return _finish(programs, model_cfg, source,
                   f"mesh (data, fsdp, tensor) = {tuple(mesh.shape.values())}: training weights FSDP-sharded, "
                   "validation resharded to the sampling layout (replicated over fsdp), prompts and KV cache split "
                   "over the batch")


def _finish(programs: list[Program], model_cfg: Any, source: str, mesh_note: str) -> tuple[list[Program], list[str]]:
    """Mark the programs' weight dtype and describe the model and its mesh: the tail of every stage's plan."""
    for prog in programs:
        prog.bf16_weights = model_cfg.param_dtype == "bfloat16"
    return programs, [f"model: {source}, {model_cfg.num_params / 1e9:.3g}e9 parameters, {model_cfg.param_dtype} "
                      f"weights, {model_cfg.compute_dtype} compute, remat {model_cfg.remat}", mesh_note]


def ppo_programs(cfg: Any, model_override: str | None) -> tuple[list[Program], list[str]]:
    model_cfg, source = model_config(cfg.model, model_override)
    mesh = ppo_mesh(cfg.mesh)
    replicated = jax.NamedSharding(mesh, jax.P())
    base = jax.eval_shape(lambda: model.init_params(jax.random.key(0), model_cfg))
    base_sh = sharding.param_shardings(base, mesh)
    state = jax.eval_shape(lambda b: init_state(jax.random.key(0), b, model_cfg, cfg), base)
    rep = lambda tree: jax.tree.map(lambda _: replicated, tree)  # noqa: E731
    n, r = cfg.batch_size, cfg.rollout
    # the longest rows a step can meet: the longest prompt and every response at max_new_tokens
    row_len = sampling.bucket(r.max_prompt_tokens + r.responses_per_prompt * r.max_new_tokens)
    split = jax.NamedSharding(mesh, jax.P(sharding.mesh_batch_axes(mesh)))
    empty = rollout.empty_batch(r.prompts_per_step, r.responses_per_prompt, row_len,
                                sampling.bucket(r.max_new_tokens), pad_id=0,
                                mask_bytes=-(-model_cfg.vocab_size // 8) if r.constrain == "catalogue" else 0)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=split) for k, v in empty.items()}
    key = jax.eval_shape(lambda: jax.random.key(0))
    with jax.set_mesh(mesh):
        update = ppo_update.lower(
            _abstract(base, base_sh), _abstract(state, rep(state)), batch,
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated), model_cfg=model_cfg,
            actor_cfg=cfg.actor_lora, critic_cfg=cfg.critic_lora, hyper=cfg.ppo, optim=cfg.optim,
            shards=sharding.batch_shards(mesh)).compile()
    actor = state.params["actor"]
    programs = [Program(f"ppo update ({r.prompts_per_step} x {row_len}: {r.responses_per_prompt} responses per "
                        f"prompt row, {cfg.ppo.epochs} epochs x {cfg.ppo.minibatches} minibatches)", update,
                        r.prompts_per_step * row_len,
                        "ppo.minibatches (fewer rows per pass), model.remat=full, rollout.prompts_per_step")]
    programs += sampling_programs(
        "rollout", mesh, model_cfg, base, base_sh, actor, rep(actor), cfg.actor_lora, n,
        r.max_prompt_tokens, r.max_new_tokens,
        sampling.SamplingMode(greedy=False, top_k=r.top_k > 0, top_p=r.top_p < 1.0),
        "rollout.prompts_per_step, rollout.max_new_tokens")
    return _finish(programs, model_cfg, source,
                   f"mesh (data, fsdp, tensor) = {tuple(mesh.shape.values())}: base "
                   f"{'FSDP-sharded over fsdp' if mesh.shape['fsdp'] > 1 else 'replicated'}, adapters replicated, "
                   "rollout rows, sampler cache and update minibatches split over data x fsdp")


def measure(prog: Program, acc: Accelerator, mfu: float, mbu: float, devices: int) -> Row:
    """A report row from a compiled program (`hlo_stats` for the work, XLA's buffer assignment for memory)."""
    mem = prog.compiled.memory_analysis()
    stats = hlo_stats.analyse(prog.compiled.as_text(), unknown_trips=max(prog.decode_steps, 1))
    cpu_peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                + mem.temp_size_in_bytes)
    cpu_only = min(stats.bf16_f32_copies, mem.temp_size_in_bytes)
    collective_bytes = stats.collective_bytes
    if prog.bf16_weights:  # the CPU gathers bfloat16 weights as float32 copies: half of that on an accelerator
        collective_bytes -= stats.collectives.get("all-gather f32", 0.0) / 2
    peak = cpu_peak - cpu_only
    seconds = stats.flops / (acc.peak_flops * mfu)
    if prog.decode_steps:  # every step reads the weights and the cache
        seconds = max(seconds, prog.decode_steps * mem.argument_size_in_bytes / (acc.hbm_bandwidth * mbu))
    return Row(prog.name, mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
               mem.temp_size_in_bytes, prog.cache_bytes, cpu_peak, cpu_only, peak,
               peak <= acc.hbm_bytes * acc.usable, prog.knob, stats.flops, collective_bytes,
               stats.unknown_loops, seconds, prog.tokens / seconds if seconds else 0.0,
               stats.flops * devices / max(prog.tokens, 1))


def config_kind(path: str) -> str:
    """"sft", "ppo", "pipeline" or "teacher", from the folder (configs/<stage>/...) or the file's sections."""
    folder = Path(path).parent.name
    if folder in ("sft", "ppo", "pipeline", "teacher"):
        return folder
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if "sft" in raw or "ppo" in raw and isinstance(raw.get("ppo"), dict) and "rollout" in raw["ppo"]:
        return "pipeline"
    if "rollout" in raw or "actor_lora" in raw:
        return "ppo"
    return "teacher" if "model" in raw and "width" in (raw["model"] or {}) else "sft"


def plan(config: str, overrides: list[str], model_override: str | None = None) -> tuple[list[Program], list[str]]:
    """The compiled programs of a config file (on the devices JAX sees) and notes on the layout."""
    kind = config_kind(config)
    if kind == "teacher":
        return [], ["a teacher config: the SASRec teacher trains on one device, nothing to shard or plan"]
    if kind == "sft":
        return sft_programs(config_lib.load(SFTConfig, config, overrides), model_override)
    if kind == "ppo":
        return ppo_programs(config_lib.load(PPOConfig, config, overrides), model_override)
    sft_cfg, ppo_cfg = stage_configs(config_lib.load(PipelineConfig, config, overrides))
    sft, sft_notes = sft_programs(sft_cfg, model_override)
    ppo, ppo_notes = ppo_programs(ppo_cfg, model_override)
    return sft + ppo, sft_notes + ppo_notes


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def report(rows: list[Row], notes: list[str], acc: Accelerator, devices: int, mfu: float, mbu: float) -> str:
    limit = acc.hbm_bytes * acc.usable
    head = ("| program | args GB | out GB | temp GB | KV cache GB | CPU peak GB | CPU-only GB | peak GB "
            f"| fits {_gb(limit)} GB | TFLOP/device | FLOPs/token | collectives GB | time s | tokens/s |")
    lines = [f"plan on {devices} x {acc.name} (per device: {acc.hbm_bytes / 1e9:.0f} GB, {acc.usable:.0%} usable by "
             f"JAX; {acc.peak_flops / 1e12:.0f} TFLOP/s bf16 at {mfu:.0%} MFU; {acc.hbm_bandwidth / 1e12:.2f} TB/s "
             f"at {mbu:.0%} for decoding)", *(f"- {n}" for n in notes), "", head,
             "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(f"| {r.program} | {_gb(r.arguments)} | {_gb(r.outputs)} | {_gb(r.temporaries)} | "
                     f"{_gb(r.cache)} | {_gb(r.cpu_peak)} | {_gb(r.cpu_only)} | {_gb(r.peak)} | "
                     f"{'yes' if r.fits else 'NO'} | {r.flops / 1e12:.3g} | {r.flops_per_token:.3g} | "
                     f"{_gb(r.collective_bytes)} | {r.seconds:.3g} | {r.tokens_per_s:.3g} |")
    lines += ["", "Memory is per device from XLA's buffer assignment: peak = arguments + outputs - donated + "
              "temporaries. The CPU backend keeps float32 copies of bfloat16 arguments (its matrix kernels are "
              "float32); 'CPU-only' is their size, and 'peak' (the accelerator estimate) leaves them out.",
              "Collectives: bytes each device receives or reduces per call (float32 all-gathers of bfloat16 "
              "weights, a CPU artefact, counted at bfloat16). "
              "FLOPs are matrix-product FLOPs per device with every loop counted trip-count times (decode: the "
              "full token budget); time = FLOPs / (peak x MFU), for decode at least (weights + cache) x steps / "
              "(bandwidth x its utilisation). Peaks: " + acc.source + "."]
    for r in rows:
        if not r.fits:
            lines.append(f"DOES NOT FIT: {r.program} needs {_gb(r.peak)} GB of {_gb(limit)} GB: lower {r.knob} "
                         "(or set XLA_PYTHON_CLIENT_MEM_FRACTION higher on a GPU)")
    return "\n".join(lines)


def command(args: argparse.Namespace) -> int:
    """`reclm-jax plan`: plan on `--devices` fake CPU devices, set up before JAX starts its backend."""
    if args.devices < 1:
        raise UserError(f"--devices must be >= 1, got {args.devices}")
    if not 0 < args.mfu <= 1 or not 0 < args.mbu <= 1:
        raise UserError("--mfu and --mbu must be in (0, 1]")
    # The programs are never run: skip LLVM's optimisation of their CPU code (buffer assignment, hence the
    # memory figures, and the HLO that the FLOPs and collectives are read from come before it and are the same).
    # XLA reads the flags when the backend starts (below, unless a caller in this process started it already).
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
                                        "--xla_llvm_disable_expensive_passes=true"]).strip()
    try:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.devices)
    except RuntimeError:  # JAX has started already (a caller in the same process): it must see the devices
        pass
    if jax.device_count() != args.devices:
        raise UserError(f"JAX sees {jax.device_count()} devices, not {args.devices}: JAX started before `plan`")
    acc = ACCELERATORS[args.accelerator]
    try:
        programs, notes = plan(args.config, args.overrides, args.model)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not programs:
        print("\n".join(notes))
        return 0
    rows = [measure(p, acc, args.mfu, args.mbu, args.devices) for p in programs]
    if args.json:
        print(json.dumps({"accelerator": args.accelerator, "devices": args.devices, "notes": notes,
                          "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
    else:
        print(report(rows, notes, acc, args.devices, args.mfu, args.mbu))
    return 0
