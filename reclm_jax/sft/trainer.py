"""The SFT loop: batches -> jitted steps, logging, checkpoints, validation, automatic resume.

    run(cfg)                   # everything from an SFTConfig (what `reclm-jax sft` calls)
    train(run_setup, ...)      # the loop over prepared pieces (tests drive it with a random tiny model)

Resuming: when `<out_dir>/checkpoints/last` holds a checkpoint, the train state and the input iterator's
position are restored from it and training continues at the next step; the following steps see exactly
the batches they would have seen (the data stream is a deterministic function of the seed, and dropout
masks are derived from the seed and the step). A run killed at any moment (kill -9 included) is resumed
by starting the same command again.

Output directory: config.yaml, log.jsonl and tensorboard/ (`run_log`), checkpoints/last and checkpoints/best
(`checkpointing`), valid/answers-<step>.jsonl (every validation answer), adapter/ (the final adapter in PEFT
format).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reclm_jax import config as config_lib
from reclm_jax.checkpointing import Checkpointer, abstract
from reclm_jax.llm import sharding
from reclm_jax.llm.config import LlamaConfig, LoraConfig
from reclm_jax.run_log import RunLog, peak_flops, train_flops_per_token
from reclm_jax.sft import step as step_lib
from reclm_jax.sft.config import SFTConfig

Params = dict[str, Any]
CHECKPOINTS = "checkpoints"


class NonFiniteError(RuntimeError):
    """The loss or the gradients became NaN/inf; the run stopped without saving the bad state."""


@dataclass
class RunSetup:
    """What the loop needs, independent of where it came from."""

    model_cfg: LlamaConfig
    lora_cfg: LoraConfig
    params: Params  # the frozen base (host or device arrays; `train` places them on the mesh)
    lora: Params  # the fresh adapter (replaced by the checkpoint's when resuming)
    batches: grain.IterDataset  # this process's batches of [per_process_batch, T] numpy arrays
    total_steps: int
    accum: int  # micro-batches per step
    # (placed base params, adapter, step) -> {"<task>/<metric>": mean}
    validate: Callable[[Params, Params, int], dict[str, float]] | None = None
    mesh: Mesh | None = None  # None: the default device


@dataclass
class Placement:
    """The train state and base parameters on the devices, their shardings, and how batches get there."""

    state: Params
    params: Params
    shardings: tuple[Any, Any, Any] | None  # (state, params, batch) for `jit_train_step`
    put_batch: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]]


def place(mesh: Mesh | None, params: Params, lora: Params, tx: optax.GradientTransformation) -> Placement:
    """Shard the frozen base and the train state with `llm.sharding`'s training rules (the adapter and its
    Adam moments like the weights they adapt; counters replicated), batches over the batch axes. The train
    state is created directly in its sharded layout."""
    init = functools.partial(step_lib.init_state, tx=tx)
    if mesh is None:
        return Placement(jax.jit(init)(lora), jax.tree.map(jnp.asarray, params), None,
                         lambda b: {k: jnp.asarray(b[k]) for k in step_lib.BATCH_KEYS})
    lora_sh = sharding.param_shardings(lora, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    shapes = jax.eval_shape(init, lora)
    state_sh = {"step": replicated, "lora": lora_sh,
                "opt_state": optax.tree_map_params(tx, lambda _, sh: sh, shapes["opt_state"], lora_sh,
                                                   transform_non_params=lambda _: replicated)}
    params_sh = sharding.param_shardings(params, mesh)
    batch_sh = {k: sharding.batch_sharding(mesh, 2) for k in step_lib.BATCH_KEYS}
    return Placement(jax.jit(init, out_shardings=state_sh)(lora), jax.device_put(params, params_sh),
                     (state_sh, params_sh, batch_sh),
                     lambda b: sharding.shard_batch({k: b[k] for k in step_lib.BATCH_KEYS}, mesh))


def train(setup: RunSetup, cfg: SFTConfig, *, progress: bool = True, max_steps: int | None = None) -> dict[str, Any]:
    """Train until setup.total_steps (or the data ends), resuming from cfg.out_dir if it holds a run.
    `max_steps` stops after that many steps of this call (tests simulate an interruption with it).
    Returns {"step", "losses" (of this call, by step), "valid" (the last validation), "best" (the best
    checkpoint's info or None), "lora" (the final adapter)}."""
    out = Path(cfg.out_dir)
    tx = step_lib.optimizer(cfg.optim, setup.total_steps)
    placed = place(setup.mesh, setup.params, setup.lora, tx)
    train_step = step_lib.jit_train_step(setup.model_cfg, setup.lora_cfg, tx, setup.accum,
                                         cfg.tasks.max_response_tokens, placed.shardings,
                                         lr=step_lib.schedule(cfg.optim, setup.total_steps))
    state, params = placed.state, placed.params
    iterator = iter(setup.batches)
    ckpt = Checkpointer(out / CHECKPOINTS, keep_last=cfg.checkpoint.keep_last, best_metric=cfg.checkpoint.best_metric,
                        best_mode=cfg.checkpoint.best_mode, async_save=cfg.checkpoint.async_save)
    start = ckpt.latest_step() or 0
    saved: dict[str, Any] = {}
    if start:
        state, saved = ckpt.restore(abstract(state), data=iterator, step=start)
    log = RunLog(out, setup.total_steps, start, progress=progress, peak=peak_flops(override=None if
                 cfg.train.peak_tflops is None else cfg.train.peak_tflops * 1e12))
    if start:
        log.write(f"resumed from step {start} ({out / CHECKPOINTS})")
        if saved.get("total_steps") != setup.total_steps:
            log.write(f"warning: the run was started for {saved.get('total_steps')} steps, now {setup.total_steps}: "
                      "the learning-rate schedule changes from here on")
    dropout_key = jax.random.key(cfg.train.seed)
    losses: dict[int, float] = {}
    last_valid: dict[str, float] = {}
    step = start
    try:
        while step < setup.total_steps and (max_steps is None or step - start < max_steps):
            try:
                host_batch = next(iterator)
            except StopIteration:
                log.write(f"the data ended after step {step}")
                break
            state, metrics = train_step(state, params, placed.put_batch(host_batch), dropout_key)
            metrics = jax.device_get(metrics)
            if not metrics["finite"]:
                ckpt.wait()
                raise NonFiniteError(
                    f"step {step + 1}: loss {float(metrics['loss'])} or gradient norm {float(metrics['grad_norm'])} "
                    f"is not finite; the run stopped. The last good checkpoint is step {ckpt.latest_step()} in "
                    f"{out / CHECKPOINTS} (lower optim.lr, check the data, or use float32 compute)")
            step += 1
            loss = float(metrics["loss"])
            losses[step] = loss
            padded = int(np.prod(host_batch["tokens"].shape)) * jax.process_count()
            flops = train_flops_per_token(setup.model_cfg, host_batch["tokens"].shape[1]) * padded
            scalars = {"loss": loss, "grad_norm": float(metrics["grad_norm"]),
                       "lr": float(metrics["lr"]),
                       "response_tokens": int(metrics["response_tokens"])}
            log.step(step, scalars, tokens=int(metrics["tokens"]), flops=flops)
            done = step >= setup.total_steps
            if setup.validate is not None and cfg.valid.every and (step % cfg.valid.every == 0 or done):
                last_valid = setup.validate(params, state["lora"], step)
                log.scalars(step, {f"valid/{k}": v for k, v in last_valid.items()})
                if cfg.checkpoint.best_metric in last_valid and ckpt.save_best(step, state["lora"], last_valid):
                    log.write(f"step {step}: best {cfg.checkpoint.best_metric} = "
                              f"{last_valid[cfg.checkpoint.best_metric]:.4f}")
                log.pause()
            if step % cfg.checkpoint.every == 0 or done:
                ckpt.save(step, state, data=iterator, extra={"loss": loss, "total_steps": setup.total_steps})
                log.pause()
        if step > start and ckpt.latest_step() != step:
            ckpt.save(step, state, data=iterator, extra={"loss": losses[step], "total_steps": setup.total_steps})
        ckpt.wait()
        return {"step": step, "losses": losses, "valid": last_valid, "best": ckpt.best_info(),
                "lora": state["lora"]}
    finally:
        ckpt.close()
        log.close()


def epoch_steps(samples_per_epoch: int, cfg: SFTConfig) -> int:
    """The optimiser steps in tasks.num_epochs epochs (each process reads its equal shard of every epoch;
    batches run across epoch boundaries)."""
    procs = jax.process_count()
    shard = samples_per_epoch // procs
    return cfg.tasks.num_epochs * shard // (cfg.train.global_batch // procs)


def batch_sizes(cfg: SFTConfig) -> tuple[int, int]:
    """(samples per step on this process, micro-batches per step)."""
    procs = jax.process_count()
    if cfg.train.global_batch % procs:
        raise ValueError(f"train.global_batch ({cfg.train.global_batch}) must be a multiple of the number of "
                         f"processes ({procs})")
    per_process = cfg.train.global_batch // procs
    if per_process % cfg.train.micro_batch:
        raise ValueError(f"train.global_batch / processes ({per_process}) must be a multiple of train.micro_batch "
                         f"({cfg.train.micro_batch})")
    return per_process, per_process // cfg.train.micro_batch


def run(cfg: SFTConfig, *, progress: bool = True) -> dict[str, Any]:
    """Build everything from `cfg` and train (or resume) in cfg.out_dir."""
    from reclm_jax.data.load import load_dataset
    from jax.experimental import multihost_utils

    from reclm_jax.eval.parse import Catalogue
    from reclm_jax.llm import hf_io, lora as lora_lib, model as model_lib, sampling
    from reclm_jax.llm.config import PRESETS
    from reclm_jax.llm.tokenizer import load_tokenizer, stop_token_ids
    from reclm_jax.sft import validation
    from reclm_jax.tasks.evaluation import build_eval_set
    from reclm_jax.tasks.pipeline import pad_id, sft_batches
    from reclm_jax.tasks.samples import TaskContext
    from reclm_jax.tasks.sharegpt import read_sharegpt
    from reclm_jax.tasks.tokenize import display_titles
    from reclm_jax.tasks.training import training_samples
    from reclm_jax.teacher.query import Teacher

    sharding.initialize_distributed(cfg.mesh)
    mesh = sharding.make_mesh(cfg.mesh)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        config_lib.dump(cfg, out / "config.yaml")
    per_process, accum = batch_sizes(cfg)
    tasks_cfg = replace(cfg.tasks, batch_size=per_process)

    tokenizer = load_tokenizer(cfg.model.tokenizer)
    dtypes = {"param_dtype": cfg.model.param_dtype, "compute_dtype": cfg.model.compute_dtype,
              "remat": cfg.model.remat}
    if cfg.model.random_init:
        model_cfg = PRESETS[cfg.model.base].replace(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                                    **dtypes)
        params = jax.jit(model_lib.init_params, static_argnums=1)(jax.random.key(cfg.train.seed), model_cfg)
    else:
        model_cfg, params = hf_io.load_pretrained(cfg.model.base, **dtypes)
    lora_cfg = cfg.lora.lora_config()
    lora = lora_lib.init(jax.random.key(cfg.lora.seed), params, model_cfg, lora_cfg)

    dataset = load_dataset(cfg.data)
    teacher = Teacher.load(cfg.teacher)
    titles = display_titles(dataset.titles, tokenizer, tasks_cfg.max_title_tokens)
    ctx = TaskContext(dataset, teacher, tasks_cfg, titles=titles)
    conversations = read_sharegpt(tasks_cfg.sharegpt_path) if tasks_cfg.sharegpt_path else None
    # Memoised: epoch 0, built to count the steps, is reused by the pipeline.
    build_epoch = functools.lru_cache(maxsize=1)(lambda epoch: training_samples(ctx, epoch, conversations))
    steps = cfg.train.steps if cfg.train.steps is not None else epoch_steps(len(build_epoch(0)), cfg)

    validate = None
    if cfg.valid.every:
        users = cfg.valid.users or tasks_cfg.valid_users
        eval_set = build_eval_set(TaskContext(dataset, teacher, replace(tasks_cfg, valid_users=users), titles=titles),
                                  "valid")
        catalogue = Catalogue(titles, cfg.valid.title_match, fuzzy=cfg.valid.fuzzy_titles)
        max_prompt = min(tasks_cfg.max_length, model_cfg.max_position_embeddings) - cfg.valid.max_new_tokens

        def validate(placed_params: Params, adapter: Params, step: int) -> dict[str, float]:
            generate = lambda prompts, **kw: sampling.generate(placed_params, model_cfg, prompts,  # noqa: E731
                                                               lora=adapter, lora_cfg=lora_cfg, **kw)
            answer = validation.greedy_answer(generate, tokenizer, cfg.valid.batch_size, cfg.valid.max_new_tokens,
                                              stop_token_ids(tokenizer), pad_id(tokenizer))
            metrics, answers = validation.evaluate(eval_set, answer, tokenizer, catalogue, dataset.category_matrix,
                                                   max_prompt)
            if jax.process_index() == 0:  # the answers, to read what the model writes
                (out / "valid").mkdir(exist_ok=True)
                with (out / "valid" / f"answers-{step}.jsonl").open("w") as f:
                    for task, texts in answers.items():
                        for sample, text in zip(eval_set.tasks[task], texts):
                            f.write(json.dumps({"task": task, "user": sample.user, "target": sample.target,
                                                "k": sample.k, "answer": text}) + "\n")
            return metrics

    setup = RunSetup(model_cfg=model_cfg, lora_cfg=lora_cfg, params=params, lora=lora,
                     batches=sft_batches(build_epoch, tokenizer, tasks_cfg), total_steps=steps, accum=accum,
                     validate=validate, mesh=mesh)
    result = train(setup, cfg, progress=progress)
    adapter = multihost_utils.process_allgather(result["lora"], tiled=True)  # every host takes part
    if jax.process_index() == 0:
        hf_io.save_peft_dir(out / "adapter", adapter, model_cfg, lora_cfg, base_model_name_or_path=cfg.model.base)
    return result
