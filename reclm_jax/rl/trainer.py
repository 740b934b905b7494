"""The RL stage's loop: RL prompts -> rollouts -> host rewards -> one jitted PPO update, with checkpoints,
resume and logging like SFT's.

    run(cfg, resume=True, progress=True)   # everything from the config: model, tokenizer, dataset, teacher

`PPOTrainer` holds the pieces one step needs and is what `run` (and the tests) drive:

    trainer = PPOTrainer(cfg, base, model_cfg, scorer, stop_ids, pad_id, mesh)
    metrics = trainer.step(prompts, step)      # sample, score, update; returns the step's scalars

Per step it logs (JSONL + TensorBoard + progress bar via `run_log`): the rule reward per response ("reward",
before the KL penalty), R_item per item, R_list (Eq. 5), the KL to the reference, entropy, clip fraction,
losses, explained variance, the formatting-error rates of the samples (format/CorrectCount, NonExist@K,
RepeatItem@K, InHistory@K, empty_rate, truncated_rate), their HR@K / NDCG@K (sample/...), and the wall and
CPU time of sampling, host rewards and the update (time/..., cpu/...). Every random draw of step s comes from
`fold_in(key, s)`, so a resumed run draws exactly what the uninterrupted run would have.

Checkpoints (`checkpointing.Checkpointer`, `<out_dir>/checkpoints`): the train state (actor LoRA, critic LoRA,
value head, optimiser state, step) and, as JSON, the prompt stream's position. The base is not saved: it is
the SFT model, reloaded from `model.base` (+ `model.sft_adapter`). At the end the actor adapter is also written
as a PEFT directory `<out_dir>/actor` (merge it into the SFT model for evaluation and serving).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reclm_jax import config as config_lib
from reclm_jax.llm.config import LlamaConfig
from reclm_jax.rl import rollout
from reclm_jax.rl.config import PPOConfig
from reclm_jax.rl.update import init_state, ppo_update

Params = dict[str, Any]


def run_keys(seed: int) -> dict[str, jax.Array]:
    """Independent random streams of a run: adapter/head init, random base weights, and the steps (step s
    uses fold_in(keys["steps"], s) for its sampling and minibatch order)."""
    init, base, steps = jax.random.split(jax.random.key(seed), 3)
    return {"init": init, "base": base, "steps": steps}


def data_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first `num_devices` devices (all by default): the update's batch is split over
    "data", the base and the train state are replicated (an RL step's adapters and batch are small; a 7B base
    in bfloat16 fits each A100-40GB). Sampling runs the sampler on the replicated base as it is."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"train.data_parallel={n} but {len(devices)} devices are available")
    return Mesh(np.asarray(devices[:n]), ("data",))


class PPOTrainer:
    """One PPO step at a time over a fixed base; see the module docstring."""

    def __init__(self, cfg: PPOConfig, base: Params, model_cfg: LlamaConfig, scorer: rollout.Scorer,
                 stop_ids: list[int], pad_id: int, mesh: Mesh | None = None):
        self.cfg, self.model_cfg, self.scorer = cfg, model_cfg, scorer
        self.stop_ids, self.pad_id = list(stop_ids), pad_id
        self.mesh = mesh or data_mesh(1)
        if cfg.batch_size % self.mesh.size:
            raise ValueError(f"{cfg.batch_size} sequences per step do not split over {self.mesh.size} devices")
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.split = NamedSharding(self.mesh, PartitionSpec("data"))
        self.base = jax.device_put(base, self.replicated)
        self.keys = run_keys(cfg.seed)
        self.state = jax.device_put(init_state(self.keys["init"], self.base, model_cfg, cfg), self.replicated)
        self.actor_cfg, self.critic_cfg = cfg.actor_lora.lora(), cfg.critic_lora.lora()

    def step(self, prompts: list[rollout.Prompt], step: int) -> dict[str, float]:
        """Sample, score and update on `prompts` (rollout.prompts_per_step of them) as step number `step`."""
        r = self.cfg.rollout
        if len(prompts) != r.prompts_per_step:
            raise ValueError(f"step needs rollout.prompts_per_step={r.prompts_per_step} prompts, got {len(prompts)}")
        sample_key, update_key = jax.random.split(jax.random.fold_in(self.keys["steps"], step))
        clock = [(time.perf_counter(), time.process_time())]
        gen = rollout.sample(self.base, self.state["params"]["actor"], prompts, sample_key, model_cfg=self.model_cfg,
                             actor_cfg=self.actor_cfg, rollout=r, stop_ids=self.stop_ids, pad_id=self.pad_id)
        clock.append((time.perf_counter(), time.process_time()))
        scores, stats = self.scorer.score(prompts, gen.tokens, gen.lengths, r.responses_per_prompt, self.stop_ids)
        batch = rollout.build_batch(prompts, gen, scores, r.responses_per_prompt, self.pad_id)
        clock.append((time.perf_counter(), time.process_time()))
        self.state, metrics = ppo_update(self.base, self.state, jax.device_put(batch, self.split), update_key,
                                         model_cfg=self.model_cfg, actor_cfg=self.actor_cfg,
                                         critic_cfg=self.critic_cfg, hyper=self.cfg.ppo)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        clock.append((time.perf_counter(), time.process_time()))
        self.last_batch_tokens = int(batch["attention_mask"].sum())
        # wall and process CPU seconds of each part (CPU time is the steadier number on a shared machine)
        for i, part in enumerate(("sample", "rewards", "update")):
            metrics[f"time/{part}_s"] = clock[i + 1][0] - clock[i][0]
            metrics[f"cpu/{part}_s"] = clock[i + 1][1] - clock[i][1]
        return {**stats, **metrics}


class PromptStream:
    """RL prompts in a fixed order: epoch e is `tasks.training.rl_prompts(ctx, e)` (deterministic), taken in
    consecutive slices; a slice that crosses an epoch's end continues with the next epoch. The position
    (epoch, offset) is what a checkpoint stores."""

    def __init__(self, ctx, tokenizer, max_prompt_tokens: int, epoch: int = 0, offset: int = 0):
        self.ctx, self.tokenizer, self.max_prompt_tokens = ctx, tokenizer, max_prompt_tokens
        self.epoch, self.offset = epoch, offset
        self._prompts: list[rollout.Prompt] | None = None

    def _epoch_prompts(self) -> list[rollout.Prompt]:
        from reclm_jax.tasks.training import rl_prompts

        if self._prompts is None:
            samples = rl_prompts(self.ctx, self.epoch)
            if not samples:
                raise ValueError("the dataset yields no RL prompts (every user needs >= 2 training items)")
            self._prompts = rollout.prompts_from_samples(samples, self.tokenizer, self.max_prompt_tokens)
        return self._prompts

    def take(self, count: int) -> list[rollout.Prompt]:
        out: list[rollout.Prompt] = []
        while len(out) < count:
            prompts = self._epoch_prompts()
            chunk = prompts[self.offset:self.offset + count - len(out)]
            out += chunk
            self.offset += len(chunk)
            if self.offset >= len(prompts):
                self.epoch, self.offset, self._prompts = self.epoch + 1, 0, None
        return out

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}


def load_base(cfg: PPOConfig, tokenizer) -> tuple[LlamaConfig, Params]:
    """The SFT model: `model.base` (+ the merged `model.sft_adapter`), or random weights for smoke runs."""
    from reclm_jax.llm import hf_io, lora as lora_lib, model
    from reclm_jax.llm.config import PRESETS

    m = cfg.model
    dtypes = {"param_dtype": m.param_dtype, "compute_dtype": m.compute_dtype, "remat": m.remat}
    if m.random_init:
        model_cfg = PRESETS[m.base].replace(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id or 0,
                                            eos_token_id=tokenizer.eos_token_id, **dtypes)
        base = model.init_params(run_keys(cfg.seed)["base"], model_cfg)
    else:
        model_cfg, base = hf_io.load_pretrained(m.base, **dtypes)
    if m.sft_adapter is not None:
        sft_cfg, sft_lora = hf_io.load_peft_dir(m.sft_adapter, model_cfg)
        base = lora_lib.merge(base, sft_lora, sft_cfg)
    return model_cfg, base


def build(cfg: PPOConfig, teacher=None) -> tuple[PPOTrainer, PromptStream]:
    """The trainer and the prompt stream (from its start) of a config: tokenizer, SFT model, dataset, teacher
    (loaded from cfg.teacher unless given), catalogue of the titles as SFT shows them, mesh."""
    from reclm_jax.cli import UserError
    from reclm_jax.data import load_dataset
    from reclm_jax.eval.parse import Catalogue
    from reclm_jax.llm.tokenizer import load_tokenizer, stop_token_ids
    from reclm_jax.tasks.samples import TaskContext
    from reclm_jax.tasks.tokenize import display_titles
    from reclm_jax.teacher.query import Teacher

    tokenizer = load_tokenizer(cfg.model.tokenizer)
    model_cfg, base = load_base(cfg, tokenizer)
    dataset = load_dataset(cfg.data)
    teacher = teacher if teacher is not None else Teacher.load(cfg.teacher)
    if teacher.num_items != dataset.num_items:
        raise UserError(f"teacher {cfg.teacher} was trained on {teacher.num_items} items, dataset "
                        f"{dataset.name} has {dataset.num_items}")
    tasks_cfg = cfg.prompts.tasks()
    titles = display_titles(dataset.titles, tokenizer, tasks_cfg.max_title_tokens)
    catalogue = Catalogue(titles, cfg.rollout.title_match, fuzzy=cfg.rollout.fuzzy_titles)
    scorer = rollout.Scorer(catalogue, teacher, dataset.category_matrix, rollout.decoder(tokenizer), cfg.rewards)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = PPOTrainer(cfg, base, model_cfg, scorer, stop_token_ids(tokenizer), pad_id,
                         data_mesh(cfg.train.data_parallel))
    stream = PromptStream(TaskContext(dataset, teacher, tasks_cfg, titles=titles), tokenizer,
                          cfg.rollout.max_prompt_tokens)
    return trainer, stream


def run(cfg: PPOConfig, *, resume: bool = True, progress: bool = True) -> dict[str, float]:
    """Train with PPO for cfg.train.steps steps (resuming from `<out_dir>/checkpoints` if it holds a run);
    returns the last step's metrics."""
    from reclm_jax.checkpointing import Checkpointer, abstract
    from reclm_jax.llm import hf_io
    from reclm_jax.run_log import RunLog

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_lib.dump(cfg, out / "config.yaml")
    trainer, stream = build(cfg)
    ckpt = Checkpointer(out / "checkpoints", keep_last=cfg.train.keep_checkpoints)
    start = 0
    if resume and ckpt.latest_step() is not None:
        trainer.state, extra = ckpt.restore(abstract(trainer.state))
        start = int(trainer.state["step"])
        stream = PromptStream(stream.ctx, stream.tokenizer, stream.max_prompt_tokens, **extra["prompts"])
    log = RunLog(out, total_steps=cfg.train.steps, start_step=start, progress=progress, description="ppo")
    metrics: dict[str, float] = {}
    tokens = 0  # since the last log line (throughput is measured between log lines)
    try:
        for step in range(start, cfg.train.steps):
            metrics = trainer.step(stream.take(cfg.rollout.prompts_per_step), step)
            tokens += trainer.last_batch_tokens
            done = step + 1
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                log.step(done, metrics, tokens=tokens)
                tokens = 0
            if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
                ckpt.save(done, trainer.state, extra={"prompts": stream.position()})
                log.pause()
        ckpt.wait()
        hf_io.save_peft_dir(out / "actor", jax.device_get(trainer.state["params"]["actor"]), trainer.model_cfg,
                            trainer.actor_cfg, base_model_name_or_path=cfg.model.base)
    finally:
        ckpt.close()
        log.close()
    return metrics
