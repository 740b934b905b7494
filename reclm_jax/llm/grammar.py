"""The catalogue's answer format as an EBNF grammar for vLLM's structured outputs (xgrammar backend).

    root  ::= "1. " title "\n" "2. " title ... "k. " title
    title ::= "Toy Story (1995)" | "GoldenEye (1995)" | ...

A grammar keeps every line a catalogue title but cannot forbid repeats, history items or an intent: serve
with `llm.vllm_processor` for those (the same automaton as our sampler).
"""

from __future__ import annotations

from collections.abc import Sequence


def _literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def catalogue_grammar(titles: Sequence[str], k: int) -> str:
    """EBNF for exactly k numbered lines, each one of `titles` (empty titles and line breaks left out)."""
    if k < 1:
        raise ValueError(f"catalogue_grammar: k must be >= 1, got {k}")
    usable = sorted({t for t in titles if t.strip() and "\n" not in t and "\r" not in t})
    if not usable:
        raise ValueError("catalogue_grammar: no usable title")
    lines = ' "\\n" '.join(f'"{i}. " title' for i in range(1, k + 1))
    return f"root ::= {lines}\ntitle ::= " + "\n    | ".join(_literal(t) for t in usable) + "\n"
