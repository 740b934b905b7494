"""The one owner of chat conventions: tokenizer, chat template, pad and stop ids, encoding and decoding.

    policy = ChatPolicy.load("smollm2-135m")                 # or ChatPolicy.of(tokenizer)
    ids = policy.prompt_ids([("user", "Recommend 10 films")], max_tokens=512)
    texts = policy.answer(params, model_cfg, [ids, ...], max_new_tokens=256, batch_size=16)

SFT batches, SFT validation, evaluation, `recommend` and the PPO rollouts all render, pad, stop and decode
through one `ChatPolicy`, so one sampled token sequence becomes the same text (and so the same parsed list)
wherever it is scored. The conventions:
- the chat wrapping (Llama-2 `[INST]`, ChatML, ...) comes only from `tokenizer.apply_chat_template`: a prompt
  is the conversation with the generation prompt added; a response is what the full conversation adds after
  it, up to and including the first stop token;
- stop ids: EOS and the template's end-of-turn token (`tokenizer.stop_token_ids`);
- pad id: the tokenizer's pad token, else EOS (padding is masked everywhere, its value never matters for the
  outputs, but one choice keeps batches comparable byte for byte);
- decoding drops special tokens and leaves spaces exactly as sampled (no clean-up: the reward placement maps
  characters back to tokens, which a clean-up that deletes spaces would break).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reclm_jax.llm import sampling
from reclm_jax.llm.config import LlamaConfig, LoraConfig
from reclm_jax.llm.tokenizer import load_tokenizer, stop_token_ids

Messages = Sequence[tuple[str, str]]  # (role, text) turns


@dataclass(frozen=True)
class ChatPolicy:
    tokenizer: Any
    stop_ids: tuple[int, ...]
    pad_id: int

    @classmethod
    def of(cls, tokenizer: Any) -> ChatPolicy:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(tokenizer, tuple(stop_token_ids(tokenizer)), pad)

    @classmethod
    def load(cls, name_or_path: str | Path) -> ChatPolicy:
        """From a named tokenizer, a .gguf file or an HF tokenizer directory (`tokenizer.load_tokenizer`)."""
        return cls.of(load_tokenizer(name_or_path))

    def __len__(self) -> int:
        return len(self.tokenizer)

    # ---- text <-> ids
    def render(self, messages: Messages, add_generation_prompt: bool) -> str:
        chat = [{"role": role, "content": text} for role, text in messages]
        return self.tokenizer.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=False)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Rendered texts -> ids, batched (the Rust tokenizer encodes a batch in parallel); what
        `apply_chat_template(tokenize=True)` does with its rendered text."""
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def prompt_ids(self, messages: Messages, max_tokens: int) -> list[int]:
        """The prompt as the model sees it before answering, cut from the left to `max_tokens`."""
        return self.encode([self.render(messages, True)])[0][-max_tokens:]

    def conversation_ids(self, conversations: Sequence[tuple[Messages, str]]) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, response ids) per (messages, answer): the response is what the rendered full
        conversation adds after the prompt, up to and including its first stop token (EOS appended if the
        template adds none)."""
        prompts = self.encode([self.render(m, True) for m, _ in conversations])
        fulls = self.encode([self.render(tuple(m) + (("assistant", a),), False) for m, a in conversations])
        stops = frozenset(self.stop_ids)
        out = []
        for prompt, full in zip(prompts, fulls):
            if full[: len(prompt)] != prompt:
                raise ValueError("the tokenizer's chat template does not extend the generation prompt with the "
                                 "answer; cannot locate the response tokens")
            response = full[len(prompt):]
            ends = [j for j, t in enumerate(response) if t in stops]
            out.append((prompt, response[: ends[0] + 1] if ends else response + [self.tokenizer.eos_token_id]))
        return out

    # ---- answers
    def answer(self, params: Any, model_cfg: LlamaConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               batch_size: int, lora: Any = None, lora_cfg: LoraConfig | None = None, on_batch=None,
               constraint=None) -> list[str]:
        """Greedy answers to prompt ids, in order: decoded in batches of similar prompt lengths (fewer padded
        positions and compiled shapes); `on_batch(n)` is called after each batch of n answers (progress).
        `constraint`: an `llm.constrain.RowConstraints` with one row per prompt (constrained decoding)."""
        order = np.argsort([len(p) for p in prompts], kind="stable")
        texts = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            extra = {} if constraint is None else {"constraint": constraint.select(rows)}
            result = sampling.generate(params, model_cfg, [prompts[i] for i in rows], max_new_tokens=max_new_tokens,
                                       eos_ids=self.stop_ids, pad_id=self.pad_id, lora=lora, lora_cfg=lora_cfg,
                                       **extra)
            for row, tokens, length in zip(rows, result.tokens, result.lengths):
                texts[row] = self.decode(tokens[:length].tolist())
            if on_batch is not None:
                on_batch(len(rows))
        return texts
