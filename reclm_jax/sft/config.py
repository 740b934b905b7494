"""Every default of the SFT stage (paper section 2.2 and the reference code's hyper-parameters).

A preset YAML under `configs/sft/` holds only what differs; `reclm-jax sft --config <yaml> key=value ...`
overrides last. The instruction data's own settings (task set, lengths, buckets, epochs, valid users) are
the `tasks` section (`reclm_jax.tasks.config.TaskConfig`), except `tasks.batch_size`, which SFT sets from
`train.global_batch` (global batch / number of processes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from reclm_jax.data.config import DataConfig
from reclm_jax.llm.config import DTYPES, LAYER_TARGETS, PRESETS, REMAT_POLICIES, LoraConfig
from reclm_jax.llm.sharding import MeshConfig
from reclm_jax.tasks.config import TaskConfig

Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class ModelConfig:
    # A model with weights (a preset with embedded weights such as "smollm2-135m", a .gguf file or a Hugging
    # Face directory), or with random_init a `reclm_jax.llm.config.PRESETS` name (smoke runs and tests).
    base: str = "smollm2-135m"
    random_init: bool = False  # random base weights from train.seed; vocab_size becomes the tokenizer's
    tokenizer: str = "smollm2-135m"  # see `reclm_jax.llm.tokenizer.load_tokenizer`
    param_dtype: Dtype = "float32"  # storage of the frozen base ("bfloat16" halves its memory)
    compute_dtype: Dtype = "float32"  # "bfloat16" on accelerators; the loss and the adapter stay float32
    remat: Literal["none", "full", "dots"] = "none"  # gradient checkpointing of each decoder layer

    def __post_init__(self):
        if self.random_init and self.base not in PRESETS:
            raise ValueError(f"model.base {self.base!r} must be one of {sorted(PRESETS)} with model.random_init")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"model.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")


@dataclass(frozen=True)
class AdapterConfig:
    """LoRA on all linear layers, r 16, alpha 8, dropout 0.1 (the paper)."""

    rank: int = 16
    alpha: float = 8.0
    dropout: float = 0.1
    targets: tuple[str, ...] = LAYER_TARGETS
    seed: int = 0  # initial `a` matrices

    def lora_config(self) -> LoraConfig:
        return LoraConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets)

    def __post_init__(self):
        self.lora_config()  # validates


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, lr 1e-3, weight decay 0.01, eps 1e-5, warmup 1.25 %, polynomial decay power 2, clip 1.0."""

    lr: float = 1e-3
    end_lr: float = 0.0
    warmup_ratio: float = 0.0125
    decay_power: float = 2.0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-5
    clip_norm: float = 1.0

    def __post_init__(self):
        if self.lr <= 0 or self.end_lr < 0 or self.eps <= 0 or self.clip_norm <= 0 or self.weight_decay < 0:
            raise ValueError("optim.lr, optim.eps and optim.clip_norm must be > 0; optim.end_lr and "
                             "optim.weight_decay >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            raise ValueError("optim.b1 and optim.b2 must be in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0  # LoRA dropout masks (and random base weights)
    global_batch: int = 64  # samples per optimiser step over all processes (the paper)
    # samples per forward/backward on each process (over all its devices); gradients accumulate to global_batch
    micro_batch: int = 8
    steps: int | None = None  # optimiser steps; None: tasks.num_epochs epochs of training samples
    peak_tflops: float | None = None  # per-device peak for MFU; None: the table in run_log by device kind

    def __post_init__(self):
        for name in ("global_batch", "micro_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"train.steps must be >= 1 or null, got {self.steps}")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 200  # steps between checkpoints (and one at the end)
    keep_last: int = 3
    async_save: bool = True
    best_metric: str = "seqrec/NDCG@K"  # validation metric that picks the best checkpoint
    best_mode: Literal["max", "min"] = "max"

    def __post_init__(self):
        if self.every < 1 or self.keep_last < 1:
            raise ValueError("checkpoint.every and checkpoint.keep_last must be >= 1")


@dataclass(frozen=True)
class ValidConfig:
    every: int = 200  # steps between validations (and one at the end); 0: never
    users: int | None = None  # users per valid task; None: tasks.valid_users (320, the paper)
    batch_size: int = 32  # prompts per generation batch
    max_new_tokens: int = 256  # per answer (greedy)
    title_match: Literal["strict", "lenient"] = "strict"  # how answer titles name catalogue items (eval.parse)
    fuzzy_titles: bool = False  # also match titles within Levenshtein distance 3

    def __post_init__(self):
        if self.every < 0 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("valid.every must be >= 0; valid.batch_size and valid.max_new_tokens >= 1")
        if self.users is not None and self.users < 1:
            raise ValueError(f"valid.users must be >= 1 or null, got {self.users}")


@dataclass(frozen=True)
class SFTConfig:
    out_dir: str = "runs/sft"
    teacher: str = "runs/teacher"  # a trained teacher directory (`reclm-jax teacher train --out ...`)
    data: DataConfig = field(default_factory=DataConfig)
    tasks: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    valid: ValidConfig = field(default_factory=ValidConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)  # (data, fsdp, tensor) and multi-host start-up
