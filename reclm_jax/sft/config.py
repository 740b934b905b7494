"""Every default of the SFT stage (paper section 2.2 and the reference code's hyper-parameters).

A preset YAML under `configs/sft/` holds only what differs; `reclm-jax sft --config <yaml> key=value ...`
overrides last. The instruction data's own settings (task set, lengths, buckets, epochs, valid users) are
the `tasks` section (`reclm_jax.tasks.config.TaskConfig`), except `tasks.batch_size`, which SFT sets from
`train.global_batch` (global batch / number of processes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from reclm_jax.config import Count, NonNegativeInt, Section
from reclm_jax.data.config import DataConfig
from reclm_jax.llm.config import LoraConfig, ModelConfig
from reclm_jax.llm.sharding import MeshConfig
from reclm_jax.tasks.config import TaskConfig
from reclm_jax.training.loop import CheckpointConfig
from reclm_jax.training.optim import OptimConfig

# The reference's AdamW: lr 1e-3, warmup 1.25 %, polynomial decay (power 2) to 0, weight decay 0.01, eps 1e-5,
# gradient clip 1.0.
SFT_OPTIM = OptimConfig(lr=1e-3, schedule="polynomial", warmup_ratio=0.0125, weight_decay=0.01, eps=1e-5,
                        clip_norm=1.0)


@dataclass(frozen=True)
class TrainConfig(Section):
    seed: int = 0  # the adapter's initial `a` matrices, LoRA dropout masks (and random base weights)
    global_batch: Count = 64  # samples per optimiser step over all processes (the paper)
    # rows per forward/backward on each process (over all its devices; a row is a sample, or with tasks.pack_length
    # a packed row of samples); gradients accumulate to global_batch
    micro_batch: Count = 8
    steps: Count | None = None  # optimiser steps; None: tasks.num_epochs epochs of training samples
    peak_tflops: float | None = None  # per-device peak for MFU; None: the table in run_log by device kind


@dataclass(frozen=True)
class ValidConfig(Section):
    every: NonNegativeInt = 200  # steps between validations (and one at the end); 0: never
    users: Count | None = None  # users per valid task; None: tasks.valid_users (320, the paper)
    batch_size: Count = 32  # prompts per generation batch
    max_new_tokens: Count = 256  # per answer (greedy)
    title_match: Literal["strict", "lenient"] = "strict"  # how answer titles name catalogue items (eval.parse)
    fuzzy_titles: bool = False  # also match titles within Levenshtein distance 3


@dataclass(frozen=True)
class SFTConfig(Section):
    out_dir: str = "runs/sft"
    teacher: str = "runs/teacher"  # a trained teacher directory (`reclm-jax teacher train --out ...`)
    data: DataConfig = field(default_factory=DataConfig)
    tasks: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)  # r 16, alpha 8, dropout 0.1 on every linear layer (the paper)
    optim: OptimConfig = field(default_factory=lambda: SFT_OPTIM)
    train: TrainConfig = field(default_factory=TrainConfig)
    # the best adapter by validation (checkpoints/best) is what `valid` picks; the exported adapter is the last
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(best_metric="seqrec/NDCG@K"))
    valid: ValidConfig = field(default_factory=ValidConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)  # (data, fsdp, tensor) and multi-host start-up
