"""The RL stage: RL prompts -> rollouts -> host rewards -> one jitted PPO update, run by the one training loop.

    run(cfg, resume=True, progress=True)   # everything from the config: model, tokenizer, dataset, teacher

`PPOTrainer` holds the fixed pieces of a step (the SFT base, the scorer, the chat policy, the mesh) and is what
`run` (and the tests) drive:

    trainer = PPOTrainer(cfg, base, model_cfg, scorer, policy, mesh)
    state, metrics = trainer.step(trainer.state, prompts)     # sample, score, update; the step's scalars

Per step it logs (JSONL + TensorBoard + progress bar, `training.loop`): the rule reward per response ("reward",
before the KL penalty), R_item per item, R_list (Eq. 5), the KL to the reference, entropy, clip fraction,
losses, explained variance, the formatting-error rates of the samples (format/CorrectCount, NonExist@K,
RepeatItem@K, InHistory@K, empty_rate, truncated_rate), their HR@K / NDCG@K (sample/...), and the wall and
CPU time of sampling, host rewards and the update (time/..., cpu/...). Every random draw of step s comes from
`fold_in(key, s)`, so a resumed run draws exactly what the uninterrupted run would have.

Checkpoints (`training.loop`, `<out_dir>/checkpoints/last`): the `TrainState` (actor LoRA, critic LoRA, value
head, optimiser state, step) and the prompt stream's position. The base is not saved: it is the SFT model,
reloaded from `model.base` (+ `model.sft_adapter`). At the end the actor adapter is also written as a PEFT
directory `<out_dir>/actor` (merge it into the SFT model for evaluation and serving).
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import grain
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reclm_jax.core.errors import UserError
from reclm_jax.data import load_dataset
from reclm_jax.eval.parse import Catalogue
from reclm_jax.llm import hf_io, lora as lora_lib, sharding
from reclm_jax.llm.automaton import catalogue_automaton
from reclm_jax.llm.chat import ChatPolicy
from reclm_jax.llm.config import LlamaConfig
from reclm_jax.llm.sharding import MeshConfig, initialize_distributed
from reclm_jax.rl import rollout
from reclm_jax.rl.config import PPOConfig
from reclm_jax.rl.update import init_state, ppo_update
from reclm_jax.tasks.encode import display_titles
from reclm_jax.tasks.samples import TaskContext
from reclm_jax.tasks.training import rl_prompts
from reclm_jax.teacher.query import Teacher
from reclm_jax.training import loop
from reclm_jax.training.loop import Result, RunDir
from reclm_jax.training.state import TrainState

Params = dict[str, Any]
# Config keys that may change when a run is resumed: they do not alter the steps already taken.
MAY_CHANGE = ("train.steps", "train.log_every", "train.max_kl", "checkpoint.every", "checkpoint.keep_last",
              "checkpoint.async_save")


def run_keys(seed: int) -> dict[str, jax.Array]:
    """Independent random streams of a run: adapter/head init and the steps (step s uses
    fold_in(keys["steps"], s) for its sampling and minibatch order)."""
    # Three streams, as before random base weights moved to `hf_io.load_model`: existing seeds reproduce.
    init, _, steps = jax.random.split(jax.random.key(seed), 3)
    return {"init": init, "steps": steps}


def ppo_mesh(cfg: MeshConfig) -> Mesh:
    """The (data, fsdp, tensor) mesh over the first data x fsdp devices (-1: all the rest, of every process).
    The batch is split over data and fsdp: sampling and the update each work on their device's rows. The base
    is FSDP-sharded over fsdp like SFT's (1: replicated, as the paper's 7B in bfloat16 fits an A100-40GB); the
    adapters, value head and optimiser state are small and replicated."""
    devices = jax.devices()
    known = math.prod(s for s in cfg.sizes if s != -1)
    n = len(devices) if -1 in cfg.sizes else known
    if not known <= n <= len(devices):
        raise ValueError(f"mesh {cfg.sizes} (data, fsdp, tensor) needs {known} devices, {len(devices)} are available")
    return sharding.make_mesh(cfg, devices[:n])


class PPOTrainer:
    """One PPO step at a time over a fixed base; see the module docstring."""

    def __init__(self, cfg: PPOConfig, base: Params, model_cfg: LlamaConfig, scorer: rollout.Scorer,
                 policy: ChatPolicy, mesh: Mesh | None = None):
        self.cfg, self.model_cfg, self.scorer = cfg, model_cfg, scorer
        self.policy = policy
        self.mesh = mesh or ppo_mesh(MeshConfig(data=1, fsdp=1))
        self.shards = sharding.batch_shards(self.mesh)
        if cfg.rollout.prompts_per_step % self.shards:
            raise ValueError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} does not split over "
                             f"{self.shards} devices (the update's rows are prompts, each with its responses)")
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.split = NamedSharding(self.mesh, PartitionSpec(sharding.mesh_batch_axes(self.mesh)))
        self.base = sharding.shard_params(base, self.mesh)
        self.keys = run_keys(cfg.seed)
        # one program that creates the state in its place (many small eager ops and compiles otherwise)
        self.state = jax.jit(init_state, static_argnums=(2, 3), out_shardings=self.replicated)(
            self.keys["init"], self.base, model_cfg, cfg)
        self.actor_cfg, self.critic_cfg = cfg.actor_lora, cfg.critic_lora
        self.automaton = (catalogue_automaton(scorer.catalogue.titles, policy.tokenizer)
                          if cfg.rollout.constrain == "catalogue" else None)

    def sample(self, actor: Params, prompts: list[rollout.Prompt], key: jax.Array):
        """The step's rollouts of `prompts` under adapter `actor` (`rollout.sample` with this run's settings)."""
        return rollout.sample(self.base, actor, prompts, key, model_cfg=self.model_cfg, actor_cfg=self.actor_cfg,
                              rollout=self.cfg.rollout, policy=self.policy, automaton=self.automaton)

    def step(self, state: TrainState, prompts: list[rollout.Prompt]) -> tuple[TrainState, dict[str, Any]]:
        """Sample, score and update on `prompts` (rollout.prompts_per_step of them) as step number state.step."""
        r = self.cfg.rollout
        if len(prompts) != r.prompts_per_step:
            raise ValueError(f"step needs rollout.prompts_per_step={r.prompts_per_step} prompts, got {len(prompts)}")
        sample_key, update_key = jax.random.split(jax.random.fold_in(self.keys["steps"], int(state.step)))
        clock = [(time.perf_counter(), time.process_time())]
        gen = self.sample(state.params["actor"], prompts, sample_key)
        clock.append((time.perf_counter(), time.process_time()))
        scores, stats = self.scorer.score(prompts, gen.tokens, gen.lengths, r.responses_per_prompt, self.policy.stop_ids)
        batch = rollout.build_batch(prompts, gen, scores, r.responses_per_prompt, self.policy.pad_id)
        clock.append((time.perf_counter(), time.process_time()))
        with jax.set_mesh(self.mesh):  # activations pinned to the batch axis; minibatches keep the split
            state, metrics = ppo_update(self.base, state, jax.device_put(batch, self.split), update_key,
                                        model_cfg=self.model_cfg, actor_cfg=self.actor_cfg, critic_cfg=self.critic_cfg,
                                        hyper=self.cfg.ppo, optim=self.cfg.optim,
                                        shards=self.shards)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        clock.append((time.perf_counter(), time.process_time()))
        # wall and process CPU seconds of each part (CPU time is the steadier number on a shared machine)
        for i, part in enumerate(("sample", "rewards", "update")):
            metrics[f"time/{part}_s"] = clock[i + 1][0] - clock[i][0]
            metrics[f"cpu/{part}_s"] = clock[i + 1][1] - clock[i][1]
        return state, {**stats, **metrics, "tokens": int((batch["segment_ids"] >= 0).sum())}


class PromptStream(grain.DatasetIterator):
    """RL prompts in a fixed order, `count` per `next`: epoch e is `tasks.training.rl_prompts(ctx, e)`
    (deterministic), taken in consecutive slices; a slice that crosses an epoch's end continues with the next
    epoch. Its state {"epoch", "offset"} is what a checkpoint stores."""

    def __init__(self, ctx, policy: ChatPolicy, max_prompt_tokens: int, count: int):
        super().__init__()
        self.ctx, self.policy, self.max_prompt_tokens, self.count = ctx, policy, max_prompt_tokens, count
        self.epoch, self.offset = 0, 0
        self._prompts: list[rollout.Prompt] | None = None

    def _epoch_prompts(self) -> list[rollout.Prompt]:
        if self._prompts is None:
            samples = rl_prompts(self.ctx, self.epoch)
            if not samples:
                raise ValueError("the dataset yields no RL prompts (every user needs >= 2 training items)")
            self._prompts = rollout.prompts_from_samples(samples, self.policy, self.max_prompt_tokens)
        return self._prompts

    def __next__(self) -> list[rollout.Prompt]:
        out: list[rollout.Prompt] = []
        while len(out) < self.count:
            prompts = self._epoch_prompts()
            chunk = prompts[self.offset:self.offset + self.count - len(out)]
            out += chunk
            self.offset += len(chunk)
            if self.offset >= len(prompts):
                self.epoch, self.offset, self._prompts = self.epoch + 1, 0, None
        return out

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def set_state(self, state: dict[str, int]) -> None:
        if int(state["epoch"]) != self.epoch:
            self._prompts = None
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


def load_base(cfg: PPOConfig, policy: ChatPolicy) -> tuple[LlamaConfig, Params]:
    """The SFT model: `model.base` (+ the merged `model.sft_adapter`), or random weights for smoke runs."""
    model_cfg, base = hf_io.load_model(cfg.model, policy.tokenizer, cfg.seed)
    if cfg.model.sft_adapter is not None:
        sft_cfg, sft_lora = hf_io.load_peft_dir(cfg.model.sft_adapter, model_cfg)
        base = lora_lib.merge(base, sft_lora, sft_cfg)
    return model_cfg, base


def check_inputs(cfg: PPOConfig) -> None:
    """What can be checked before loading anything: the teacher and SFT adapter directories."""
    if not Path(cfg.teacher).is_dir():
        raise UserError(f"teacher={cfg.teacher!r} is not a directory: train one with `reclm-jax teacher train --out ...`")
    if cfg.model.sft_adapter is not None and not Path(cfg.model.sft_adapter).is_dir():
        raise UserError(f"model.sft_adapter={cfg.model.sft_adapter!r} is not a directory (the SFT run's adapter/)")


def build(cfg: PPOConfig, teacher=None) -> tuple[PPOTrainer, PromptStream]:
    """The trainer and the prompt stream (from its start) of a config: tokenizer, SFT model, dataset, teacher
    (loaded from cfg.teacher unless given), catalogue of the titles as SFT shows them, mesh."""
    policy = ChatPolicy.load(cfg.model.tokenizer)
    model_cfg, base = load_base(cfg, policy)
    dataset = load_dataset(cfg.data)
    teacher = teacher if teacher is not None else Teacher.load(cfg.teacher)
    if teacher.num_items != dataset.num_items:
        raise UserError(f"teacher {cfg.teacher} was trained on {teacher.num_items} items, dataset "
                        f"{dataset.name} has {dataset.num_items}")
    tasks_cfg = cfg.prompts.tasks()
    titles = display_titles(dataset.titles, policy, tasks_cfg.max_title_tokens)
    catalogue = Catalogue(titles, cfg.rollout.title_match, fuzzy=cfg.rollout.fuzzy_titles)
    scorer = rollout.Scorer(catalogue, teacher, dataset.category_matrix, policy.decode, cfg.rewards)
    trainer = PPOTrainer(cfg, base, model_cfg, scorer, policy, ppo_mesh(cfg.mesh))
    stream = PromptStream(TaskContext(dataset, teacher, tasks_cfg, titles=titles), policy,
                          cfg.rollout.max_prompt_tokens, cfg.rollout.prompts_per_step)
    return trainer, stream


def kl_stop(max_kl: float | None, scalars: dict) -> str | None:
    """Why the run stops after a step with these scalars (`train.max_kl`), or None."""
    if max_kl is not None and float(scalars["kl"]) > max_kl:
        return f"the sampled responses' KL to the SFT model, {float(scalars['kl']):.3g}, is above train.max_kl = {max_kl}"
    return None


def run(cfg: PPOConfig, *, resume: bool = True, progress: bool = True) -> Result:
    """Train with PPO for cfg.train.steps steps in the one loop (resuming the run in cfg.out_dir if it holds one);
    the actor adapter goes to <out_dir>/actor. The run directory and the inputs are checked first."""
    initialize_distributed(cfg.mesh)  # before anything asks JAX for its devices or processes
    run_dir = RunDir(cfg.out_dir, cfg, resume=resume, may_change=MAY_CHANGE)
    check_inputs(cfg)
    trainer, stream = build(cfg)
    result = loop.train(run_dir, trainer.state, trainer.step, stream, total_steps=cfg.train.steps,
                        checkpoint=cfg.checkpoint, progress=progress, description="ppo", log_every=cfg.train.log_every,
                        stop=partial(kl_stop, cfg.train.max_kl))
    if jax.process_index() == 0:
        hf_io.save_peft_dir(run_dir.path / "actor", jax.device_get(result.state.params["actor"]), trainer.model_cfg,
                            trainer.actor_cfg, base_model_name_or_path=cfg.model.base)
    return result
