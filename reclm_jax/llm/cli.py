"""`reclm-jax model fetch|info` and `reclm-jax export`: base models, tokenizers, merged-HF and PEFT export."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reclm_jax.core.errors import UserError
from reclm_jax.data.cli import dataset_from_args
from reclm_jax.llm import hf_io, tokenizer
from reclm_jax.llm.automaton import catalogue_automaton, save_automaton
from reclm_jax.llm.chat import ChatPolicy
from reclm_jax.llm.config import PRESETS
from reclm_jax.llm.grammar import catalogue_grammar
from reclm_jax.tasks.config import TaskConfig
from reclm_jax.tasks.encode import display_titles


def fetch(args: argparse.Namespace) -> int:
    known = sorted({*hf_io.EMBEDDED_MODELS, *tokenizer.NAMED})
    if args.name not in known:
        raise UserError(f"unknown model {args.name!r}; embedded models and tokenizers: {', '.join(known)}")
    if args.name in hf_io.EMBEDDED_MODELS:
        print(f"weights: {hf_io.resolve_model_path(args.name)}")
    if args.name in tokenizer.NAMED:
        tok = tokenizer.load_tokenizer(args.name)
        print(f"tokenizer: {tokenizer.cached_path(args.name)} ({len(tok)} tokens)")
    return 0


def info(args: argparse.Namespace) -> int:
    if args.model in PRESETS and args.model not in hf_io.EMBEDDED_MODELS:
        cfg, source = PRESETS[args.model], "preset (no weights)"
    else:
        try:
            path = hf_io.resolve_model_path(args.model)
            cfg, source = hf_io.read_model_config(path), str(path)
        except hf_io.FormatError as e:
            raise UserError(str(e)) from None
    print(f"model: {args.model}\nsource: {source}\nparameters: {cfg.num_params:,}")
    print(json.dumps(cfg.to_hf(), indent=2))
    return 0


def export(args: argparse.Namespace) -> int:
    if args.kind == "grammar":
        return _export_grammar(args)
    if args.kind == "peft" and not args.lora:
        raise UserError("export --peft writes an adapter: give it with --lora")
    try:
        if args.kind == "peft":
            cfg = hf_io.read_model_config(args.model)
            lora_cfg, adapter = hf_io.load_peft_dir(_adapter_dir(args.lora), cfg)
            out = hf_io.save_peft_dir(args.out, adapter, cfg, lora_cfg, base_model_name_or_path=str(args.model))
        else:
            cfg, params = hf_io.load_merged(args.model, [_adapter_dir(args.lora)] if args.lora else [])
            tok = _tokenizer(args.tokenizer, args.model)
            out = hf_io.save_hf_dir(args.out, params, cfg, tokenizer=tok, dtype=args.dtype)
    except (hf_io.FormatError, ValueError) as e:
        raise UserError(str(e)) from None
    print(f"wrote {args.kind} export to {out}")
    return 0


def _export_grammar(args: argparse.Namespace) -> int:
    """grammar.ebnf and catalogue.npz for the dataset's titles as the tokenizer shows them (`display_titles`)."""
    if args.k < 1:
        raise UserError(f"-k must be >= 1, got {args.k}")
    tok = _tokenizer(args.tokenizer, args.model)
    if tok is None:
        raise UserError(f"--model {args.model} has no tokenizer: give --tokenizer")
    dataset = dataset_from_args(args)
    titles = display_titles(dataset.titles, ChatPolicy.of(tok), TaskConfig.max_title_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grammar.ebnf").write_text(catalogue_grammar(titles, args.k), encoding="utf-8")
    automaton = catalogue_automaton(titles, tok)
    save_automaton(automaton, out / "catalogue.npz", max(args.k, 20), dataset.categories, dataset.category_matrix)
    dropped = "".join(f"; left out ({reason}): {len(ids)}" for reason, ids in automaton.dropped.items())
    print(f"wrote {out}/grammar.ebnf ({args.k} lines over {len(titles)} titles) and {out}/catalogue.npz "
          f"({len(automaton.items)} titles{dropped})")
    return 0


def _adapter_dir(path: str) -> Path:
    """A PEFT directory, or its adapter_model.safetensors file."""
    p = Path(path).expanduser()
    return p.parent if p.is_file() else p


def _tokenizer(name: str | None, model: str):
    """The tokenizer asked for, else the model's own: a named tokenizer, its GGUF, or its HF directory."""
    if name is not None:
        return tokenizer.load_tokenizer(name)
    if model in tokenizer.NAMED:
        return tokenizer.load_tokenizer(model)
    path = hf_io.resolve_model_path(model)
    if path.suffix == ".gguf" or (path / "tokenizer_config.json").is_file():
        return tokenizer.load_tokenizer(path)
    return None
