"""Every setting of the RL stage (paper section 2.3.3; notes/reference-implementation.md, "RL stage").

Defaults are the paper's where it states them, else the official code's:
- eta (kl_coef) 0.3, gamma 0.99, lambda 0.95, ratio clip 0.2, critic loss weight 0.5 (paper);
- value clip 0.2, entropy bonus 0.01, AdamW lr 5e-6, gradient clip 0.5, 4 PPO epochs, early stop when the
  approximate KL exceeds 0.05 (official code; lambda there is 1.0, the paper's 0.95 is used);
- actor and critic LoRA r 4, alpha 2 (paper), no LoRA dropout (dropout would make the first PPO ratio differ
  from 1 and the sampled log-probs differ from the trained ones);
- 2 responses per prompt at temperature 0.7 (paper; the official code makes one of the two greedy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

from reclm_jax.config import Count, NonNegative, NonNegativeInt, Positive, Rule, Section
from reclm_jax.data.config import DataConfig
from reclm_jax.eval.rewards import RewardOptions
from reclm_jax.llm.config import LoraConfig
from reclm_jax.llm.sharding import MeshConfig
from reclm_jax.sft.config import ModelConfig
from reclm_jax.tasks.config import RL_KINDS, TaskConfig
from reclm_jax.training.loop import CheckpointConfig
from reclm_jax.training.optim import OptimConfig


@dataclass(frozen=True)
class ModelSection(ModelConfig):
    """The SFT model that the policy, the critic and the reference share: SFT's `model` section (random
    weights come from the PPO `seed`), plus the SFT adapter to merge."""

    sft_adapter: str | None = None  # a PEFT adapter directory (the SFT LoRA), merged into `base` once at load


@dataclass(frozen=True)
class PromptSection(Section):
    """The RL prompts (`tasks.training.rl_prompts`): one per user per epoch, the `kinds` uniform."""

    seed: int = 0
    k: tuple[int, int] = (6, 10)  # k uniform in this range (the official code)
    kinds: tuple[str, ...] = RL_KINDS  # the instructions drawn uniformly: seq (I0), +c, -c, <=, >=, ~ (the paper: all)
    max_history: int = 10
    max_title_tokens: int = 64  # titles shown (and matched) as SFT shows them: cut to this many tokens

    def tasks(self) -> TaskConfig:
        return TaskConfig(seed=self.seed, task_set="v1", sharegpt_ratio=0.0, rl_k=tuple(self.k),
                          rl_kinds=tuple(self.kinds), max_history=self.max_history,
                          max_title_tokens=self.max_title_tokens)

    def check(self) -> None:
        self.tasks()  # TaskConfig's rules (the same names, except k and kinds, which are its rl_k and rl_kinds)


@dataclass(frozen=True)
class RolloutConfig(Section):
    prompts_per_step: Count = 16  # RL prompts sampled per PPO step (x responses_per_prompt sequences)
    responses_per_prompt: Count = 2
    temperature: Positive = 0.7  # PPO needs sampled responses
    top_k: NonNegativeInt = 0  # 0 = off (the paper states none; the official code's sampled response uses 20)
    top_p: Annotated[float, Rule(lambda v: 0 < v <= 1, "must be in (0, 1]")] = 1.0
    max_new_tokens: Count = 160  # ~112 tokens for a top-10 list of Movie titles (paper section 3)
    max_prompt_tokens: Count = 512  # prompts are cut from the left to this many tokens (the paper)
    # "strict": only a catalogue title earns an item reward; "lenient" (eval.parse) also matches through quotes,
    # case and cut-off annotations, so an invented suffix ("Heat (3)") is never penalised
    title_match: Literal["strict", "lenient"] = "strict"
    fuzzy_titles: bool = False  # also match titles within Levenshtein distance 3 (the official code's option)
    # "catalogue": train the constrained policy: rollouts are sampled under catalogue-constrained decoding
    # (`llm.constrain`: exactly k distinct catalogue titles outside the history) and the update's ratio, KL and
    # entropy are those of the masked distributions the tokens were drawn from (`rl.update`), so rewards differ
    # only in what the lists recommend and the trained policy is the one that serves them (decode it with
    # `--constrain catalogue`). Costs the masks, V / 8 bytes a sampled token.
    constrain: Literal["none", "catalogue"] = "none"


@dataclass(frozen=True)
class PPOHyper(Section):
    kl_coef: NonNegative = 0.3  # eta of Eq. 6: r_t -= eta * (log pi(y_t) - log pi_ref(y_t))
    whiten_rewards: bool = True  # per-token rewards to unit std over response tokens, mean kept
    gamma: Annotated[float, Rule(lambda v: 0 <= v <= 1, "must be in [0, 1]")] = 0.99
    lam: Annotated[float, Rule(lambda v: 0 <= v <= 1, "must be in [0, 1]")] = 0.95
    clip_eps: Annotated[float, Rule(lambda v: 0 < v < 1, "must be in (0, 1)")] = 0.2  # ratio clip
    value_clip: NonNegative = 0.2
    vf_coef: NonNegative = 0.5  # critic loss weight
    ent_coef: NonNegative = 0.01  # entropy bonus
    epochs: Count = 4  # passes over the rollout batch per step
    minibatches: Count = 4  # minibatches per epoch; rollout.prompts_per_step must divide evenly
    target_kl: Positive | None = 0.05  # skip the remaining minibatch updates once approx KL exceeds it; None = off
    MOVED: ClassVar = {"lr": "optim.lr", "weight_decay": "optim.weight_decay", "adam_b1": "optim.b1",
                       "adam_b2": "optim.b2", "adam_eps": "optim.eps", "grad_clip": "optim.clip_norm"}
    # False: PPO's old log-probs are the sampler's (kept from sampling). True: recompute them with the training
    # forward pass (one more no-grad forward per step), so that ratio and KL compare log-probs of one code
    # path; worth it in bfloat16, where the KV-cache decode and the full forward round differently.
    recompute_logprobs: bool = False
    # What an answer's advantage is measured against. "critic": GAE with the critic's values (the paper).
    # "group": the mean return of the other answers to the same prompt, on every token of the answer (leave-one-out,
    # as RLOO and GRPO do; rollout.responses_per_prompt >= 2): what a prompt gives all its answers alike cancels,
    # which a freshly initialised critic cannot do in a short run. The critic is still trained.
    baseline: Literal["critic", "group"] = "critic"


@dataclass(frozen=True)
class TrainSection(Section):
    steps: Count = 1000  # PPO steps (one rollout batch and its update each)
    log_every: Count = 1
    # Stop after the first step whose sampled responses are further than this from the SFT model (the logged
    # "kl": per response, the sum over its tokens of log pi - log pi_ref); None: run all steps. KL weight
    # eta holds the policy only softly: at a high learning rate the KL runs away and the reward falls back.
    max_kl: Positive | None = None
    MOVED: ClassVar = {"data_parallel": "mesh.data"}


@dataclass(frozen=True)
class PPOConfig(Section):
    out_dir: str = "runs/ppo"
    teacher: str = "runs/teacher"  # a trained teacher directory (`reclm-jax teacher train --out ...`)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0  # adapters, value head, random base weights, sampling, minibatch order
    model: ModelSection = field(default_factory=ModelSection)
    # the RL stage's adapters: r 4, alpha 2 (the paper), no dropout (see the module docstring)
    actor_lora: LoraConfig = field(default_factory=lambda: LoraConfig(rank=4, alpha=2.0, dropout=0.0))
    critic_lora: LoraConfig = field(default_factory=lambda: LoraConfig(rank=4, alpha=2.0, dropout=0.0))
    value_head_width: Count = 64  # Linear(h, 64) -> GELU -> Linear(64, 1)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardOptions = field(default_factory=RewardOptions)  # rewards.item_level=false: Ours_v3
    ppo: PPOHyper = field(default_factory=PPOHyper)
    # AdamW at lr 5e-6, clipped to global norm 0.5 over actor and critic gradients together (the official code)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6, clip_norm=0.5))
    prompts: PromptSection = field(default_factory=PromptSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=50, keep_last=2))
    # The batch is split over mesh.data x mesh.fsdp devices; the base is FSDP-sharded over mesh.fsdp (for a base
    # that does not fit on one device; 1: replicated), the adapters and value head are replicated. Multi-host too.
    mesh: MeshConfig = field(default_factory=lambda: MeshConfig(data=-1, fsdp=1))

    def check(self) -> None:
        if self.mesh.tensor != 1:
            raise ValueError(f"mesh.tensor must be 1 for PPO (got {self.mesh.tensor}): it splits the batch over "
                             "mesh.data and mesh.fsdp, and the base over mesh.fsdp")
        if self.optim.schedule != "constant":
            raise ValueError(f"optim.schedule must be 'constant' for PPO, got {self.optim.schedule!r}")
        if self.ppo.baseline == "group" and self.rollout.responses_per_prompt < 2:
            raise ValueError("ppo.baseline = 'group' compares the answers to one prompt: it needs "
                             f"rollout.responses_per_prompt >= 2, got {self.rollout.responses_per_prompt}")
        if self.rollout.prompts_per_step % self.ppo.minibatches:
            raise ValueError(f"rollout.prompts_per_step = {self.rollout.prompts_per_step} must divide into "
                             f"ppo.minibatches = {self.ppo.minibatches} (a minibatch takes whole prompts, each "
                             "with its responses)")

    @property
    def batch_size(self) -> int:
        """Sequences per PPO step."""
        return self.rollout.prompts_per_step * self.rollout.responses_per_prompt
