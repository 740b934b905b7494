"""The SASRec teacher's config. Defaults are the SASRec paper's ML-1M setting (Kang & McAuley 2018);
`configs/teacher/paper.yaml` holds the RecLM-gen teacher's differences."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from reclm_jax.config import Count, Fraction, Section
from reclm_jax.training.optim import OptimConfig


@dataclass(frozen=True)
class ModelConfig(Section):
    max_len: Count = 200  # histories keep their most recent max_len items
    width: Count = 50
    num_blocks: Count = 2
    num_heads: Count = 1
    ffn_dim: Count = 50
    dropout: Fraction = 0.2
    activation: Literal["relu", "gelu"] = "relu"
    layer_norm_eps: float = 1e-8
    init_std: float = 0.02  # N(0, init_std) for every weight matrix and embedding
    # Inputs are padded to the shortest of this many lengths (max_len * i / n) that fits, not always to
    # max_len: padding never changes outputs, and short histories cost less. One compile per length.
    length_buckets: Count = 4

    def padded_length(self, length: int) -> int:
        """The bucket length for inputs of `length` items (at least 1, at most max_len)."""
        n = min(self.length_buckets, self.max_len)
        for i in range(1, n + 1):
            if length <= -(-self.max_len * i // n):
                return -(-self.max_len * i // n)
        return self.max_len

    def check(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"width ({self.width}) must be divisible by num_heads ({self.num_heads})")


@dataclass(frozen=True)
class TrainConfig(Section):
    loss: Literal["bce", "softmax"] = "bce"  # bce: one sampled negative per position; softmax: over all items
    MOVED: ClassVar = {"lr": "optim.lr", "adam_b1": "optim.b1", "adam_b2": "optim.b2"}
    batch_size: Count = 128
    max_epochs: Count = 200
    patience: Count = 10  # stop after this many evaluations without a better valid NDCG@10 (full ranking)
    eval_every: Count = 1  # epochs between validations


@dataclass(frozen=True)
class EvalConfig(Section):
    num_negatives: Count = 100  # the SASRec paper's sampled protocol
    ks: tuple[int, ...] = (5, 10, 20)
    batch_size: Count = 256  # fixed query/eval batch: histories are padded to it so shapes never change

    def check(self) -> None:
        if 10 not in self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be >= 1 and include 10 (early stopping uses NDCG@10), got {list(self.ks)}")


@dataclass(frozen=True)
class TeacherConfig(Section):
    seed: int = 0  # every random choice (init, shuffling, negatives, dropout, sampled evaluation)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, b2=0.98))  # Adam, the SASRec code's
