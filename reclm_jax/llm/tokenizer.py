"""Tokenizers with chat templates, as transformers tokenizer objects (encode / decode / apply_chat_template /
save_pretrained / eos_token_id).

    load_tokenizer("smollm2-135m")   # SmolLM2's byte-level BPE + ChatML template, built from its GGUF
    load_tokenizer("llama2")         # Llama-2's 32k SentencePiece + [INST] template, from llama.cpp's vocab GGUF
    load_tokenizer(path)             # a Hugging Face tokenizer directory, or a .gguf file

Byte-level BPE vocabularies are converted by transformers (`gguf_file=`). Llama SentencePiece vocabularies are
built here as a `tokenizers` BPE whose merges reproduce SentencePiece's segmentation: transformers 5.x's own
conversion drops the leading-space piece of inputs that start with a space (the tests compare with llama.cpp's
reference encodings and with `sentencepiece` itself). Built tokenizers are saved under the cache directory, so
later loads are fast; `save_pretrained` writes a tokenizer.json that transformers and vLLM load as is.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from transformers import AutoTokenizer
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from reclm_jax import assets
from reclm_jax.core.errors import FormatError

# Llama-2-chat's prompt format: "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s>" per turn.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Llama-2 chat roles must alternate user/assistant after an optional system message') }}"
    "{% endif %}"
    "{% if m['role'] == 'user' %}"
    "{% set text = m['content'] | trim %}"
    "{% if loop.first and system is not none %}"
    "{% set text = '<<SYS>>\\n' + (system | trim) + '\\n<</SYS>>\\n\\n' + text %}{% endif %}"
    "{{ bos_token + '[INST] ' + text + ' [/INST]' }}"
    "{% else %}{{ ' ' + (m['content'] | trim) + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Named tokenizers: name -> (asset, file inside it).
NAMED = {
    "smollm2-135m": ("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "llama2": ("llama-spm-vocab", "ggml-vocab-llama-spm.gguf"),
}
_BUILD_VERSION = 1  # bump when the way a named tokenizer is built changes
# Chat turn terminators that end generation besides the tokenizer's eos token.
_END_OF_TURN = ("<|im_end|>",)


def load_tokenizer(name_or_path: str | Path) -> Any:
    """A transformers tokenizer for a named tokenizer (see NAMED), a .gguf file or an HF tokenizer directory."""
    name = str(name_or_path)
    if name in NAMED:
        cached = cached_path(name)
        if not (cached / "tokenizer_config.json").is_file():
            asset, file = NAMED[name]
            _save_atomic(tokenizer_from_gguf(assets.fetch(asset) / file), cached)
        return AutoTokenizer.from_pretrained(cached)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return tokenizer_from_gguf(path)
    if path.is_dir() and (path / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(path)
    raise FormatError(f"tokenizer {name!r} is not one of {sorted(NAMED)}, a .gguf file, or a directory with "
                      "tokenizer_config.json")


def cached_path(name: str) -> Path:
    """Where the named tokenizer is saved once built (versioned: a change in how it is built makes a new one)."""
    return assets.cache_dir() / "tokenizers" / f"{name}-v{_BUILD_VERSION}"


def tokenizer_from_gguf(path: str | Path) -> Any:
    """Build the tokenizer stored in a GGUF file's metadata (SentencePiece 'llama' or byte-level BPE 'gpt2')."""
    path = Path(path)
    reader = gguf.GGUFReader(path)
    field = reader.fields.get("tokenizer.ggml.model")
    kind = field.contents() if field is not None else None
    if kind == "llama":
        return _sentencepiece_bpe_tokenizer(reader)
    if kind == "gpt2":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    raise FormatError(f"{path}: tokenizer model {kind!r} is not supported ('llama' SentencePiece or 'gpt2' BPE)")


def _sentencepiece_bpe_tokenizer(reader: Any) -> Any:
    """A fast tokenizer that segments exactly as SentencePiece BPE does for a Llama vocabulary in a GGUF.

    SentencePiece BPE repeatedly merges the adjacent pair whose merged piece has the highest score; a fast BPE
    applies merges by rank, so the merges are every split of a normal piece into two pieces, ranked by the
    piece's score. Whitespace-only pieces score -1e9, so " Hello" is "▁" + "▁Hello", not "▁▁" + "Hello"
    (transformers' own conversion gets such cases wrong). The normalizer is Llama's: a dummy-prefix space
    before each text segment and spaces as "▁"; characters outside the vocabulary fall back to bytes.
    """
    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        if f is None and default is None:
            raise FormatError(f"GGUF metadata lacks {key}")
        return default if f is None else f.contents()

    pieces, scores = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.scores")
    kinds = field("tokenizer.ggml.token_type")  # SentencePiece numbering: 1 normal, 2 unknown, 3 control, 6 byte
    vocab = {piece: i for i, piece in enumerate(pieces)}
    ranked = sorted(
        (-scores[i], i, vocab[piece[:k]], vocab[piece[k:]])
        for i, piece in enumerate(pieces) if kinds[i] == 1
        for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab
    )
    merges = [(pieces[a], pieces[b]) for _, _, a, b in ranked]
    unk, bos, eos = (pieces[field(f"tokenizer.ggml.{k}_token_id", d)] for k, d in (("unknown", 0), ("bos", 1),
                                                                                   ("eos", 2)))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = [normalizers.Prepend("▁")] if field("tokenizer.ggml.add_space_prefix", True) else []
    tok.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     *([decoders.Strip(" ", 1, 0)] if prefix else [])])
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False)
                            for i in range(len(pieces)) if kinds[i] == 3])
    if field("tokenizer.ggml.add_bos_token", True):
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab[bos])])
    return TokenizersBackend(tokenizer_object=tok, unk_token=unk, bos_token=bos, eos_token=eos,
                             chat_template=LLAMA2_CHAT_TEMPLATE)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a generated answer: the eos token and the chat end-of-turn token, if any."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in _END_OF_TURN if t in vocab and vocab[t] not in ids]
    return ids


def _save_atomic(tokenizer: Any, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    tokenizer.save_pretrained(tmp)
    if not (dest / "tokenizer_config.json").is_file():
        shutil.rmtree(dest, ignore_errors=True)  # an incomplete one
    try:
        tmp.replace(dest)
    except OSError:  # another process (a parallel test worker, a second run) saved it first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
