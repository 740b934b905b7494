"""Validation by greedy generation on the fixed valid tasks (I0, +C, -C, ~50 %), scored with the paper's metrics.

Per task, every prompt is answered greedily, the answer is parsed into titles (`eval.parse`), titles are
mapped to items by the catalogue of displayed titles, and the lists are scored (`eval.metrics`):
HR@K, NDCG@K and the formatting metrics for all tasks, TCP@K where the task names a category, CPA for the
proportion task. Result keys are "<task>/<metric>" (e.g. "seqrec/NDCG@K", "~50%/CPA"), plus "<task>/n".

`answer` abstracts the model: prompts (token ids) -> answer texts, so the PPO stage and the test evaluation
can score any policy the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from reclm_jax.eval.metrics import evaluate_batch
from reclm_jax.eval.parse import Catalogue, parse_items
from reclm_jax.tasks.evaluation import EvalSet
from reclm_jax.tasks.samples import Sample
from reclm_jax.tasks.tokenize import prompt_ids

Answer = Callable[[Sequence[Sequence[int]]], list[str]]


def score_answers(samples: Sequence[Sample], texts: Sequence[str], catalogue: Catalogue,
                  category_matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample metrics of one task's answers (metric -> array [n])."""
    lists = [[it.item_id for it in catalogue.match(parse_items(text))] for text in texts]
    has_category = samples[0].category >= 0
    in_target = None
    if has_category:
        in_target = [[bool(item >= 0 and category_matrix[item, s.category]) for item in items]
                     for items, s in zip(lists, samples)]
    controls = [s.control for s in samples] if has_category else None
    return evaluate_batch(lists, [s.k for s in samples], [list(s.history) for s in samples],
                          [s.target for s in samples], in_target=in_target, controls=controls)


def evaluate(eval_set: EvalSet, answer: Answer, tokenizer: Any, catalogue: Catalogue,
             category_matrix: np.ndarray, max_prompt_tokens: int) -> tuple[dict[str, float], dict[str, list[str]]]:
    """(mean metrics per task of `eval_set` as "<task>/<metric>", the answer texts per task), answering every
    prompt with `answer`."""
    out: dict[str, float] = {}
    answers: dict[str, list[str]] = {}
    for task, samples in eval_set.tasks.items():
        if not samples:
            continue
        prompts = [prompt_ids(s, tokenizer, max_prompt_tokens) for s in samples]
        answers[task] = texts = answer(prompts)
        for name, values in score_answers(samples, texts, catalogue, category_matrix).items():
            out[f"{task}/{name}"] = float(np.mean(values))
        out[f"{task}/n"] = float(len(samples))
    return out, answers


def greedy_answer(generate: Callable[..., Any], tokenizer: Any, batch_size: int, max_new_tokens: int,
                  eos_ids: Sequence[int], pad_id: int) -> Answer:
    """An `Answer` from `llm.sampling.generate` bound to a model (`generate(prompts, max_new_tokens=...,
    eos_ids=..., pad_id=...)`): greedy, in batches of similar prompt lengths, special tokens dropped."""

    def answer(prompts: Sequence[Sequence[int]]) -> list[str]:
        order = np.argsort([len(p) for p in prompts], kind="stable")
        texts = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            result = generate([prompts[i] for i in rows], max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                              pad_id=pad_id)
            for row, tokens, length in zip(rows, result.tokens, result.lengths):
                texts[row] = tokenizer.decode(tokens[:length].tolist(), skip_special_tokens=True)
        return texts

    return answer
