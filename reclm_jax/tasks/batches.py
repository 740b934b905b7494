"""The SL input pipeline (grain): samples regenerated each epoch -> tokens -> padded, bucketed batches.

- Deterministic: epoch e's samples depend only on (seed, e) (the teacher is deterministic), read in order.
- Sharded: global batch i is samples [i*G, (i+1)*G) of the stream (G = cfg.batch_size * P processes);
  process p takes its rows [p*B, (p+1)*B), so the P processes' batches put side by side are exactly the
  batch a single process with batch size G reads, and every process yields the same number of batches.
- Checkpointable: the iterator's state is {"epoch", "position"} in the stream (plus what grain's batching
  keeps); `get_state()` / `set_state()` resume exactly, rebuilding that epoch's samples.
- Bucketed: a batch is padded on the right to the smallest of cfg.buckets that holds the longest sample of
  the whole global batch, so every process pads to the same length (their arrays form one global batch)
  and the training step compiles for a few shapes only.

A batch is a dict of numpy arrays [batch_size, bucket]:
  tokens     int32  token ids (padding: the `ChatPolicy`'s pad id)
  positions  int32  0, 1, ... along each sample (0 on padding)
  attention_mask bool  real tokens
  loss_mask  bool   tokens that are response tokens (the answer and its EOS): the loss is on predicting
                    tokens[:, t] from the logits at t - 1 wherever loss_mask[:, t]
Samples that do not fit cfg.max_length are cut by `encode_samples`, never dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np

from reclm_jax.llm.chat import ChatPolicy
from reclm_jax.tasks.config import TaskConfig
from reclm_jax.tasks.encode import encode_samples
from reclm_jax.tasks.samples import Sample


class _EpochIterator(grain.DatasetIterator):
    def __init__(self, source: "EpochSamples"):
        super().__init__()
        self._source = source
        self._epoch, self._position = 0, 0
        self._samples: list[Sample] | None = None

    def __next__(self) -> Sample:
        src = self._source
        while self._epoch < src.num_epochs:
            if self._samples is None:
                self._samples = src.build_epoch(self._epoch)
            if self._position < len(self._samples):
                self._position += 1
                return self._samples[self._position - 1]
            self._epoch, self._position, self._samples = self._epoch + 1, 0, None
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "position": self._position}

    def set_state(self, state: dict[str, Any]) -> None:
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._samples = None


class EpochSamples(grain.IterDataset):
    """The stream of samples of epochs 0..num_epochs-1."""

    def __init__(self, build_epoch: Callable[[int], list[Sample]], num_epochs: int):
        super().__init__()
        self.build_epoch, self.num_epochs = build_epoch, num_epochs

    def __iter__(self) -> _EpochIterator:
        return _EpochIterator(self)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length."""
    for b in buckets:
        if b >= length:
            return b
    raise ValueError(f"a sample of {length} tokens exceeds the largest bucket {buckets[-1]}")


def collate(rows: Sequence[dict[str, np.ndarray]], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad encoded samples to `length` tokens (at least the longest's)."""
    b = len(rows)
    out = {
        "tokens": np.full((b, length), pad_id, np.int32),
        "positions": np.zeros((b, length), np.int32),
        "attention_mask": np.zeros((b, length), bool),
        "loss_mask": np.zeros((b, length), bool),
    }
    for i, r in enumerate(rows):
        n = len(r["tokens"])
        out["tokens"][i, :n] = r["tokens"]
        out["positions"][i, :n] = np.arange(n)
        out["attention_mask"][i, :n] = True
        out["loss_mask"][i, :n] = r["loss_mask"]
    return out


def sft_batches(build_epoch: Callable[[int], list[Sample]], policy: ChatPolicy, cfg: TaskConfig,
                shard_index: int | None = None, shard_count: int | None = None) -> grain.IterDataset:
    """This process's batches of cfg.batch_size samples (an incomplete last global batch is dropped), tokenised
    a batch at a time and prepared cfg.prefetch batches ahead in a thread. Shards default to
    jax.process_index() / jax.process_count()."""
    if shard_index is None or shard_count is None:
        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in 0..{shard_count - 1}")
    mine = slice(shard_index * cfg.batch_size, (shard_index + 1) * cfg.batch_size)

    def encode_batch(samples: list[Sample]) -> dict[str, np.ndarray]:
        # Every process encodes the whole global batch: its longest sample sets the one bucket all pad to.
        rows = encode_samples(list(samples), policy, cfg.max_length, cfg.max_response_tokens)
        length = bucket_length(max(len(r["tokens"]) for r in rows), cfg.buckets)
        return collate(rows[mine], length, policy.pad_id)

    ds = EpochSamples(build_epoch, cfg.num_epochs).batch(cfg.batch_size * shard_count, drop_remainder=True,
                                                         batch_fn=encode_batch)
    return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch) if cfg.prefetch else ds
