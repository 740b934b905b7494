"""Validation by greedy generation on the fixed valid tasks (I0, +C, -C, ~50 %), scored with the paper's metrics.

Per task, every prompt is answered greedily, and the answers are scored exactly as the test evaluation
scores them (`eval.evaluate.score_answers`): HR@K, NDCG@K and the formatting metrics for all tasks, TCP@K
where the task names a category, CPA for the proportion task, with the catalogue's title matching rule.
Result keys are "<task>/<metric>" (e.g. "seqrec/NDCG@K", "~50%/CPA": the mean over the task's users),
plus "<task>/n" (the users).

`answer` abstracts the model: prompts (token ids) -> answer texts (e.g. `ChatPolicy.answer` bound to the
model being trained).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import numpy as np

from reclm_jax.eval.evaluate import score_answers
from reclm_jax.eval.parse import Catalogue
from reclm_jax.llm.chat import ChatPolicy
from reclm_jax.tasks.evaluation import EvalSet

Answer = Callable[[Sequence[Sequence[int]]], list[str]]


def evaluate(eval_set: EvalSet, answer: Answer, policy: ChatPolicy, catalogue: Catalogue,
             category_matrix: np.ndarray, max_prompt_tokens: int) -> tuple[dict[str, float], dict[str, list[str]]]:
    """(mean metrics per task of `eval_set` as "<task>/<metric>", the answer texts per task), answering every
    prompt with `answer` and scoring like the test evaluation (`eval.evaluate.score_answers`)."""
    answers = {task: answer([policy.prompt_ids(s.messages, max_prompt_tokens) for s in samples])
               for task, samples in eval_set.tasks.items()}
    scores = score_answers(eval_set, answers, category_matrix, catalogue)
    means = {f"{task}/n": float(len(eval_set.tasks[task])) for task in scores}
    means |= {f"{task}/{name}": e["mean"] for task, m in scores.items() for name, e in m.items()}
    return means, answers
