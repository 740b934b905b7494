"""The SL input pipeline (grain): samples regenerated each epoch -> tokens -> bucketed or packed batches.

- Deterministic: epoch e's samples depend only on (seed, e) (the teacher is deterministic), read in order.
- Sharded: global batch i is samples [i*G, (i+1)*G) of the stream (G = cfg.batch_size * P processes);
  process p takes its rows [p*B, (p+1)*B), so the P processes' batches put side by side are exactly the
  batch a single process with batch size G reads, and every process yields the same number of batches.
- Checkpointable: the iterator's state is {"epoch", "position"} in the stream (plus what grain's batching
  keeps); `get_state()` / `set_state()` resume exactly, rebuilding that epoch's samples.
- Bucketed (the default): a batch is padded on the right to the smallest of cfg.buckets that holds the longest
  sample of the whole global batch, so every process pads to the same length (their arrays form one global
  batch) and the training step compiles for a few shapes only.
- Packed (cfg.pack_length set): the global batch's samples are packed first-fit, longest first, into rows of
  cfg.pack_length tokens holding at most cfg.answer_tokens_per_row answer tokens each; the row count is rounded
  up to a multiple of `row_multiple` (micro-batch rows x processes), so a step compiles for a few row counts.
  A step still trains on exactly the same samples with the same loss: only the padding differs.

A batch is a dict of numpy arrays [rows, length] (rows = batch_size samples when bucketed):
  tokens       int32    token ids (padding: the `ChatPolicy`'s pad id)
  positions    int32    0, 1, ... along each sample (0 on padding)
  segment_ids  int32    1, 2, ... for the samples of a row, 0 on padding: attention stays within a segment
  loss_weight  float32  on each response token (the answer and its EOS) 1 / (its sample's response tokens x
                        the samples of the global batch), 0 elsewhere, so the sum of weighted token losses over
                        all rows of all processes is the mean over samples of each sample's mean token loss;
                        the loss is on predicting tokens[:, t] from the logits at t - 1
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


def pack(lengths: Sequence[int], answers: Sequence[int], length: int, answer_budget: int,
         row_multiple: int = 1) -> list[list[int]]:
    """Sample indices per row: first-fit, longest first (ties in sample order), into rows of `length` tokens
    with at most `answer_budget` answer tokens; empty rows are added up to a multiple of `row_multiple`."""
    rows: list[list[int]] = []
    used: list[list[int]] = []  # per row: [tokens, answer tokens]
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > length or answers[i] > answer_budget:
            raise ValueError(f"a sample of {lengths[i]} tokens ({answers[i]} answer tokens) does not fit a packed "
                             f"row of {length} tokens and {answer_budget} answer tokens")
        for row, u in zip(rows, used):
            if u[0] + lengths[i] <= length and u[1] + answers[i] <= answer_budget:
                row.append(i)
                u[0] += lengths[i]
                u[1] += answers[i]
                break
        else:
            rows.append([i])
            used.append([lengths[i], answers[i]])
    return rows + [[] for _ in range(-len(rows) % row_multiple)]


def collate(samples: Sequence[dict[str, np.ndarray]], rows: Sequence[Sequence[int]], length: int,
            pad_id: int) -> dict[str, np.ndarray]:
    """The batch arrays (module docstring) of encoded `samples` laid out as `rows` (sample indices per row,
    in order), right-padded to `length` tokens."""
    shape = (len(rows), length)
    out = {"tokens": np.full(shape, pad_id, np.int32), "positions": np.zeros(shape, np.int32),
           "segment_ids": np.zeros(shape, np.int32), "loss_weight": np.zeros(shape, np.float32)}
    for r, members in enumerate(rows):
        start = 0
        for segment, i in enumerate(members, 1):
            tokens, answer = samples[i]["tokens"], samples[i]["loss_mask"]
            span = slice(start, start + len(tokens))
            out["tokens"][r, span] = tokens
            out["positions"][r, span] = np.arange(len(tokens))
            out["segment_ids"][r, span] = segment
            out["loss_weight"][r, span] = answer / (max(int(answer.sum()), 1) * len(samples))
            start += len(tokens)
    return out


def sft_batches(build_epoch: Callable[[int], list[Sample]], policy: ChatPolicy, cfg: TaskConfig,
                shard_index: int | None = None, shard_count: int | None = None,
                row_multiple: int = 1) -> grain.IterDataset:
    """This process's batches of cfg.batch_size samples (an incomplete last global batch is dropped), tokenised
    a batch at a time and prepared cfg.prefetch batches ahead in a thread. Shards default to
    jax.process_index() / jax.process_count(). Packed rows are rounded up to `row_multiple` per process."""
    if shard_index is None or shard_count is None:
        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in 0..{shard_count - 1}")

    def encode_batch(samples: list[Sample]) -> dict[str, np.ndarray]:
        # Every process lays out the whole global batch (its longest sample sets the one bucket all pad to;
        # its packing the rows all share), then takes its own rows.
        encoded = encode_samples(list(samples), policy, cfg.max_length, cfg.max_response_tokens)
        if cfg.pack_length is None:
            rows = [[i] for i in range(len(encoded))]
            length = bucket_length(max(len(r["tokens"]) for r in encoded), cfg.buckets)
        else:
            rows = pack([len(r["tokens"]) for r in encoded], [int(r["loss_mask"].sum()) for r in encoded],
                        cfg.pack_length, cfg.answer_tokens_per_row, row_multiple * shard_count)
            length = cfg.pack_length
        batch = collate(encoded, rows, length, policy.pad_id)
        per_process = len(rows) // shard_count
        return {k: v[shard_index * per_process:(shard_index + 1) * per_process] for k, v in batch.items()}

    ds = EpochSamples(build_epoch, cfg.num_epochs).batch(cfg.batch_size * shard_count, drop_remainder=True,
                                                         batch_fn=encode_batch)
    return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch) if cfg.prefetch else ds
