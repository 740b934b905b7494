"""Every default of the instruction data (SL training tasks, RL prompts, valid/test tasks, input pipeline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from reclm_jax.config import Count, NonNegative, NonNegativeInt, Section

RL_KINDS = ("seq", "+c", "-c", "<=", ">=", "~")  # the RL prompts' instructions: I0, I1 +/-C, I2 <=, >=, ~
TASK_SETS = {
    "v1": ("seqrec",),  # the paper's Ours_v1: I0 only
    "v2": ("seqrec", "control", "proportion", "search", "sharegpt"),  # Ours_v2: I0-I4
}


@dataclass(frozen=True)
class TaskConfig(Section):
    seed: NonNegativeInt = 0  # every random choice of the data (examples, k, categories, templates, shuffling)
    task_set: Literal["v1", "v2"] = "v2"
    train_tasks: tuple[str, ...] | None = None  # a subset of the task set's SL tasks to train on; None: all
    # "teacher": the paper's label augmentation (target first, then the teacher's constrained top-k);
    # "history": PALR-style labels, the user's true next items and no teacher (I0 only, so task_set v1).
    labels: Literal["teacher", "history"] = "teacher"
    min_k: Count = 1  # training k is uniform in min_k..max_k (the paper: 1..10)
    max_k: Count = 10
    select_form: bool = True  # also the select-from-candidates forms of I0, I1 and I3 (the reference)
    max_history: Count = 10  # items in a prompt's history (the paper)
    num_candidates: Count = 10  # list size of the select-from-candidates forms (the reference)
    proportions: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # I2 training x
    search_max_k: Count = 1  # I3 k is uniform in 1..search_max_k (the official runs use k = 1)
    sharegpt_path: str | None = None  # a ShareGPT/Vicuna JSON file (needed to train with I4)
    sharegpt_ratio: NonNegative = 0.5  # I4 samples per epoch = ratio x the other samples (the paper: 50 %)
    # tokenisation
    max_title_tokens: Count = 64  # longer titles are cut (the paper)
    max_length: Count = 1024  # prompt + response tokens; prompts are cut from the left to fit (the paper)
    max_response_tokens: Count = 512  # the paper's maximum output length
    # input pipeline
    batch_size: Count = 8  # samples per batch on each process (the paper: 64 = this x processes x accumulation)
    buckets: tuple[int, ...] = (128, 256, 512, 1024)  # a batch is padded to the smallest bucket that fits
    # pack each batch's samples into rows of this many tokens (>= max_length) instead of padding every sample to
    # a bucket: the same samples and loss per step, fewer padding tokens when sample lengths vary (tasks.batches)
    pack_length: Count | None = None
    num_epochs: Count = 30  # SL converged around 30 epochs in the paper
    prefetch: NonNegativeInt = 2  # batches prepared ahead in a background thread (0: none)
    teacher_batch: Count = 512  # users per teacher query
    # RL prompts and the fixed valid/test tasks
    rl_k: tuple[int, int] = (6, 10)  # RL prompt k is uniform in this range (the reference)
    rl_kinds: tuple[str, ...] = RL_KINDS  # the RL prompts' instructions, drawn uniformly (the paper: all six)
    valid_users: Count = 320  # users per valid task (the paper)
    test_users: Count | None = None  # users per test task; None: all (the paper)
    test_k: Count = 10
    item_count_k: tuple[int, int] = (11, 15)  # the ItemCount test's k range (the paper)

    def check(self) -> None:
        if self.min_k > self.max_k:
            raise ValueError(f"min_k ({self.min_k}) must be <= max_k ({self.max_k})")
        if self.train_tasks is not None:
            outside = [t for t in self.train_tasks if t not in TASK_SETS[self.task_set]]
            if not self.train_tasks or outside:
                raise ValueError(f"train_tasks must be a non-empty subset of task set {self.task_set}'s "
                                 f"{list(TASK_SETS[self.task_set])}, got {list(self.train_tasks)}")
        kinds = self.rl_kinds
        if not kinds or not set(kinds) <= set(RL_KINDS) or len(set(kinds)) < len(kinds):
            raise ValueError(f"rl_kinds must be distinct kinds from {list(RL_KINDS)}, got {list(kinds)}")
        if not self.proportions or not all(0.0 < x < 1.0 for x in self.proportions):
            raise ValueError(f"proportions must be fractions strictly between 0 and 1, got {self.proportions}")
        for name in ("rl_k", "item_count_k"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be a range [lo, hi] with 1 <= lo <= hi, got {(lo, hi)}")
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)) or self.buckets[-1] < self.max_length:
            raise ValueError(f"buckets must be increasing and end at >= max_length ({self.max_length}), "
                             f"got {self.buckets}")
        if self.pack_length is not None and self.pack_length < self.max_length:
            raise ValueError(f"pack_length ({self.pack_length}) must be at least max_length ({self.max_length}): "
                             "every sample has to fit a packed row")
        if self.max_response_tokens >= self.max_length:
            raise ValueError(f"max_response_tokens ({self.max_response_tokens}) must be below "
                             f"max_length ({self.max_length})")
        if self.labels == "history" and self.task_set != "v1":
            raise ValueError("labels=history (PALR-style) defines labels for I0 only: use task_set=v1")

    @property
    def answer_tokens_per_row(self) -> int:
        """The most answer tokens in a batch row, where the SFT loss computes vocabulary logits: one sample's
        answer when bucketed; when packed, half a row (or one longest answer, if that is more)."""
        if self.pack_length is None:
            return self.max_response_tokens
        return max(self.pack_length // 2, self.max_response_tokens)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.train_tasks or TASK_SETS[self.task_set]

    @property
    def mixes_sharegpt(self) -> bool:
        return "sharegpt" in self.tasks and self.sharegpt_ratio > 0

    def check_training(self) -> None:
        """What building training data needs beyond valid values (evaluation and RL do not read ShareGPT)."""
        if self.mixes_sharegpt and not self.sharegpt_path:
            raise ValueError("tasks.task_set=v2 mixes in ShareGPT (I4): set tasks.sharegpt_path to a "
                             "ShareGPT/Vicuna JSON file, or tasks.sharegpt_ratio=0 to leave I4 out")
