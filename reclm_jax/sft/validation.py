"""Validation by greedy generation on the fixed valid tasks (I0, +C, -C, ~50 %), scored with the paper's metrics.

Per task, every prompt is answered greedily, and the answers are scored exactly as the test evaluation
scores them (`eval.evaluate.score_answers`): HR@K, NDCG@K and the formatting metrics for all tasks, TCP@K
where the task names a category, CPA for the proportion task, with the catalogue's title matching rule.
Result keys are "<task>/<metric>" (e.g. "seqrec/NDCG@K", "~50%/CPA": the mean over the task's users),
plus "<task>/n" (the users).

`answer` abstracts the model: prompts (token ids) -> answer texts, so the PPO stage and the test evaluation
can score any policy the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from reclm_jax.eval.evaluate import score_answers
from reclm_jax.eval.parse import Catalogue
from reclm_jax.tasks.evaluation import EvalSet
from reclm_jax.tasks.tokenize import prompt_ids

Answer = Callable[[Sequence[Sequence[int]]], list[str]]


def evaluate(eval_set: EvalSet, answer: Answer, tokenizer: Any, catalogue: Catalogue,
             category_matrix: np.ndarray, max_prompt_tokens: int) -> tuple[dict[str, float], dict[str, list[str]]]:
    """(mean metrics per task of `eval_set` as "<task>/<metric>", the answer texts per task), answering every
    prompt with `answer` and scoring like the test evaluation (`eval.evaluate.score_answers`)."""
    answers = {task: answer([prompt_ids(s, tokenizer, max_prompt_tokens) for s in samples])
               for task, samples in eval_set.tasks.items()}
    scores = score_answers(eval_set, answers, category_matrix, catalogue)
    means = {f"{task}/n": float(len(eval_set.tasks[task])) for task in scores}
    means |= {f"{task}/{name}": e["mean"] for task, m in scores.items() for name, e in m.items()}
    return means, answers


def greedy_answer(generate: Callable[..., Any], tokenizer: Any, batch_size: int, max_new_tokens: int,
                  eos_ids: Sequence[int], pad_id: int) -> Answer:
    """An `Answer` from `llm.sampling.generate` bound to a model (`generate(prompts, max_new_tokens=...,
    eos_ids=..., pad_id=...)`): greedy, in batches of similar prompt lengths, special tokens dropped."""

    def answer(prompts: Sequence[Sequence[int]], constraint=None) -> list[str]:
        # constraint: an `llm.constrain.RowConstraints` with one row per prompt (constrained decoding)
        order = np.argsort([len(p) for p in prompts], kind="stable")
        texts = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            extra = {} if constraint is None else {"constraint": constraint.select(rows)}
            result = generate([prompts[i] for i in rows], max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                              pad_id=pad_id, **extra)
            for row, tokens, length in zip(rows, result.tokens, result.lengths):
                texts[row] = tokenizer.decode(tokens[:length].tolist(), skip_special_tokens=True)
        return texts

    return answer
