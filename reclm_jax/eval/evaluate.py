"""Run the paper's test tasks (section 3) on a chat model and score its answers.

    model = load_chat_model("smollm2-135m", loras=["runs/sft/adapter"])
    answers = generate_answers(model, eval_set, settings)          # batched greedy decoding, a progress bar
    metrics = score_answers(eval_set, answers, dataset.category_matrix, catalogue)  # {task: {metric: estimate}}

or all of it for several models, with the teacher's row, the tables and per-model files (what
`reclm-jax evaluate` runs): `run_evaluation(dataset, teacher, [ModelRun(...), ...], out_dir)`.

The test set is `tasks.evaluation.build_eval_set(ctx, "test")`: fixed by the seed and the teacher, the same
users, targets and control categories for every model. Scoring is a pure function of the generated texts,
the catalogue's title matching rule (`eval.parse`: strict by default; results say which in their settings
and tables) and the bootstrap seed.

Every metric is reported as an estimate {"mean", "lo", "hi", "n"} (`eval.metrics.estimate`): the mean over
the task's n answers (one per test user) and its 95 % percentile bootstrap interval, users resampled with
replacement (`Bootstrap`: 1000 resamples by default, seeded by the test set's seed and the task name, so
every model of a table is resampled with the same users).

Metric keys per task (definitions in `eval/metrics.py`; @K is @k, the requested count: 10 except in
"item_count", where k is 11..15):
- every task: HR@K, NDCG@K, CorrectCount, RepeatItem@K, NonExist@K, InHistory@K, plus "Unparsed" (percent
  of answers in which no list item was found at all); a task without samples has no metrics ({});
- "seqrec" also HR@5 and NDCG@5 (the first 5 items of the 10 asked for, the paper's Table 2);
- "+c", "-c", "~30%", ...: TCP@K of the control's category, and CPA for the proportion controls;
- "+c1&-c2": TC1not2P@K (TCP@K of "in C1 and not in C2", Table 7);
- "c1<=20%&-c2": C1PA (CPA of "C1 <= 20 %") and TC2P@K (TCP@K of C2);
- every task but the combined ones: "Reward", the answer's rule reward as PPO computes it (`eval.rewards`:
  sum of R_item + 10 x R_list, the teacher's ranks, no KL term), when `score_answers` is given the teacher
  (`run_evaluation` always gives it): the quantity RL maximises, measured on held-out users.
The control metrics also appear as "<metric>/no_control": the same metric, same user and same categories,
measured on the model's answer to the plain SeqRec (I0) prompt of that user, i.e. the value in parentheses
in the paper's Tables 3, 4 and 7 (what the model does without the control text).

Every answer counts: an empty or unparseable answer is a list of no items (HR, NDCG, TCP, CPA and
CorrectCount are 0 for it; "Unparsed" counts it).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from reclm_jax.config import Count, Section
from reclm_jax.core.controls import Control
from reclm_jax.data.schema import Dataset
from reclm_jax.eval.lists import in_category
from reclm_jax.eval.metrics import NO_CONTROL, Bootstrap, estimate, evaluate_batch
from reclm_jax.eval.parse import Catalogue
from reclm_jax.eval.rewards import answer_rewards
from reclm_jax.eval.tables import write_tables
from reclm_jax.llm import hf_io, sharding
from reclm_jax.llm.automaton import Intent, catalogue_automaton
from reclm_jax.llm.chat import ChatPolicy
from reclm_jax.llm.config import LlamaConfig
from reclm_jax.llm.sharding import MeshConfig
from reclm_jax.tasks.config import TaskConfig
from reclm_jax.tasks.evaluation import EvalSet, build_eval_set
from reclm_jax.tasks.samples import Sample, TaskContext
from reclm_jax.tasks.encode import display_titles

CONSTRAIN_MODES = ("none", "catalogue", "intent")
SEQREC = "seqrec"


@dataclass(frozen=True)
class GenerationSettings(Section):
    max_new_tokens: Count = 512  # the paper's maximum output length
    max_prompt_tokens: Count = 512  # prompts are cut from the left to this (the paper: 1024 with the answer)
    batch_size: Count = 16  # answers decoded together


@dataclass
class ChatModel:
    """A Llama-family model ready for greedy chat generation (any LoRA adapter merged in)."""

    name: str
    cfg: LlamaConfig
    params: Any  # device arrays, on the sampling mesh
    policy: ChatPolicy


def load_chat_model(model: str, loras: Sequence[str | Path] = (), tokenizer: str | Path | None = None,
                    name: str | None = None, mesh: MeshConfig = MeshConfig(data=-1, fsdp=1)) -> ChatModel:
    """Base weights from a preset with embedded weights, a GGUF file or an HF directory
    (`hf_io.load_pretrained`), PEFT LoRA adapters merged in in the given order (e.g. the SFT adapter, then
    the PPO actor trained on top of it), and the model's tokenizer (`tokenizer` defaults to `model`). The
    weights go onto `mesh` over this process's devices in the sampling layout (`sharding.SAMPLE_RULES`): by
    default a copy on every device, each answering its share of every batch; mesh.tensor > 1 splits the
    matrices for a model that does not fit one device."""
    cfg, params = hf_io.load_merged(model, loras)
    policy = ChatPolicy.load(tokenizer or model)
    if len(policy) > cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer or model} has {len(policy)} tokens, model {model} only {cfg.vocab_size}")
    placed = sharding.shard_params(params, sharding.make_mesh(mesh, jax.local_devices()), sharding.SAMPLE_RULES)
    return ChatModel(name or str(model), cfg, placed, policy)


def generate_texts(model: ChatModel, samples: Sequence[Sample], settings: GenerationSettings,
                   progress: bool | str = False, constraint=None) -> list[str]:
    """Greedy answers to the samples' chat prompts, in order (`ChatPolicy.answer`); `progress` (True or a
    label) shows a tqdm bar. `constraint`: an `llm.constrain.RowConstraints` with one row per sample
    (constrained decoding)."""
    prompts = [model.policy.prompt_ids(s.messages, settings.max_prompt_tokens) for s in samples]
    label = progress if isinstance(progress, str) else model.name
    with tqdm(total=len(prompts), desc=label, unit="answer", disable=not progress) as bar:
        return model.policy.answer(model.params, model.cfg, prompts, max_new_tokens=settings.max_new_tokens,
                                   batch_size=settings.batch_size, on_batch=bar.update, constraint=constraint)


def generate_answers(model: ChatModel, eval_set: EvalSet, settings: GenerationSettings,
                     progress: bool = True, constrain: Constrain | None = None) -> dict[str, list[str]]:
    """{task: answers in the order of eval_set.tasks[task]}; all tasks are decoded in one length-sorted stream,
    under `constrain` when given (then with at least the new tokens the longest k-item list needs)."""
    names = list(eval_set.tasks)
    flat = [s for name in names for s in eval_set.tasks[name]]
    rows = constrain.rows(model.policy.tokenizer, flat) if constrain else None
    if rows is not None:  # a constrained list always ends after its k items: give it the tokens to get there
        settings = replace(settings, max_new_tokens=max(settings.max_new_tokens,
                                                        rows.automaton.answer_tokens(int(rows.k.max()))))
    texts = generate_texts(model, flat, settings, progress=progress and f"{model.name}: test tasks", constraint=rows)
    out, start = {}, 0
    for name in names:
        n = len(eval_set.tasks[name])
        out[name] = texts[start:start + n]
        start += n
    return out


@dataclass(frozen=True)
class Constrain:
    """Constrained decoding of test answers (`llm.constrain`): mode "catalogue" (k distinct catalogue titles
    outside the history) or "intent" (also the sample's controls), over the titles the answers are matched to."""

    mode: str
    titles: tuple[str, ...]
    category_matrix: np.ndarray

    def __post_init__(self):
        if self.mode not in CONSTRAIN_MODES[1:]:
            raise ValueError(f"constrain mode {self.mode!r} is not one of {', '.join(CONSTRAIN_MODES[1:])}")

    def rows(self, tokenizer, samples: Sequence[Sample]):
        intents = [Intent.of_controls(s.controls) if self.mode == "intent" else Intent() for s in samples]
        return catalogue_automaton(self.titles, tokenizer).rows(
            [s.k for s in samples], [s.history for s in samples], intents, self.category_matrix)


# ---- scoring -------------------------------------------------------------------------------------------
def _control_metrics(task: str, samples: Sequence[Sample], ids: list[list[int]],
                     category_matrix: np.ndarray) -> dict[str, np.ndarray]:
    """The control metrics of `task` for lists `ids` (answers to `samples` or to their plain prompts)."""
    if not samples or samples[0].control is None or samples[0].control.kind == "seq":
        return {}
    k = [s.k for s in samples]
    hist = [s.history for s in samples]
    target = [s.target for s in samples]
    c1 = in_category(ids, [s.controls[0][1] for s in samples], category_matrix)
    if len(samples[0].controls) == 1:
        res = evaluate_batch(ids, k, hist, target, c1, [s.control for s in samples])
        return {m: res[m] for m in ("TCP@K", "CPA") if m in res}
    c2 = in_category(ids, [s.controls[1][1] for s in samples], category_matrix)
    first = samples[0].control.kind
    if first == "+c":  # +C1 & -C2
        c1_not_2 = [[a and not b for a, b in zip(r1, r2)] for r1, r2 in zip(c1, c2)]
        return {"TC1not2P@K": evaluate_batch(ids, k, hist, target, c1_not_2)["TCP@K"]}
    if first == "<=":  # C1 <= m & -C2
        return {"C1PA": evaluate_batch(ids, k, hist, target, c1, [s.control for s in samples])["CPA"],
                "TC2P@K": evaluate_batch(ids, k, hist, target, c2)["TCP@K"]}
    raise ValueError(f"task {task}: no metrics defined for the combination {[c.kind for c, _ in samples[0].controls]}")


def list_metrics(task: str, samples: Sequence[Sample], ids: list[list[int]], plain: list[list[int]] | None,
                 category_matrix: np.ndarray, teacher: Any = None) -> dict[str, np.ndarray]:
    """{metric: float [n]}: each answer's metrics (see the module docstring) from the answers' parsed item ids;
    `plain` holds each sample's user's parsed SeqRec answer, for the "/no_control" values (None: not
    measured). With a `teacher`, also each answer's "Reward" (`rewards.answer_rewards`: the paper's, as PPO
    scores an answer) where the task has one (not the combined controls, which the paper gives no reward)."""
    if not samples:
        return {}
    k = [s.k for s in samples]
    hist = [s.history for s in samples]
    target = [s.target for s in samples]
    per_list = evaluate_batch(ids, k, hist, target)
    if task == SEQREC:
        at5 = evaluate_batch(ids, 5, hist, target)
        per_list |= {"HR@5": at5["HR@K"], "NDCG@5": at5["NDCG@K"]}
    per_list |= _control_metrics(task, samples, ids, category_matrix)
    if plain is not None:
        base = _control_metrics(task, samples, plain, category_matrix)
        per_list |= {m + NO_CONTROL: v for m, v in base.items()}
    if teacher is not None and len(samples[0].controls) <= 1:
        per_list["Reward"] = answer_rewards(teacher, ids, k, hist, target,
                                            in_category(ids, [s.category for s in samples], category_matrix),
                                            [s.control or Control("seq") for s in samples])
    per_list["Unparsed"] = 100.0 * np.array([len(row) == 0 for row in ids], dtype=np.float64)
    return per_list


def score_task(task: str, samples: Sequence[Sample], ids: list[list[int]], plain: list[list[int]] | None,
               category_matrix: np.ndarray, bootstrap: Bootstrap = Bootstrap(),
               teacher: Any = None) -> dict[str, dict[str, float]]:
    """The metrics of one task (`list_metrics`) as estimates: means over the answers with their intervals."""
    return estimates({task: list_metrics(task, samples, ids, plain, category_matrix, teacher)}, bootstrap)[task]


def parse_answers(answers: Sequence[str], catalogue: Catalogue) -> list[list[int]]:
    """Item ids of each answer's list (-1 for a title not in the catalogue)."""
    return [[it.item_id for it in catalogue.parse(text)] for text in answers]


def answer_metrics(eval_set: EvalSet, answers: dict[str, Sequence[str]], category_matrix: np.ndarray,
                   catalogue: Catalogue, teacher: Any = None) -> dict[str, dict[str, np.ndarray]]:
    """{task: {metric: float [n]}}: each answer's metrics (`list_metrics`) for every task of `eval_set`
    (answers[task] in the order of its samples); with a `teacher`, rewards too."""
    missing = [t for t in eval_set.tasks if t not in answers]
    if missing:
        raise ValueError(f"no answers for tasks {missing}")
    ids = {}
    for task, samples in eval_set.tasks.items():
        if len(answers[task]) != len(samples):
            raise ValueError(f"task {task}: {len(answers[task])} answers for {len(samples)} samples")
        ids[task] = parse_answers(answers[task], catalogue)
    plain_by_user = {s.user: row for s, row in zip(eval_set.tasks.get(SEQREC, []), ids.get(SEQREC, []))}
    out = {}
    for task, samples in eval_set.tasks.items():
        plain = None
        if task != SEQREC and all(s.user in plain_by_user for s in samples):
            plain = [plain_by_user[s.user] for s in samples]
        out[task] = list_metrics(task, samples, ids[task], plain, category_matrix, teacher)
    return out


def estimates(per_list: dict[str, dict[str, np.ndarray]], bootstrap: Bootstrap = Bootstrap()
              ) -> dict[str, dict[str, dict[str, float]]]:
    """{task: {metric: estimate}} of `answer_metrics`' per-answer values (a task without answers: {})."""
    return {task: estimate(values, bootstrap, task) if values else {} for task, values in per_list.items()}


def score_answers(eval_set: EvalSet, answers: dict[str, Sequence[str]], category_matrix: np.ndarray,
                  catalogue: Catalogue, bootstrap: Bootstrap = Bootstrap(),
                  teacher: Any = None) -> dict[str, dict[str, dict[str, float]]]:
    """{task: {metric: estimate}} for every task of `eval_set` (`answer_metrics`, then `estimates`)."""
    return estimates(answer_metrics(eval_set, answers, category_matrix, catalogue, teacher), bootstrap)


def paired_differences(a: dict[str, dict[str, np.ndarray]], b: dict[str, dict[str, np.ndarray]],
                       bootstrap: Bootstrap = Bootstrap()) -> dict[str, dict[str, dict[str, float]]]:
    """{task: {metric: estimate}} of a - b, answer by answer: two models' `answer_metrics` on the same test set
    (the same users in the same order). Each interval resamples the users once for both models, as the
    models' own intervals do, so it is the paired 95 % interval of the difference: narrower than the two
    models' intervals suggest whenever their answers to a user go together."""
    diffs = {}
    for task in [t for t in a if t in b]:
        shared = [m for m in a[task] if m in b[task]]
        if shared and len(a[task][shared[0]]) != len(b[task][shared[0]]):
            raise ValueError(f"task {task}: {len(a[task][shared[0]])} answers against {len(b[task][shared[0]])}: "
                             "paired differences need the same test users")
        diffs[task] = {m: a[task][m] - b[task][m] for m in shared}
    return estimates(diffs, bootstrap)


def teacher_metrics(teacher, eval_set: EvalSet, dataset: Dataset,
                    bootstrap: Bootstrap = Bootstrap()) -> dict[str, dict[str, dict[str, float]]]:
    """The teacher's row of Table 2: its top-10 for the SeqRec test users (all items the user has seen are
    excluded, as in the teacher's own full-ranking evaluation), scored like an answer list."""
    samples = eval_set.tasks.get(SEQREC, [])  # an evaluation of other tasks only: an empty teacher row
    if not samples:
        return {SEQREC: {}}
    histories = [dataset.test_example(s.user)[0] for s in samples]
    k = max(s.k for s in samples)
    top = teacher.topk(histories, k)
    ids = [[int(i) for i in row[: s.k]] for row, s in zip(top, samples)]
    hist = [s.history for s in samples]
    target = [s.target for s in samples]
    res = evaluate_batch(ids, [s.k for s in samples], hist, target)
    at5 = evaluate_batch(ids, 5, hist, target)
    per_list = {"HR@K": res["HR@K"], "NDCG@K": res["NDCG@K"], "HR@5": at5["HR@K"], "NDCG@5": at5["NDCG@K"]}
    return {SEQREC: estimate(per_list, bootstrap, SEQREC)}


def answer_records(eval_set: EvalSet, answers: dict[str, Sequence[str]], catalogue: Catalogue) -> list[dict]:
    """One JSON-able record per answer (task, user, k, target, control, text, parsed ids) for inspection."""
    records = []
    for task, samples in eval_set.tasks.items():
        for s, text, row in zip(samples, answers[task], parse_answers(answers[task], catalogue)):
            records.append({
                "task": task, "user": s.user, "k": s.k, "target": s.target,
                "controls": [[c.kind, c.m, cat] for c, cat in s.controls],
                "answer": text, "items": row,
            })
    return records


def saved_answers(run_dir: Path, settings: dict, eval_set: EvalSet) -> tuple[dict[str, list[str]], float] | None:
    """(answers, seconds their decoding took) that a former evaluation left in `run_dir` (answers.jsonl), if its
    metrics.json was made with these `settings` and the answers are to `eval_set`'s samples (same tasks, users,
    in order); else None.
    Scoring is a pure function of the answers, so they are scored again: metrics added since are filled in."""
    try:
        saved = json.loads((run_dir / "metrics.json").read_text())
        records = [json.loads(line) for line in open(run_dir / "answers.jsonl", encoding="utf-8")]
    except (OSError, ValueError):
        return None
    if saved.get("settings") != settings:
        return None
    answers = {task: [r["answer"] for r in records if r["task"] == task] for task in eval_set.tasks}
    users = {task: [r["user"] for r in records if r["task"] == task] for task in eval_set.tasks}
    if len(records) != sum(map(len, answers.values())) or any(
            users[task] != [s.user for s in samples] for task, samples in eval_set.tasks.items()):
        return None
    return answers, saved["generation_seconds"]


# ---- several models, the teacher, tables ---------------------------------------------------------------
TEACHER_ROW = "SASRec"


@dataclass(frozen=True)
class ModelRun:
    """One row of the tables: a base model (preset, GGUF or HF directory) with LoRA adapters merged in order."""

    label: str
    model: str
    loras: tuple[str, ...] = ()
    tokenizer: str | None = None  # default: the model's own
    constrain: bool = True  # also decoded under run_evaluation's constraint modes


def _fingerprint(path: str | None) -> list | None:
    """What identifies a model/adapter path's contents cheaply: its files' names, sizes and mtimes."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        return [str(path)]  # a preset name
    files = sorted(f for f in (p.iterdir() if p.is_dir() else [p]) if f.is_file())
    return [str(p.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def constrained_label(label: str, mode: str) -> str:
    """The table row of a run decoded under constraint `mode`."""
    return f"{label} [{mode}-constrained]"


def run_slug(label: str) -> str:
    """The folder name of a row's files under <out>/runs/."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in label).strip("_") or "model"


def run_evaluation(dataset: Dataset, teacher, runs: Sequence[ModelRun], out_dir: str | Path, *,
                   task_cfg: TaskConfig, settings: GenerationSettings = GenerationSettings(),
                   title_match: str = "strict", fuzzy: bool = False, resamples: int = 1000, force: bool = False,
                   teacher_path: str | None = None, progress: bool = True,
                   constrain: Sequence[str] = (), tasks: Sequence[str] = ()) -> list[tuple[str, dict]]:
    """Evaluate each run on the test set of `task_cfg` (seed, test_users) and write, under `out_dir`,
    runs/<label>/{metrics.json, answers.jsonl} and the tables (`tables.write_tables`). A run whose
    answers were made with the same settings (model and adapter files, test set, decoding, title matching,
    bootstrap) is scored from them instead of decoded again unless `force` (`saved_answers`). Returns the
    table rows: the teacher's, then one per run. Titles are shown and matched as the first run's tokenizer
    cuts them (`tasks.encode.display_titles`), with `eval.parse.Catalogue(titles, title_match, fuzzy)`;
    intervals from `resamples` bootstrap resamples seeded by task_cfg.seed. `constrain` ("catalogue",
    "intent"): each run whose `constrain` is set is also decoded under those modes, as extra rows labelled
    `constrained_label` beside its unconstrained row. `tasks`: only these test tasks
    (`tasks.evaluation.TEST_TASKS` names; all when empty). The tables also get each run against the run
    before it, decoded the same way (zero-shot -> SFT -> SFT + PPO in the pipeline): `paired_differences`,
    the sharper test of a change than two rows' separate intervals."""
    labels = [r.label for r in runs]
    if not runs or len(set(labels)) != len(labels) or TEACHER_ROW in labels:
        raise ValueError(f"row labels must be unique and not {TEACHER_ROW!r}, got {labels}")
    if teacher.num_items != dataset.num_items:
        raise ValueError(f"the teacher has {teacher.num_items} items, dataset {dataset.name} {dataset.num_items}")
    out_dir = Path(out_dir)
    policy = ChatPolicy.load(runs[0].tokenizer or runs[0].model)
    titles = display_titles(dataset.titles, policy, task_cfg.max_title_tokens)
    eval_set = build_eval_set(TaskContext(dataset, teacher, task_cfg, titles=titles), "test", only=tuple(tasks) or None)
    catalogue = Catalogue(titles, title_match, fuzzy=fuzzy)
    bootstrap = Bootstrap(resamples, task_cfg.seed)
    print(f"test set of {dataset.name}: " + ", ".join(f"{t} {len(s)}" for t, s in eval_set.tasks.items())
          + " answers per model" + "".join(f"; {t}: {n} users skipped" for t, n in eval_set.skipped.items() if n),
          file=sys.stderr)

    rows = [(TEACHER_ROW, teacher_metrics(teacher, eval_set, dataset, bootstrap))]
    shared = {"dataset": dataset.name, "num_items": dataset.num_items, "teacher": _fingerprint(teacher_path),
              "seed": task_cfg.seed, "test_users": task_cfg.test_users, "title_match": catalogue.rule,
              "bootstrap_resamples": resamples, **asdict(settings), **({"tasks": sorted(tasks)} if tasks else {})}
    shared.pop("batch_size")  # does not change greedy answers
    per_list: dict[str, list] = {mode: [] for mode in ("none", *constrain)}  # (label, answer_metrics) in run order
    for run in runs:
        model = None
        for mode in ("none", *(constrain if run.constrain else ())):  # the paper's unconstrained row, then each constrained one beside it
            label = run.label if mode == "none" else constrained_label(run.label, mode)
            run_dir = out_dir / "runs" / run_slug(label)
            result_file = run_dir / "metrics.json"
            wanted = shared | {"model": _fingerprint(run.model), "loras": [_fingerprint(p) for p in run.loras],
                               "tokenizer": run.tokenizer} | ({} if mode == "none" else {"constrain": mode})
            saved = None if force else saved_answers(run_dir, wanted, eval_set)
            if saved is not None:
                print(f"{label}: the answers in {run_dir} were made with these settings; scoring them again",
                      file=sys.stderr)
                answers, seconds = saved
            else:
                model = model or load_chat_model(run.model, run.loras, run.tokenizer, name=run.label)
                start = time.perf_counter()
                rules = None if mode == "none" else Constrain(mode, tuple(titles), dataset.category_matrix)
                answers = generate_answers(model, eval_set, settings, progress=progress, constrain=rules)
                seconds = time.perf_counter() - start
                print(f"{label}: {sum(len(a) for a in answers.values())} answers in {seconds:.0f} s", file=sys.stderr)
                run_dir.mkdir(parents=True, exist_ok=True)
                with open(run_dir / "answers.jsonl", "w", encoding="utf-8") as f:
                    for record in answer_records(eval_set, answers, catalogue):
                        f.write(json.dumps(record, ensure_ascii=False) + "\n")
            values = answer_metrics(eval_set, answers, dataset.category_matrix, catalogue, teacher)
            per_list[mode].append((label, values))
            metrics = estimates(values, bootstrap)
            result_file.write_text(json.dumps({"model": label, "settings": wanted, "generation_seconds": seconds,
                                               "metrics": metrics}, indent=1) + "\n")
            rows.append((label, metrics))
        del model
    differences = [(f"{label} − {before}", paired_differences(this, that, bootstrap))
                   for decoded in per_list.values() for (before, that), (label, this) in zip(decoded, decoded[1:])]
    write_tables(rows, out_dir, title_match=catalogue.rule, differences=differences)
    return rows
