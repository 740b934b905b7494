"""Samples -> token ids through the `ChatPolicy` (its chat template and stop ids), and titles cut to a budget."""

from __future__ import annotations

import numpy as np

from reclm_jax.llm.chat import ChatPolicy
from reclm_jax.tasks.samples import Sample


def display_titles(titles: list[str], policy: ChatPolicy, max_tokens: int) -> list[str]:
    """Titles as prompts and responses show them: cut to `max_tokens` tokens (the paper: 64). A cut that
    makes two titles equal gets a " (n)" suffix, so that a title still names exactly one item."""
    out, seen = [], set()
    for title in titles:
        ids = policy.tokenizer.encode(title, add_special_tokens=False)
        if len(ids) > max_tokens:
            title = policy.decode(ids[:max_tokens]).strip()
        base, n = title, 2
        while title in seen:
            title, n = f"{base} ({n})", n + 1
        seen.add(title)
        out.append(title)
    return out


def encode_samples(samples: list[Sample], policy: ChatPolicy, max_length: int,
                   max_response_tokens: int) -> list[dict[str, np.ndarray]]:
    """Per sample {"tokens": int32 [n], "loss_mask": bool [n]} with n <= max_length; loss_mask marks the
    response tokens (the answer and its stop token). The response is cut to max_response_tokens, then the
    prompt from the left to fit max_length (the paper and the reference truncate prompts on the left)."""
    out = []
    for prompt, response in policy.conversation_ids([(s.messages, s.response) for s in samples]):
        prompt, response = _fit(prompt, response, max_length, max_response_tokens)
        tokens = np.asarray(prompt + response, np.int32)
        mask = np.zeros(len(tokens), bool)
        mask[len(prompt):] = True
        out.append({"tokens": tokens, "loss_mask": mask})
    return out


def cut_shares(samples: list[Sample], policy: ChatPolicy, max_length: int,
               max_response_tokens: int) -> tuple[float, float]:
    """The shares of `samples` that `encode_samples` cuts: (responses longer than max_response_tokens, whose end
    and stop token are then never learnt; prompt + response longer than max_length, whose prompt loses its
    oldest tokens)."""
    pairs = policy.conversation_ids([(s.messages, s.response) for s in samples])
    fitted = [_fit(p, r, max_length, max_response_tokens) for p, r in pairs]
    long_response = sum(len(fr) < len(r) for (_, r), (_, fr) in zip(pairs, fitted))
    too_long = sum(len(fp) < len(p) for (p, _), (fp, _) in zip(pairs, fitted))
    return long_response / max(len(pairs), 1), too_long / max(len(pairs), 1)


def _fit(prompt: list[int], response: list[int], max_length: int,
         max_response_tokens: int) -> tuple[list[int], list[int]]:
    """The response cut to max_response_tokens, then the prompt from the left to fit max_length."""
    response = response[:max_response_tokens]
    return prompt[len(prompt) - min(len(prompt), max_length - len(response)):], response
