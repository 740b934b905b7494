"""The SFT stage: the adapter's jitted step and the instruction batches, run by the one training loop.

    run(cfg)                   # everything from an SFTConfig (what `reclm-jax sft` calls)
    train(run_setup, cfg)      # the loop over prepared pieces (tests drive it with a random tiny model)

Resuming, checkpoints, logging and the NaN guard are `training.loop`'s. Dropout masks are derived from the
seed and the step, and the data stream is a deterministic function of the seed, so a resumed run sees
exactly the batches and masks the uninterrupted one would have.

Output directory: config.yaml, log.jsonl, tensorboard/, checkpoints/{last,best} (`training.loop`),
valid/answers-<step>.jsonl (every validation answer), adapter/ (the final adapter in PEFT format).
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
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from reclm_jax.core.errors import UserError
from reclm_jax.data.load import load_dataset
from reclm_jax.eval.parse import Catalogue
from reclm_jax.llm import hf_io, lora as lora_lib, sharding
from reclm_jax.llm.chat import ChatPolicy
from reclm_jax.llm.config import LlamaConfig, LoraConfig
from reclm_jax.sft import step as step_lib, validation
from reclm_jax.sft.config import SFTConfig
from reclm_jax.tasks.batches import sft_batches
from reclm_jax.tasks.config import TaskConfig
from reclm_jax.tasks.encode import cut_shares, display_titles
from reclm_jax.tasks.evaluation import build_eval_set
from reclm_jax.tasks.samples import Sample, TaskContext
from reclm_jax.tasks.sharegpt import read_sharegpt
from reclm_jax.tasks.training import training_samples
from reclm_jax.teacher.query import Teacher
from reclm_jax.training import loop, optim
from reclm_jax.training.loop import Result, RunDir
from reclm_jax.training.run_log import peak_flops
from reclm_jax.training.state import TrainState

Params = dict[str, Any]
# Config keys that may change when a run is resumed: they do not alter the steps already taken.
MAY_CHANGE = ("train.steps", "train.peak_tflops", "valid", "checkpoint.every", "checkpoint.keep_last",
              "checkpoint.async_save", "mesh.coordinator_address", "mesh.heartbeat_timeout_s")


@dataclass
class RunSetup:
    """What the loop needs, independent of where it came from."""

    model_cfg: LlamaConfig
    lora_cfg: LoraConfig
    params: Params  # the frozen base (host or device arrays; `train` places them on the mesh)
    lora: Params  # the fresh adapter (replaced by the checkpoint's when resuming)
    batches: grain.IterDataset  # this process's batches of [per_process_batch, T] numpy arrays
    total_steps: int
    micro_rows: int  # batch rows per forward/backward pass, over all processes
    # (placed base params, adapter, step) -> {"<task>/<metric>": mean}
    validate: Callable[[Params, Params, int], dict[str, float]] | None = None
    mesh: Mesh | None = None  # None: the default device


@dataclass
class Placement:
    """The train state and base parameters on the devices, their shardings, and how batches get there."""

    state: TrainState
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
    state_sh, params_sh, batch_sh = step_lib.train_shardings(mesh, params, lora, tx)
    return Placement(jax.jit(init, out_shardings=state_sh)(lora), jax.device_put(params, params_sh),
                     (state_sh, params_sh, batch_sh),
                     lambda b: sharding.shard_batch({k: b[k] for k in step_lib.BATCH_KEYS}, mesh))


def train(setup: RunSetup, cfg: SFTConfig, *, run: RunDir | None = None, progress: bool = True,
          max_steps: int | None = None) -> Result:
    """Train until setup.total_steps (or the data ends) in the one loop (`training.loop.train`), resuming
    the run in cfg.out_dir if it holds one (`run` defaults to RunDir(cfg.out_dir, cfg)). `max_steps` stops
    after that many steps of this call (tests simulate an interruption with it)."""
    run = run or RunDir(cfg.out_dir, cfg, may_change=MAY_CHANGE)
    tx = optim.optimizer(cfg.optim, setup.total_steps)
    placed = place(setup.mesh, setup.params, setup.lora, tx)
    train_step = step_lib.jit_train_step(setup.model_cfg, setup.lora_cfg, tx, setup.micro_rows,
                                         cfg.tasks.answer_tokens_per_row, placed.shardings,
                                         lr=optim.schedule(cfg.optim, setup.total_steps), mesh=setup.mesh)
    dropout_key = jax.random.key(cfg.train.seed)

    def step(state: TrainState, host_batch: dict[str, np.ndarray]) -> tuple[TrainState, dict[str, Any]]:
        state, metrics = train_step(state, placed.params, placed.put_batch(host_batch), dropout_key)
        metrics = jax.device_get(metrics)
        padded = int(np.prod(host_batch["tokens"].shape)) * jax.process_count()
        return state, {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                       "lr": float(metrics["lr"]), "response_tokens": int(metrics["response_tokens"]),
                       "samples": int(metrics["samples"]), "finite": bool(metrics["finite"]),
                       "tokens": int(metrics["tokens"]),
                       "flops": setup.model_cfg.train_flops_per_token(host_batch["tokens"].shape[1]) * padded}

    validate = None
    if setup.validate is not None:
        # the sampling layout: weights replicated over fsdp, prompts and cache split (a copy, freed after)
        validate = lambda state, step: setup.validate(sharding.for_sampling(placed.params),  # noqa: E731
                                                      sharding.for_sampling(state.params), step)
    peak = peak_flops(override=None if cfg.train.peak_tflops is None else cfg.train.peak_tflops * 1e12)
    return loop.train(run, placed.state, step, iter(setup.batches), total_steps=setup.total_steps,
                      checkpoint=cfg.checkpoint, progress=progress, description="sft", valid_every=cfg.valid.every,
                      validate=validate, peak_flops=peak, max_steps=max_steps)


def epoch_steps(samples_per_epoch: int, cfg: SFTConfig) -> int:
    """The optimiser steps in tasks.num_epochs epochs (batches run across epoch boundaries)."""
    return cfg.tasks.num_epochs * samples_per_epoch // cfg.train.global_batch


def batch_sizes(cfg: SFTConfig) -> int:
    """Samples per step on this process (when packed, the rows they fill vary from step to step)."""
    procs = jax.process_count()
    if cfg.train.global_batch % procs:
        raise ValueError(f"train.global_batch ({cfg.train.global_batch}) must be a multiple of the number of "
                         f"processes ({procs})")
    per_process = cfg.train.global_batch // procs
    if cfg.tasks.pack_length is None and per_process % cfg.train.micro_batch:
        raise ValueError(f"train.global_batch / processes ({per_process}) must be a multiple of train.micro_batch "
                         f"({cfg.train.micro_batch})")
    return per_process


def check_inputs(cfg: SFTConfig) -> None:
    """What can be checked before loading anything: the teacher directory, the ShareGPT file, the batch split."""
    batch_sizes(cfg)
    cfg.tasks.check_training()
    if not Path(cfg.teacher).is_dir():
        raise UserError(f"teacher={cfg.teacher!r} is not a directory: train one with `reclm-jax teacher train --out ...`")
    if cfg.tasks.mixes_sharegpt and not Path(cfg.tasks.sharegpt_path).is_file():
        raise UserError(f"tasks.sharegpt_path={cfg.tasks.sharegpt_path!r} is not a file")


CUT_PROBE = 256  # samples of epoch 0 measured for `warn_about_cuts`


def warn_about_cuts(samples: list[Sample], policy: ChatPolicy, tasks_cfg: TaskConfig) -> None:
    """Say how many training samples the length limits cut: a cut response teaches lists without their end."""
    response, length = cut_shares(samples, policy, tasks_cfg.max_length, tasks_cfg.max_response_tokens)
    if jax.process_index() == 0 and response:
        print(f"warning: {response:.0%} of {len(samples)} SFT samples have answers longer than "
              f"tasks.max_response_tokens={tasks_cfg.max_response_tokens}: they are cut, so the model does not learn "
              "how those lists end (raise it)", flush=True)
    if jax.process_index() == 0 and length:
        print(f"warning: {length:.0%} of {len(samples)} SFT samples are longer than tasks.max_length="
              f"{tasks_cfg.max_length}: their prompts lose their oldest tokens", flush=True)


def run(cfg: SFTConfig, *, resume: bool = True, progress: bool = True) -> Result:
    """Build everything from `cfg` and train (or resume) in cfg.out_dir; the adapter goes to <out_dir>/adapter.
    The run directory and the inputs are checked before anything is loaded or created."""
    sharding.initialize_distributed(cfg.mesh)  # before anything asks JAX for its devices or processes
    run_dir = RunDir(cfg.out_dir, cfg, resume=resume, may_change=MAY_CHANGE)
    check_inputs(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    per_process = batch_sizes(cfg)
    tasks_cfg = replace(cfg.tasks, batch_size=per_process)

    policy = ChatPolicy.load(cfg.model.tokenizer)
    model_cfg, params = hf_io.load_model(cfg.model, policy.tokenizer, cfg.train.seed)
    lora_cfg = cfg.lora
    lora = lora_lib.init(jax.random.key(cfg.train.seed), params, model_cfg, lora_cfg)

    dataset = load_dataset(cfg.data)
    teacher = Teacher.load(cfg.teacher)
    titles = display_titles(dataset.titles, policy, tasks_cfg.max_title_tokens)
    ctx = TaskContext(dataset, teacher, tasks_cfg, titles=titles)
    conversations = read_sharegpt(tasks_cfg.sharegpt_path) if tasks_cfg.mixes_sharegpt else None
    # Memoised: epoch 0, built to count the steps, is reused by the pipeline.
    build_epoch = functools.lru_cache(maxsize=1)(lambda epoch: training_samples(ctx, epoch, conversations))
    steps = cfg.train.steps if cfg.train.steps is not None else epoch_steps(len(build_epoch(0)), cfg)
    warn_about_cuts(build_epoch(0)[:CUT_PROBE], policy, tasks_cfg)
    out = run_dir.path

    validate = None
    if cfg.valid.every:
        users = cfg.valid.users or tasks_cfg.valid_users
        eval_set = build_eval_set(TaskContext(dataset, teacher, replace(tasks_cfg, valid_users=users), titles=titles),
                                  "valid")
        catalogue = Catalogue(titles, cfg.valid.title_match, fuzzy=cfg.valid.fuzzy_titles)
        max_prompt = min(tasks_cfg.max_length, model_cfg.max_position_embeddings) - cfg.valid.max_new_tokens

        def validate(placed_params: Params, adapter: Params, step: int) -> dict[str, float]:
            def answer(prompts):
                return policy.answer(placed_params, model_cfg, prompts, max_new_tokens=cfg.valid.max_new_tokens,
                                     batch_size=cfg.valid.batch_size, lora=adapter, lora_cfg=lora_cfg)

            metrics, answers = validation.evaluate(eval_set, answer, policy, catalogue, dataset.category_matrix,
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
                     batches=sft_batches(build_epoch, policy, tasks_cfg, row_multiple=cfg.train.micro_batch),
                     total_steps=steps, micro_rows=cfg.train.micro_batch * jax.process_count(),
                     validate=validate, mesh=mesh)
    result = train(setup, cfg, run=run_dir, progress=progress)
    adapter = multihost_utils.process_allgather(result.state.params, tiled=True)  # every host takes part
    if jax.process_index() == 0:
        hf_io.save_peft_dir(out / "adapter", adapter, model_cfg, lora_cfg, base_model_name_or_path=cfg.model.base)
    return result
