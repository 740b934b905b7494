"""`reclm-jax evaluate`, `reclm-jax recommend` and `reclm-jax plot`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rapidfuzz import process

from reclm_jax.cli import BASE_ROW
from reclm_jax.core.errors import UserError
from reclm_jax.data.cli import dataset_from_args
from reclm_jax.eval import evaluate as E
from reclm_jax.eval.evaluate import TEACHER_ROW, GenerationSettings, ModelRun, run_evaluation
from reclm_jax.eval.parse import Catalogue
from reclm_jax.eval.plots import LogError, plot_logs
from reclm_jax.eval.recommend import IntentError, IntentSpec, fit_history, instruction
from reclm_jax.llm.automaton import Intent, catalogue_automaton
from reclm_jax.llm.hf_io import FormatError
from reclm_jax.llm.sampling import generate
from reclm_jax.tasks.config import TaskConfig
from reclm_jax.tasks.encode import display_titles
from reclm_jax.tasks.evaluation import check_tasks
from reclm_jax.tasks.samples import Sample
from reclm_jax.tasks.templates import load_templates
from reclm_jax.teacher.query import Teacher


# ---- evaluate ------------------------------------------------------------------------------------------
def _adapters(arg: str | None) -> tuple[str, ...]:
    """--lora's comma-separated adapter directories."""
    stack = tuple(p.strip() for p in (arg or "").split(",") if p.strip())
    if arg is not None and not stack:
        raise UserError(f"--lora {arg!r} names no adapter directory")
    return stack


def model_runs(args) -> list:
    """The table rows to evaluate: --model zero-shot (unless --no-base), then one per --lora."""
    if args.name and len(args.name) != len(args.lora):
        raise UserError(f"--name was given {len(args.name)} times for {len(args.lora)} --lora; give one per --lora")
    runs = [] if args.no_base else [
        ModelRun(args.base_name or BASE_ROW.format(model=Path(args.model).name), args.model, (), args.tokenizer)]
    stacks = [_adapters(arg) for arg in args.lora]
    names = args.name or [Path(stack[-1]).name for stack in stacks]
    runs += [ModelRun(name, args.model, stack, args.tokenizer) for name, stack in zip(names, stacks)]
    if not runs:
        raise UserError("nothing to evaluate: --no-base without any --lora")
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels) or TEACHER_ROW in labels:
        raise UserError(f"row labels (--base-name, --name) must be unique and not {TEACHER_ROW!r}, got {labels}")
    return runs


def evaluate(args) -> int:
    runs = model_runs(args)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    if args.bootstrap < 1:
        raise UserError(f"--bootstrap must be >= 1, got {args.bootstrap}")
    tasks = tuple(t.strip() for t in (args.tasks or "").split(",") if t.strip())
    try:
        check_tasks(tasks)
    except ValueError as e:
        raise UserError(f"--tasks: {e}") from None
    try:
        # Test tasks only: no SL data is built, so the ShareGPT mix (I4) plays no part.
        task_cfg = TaskConfig(seed=args.seed, test_users=args.limit, sharegpt_ratio=0.0, max_history=args.max_history)
        if args.max_new_tokens >= task_cfg.max_length:
            raise ValueError(f"--max-new-tokens must be below the prompt + answer budget of {task_cfg.max_length}")
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                      max_prompt_tokens=task_cfg.max_length - args.max_new_tokens)
    except ValueError as e:
        raise UserError(str(e)) from None
    dataset = dataset_from_args(args)
    try:
        teacher = Teacher.load(args.teacher)
    except FileNotFoundError as e:
        raise UserError(f"--teacher: {e}") from None
    if teacher.num_items != dataset.num_items:
        raise UserError(f"--teacher has {teacher.num_items} items, dataset {dataset.name} {dataset.num_items}")
    out = Path(args.out)
    try:
        run_evaluation(dataset, teacher, runs, out, task_cfg=task_cfg, settings=settings,
                       title_match=args.title_match, fuzzy=args.fuzzy, resamples=args.bootstrap, force=args.force,
                       teacher_path=args.teacher,
                       constrain=tuple(dict.fromkeys(m for m in args.constrain if m != "none")), tasks=tasks)
    except FormatError as e:
        raise UserError(str(e)) from None
    print((out / "tables.md").read_text(encoding="utf-8"))
    print(f"tables: {out}/tables.md, tables.json, table*.csv, table*.png; answers and metrics per model: {out}/runs/")
    return 0


# ---- recommend -----------------------------------------------------------------------------------------
def history_items(titles: list[str], catalogue) -> list[int]:
    """Catalogue item ids of the given titles; a title that names no item is an error listing close ones."""
    ids = []
    for title in titles:
        item, _ = catalogue.lookup(title)
        if item < 0:
            near = process.extract(title, catalogue.titles, limit=3)
            hint = "; close titles: " + ", ".join(repr(t) for t, _, _ in near) if near else ""
            raise UserError(f"--history: {title!r} is not in the catalogue{hint}")
        ids.append(item)
    return ids


def recommendation_lines(items, item_categories, history: set[int], truncated: bool = False) -> list[str]:
    """One line per parsed item: its title, then its categories, or a mark when the title names no item of
    the catalogue (or, for the last one, was cut by the token budget); history items and repeats are marked."""
    lines, seen = [], set()
    for n, it in enumerate(items, 1):
        if truncated and n == len(items):
            note = "[truncated by --max-new-tokens]"
        elif it.item_id < 0:
            note = "[not in the catalogue]"
        else:
            note = "[" + ", ".join(item_categories[it.item_id]) + "]"
            if it.item_id in history:
                note += " (already in the history)"
            elif it.item_id in seen:
                note += " (repeated)"
            seen.add(it.item_id)
        lines.append(f"{n:>2}. {it.title}  {note}")
    return lines


def recommend(args) -> int:
    for name in ("k", "max_prompt_tokens", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    dataset = dataset_from_args(args)
    if args.k > dataset.num_items - len(args.history):
        raise UserError(f"-k {args.k}: the catalogue of {dataset.name} has {dataset.num_items} items, "
                        f"{dataset.num_items - len(args.history)} outside the history")
    templates = load_templates()
    try:
        spec = IntentSpec.from_options(dataset.categories, templates, args.include, args.exclude, args.share,
                                       args.intent)
    except IntentError as e:
        raise UserError(str(e)) from None
    try:
        model = E.load_chat_model(args.model, _adapters(args.lora), args.tokenizer)
    except (FormatError, ValueError) as e:
        raise UserError(f"--model/--lora: {e}") from None
    budget = model.cfg.max_position_embeddings
    if args.max_prompt_tokens + args.max_new_tokens > budget:
        raise UserError(f"--max-prompt-tokens {args.max_prompt_tokens} + --max-new-tokens {args.max_new_tokens} "
                        f"exceeds the model's context of {budget} tokens")
    titles = display_titles(dataset.titles, model.policy, TaskConfig.max_title_tokens)
    catalogue = Catalogue(titles, args.title_match, fuzzy=args.fuzzy)
    # The history is typed by a person, not judged: match it leniently (an unknown title is still an error).
    history = history_items(args.history, Catalogue(titles, "lenient", fuzzy=args.fuzzy))
    intent_text = spec.text(templates)

    def prompt_for(items: list[int]) -> str:
        return instruction(templates, [titles[i] for i in items], args.k, intent_text, spec.proportion_only)

    def tokens_for(items: list[int]) -> list[int]:
        return model.policy.prompt_ids(Sample("recommend", (("user", prompt_for(items)),)).messages, 1 << 30)

    try:
        kept, dropped = fit_history(tokens_for, history, args.max_prompt_tokens)
    except IntentError as e:
        raise UserError(str(e)) from None
    notes = []
    if dropped:
        notes.append(f"the prompt budget of {args.max_prompt_tokens} tokens left out the {len(dropped)} oldest "
                     f"history items: " + ", ".join(repr(titles[i]) for i in dropped))
    if spec.free_text:
        notes.append("--intent is not in the templates' phrasings: it is shown to the model but not enforced "
                     "(use --include/--exclude/--share to enforce it)")
    constraint = None
    if args.constrain != "none":
        automaton = catalogue_automaton(titles, model.policy.tokenizer)
        rule = spec.constraint() if args.constrain == "intent" else Intent()
        constraint = automaton.rows([args.k], [history], [rule], dataset.category_matrix)
        shortfall = constraint.shortfall(0)
        if shortfall:
            notes.append(f"fewer than {args.k} items can be listed: {shortfall}")
    result = generate(model.params, model.cfg, [tokens_for(kept)], max_new_tokens=args.max_new_tokens,
                      eos_ids=model.policy.stop_ids, pad_id=model.policy.pad_id, constraint=constraint)
    length = int(result.lengths[0])
    tokens = result.tokens[0, :length].tolist()
    truncated = not tokens or tokens[-1] not in set(model.policy.stop_ids) | (
        {constraint.automaton.final[-1]} if constraint else set())
    answer = model.policy.decode(tokens)
    if truncated:
        notes.append(f"the answer reached --max-new-tokens {args.max_new_tokens} before it ended")
    if args.show_prompt:
        print(f"--- prompt\n{prompt_for(kept)}\n--- answer\n{answer}\n---",
              file=sys.stderr if args.json else sys.stdout)
    items = catalogue.parse(answer)
    if args.json:
        listed = [{"title": it.title, "id": dataset.item_names[it.item_id] if it.item_id >= 0 else None,
                   "categories": list(dataset.item_categories[it.item_id]) if it.item_id >= 0 else []}
                  for it in items]
        if truncated and listed:
            listed[-1]["truncated"] = True
        print(json.dumps({"items": listed, "constrain": args.constrain, "notes": notes}, ensure_ascii=False))
        return 0 if items else 1
    for note in notes:
        print(f"note: {note}")
    if not items:
        print(f"no list in the answer: {answer!r}")
        return 1
    print("\n".join(recommendation_lines(items, dataset.item_categories, set(history), truncated)))
    return 0


# ---- plot ----------------------------------------------------------------------------------------------
def plot(args) -> int:
    try:
        for path in plot_logs(args.log, args.out):
            print(path)
    except LogError as e:
        raise UserError(str(e)) from None
    return 0
