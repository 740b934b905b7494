"""Samples -> token ids with the tokenizer's own chat template, and titles cut to a token budget.

The chat wrapping (Llama-2 `[INST]`, ChatML, ...) comes only from `tokenizer.apply_chat_template`: the
prompt is the conversation with the generation prompt added, the response is what the full conversation
(with the assistant's answer) adds after it, up to and including the first stop token (EOS or the
template's end-of-turn token, e.g. ChatML's <|im_end|>).
"""

from __future__ import annotations

import numpy as np

from reclm_jax.llm.tokenizer import stop_token_ids
from reclm_jax.tasks.config import TaskConfig
from reclm_jax.tasks.samples import Sample, TaskContext


def display_titles(titles: list[str], tokenizer, max_tokens: int) -> list[str]:
    """Titles as prompts and responses show them: cut to `max_tokens` tokens (the paper: 64). A cut that
    makes two titles equal gets a " (n)" suffix, so that a title still names exactly one item."""
    out, seen = [], set()
    for title in titles:
        ids = tokenizer.encode(title, add_special_tokens=False)
        if len(ids) > max_tokens:
            title = tokenizer.decode(ids[:max_tokens]).strip()
        base, n = title, 2
        while title in seen:
            title, n = f"{base} ({n})", n + 1
        seen.add(title)
        out.append(title)
    return out


def task_context(dataset, teacher, cfg: TaskConfig, tokenizer) -> TaskContext:
    """The context every stage should build its samples with: titles cut to cfg.max_title_tokens of this
    tokenizer (the same titles the parser must match the model's answers against)."""
    return TaskContext(dataset, teacher, cfg, titles=display_titles(dataset.titles, tokenizer, cfg.max_title_tokens))


def _chat(messages) -> list[dict[str, str]]:
    return [{"role": role, "content": text} for role, text in messages]


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(_chat(messages), add_generation_prompt=add_generation_prompt,
                                         tokenize=False)


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    # What apply_chat_template(tokenize=True) does with its rendered text, batched: the Rust tokenizer
    # then encodes the whole batch in parallel.
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def prompt_ids(sample: Sample, tokenizer, max_prompt_tokens: int) -> list[int]:
    """The prompt as the model sees it before answering, cut from the left to max_prompt_tokens."""
    return _tokenize(tokenizer, [_render(tokenizer, sample.messages, True)])[0][-max_prompt_tokens:]


def encode_samples(samples: list[Sample], tokenizer, max_length: int, max_response_tokens: int,
                   stop_ids: frozenset[int] | None = None) -> list[dict[str, np.ndarray]]:
    """Per sample {"tokens": int32 [n], "loss_mask": bool [n]} with n <= max_length; loss_mask marks the
    response tokens (the answer and its stop token). The response is cut to max_response_tokens, then the
    prompt from the left to fit max_length (the paper and the reference truncate prompts on the left).
    `stop_ids`: the tokenizer's stop tokens, when the caller has them already (the lookup reads the
    vocabulary)."""
    stop_ids = stop_ids if stop_ids is not None else frozenset(stop_token_ids(tokenizer))
    prompts = _tokenize(tokenizer, [_render(tokenizer, s.messages, True) for s in samples])
    fulls = _tokenize(tokenizer, [_render(tokenizer, s.messages + (("assistant", s.response),), False)
                                  for s in samples])
    out = []
    for prompt, full in zip(prompts, fulls):
        if full[: len(prompt)] != prompt:
            raise ValueError("the tokenizer's chat template does not extend the generation prompt with the "
                             "answer; cannot locate the response tokens")
        response = full[len(prompt):]
        ends = [j for j, t in enumerate(response) if t in stop_ids]
        response = response[: ends[0] + 1] if ends else response + [tokenizer.eos_token_id]
        response = response[:max_response_tokens]
        prompt = prompt[len(prompt) - min(len(prompt), max_length - len(response)):]
        tokens = np.asarray(prompt + response, np.int32)
        mask = np.zeros(len(tokens), bool)
        mask[len(prompt):] = True
        out.append({"tokens": tokens, "loss_mask": mask})
    return out


def encode_sample(sample: Sample, tokenizer, max_length: int, max_response_tokens: int) -> dict[str, np.ndarray]:
    """`encode_samples` for one sample."""
    return encode_samples([sample], tokenizer, max_length, max_response_tokens)[0]
